import numpy as np
a = np.arange(12).reshape(3, 4) * 10**9
print(a.sum(axis=0), a.sum(axis=1))
