import numpy as np
f = np.full(3, 7)
print(f.dtype, (f * 10**9).sum())
