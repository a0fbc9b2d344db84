"""rollbox's registry of user tools inside a slot, kept as the module `_rollbox_tools`.

The host loads each tools file once per slot with `load` and runs each call with `call`. Every
file runs in a module of its own (registered in `sys.modules`, so dataclasses and pickling work),
never in the notebook's globals, so a tool's helpers and a model's variables cannot collide.
"""

import json
import linecache
import sys
import types

# Tool name -> (file label, function or None). A file that failed to load keeps its error here.
_TOOLS = {}
_LOAD_ERRORS = {}


def load(label, module_name, source, names):
    """Runs one tools file in a fresh module and registers its functions `names`."""
    module = types.ModuleType(module_name)
    module.__file__ = label
    # Registered so tracebacks through the file show its lines.
    linecache.cache[label] = (len(source), None, source.splitlines(True), label)
    sys.modules[module_name] = module
    try:
        exec(compile(source, label, "exec"), module.__dict__)
    except BaseException as error:  # SystemExit too: a tools file must not end the kernel
        sys.modules.pop(module_name, None)
        _LOAD_ERRORS[label] = f"{type(error).__name__}: {error}"
        module = None
    for name in names:
        _TOOLS[name] = (label, getattr(module, name, None))


def call(name, arguments):
    """Calls tool `name` with the JSON object `arguments` as keyword arguments and prints its
    result: a string as it is, anything else as JSON, or its repr when it is not JSON."""
    if name not in _TOOLS:
        raise LookupError(f"no tool named `{name}` is loaded in this slot")
    label, function = _TOOLS[name]
    if label in _LOAD_ERRORS:
        raise RuntimeError(f"`{name}` is unavailable: {label} failed to load in the sandbox: {_LOAD_ERRORS[label]}")
    if not callable(function):
        raise RuntimeError(f"{label} did not define a function `{name}` when it ran in the sandbox")
    print(_text(function(**json.loads(arguments))), end="")


def _text(value):
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)
