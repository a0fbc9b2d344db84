import numpy as np
print(np.sum(np.arange(100000, dtype=np.int32)))
