"""rollbox's built-in `calculator` tool.

It runs inside the trajectory's slot like any `--tools-file` function. The expression is parsed
with `ast` and evaluated by walking the tree: only numbers, arithmetic operators, parentheses and
the whitelisted functions and constants below are allowed, so nothing in it is ever run as code.
Every step is bounded (expression length, nesting, exponent and result size), so no expression
can make the slot spend much time or memory.
"""

import ast
import math

# Long enough for any hand-written arithmetic; short enough that parsing is instant.
_MAX_EXPRESSION_CHARS = 1000
# Results (and intermediate integers) up to about 1000 decimal digits.
_MAX_INT_BITS = 3322
# Deeper trees than this come only from generated input, and recursion must stay bounded.
_MAX_DEPTH = 200
# `factorial(450)` has about 1000 digits; `comb`/`perm` cost grows with n.
_MAX_FACTORIAL = 450
_MAX_COMB_N = 10_000
_MAX_ROUND_DIGITS = 100

_NO_ATTRIBUTES = "attribute access (`x.y`) is not allowed; call the functions by name, e.g. sqrt(2)"

_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


def _factorial(n):
    if not isinstance(n, int) or n > _MAX_FACTORIAL:
        raise ValueError(f"factorial needs an integer from 0 to {_MAX_FACTORIAL}")
    return math.factorial(n)


def _bounded_n(name, function):
    def bounded(n, k):
        if isinstance(n, int) and n > _MAX_COMB_N:
            raise ValueError(f"{name} is limited to n <= {_MAX_COMB_N}")
        return function(n, k)

    return bounded


def _round(x, ndigits=None):
    if ndigits is not None and (not isinstance(ndigits, int) or abs(ndigits) > _MAX_ROUND_DIGITS):
        raise ValueError(f"round needs an integer number of digits between -{_MAX_ROUND_DIGITS} and {_MAX_ROUND_DIGITS}")
    return round(x, ndigits)


_FUNCTIONS = {
    "abs": abs,
    "round": _round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "cbrt": math.cbrt,
    "exp": math.exp,
    "log": math.log,
    "log2": math.log2,
    "log10": math.log10,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "asin": math.asin,
    "acos": math.acos,
    "atan": math.atan,
    "atan2": math.atan2,
    "sinh": math.sinh,
    "cosh": math.cosh,
    "tanh": math.tanh,
    "hypot": math.hypot,
    "degrees": math.degrees,
    "radians": math.radians,
    "floor": math.floor,
    "ceil": math.ceil,
    "trunc": math.trunc,
    "gcd": math.gcd,
    "lcm": math.lcm,
    "factorial": _factorial,
    "comb": _bounded_n("comb", math.comb),
    "perm": _bounded_n("perm", math.perm),
}

