import numpy as np
print(np.array([10**10]) * 3)
