import numpy as np
print(np.arange(100000).sum())
