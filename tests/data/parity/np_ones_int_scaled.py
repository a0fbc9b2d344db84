import numpy as np
print((np.ones(5, int) * 2**40).sum())
