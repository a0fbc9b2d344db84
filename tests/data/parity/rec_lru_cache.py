import sys
from functools import lru_cache
sys.setrecursionlimit(10**4)
@lru_cache(maxsize=None)
def fib(n):
    return n if n < 2 else fib(n - 1) + fib(n - 2)
print(fib(2000) % 10**9)
