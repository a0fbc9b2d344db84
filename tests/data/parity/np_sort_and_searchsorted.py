import numpy as np
a = np.array([5, 3, 9, 1])
print(np.sort(a), np.searchsorted(np.sort(a), 4), np.argsort(a))
