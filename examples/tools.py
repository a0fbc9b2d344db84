"""Example tools for the `tools` agent: `rollbox rollout --agent tools --tools-file examples/tools.py`.

rollbox reads each public function's signature and docstring to build its JSON schema (without
running this file on the host), and runs the functions inside each trajectory's sandboxed slot.
Names starting with `_` are helpers, not tools.
"""

from typing import Literal

_METRES_PER_UNIT = {"km": 1000.0, "m": 1.0, "cm": 0.01, "mi": 1609.344, "ft": 0.3048}


def convert_length(value: float, from_unit: Literal["km", "m", "cm", "mi", "ft"], to_unit: Literal["km", "m", "cm", "mi", "ft"] = "m") -> float:
    """Convert a length between metric and imperial units.

    Args:
        value: The length to convert.
        from_unit: The unit `value` is in.
        to_unit: The unit to convert to.
    """
    return value * _METRES_PER_UNIT[from_unit] / _METRES_PER_UNIT[to_unit]


def prime_factors(n: int) -> list[int]:
    """Factor an integer into primes, smallest first, repeated as often as they divide it.

    Args:
        n: The integer to factor, from 2 to 10**12.
    """
    if not isinstance(n, int) or not 2 <= n <= 10**12:
        raise ValueError("n must be an integer from 2 to 10**12")
    return _factor(n)


def _factor(n):
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors
