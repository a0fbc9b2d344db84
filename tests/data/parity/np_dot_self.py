import numpy as np
a = np.arange(100000)
print(a.dot(a), np.dot(a, a))
