from fractions import Fraction
from decimal import Decimal, getcontext
getcontext().prec = 40
print(Fraction(1, 3) + Fraction(1, 6), Decimal(1) / Decimal(7), Decimal('1.1') + Decimal('2.2'))
