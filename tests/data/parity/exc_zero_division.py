print('start')
print(1 / 0)
