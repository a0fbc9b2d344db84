"""calc: small statistics helpers (rollbox's example SWE repository)."""

from calc.stats import mean, median

__all__ = ["mean", "median"]
