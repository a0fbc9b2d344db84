name = input('name? ')
print('hi', name)
