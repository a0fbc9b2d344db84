import sys, threading
def main():
    n = int(input())
    def f(k):
        return 0 if k == 0 else 1 + f(k - 1)
    print(f(n))
threading.stack_size(2**27)
sys.setrecursionlimit(10**6)
t = threading.Thread(target=main)
t.start()
t.join()
