import numpy as np
a = np.array(range(100000))
print((a * a).sum())
