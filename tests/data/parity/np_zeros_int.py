import numpy as np
z = np.zeros(3, dtype=int)
z[0] = 2**40
print(z.dtype, z[0])
