"""rollbox's guest half: runs notebook cells inside the sandboxed interpreter.

The host loads this file once per interpreter as the module `rollbox_guest` and calls
`start`, which installs `_turn` as the reactor's turn handler. From then on the host sends
each cell's source as one `turn`, and `_turn` runs it: the cell executes in `__main__`'s
namespace, so state persists across cells as in a Jupyter kernel. The cell is compiled here
and nowhere else: straight from source when it certainly ends in a statement, otherwise parsed
to an AST so that a final expression's value can be kept. Its outcome (stdout, stderr, the
value of the final expression, rich displays, the exception) goes back to the host as one JSON
object through the door (the `_host` builtin), never through stdout, so nothing the cell
prints can forge it.
"""

import _ast as ast  # the C module: `ast.py` costs an import and is not needed
import builtins
import io
import json
import linecache
import sys
from os import write as _os_write  # os is loaded before the guest: no cost

import _warnings

from _host import call as _door_call

_MAIN = sys.modules["__main__"].__dict__
_THIS_FILE = __file__ if "__file__" in globals() else "<rollbox_guest>"
# matplotlib's agg backend warns that it cannot show a window; the figures are collected after
# each cell instead, as Jupyter's inline backend does. The filter goes straight into the C
# `_warnings` list (which `warnings.filters` is): importing `warnings`, or compiling a regex,
# would cost each new interpreter milliseconds. A filter's message test is any object with a
# `match` method.


class _EndsWith:
    def __init__(self, suffix):
        self.suffix = suffix

    def match(self, text):
        return text.endswith(self.suffix)


_warnings.filters.insert(0, ("ignore", _EndsWith("is non-interactive, and thus cannot be shown"), Warning, None, 0))


class _CappedWriter(io.TextIOBase):
    """A text stream that keeps the first `cap` bytes written to it and counts the rest; or,
    with `_Config.streams_to_fd`, passes every byte straight to its file descriptor, where the
    host captures, caps and counts it itself (the wasm backend: the report's streams are then
    not the guest's word, see docs/security.md)."""

    def __init__(self, name, fd):
        super().__init__()
        self.name = name
        self.fd = fd
        self.reset(0)

    def reset(self, cap):
        """Empties the stream for the next cell; one writer serves every cell."""
        self._parts = []
        self._room = cap
        self.dropped = 0
        self.wrote = False

    @property
    def encoding(self):
        return "utf-8"

    def writable(self):
        return True

    def isatty(self):
        return False

    def write(self, text):
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        data = text.encode("utf-8", "replace")
        if data:
            self.wrote = True
        if _Config.streams_to_fd:
            _write_fd(self.fd, data)
            return len(text)
        if len(data) <= self._room:
            self._parts.append(text)
            self._room -= len(data)
        else:
            kept = data[: max(self._room, 0)].decode("utf-8", "ignore")
            if kept:
                self._parts.append(kept)
            self.dropped += len(data) - len(kept.encode("utf-8"))
            self._room = 0
        return len(text)

    def getvalue(self):
        return "".join(self._parts)


def _write_fd(fd, data):
    view = memoryview(data)
    while view:
        view = view[_os_write(fd, view) :]


_STDOUT, _STDERR = _CappedWriter("<stdout>", 1), _CappedWriter("<stderr>", 2)


class _Cell:
    """What one cell produced so far; `display()` appends to the current one."""

    current = None
    count = 0

    def __init__(self, cap):
        self.cap = cap
        self.display = []
        self.result = None
        self.error = None


def display(*objects):
    """Show rich outputs (images, HTML) in the cell's result, as IPython's display does."""
    cell = _Cell.current
    for obj in objects:
        if cell is None:
            print(repr(obj))
        else:
            cell.display.append(_mime_bundle(obj, cell.cap))


builtins.display = display


