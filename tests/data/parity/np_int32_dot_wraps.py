import numpy as np
a = np.arange(100000, dtype=np.int32)
print(np.dot(a, a))
