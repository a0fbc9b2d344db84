import math
print(math.isqrt(10**100 + 12345), math.comb(100, 50), math.gcd(2**64, 6**30))
