import numpy as np
print(np.add.reduce(np.arange(100000)))
