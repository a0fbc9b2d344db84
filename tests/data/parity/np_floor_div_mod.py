import numpy as np
a = np.array([-7, 7, -8])
print(a // 2, a % 3)
