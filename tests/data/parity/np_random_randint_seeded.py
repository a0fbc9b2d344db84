import numpy as np
np.random.seed(0)
small = np.random.randint(0, 10, size=5)
wide = np.random.randint(-2**40, 2**40, size=3)
one = np.random.randint(5)
print(small.dtype, small.tolist(), wide.tolist(), type(one).__name__, one)
