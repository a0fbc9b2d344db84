print(undefined_name_here)
