import numpy as np
a = np.full(100000, 2**20, dtype=np.int32)
print(a.sum(), np.sum(a))
