x = 10 ** 5000
try:
    s = str(x)
except ValueError as e:
    print('limited')
import sys
sys.set_int_max_str_digits(0)
print(len(str(x)))
