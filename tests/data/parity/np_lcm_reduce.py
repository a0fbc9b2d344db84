import numpy as np
print(np.lcm.reduce(np.arange(1, 30)))
