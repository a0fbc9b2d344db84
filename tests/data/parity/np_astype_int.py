import numpy as np
print(np.array([1.5, 2.5]).astype(int).dtype)
