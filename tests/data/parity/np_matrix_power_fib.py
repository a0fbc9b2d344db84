import numpy as np
m = np.linalg.matrix_power(np.array([[1, 1], [1, 0]]), 50)
print(m[0, 1])
