print(input() + '!')
