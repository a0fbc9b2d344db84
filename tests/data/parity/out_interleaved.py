import sys
print('a', flush=True)
print('b', file=sys.stderr)
print('c')
