import numpy as np
a = np.array([2.5, 3.5]).astype(np.int64)
print(a.dtype, a.cumsum(dtype=np.int64).tolist(), np.arange(5, dtype=np.int64).sum())