def _mime_bundle(value, cap):
    bundle = {}
    try:
        text = repr(value)
    except BaseException as e:  # a broken __repr__ must not lose the cell's result
        text = f"<{type(value).__name__} object; repr() raised {type(e).__name__}>"
    if len(text) > cap:
        text = text[:cap] + f"... [{len(text) - cap} more characters]"
    bundle["text/plain"] = text
    if _is_figure(value):
        png = _figure_png(value)
        if png is not None:
            bundle["image/png"] = png
        return bundle
    for method, mime in (
        ("_repr_html_", "text/html"),
        ("_repr_markdown_", "text/markdown"),
        ("_repr_latex_", "text/latex"),
        ("_repr_svg_", "image/svg+xml"),
        ("_repr_png_", "image/png"),
        ("_repr_json_", "application/json"),
    ):
        render = getattr(type(value), method, None)
        if render is None:
            continue
        try:
            data = render(value)
        except Exception:
            continue
        if data is None:
            continue
        if isinstance(data, bytes):
            import base64

            data = base64.b64encode(data).decode("ascii")
        elif not isinstance(data, str):
            data = json.dumps(data, default=str)
        if len(data) > _RICH_CAP:
            # Larger than the host takes for all of a cell's rich outputs: say so, keep the rest.
            bundle["text/plain"] += f" [rollbox: its {mime} form, {len(data)} characters, was dropped]"
            continue
        bundle[mime] = data
    return bundle


# The most characters one rich output (HTML, an image) may have: the host's budget for all of a
# cell's rich outputs is 16 MiB (`DISPLAY_BUDGET_BYTES`), so a larger one could only be refused.
_RICH_CAP = 8 << 20


def _is_figure(value):
    figure_module = sys.modules.get("matplotlib.figure")
    return figure_module is not None and isinstance(value, figure_module.Figure)


