import numpy as np
v, c = np.unique([5, 1, 5, 2, 5], return_counts=True)
print(v, c, c.sum())
