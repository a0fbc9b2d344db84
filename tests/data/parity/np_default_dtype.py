import numpy as np
print(np.array([1, 2, 3]).dtype, np.arange(3).dtype)
