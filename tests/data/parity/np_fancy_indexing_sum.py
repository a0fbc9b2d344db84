import numpy as np
a = np.arange(10) * 10**9
print(a[[1, 5, 9]].sum())
