print('a')
exit(5)