def _figure_png(figure):
    import base64

    buffer = io.BytesIO()
    try:
        figure.savefig(buffer, format="png", bbox_inches="tight")
    except Exception as e:
        print(f"rollbox: could not render a figure: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _collect_figures(cell):
    """Open pyplot figures become PNG displays and are closed, as in Jupyter's inline mode."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    for number in pyplot.get_fignums():
        bundle = _mime_bundle(pyplot.figure(number), cell.cap)
        if "image/png" in bundle:
            cell.display.append(bundle)
    pyplot.close("all")


def _user_traceback(error):
    """The traceback without this module's own frames."""
    import traceback

    tb = error.__traceback__
    while tb is not None and _is_ours(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return traceback.format_exception(type(error), error, tb)


def _is_ours(filename):
    return filename == _THIS_FILE or filename in ("<reactor>",) or filename.startswith("<turn")


def _execute(source, cell):
    _Cell.count += 1
    filename = f"<cell-{_Cell.count}>"
    # Registered so tracebacks and inspect show the cell's lines.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    if _ends_in_plain_statement(source):
        # Nothing to show: compile the source straight to code, once.
        _run(compile(source, filename, "exec", _COMPILE_FLAGS))
        return
    tree = compile(source, filename, "exec", ast.PyCF_ONLY_AST | _COMPILE_FLAGS)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    _run(compile(tree, filename, "exec", _COMPILE_FLAGS))
    if last is not None:
        value = _run(compile(last, filename, "eval", _COMPILE_FLAGS))
        if value is not None:
            _MAIN["_"] = value
            cell.result = _mime_bundle(value, cell.cap)


_COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


# Words that start a statement and can never start an expression; a cell whose last top-level
# line starts with one cannot have a value to show. (`else` and the like continue a compound
# statement, which is not an expression either.)
_STATEMENT_WORDS = frozenset(
    "import from def class for while if elif else with try except finally return del pass "
    "raise assert global nonlocal break continue async".split()
)


def _ends_in_plain_statement(source):
    """Whether the cell's last top-level statement is certainly not an expression, decided from
    the text alone so that such a cell is compiled once instead of parsed and then compiled.

    It answers True only when that is sure: the last line at column 0 is taken as the start of
    the last statement, which holds when the lines above it are outside any string, bracket or
    line continuation. That is checked by requiring them to hold no quote, comment or backslash
    and balanced brackets; from that line on there must be no `;`, and there must be no carriage
    return anywhere (a lone one ends a line). The line must then start with a statement word or
    `@`, or be an assignment: a `=` outside any bracket, string or comment, with no `lambda`
    before it. Any doubt answers False, and the cell takes the parsing path, which is exact.
    """
    if "\r" in source:
        return False
    end = len(source)
    while True:
        start = source.rfind("\n", 0, end) + 1
        line = source[start:end]
        if line[:1] not in ("", " ", "\t", "#") and not line.isspace():
            break
        if start == 0:
            return False
        end = start - 1
    head = source[:start]
    if _holds_any(head, _NOT_PLAIN_MARKS) or not _brackets_balance(head) or ";" in source[start:]:
        return False  # a `;` may put an expression after the statement the line starts
    if line[0] == "@" or line.split(None, 1)[0] in _STATEMENT_WORDS:
        return True
    equals = line.find("=")
    if equals <= 0 or line[equals + 1 : equals + 2] == "=" or line[equals - 1] in "=!<>:":
        return False
    before = line[:equals]
    return not _holds_any(before, _NOT_PLAIN_MARKS) and "lambda" not in before and _brackets_balance(before)


# A quote, comment or backslash may hide or continue a line: text holding one is not judged.
_NOT_PLAIN_MARKS = ("'", '"', "#", "\\")


def _holds_any(text, marks):
    for mark in marks:
        if mark in text:
            return True
    return False


def _brackets_balance(text):
    return text.count("(") == text.count(")") and text.count("[") == text.count("]") and text.count("{") == text.count("}")


_CO_COROUTINE = 0x80  # inspect.CO_COROUTINE: the cell awaits at top level


def _run(code):
    value = eval(code, _MAIN)
    if code.co_flags & _CO_COROUTINE:
        value = _event_loop().run_until_complete(value)
    return value


def _event_loop():
    """The interpreter's one asyncio loop, made on first use. WASI has no socketpair, so the
    loop has no self-pipe: nothing outside the cell's own thread ever needs to wake it."""
    global _LOOP
    if _LOOP is None or _LOOP.is_closed():
        import asyncio

        class _SandboxLoop(asyncio.SelectorEventLoop):
            def _make_self_pipe(self):
                self._ssock = self._csock = None

            def _close_self_pipe(self):
                pass

            def _write_to_self(self):
                pass

        _LOOP = _SandboxLoop()
        asyncio.set_event_loop(_LOOP)
    return _LOOP


_LOOP = None


class _Config:
    """Set once by `start`: the byte cap of each output stream, and whether the streams go
    straight to file descriptors 1 and 2 for the host to capture."""

    cap = 1 << 18
    streams_to_fd = False


def _turn(source, name):
    """The reactor's turn handler, replaced by `start`: runs `source` as one cell and sends
    its report to the host. Never raises."""
    cell = _Cell(_Config.cap)
    out, err = _STDOUT, _STDERR
    out.reset(cell.cap)
    err.reset(cell.cap)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    _Cell.current = cell
    try:
        try:
            _execute(source, cell)
        except BaseException as e:  # SystemExit and KeyboardInterrupt too: the kernel lives on
            cell.error = _error_report(e, cell.cap)
        try:
            _collect_figures(cell)
        except Exception as e:
            print(f"rollbox: could not collect figures: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        sys.stdout, sys.stderr = saved
        _Cell.current = None
    silent = not (out.wrote or err.wrote or cell.result or cell.display or cell.error)
    _send(None if silent else {
        "stdout": out.getvalue(),
        "stderr": err.getvalue(),
        "stdout_dropped": out.dropped,
        "stderr_dropped": err.dropped,
        "result": cell.result,
        "display": cell.display,
        "error": cell.error,
    })


def _error_report(error, cap):
    """The exception as the report carries it. Its value and each traceback line are cut at the
    stream cap here already: the host caps them again, but a report too large for the door
    would lose the cell's whole outcome."""
    try:
        value = str(error)
    except BaseException as e:  # a broken __str__ must not lose the error
        value = f"<str() raised {type(e).__name__}>"
    lines = [_cut(line.rstrip("\n"), cap) for line in _user_traceback(error)]
    return {"name": type(error).__name__, "value": _cut(value, cap), "traceback": lines}


def _cut(text, cap):
    if len(text) <= cap:
        return text
    return text[:cap] + f"... [{len(text) - cap} more characters]"


def start(cap, streams_to_fd=False):
    """Installs `_turn` as the reactor's turn handler (found on the stack: the reactor's
    `turn` looks `_run_turn` up in its globals on every call) and answers the host's
    readiness check, saying whether the handler was installed."""
    _Config.cap = cap
    _Config.streams_to_fd = streams_to_fd
    frame = sys._getframe()
    while frame is not None and not (frame.f_code.co_name == "turn" and "_run_turn" in frame.f_globals):
        frame = frame.f_back
    hooked = frame is not None
    if hooked:
        frame.f_globals["_run_turn"] = _turn
    _door_call(json.dumps({"ready": True, "hooked": hooked}).encode())


def _preload(names):
    """Imports `names` (the backend's preload list) without binding anything in the cell
    namespace, so slots start with the modules in `sys.modules` and a clean `__main__`."""
    import importlib

    for name in names:
        importlib.import_module(name)
    _forget_setup_cells()


def _open_fds(limit):
    """The file descriptors from 3 up to `limit` that are open. A snapshot may hold only the
    preopened folders: a new instance has no other descriptor."""
    import os

    found = []
    for fd in range(3, limit):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.append(fd)
    return found


# Module-level generators that their import seeds once: a slot restored from a snapshot would
# share them with every other slot. (module, the call that reseeds it from fresh entropy) A
# module not imported yet needs nothing: it seeds itself from entropy when a cell imports it.
_RESEED = (
    ("random", lambda m: m.seed()),
    ("numpy.random", lambda m: m.seed()),
    ("sympy.core.random", lambda m: m.rng.seed()),
)


def _fresh_slot():
    """Makes a slot restored from a snapshot its own: new random streams, and no trace of the
    template's setup cells."""
    for name, reseed in _RESEED:
        module = sys.modules.get(name)
        if module is not None:
            reseed(module)
    _forget_setup_cells()


def _forget_setup_cells():
    """Setup cells run through `_turn` like any cell; the slot's first real cell is still
    `<cell-1>`, and `_` is unset."""
    _Cell.count = 0
    for name in [n for n in linecache.cache if n.startswith("<cell-")]:
        del linecache.cache[name]
    _MAIN.pop("_", None)


# What a silent cell (an assignment, a def) reports; the same every time.
_SILENT_REPORT = json.dumps(
    {"stdout": "", "stderr": "", "stdout_dropped": 0, "stderr_dropped": 0, "result": None, "display": [], "error": None}
).encode()
# One encoder for every report: `json.dumps` with options builds a new one per call.
_REPORT_ENCODER = json.JSONEncoder(ensure_ascii=False)


def _send(report):
    """Sends a cell's report to the host; `None` is a silent cell's. Every report goes through
    the one door call below, so where that call sits on the C stack does not depend on the
    cell (the snapshot's stack probe, `src/wasm/snapshot.rs`, relies on it)."""
    payload = _SILENT_REPORT if report is None else _REPORT_ENCODER.encode(report).encode("utf-8", "replace")
    try:
        _door_call(payload)
    except Exception as e:
        if report is None:
            raise
        _send_smaller(report, f"{type(e).__name__}: {e}")


def _send_smaller(report, why):
    """The report was too large for the host's cap: send it again without the rich outputs
    (displays, and the final value's rich forms), then, if that is still too large, with only
    the error's name and a note, so the cell's outcome is never lost."""
    _note(f"\nrollbox: rich outputs were dropped: {why}\n", report)
    report["display"] = []
    if report["result"] is not None:
        report["result"] = {"text/plain": _cut(report["result"].get("text/plain", ""), _Config.cap)}
    try:
        _door_call(_REPORT_ENCODER.encode(report).encode("utf-8", "replace"))
        return
    except Exception:
        pass
    _note("\nrollbox: the cell's report was still too large; only the exception's name is kept\n", report)
    error = report["error"] and {"name": report["error"]["name"], "value": "", "traceback": []}
    smallest = {"stdout": "", "stderr": "", "stdout_dropped": 0, "stderr_dropped": 0}
    if not _Config.streams_to_fd:
        smallest["stderr"] = report["stderr"][-4096:]
    smallest.update(result=None, display=[], error=error)
    _door_call(_REPORT_ENCODER.encode(smallest).encode("utf-8", "replace"))


def _note(text, report):
    """Tells the reader on stderr: straight to fd 2 when the host captures the streams."""
    if _Config.streams_to_fd:
        _write_fd(2, text.encode("utf-8", "replace"))
    else:
        report["stderr"] += text
