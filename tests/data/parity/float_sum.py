import math
xs = [0.1] * 10
print(sum(xs), math.fsum(xs), sum(i / 7 for i in range(1000)))
