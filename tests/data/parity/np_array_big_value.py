import numpy as np
a = np.array([2**31])
print(a.dtype, a[0], a[0] + 1)
