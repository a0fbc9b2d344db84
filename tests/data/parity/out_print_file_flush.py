import sys
for i in range(3):
    print(i, end=' ', flush=True)
print(file=sys.stdout)
