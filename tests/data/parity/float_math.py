import math
print(math.sqrt(2), math.pi, math.e, math.exp(1), math.log(10), math.sin(1), math.atan2(1, 2))
