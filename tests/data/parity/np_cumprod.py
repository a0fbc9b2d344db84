import numpy as np
print(np.cumprod(np.arange(1, 21))[-1])
