import numpy as np
x = np.array([1])
for i in range(1, 21):
    x = x * i
print(x[0])
