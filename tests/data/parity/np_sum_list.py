import numpy as np
print(np.sum(list(range(100000))))
