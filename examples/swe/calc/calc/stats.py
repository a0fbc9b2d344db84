"""Summary statistics of a list of numbers."""


def mean(values):
    """The arithmetic mean of `values`; raises ValueError when it is empty."""
    if not values:
        raise ValueError("mean() of an empty list")
    return sum(values) / len(values)


def median(values):
    """The middle value of `values` once sorted; for an even count, the mean of the two middle
    values. Raises ValueError when `values` is empty."""
    if not values:
        raise ValueError("median() of an empty list")
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle]
