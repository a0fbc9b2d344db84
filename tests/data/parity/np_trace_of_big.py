import numpy as np
a = np.arange(16).reshape(4, 4) * 10**9
print(np.trace(a), a.diagonal().sum())
