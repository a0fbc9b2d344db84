import numpy as np
print(np.dtype(np.int_))
