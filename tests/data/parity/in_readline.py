import sys
line = sys.stdin.readline()
print(repr(line))
print(repr(sys.stdin.readline()))
