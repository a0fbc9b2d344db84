import numpy as np
print(repr(np.arange(3)), repr(np.array([1, 2], dtype=np.int32)))
