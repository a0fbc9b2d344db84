import numpy as np
print(np.random.randint(0, 10, size=3).dtype)
