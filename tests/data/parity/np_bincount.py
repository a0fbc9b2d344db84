import numpy as np
c = np.bincount([1, 2, 2, 3, 3, 3])
print(c, c.sum(), c.argmax())
