import numpy as np
print(np.arange(100000, dtype=np.int32).cumsum()[-1])
