import sys
print('err', file=sys.stderr)
