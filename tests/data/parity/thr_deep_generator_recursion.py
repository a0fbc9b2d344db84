import sys, threading
def main():
    n = 20000
    children = [[] for _ in range(n)]
    for v in range(1, n):
        children[v - 1].append(v)
    def depth(v):
        return 1 + max((depth(c) for c in children[v]), default=0)
    print(depth(0))
threading.stack_size(2**27)
sys.setrecursionlimit(10**6)
threading.Thread(target=main).start()
