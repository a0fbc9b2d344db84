import numpy as np
print(np.cumsum(np.arange(100000))[-1])
