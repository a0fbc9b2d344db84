import sys
sys.setrecursionlimit(300000)
n = 100000
children = [[] for _ in range(n)]
for v in range(1, n):
    children[v - 1].append(v)
def depth(v):
    best = 0
    for c in children[v]:
        best = max(best, depth(c))
    return best + 1
print(depth(0))
