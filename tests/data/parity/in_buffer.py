import sys
raw = sys.stdin.buffer.read()
print(len(raw), raw.split())
