import numpy as np
a = np.array([3, 9, 2, 9])
print(a.argmax(), np.where(a == 9)[0], a.max())
