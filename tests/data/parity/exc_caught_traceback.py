import traceback
try:
    int('x')
except ValueError:
    traceback.print_exc()
print('after')
