import numpy as np
print(np.prod(np.arange(1, 21)))
