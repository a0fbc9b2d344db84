import numpy as np
print((np.arange(100000) * np.arange(100000)).sum())