_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression with Python's rules and return the result.

    Supports numbers, + - * / // % ** (use ** for powers, not ^), unary minus, parentheses, the
    constants pi, e and tau, and the functions abs, round, min, max, sqrt, cbrt, exp, log (with an
    optional base), log2, log10, sin, cos, tan, asin, acos, atan, atan2, sinh, cosh, tanh, hypot,
    degrees, radians, floor, ceil, trunc, gcd, lcm, factorial, comb and perm. Angles are in
    radians. Integers stay exact; floats are shown to 15 significant digits.

    Args:
        expression: The expression, e.g. "2 * (3 + 4) ** 2" or "sqrt(2) / 2".
    """
    if not isinstance(expression, str):
        raise TypeError("expression must be a string, e.g. \"2 * (3 + 4)\"")
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"the expression is {len(expression)} characters long; the limit is {_MAX_EXPRESSION_CHARS}")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(f"not a valid expression: {error.msg}") from None
    except ValueError as error:  # null bytes
        raise ValueError(f"not a valid expression: {error}") from None
    except (RecursionError, MemoryError):
        raise ValueError("the expression is nested too deeply") from None
    return _format(_eval(tree.body, 0))


def _eval(node, depth):
    if depth > _MAX_DEPTH:
        raise ValueError("the expression is nested too deeply")
    if isinstance(node, ast.Constant):
        return _number(node.value)
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise ValueError(f"unknown name `{node.id}`; the constants are {', '.join(_CONSTANTS)}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand, depth + 1)
        return _checked(-value if isinstance(node.op, ast.USub) else +value)
    if isinstance(node, ast.BinOp):
        return _binary(node, depth)
    if isinstance(node, ast.Call):
        return _call(node, depth)
    if isinstance(node, ast.Attribute):
        raise ValueError(_NO_ATTRIBUTES)
    raise ValueError(f"`{type(node).__name__}` is not allowed in a calculator expression")


def _number(value):
    # bool is an int subclass; True + 1 is not arithmetic anyone means.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _checked(value)
    raise ValueError(f"only numbers are allowed, not {type(value).__name__} values like {value!r}")


def _binary(node, depth):
    # A long sum or product is a left-leaning chain of BinOps: walk it in a loop, so only real
    # nesting (parentheses, calls) counts towards the depth limit.
    chain = []
    while isinstance(node, ast.BinOp):
        chain.append(node)
        node = node.left
    value = _eval(node, depth + 1)
    for step in reversed(chain):
        value = _apply(step.op, value, _eval(step.right, depth + 1))
    return value


def _apply(op, left, right):
    if isinstance(op, ast.Pow):
        return _power(left, right)
    if isinstance(op, ast.BitXor):
        raise ValueError("`^` is not a power here; write powers with **, e.g. 2 ** 10")
    operation = _BINARY.get(type(op))
    if operation is None:
        raise ValueError(f"the operator `{type(op).__name__}` is not supported; use + - * / // % **")
    try:
        return _checked(operation(left, right))
    except ZeroDivisionError:
        raise ValueError("division by zero") from None


def _power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        # Refuse before computing: the result has about exponent * bits(base) bits. Other
        # powers are float powers (or tiny), which cannot take long and raise OverflowError.
        if exponent * max(abs(base).bit_length() - 1, 0) > _MAX_INT_BITS:
            raise ValueError(f"the result of {base} ** {exponent} would have more than about 1000 digits")
    try:
        return _checked(base**exponent)
    except ZeroDivisionError:
        raise ValueError("zero cannot be raised to a negative power") from None
    except OverflowError:
        raise ValueError("the result is too large") from None


def _call(node, depth):
    if isinstance(node.func, ast.Attribute):
        raise ValueError(_NO_ATTRIBUTES)
    if not isinstance(node.func, ast.Name):
        raise ValueError("only the listed functions can be called, by name, e.g. sqrt(2)")
    function = _FUNCTIONS.get(node.func.id)
    if function is None:
        raise ValueError(f"unknown function `{node.func.id}`; the functions are {', '.join(_FUNCTIONS)}")
    if node.keywords:
        raise ValueError(f"{node.func.id}() takes positional arguments only")
    if any(isinstance(arg, ast.Starred) for arg in node.args):
        raise ValueError(f"{node.func.id}() takes plain arguments, not *unpacking")
    args = [_eval(arg, depth + 1) for arg in node.args]
    try:
        return _checked(function(*args))
    except (ValueError, TypeError) as error:
        shown = ", ".join(_format(arg) for arg in args)
        raise ValueError(f"{node.func.id}({shown}): {error}") from None
    except OverflowError:
        raise ValueError(f"the result of {node.func.id} is too large") from None
    except ZeroDivisionError:
        raise ValueError("division by zero") from None


def _checked(value):
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is too large (or not a number)")
    if isinstance(value, int) and value.bit_length() > _MAX_INT_BITS:
        raise ValueError("the result has more than about 1000 digits")
    return value


def _format(value):
    if isinstance(value, float):
        return format(value, ".15g")
    return str(value)
