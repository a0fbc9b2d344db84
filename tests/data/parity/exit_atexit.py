import atexit
atexit.register(print, 'bye from atexit')
print('main')
