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
        self.written = 0  # bytes written this cell, kept or not: where displays sit among them
        self.wrote = False
        self._buffer = None
        self._pending = []
        self._pending_bytes = 0

    @property
    def buffer(self):
        """The binary layer (`sys.stdout.buffer.write(b"...")`, common in judge solutions): bytes
        are decoded as UTF-8, a character split across writes included, and kept as text."""
        if self._buffer is None:
            self._buffer = _BinaryWriter(self)
        return self._buffer

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
        self.written += len(data)
        if _Config.streams_to_fd:
            # The other stream's gathered text goes first, so the host sees the two streams'
            # writes in the order they were made.
            if self.other._pending:
                self.other.flush()
            # Gathered and passed on in chunks: one host call per print would cost a cell that
            # prints 20,000 lines more than twice its time.
            self._pending.append(data)
            self._pending_bytes += len(data)
            if self._pending_bytes >= _FD_CHUNK_BYTES:
                self.flush()
            return len(text)
        runs = _RUNS
        if runs and runs[-1][0] == self.fd:
            runs[-1][1] = self.written
        elif len(runs) < _MAX_RUNS:
            runs.append([self.fd, self.written])
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

    def flush(self):
        """Passes what was gathered on to the file descriptor (with `_Config.streams_to_fd`)."""
        if self._pending:
            data, self._pending, self._pending_bytes = b"".join(self._pending), [], 0
            _write_fd(self.fd, data)

    def getvalue(self):
        return "".join(self._parts)


# How much a stream gathers before it passes it to its file descriptor; the rest goes at the end
# of the cell, or at an explicit flush.
_FD_CHUNK_BYTES = 8192


def _write_fd(fd, data):
    view = memoryview(data)
    while view:
        view = view[_os_write(fd, view) :]


class _BinaryWriter(io.BufferedIOBase):
    """`buffer` of a `_CappedWriter`: UTF-8 bytes in, text out to the writer."""

    def __init__(self, text):
        super().__init__()
        import codecs

        self._text = text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def writable(self):
        return True

    def write(self, data):
        data = bytes(data)
        self._text.write(self._decoder.decode(data))
        return len(data)

    def flush(self):
        self._text.flush()


_STDOUT, _STDERR = _CappedWriter("<stdout>", 1), _CappedWriter("<stderr>", 2)
_STDOUT.other, _STDERR.other = _STDERR, _STDOUT
# The order of a cell's writes when the report carries its streams: `[fd, bytes written to it
# when the run ended]`, one entry per run of writes to one stream, at most `_MAX_RUNS` (the
# host's own cap, `MAX_RUNS` in src/slot/outputs.rs). When the host captures the streams it
# records the order itself and this stays empty.
_RUNS = []
_MAX_RUNS = 8192


def _stream_position():
    """How many bytes the cell has written to stdout and to stderr: where a display sits."""
    return [_STDOUT.written, _STDERR.written]


class _Cell:
    """What one cell produced so far; `display()` appends to the current one."""

    current = None
    count = 0

    def __init__(self, cap):
        self.cap = cap
        self.display = []
        self.display_at = []
        self.result = None
        self.result_at = None
        self.result_after = 0
        self.error = None

    def show(self, bundle):
        """Adds a display, and where among the streams it was shown."""
        self.display.append(bundle)
        self.display_at.append(_stream_position())


def display(*objects, raw=False, **_ignored):
    """Show rich outputs (images, HTML) in the cell's result, as IPython's display does. With
    `raw=True` each object is already a bundle: a dict from MIME type to data."""
    cell = _Cell.current
    for obj in objects:
        if cell is None:
            print(repr(obj))
        elif raw and isinstance(obj, dict):
            bundle = {str(mime): data if isinstance(data, str) else json.dumps(data, default=str) for mime, data in obj.items()}
            bundle.setdefault("text/plain", "")
            cell.show(bundle)
        else:
            cell.show(_mime_bundle(obj, cell.cap))


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
        ("_repr_jpeg_", "image/jpeg"),
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
            cell.show(bundle)
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
            cell.result_at, cell.result_after = _stream_position(), len(cell.display)


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


class _Script:
    """Script semantics for the next cell, which `/run_code`'s set-up cell asks for with
    `_begin_script`: the cell is a whole program, and ends as CPython ends one."""

    pending = False
    hard_exit = False


def _begin_script():
    """Makes the next cell a program: at its end, non-daemon threads are waited for and atexit
    handlers run, as when CPython exits; `os._exit(n)` ends it with status n (it would end the
    whole interpreter otherwise, losing what was printed)."""
    import os

    _Script.pending = True
    os._exit = _hard_exit


def _hard_exit(status):
    """os._exit in a program: its status, and no threads waited for nor atexit handlers run, as
    in CPython (unlike CPython, `finally` blocks on the way out still run)."""
    _Script.hard_exit = True
    raise SystemExit(status)


def _finish_script():
    """What CPython does after a program's last line, its exception or its sys.exit: wait for
    the threads that are not daemons, then run the atexit handlers (which print their own
    errors)."""
    if _Script.hard_exit:
        return
    for timer in [t for t in _Threads.timers if not t.daemon]:
        timer.join()
    threading = sys.modules.get("threading")
    if threading is not None:
        current = threading.current_thread()
        for thread in threading.enumerate():
            if thread is not current and not thread.daemon and thread is not threading.main_thread():
                thread.join()
    import atexit

    atexit._run_exitfuncs()


def _turn(source, name):
    """The reactor's turn handler, replaced by `start`: runs `source` as one cell and sends
    its report to the host. Never raises."""
    cell = _Cell(_Config.cap)
    out, err = _STDOUT, _STDERR
    out.reset(cell.cap)
    err.reset(cell.cap)
    _RUNS.clear()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    _Cell.current = cell
    script, _Script.pending = _Script.pending, False
    try:
        narrow = _narrow_integer_idioms(source) if _WASM else ()
        try:
            _execute(source, cell)
        except BaseException as e:  # SystemExit and KeyboardInterrupt too: the kernel lives on
            cell.error = _error_report(e, cell.cap)
        if narrow:
            _warn_narrow_integers(narrow, _Cell.count)
        if script:
            _finish_script()
        try:
            _collect_figures(cell)
        except Exception as e:
            print(f"rollbox: could not collect figures: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        for stream in (out, err):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - the report must still go out
                pass
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
        "display_at": cell.display_at,
        "result_at": cell.result_at,
        "result_after": cell.result_after,
        "runs": _RUNS,
    })


def _error_report(error, cap):
    """The exception as the report carries it. Its value and each traceback line are cut at the
    stream cap here already: the host caps them again, but a report too large for the door
    would lose the cell's whole outcome."""
    try:
        value = str(error)
    except BaseException as e:  # a broken __str__ must not lose the error
        value = f"<str() raised {type(e).__name__}>"
    # One newline off each entry: a chained exception's separator keeps its blank lines.
    lines = [_cut(line[:-1] if line.endswith("\n") else line, cap) for line in _user_traceback(error)]
    return {"name": type(error).__name__, "value": _cut(value, cap), "traceback": lines}


def _cut(text, cap):
    if len(text) <= cap:
        return text
    return text[:cap] + f"... [{len(text) - cap} more characters]"


# --- What a notebook or a judge expects of CPython that the sandbox lacks -------------------
# Each piece below is installed by `_install_compat` when the guest loads, and only changes a
# module when the module is imported (or already was): an `IPython` that is not installed, and
# on wasm (no threads, a 32-bit C long) threading, thread pools and numpy's integer widths.
# docs/parity.md lists what each gives and what stays different.

_WASM = sys.platform == "wasi"


class _DisplayObject:
    """The base of IPython.display's HTML, Markdown and friends: data shown as one MIME type."""

    _mime = "text/plain"

    def __init__(self, data=None, url=None, filename=None, metadata=None):
        if data is None and filename is not None:
            with open(filename, "rb" if self._binary else "r") as file:
                data = file.read()
        self.data, self.url, self.filename, self.metadata = data, url, filename, metadata

    _binary = False

    def __repr__(self):
        return f"<IPython.core.display.{type(self).__name__} object>"


class _HTML(_DisplayObject):
    def _repr_html_(self):
        return self.data


class _Markdown(_DisplayObject):
    def _repr_markdown_(self):
        return self.data


class _Latex(_DisplayObject):
    def _repr_latex_(self):
        return self.data


class _Math(_DisplayObject):
    def _repr_latex_(self):
        text = (self.data or "").strip("$")
        return f"$\\displaystyle {text}$"


class _SVG(_DisplayObject):
    def _repr_svg_(self):
        return self.data


class _JSON(_DisplayObject):
    def __init__(self, data=None, url=None, filename=None, expanded=False, metadata=None, **_ignored):
        if isinstance(data, str) and filename is None:
            data = json.loads(data)
        super().__init__(data, url, filename, metadata)
        if isinstance(self.data, str):
            self.data = json.loads(self.data)

    def _repr_json_(self):
        return self.data


class _Pretty(_DisplayObject):
    def __repr__(self):
        return str(self.data)


_IMAGE_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8", "jpeg"), (b"GIF8", "gif"))


class _Image(_DisplayObject):
    """IPython's Image: bytes (or a file) shown as image/png or image/jpeg, or a URL as HTML."""

    _binary = True

    def __init__(self, data=None, url=None, filename=None, format=None, embed=None, width=None, height=None, **_ignored):
        if isinstance(data, str) and filename is None and url is None:
            if data.startswith(("http://", "https://", "data:")):
                data, url = None, data
            else:
                data, filename = None, data
        super().__init__(data, url, filename)
        self.width, self.height = width, height
        if format is None and filename is not None:
            format = filename.rsplit(".", 1)[-1].lower()
        if format is None and isinstance(self.data, bytes):
            format = next((name for magic, name in _IMAGE_MAGIC if self.data.startswith(magic)), None)
        self.format = "jpeg" if format == "jpg" else format

    def _repr_png_(self):
        return self.data if self.format == "png" and self.data is not None else None

    def _repr_jpeg_(self):
        return self.data if self.format == "jpeg" and self.data is not None else None

    def _repr_html_(self):
        if self.data is not None:
            return None
        size = "".join(f' {name}="{value}"' for name, value in (("width", self.width), ("height", self.height)) if value)
        return f'<img src="{self.url}"{size}/>'


def _clear_output(wait=False):
    """IPython's clear_output: forgets what the cell showed and printed so far."""
    cell = _Cell.current
    if cell is not None:
        cell.display.clear()
        cell.display_at.clear()
        cell.result_after = 0
        _STDOUT.reset(cell.cap)
        _STDERR.reset(cell.cap)
        _RUNS.clear()
        if _Config.streams_to_fd:
            _door_call(b"clear-output")  # the host holds what was written: it forgets it


def _get_ipython():
    """There is no IPython shell here: code that checks for one takes its plain-Python path."""
    return None


def _ipython_modules():
    """`IPython`, `IPython.display` and `IPython.core.display`, made of the objects above."""
    import types

    names = {
        "display": display,
        "clear_output": _clear_output,
        "HTML": _HTML,
        "Markdown": _Markdown,
        "Latex": _Latex,
        "Math": _Math,
        "SVG": _SVG,
        "JSON": _JSON,
        "Image": _Image,
        "Pretty": _Pretty,
        "DisplayObject": _DisplayObject,
    }
    for name in ("HTML", "Markdown", "Latex", "Math", "SVG", "JSON", "Image", "Pretty", "DisplayObject"):
        names[name].__name__ = names[name].__qualname__ = name
        names[name].__module__ = "IPython.core.display"
    for kind in ("html", "markdown", "latex", "svg", "json", "png", "jpeg"):
        names[f"display_{kind}"] = display
    display_module = types.ModuleType("IPython.display", "rollbox's IPython.display: rich outputs as display bundles.")
    display_module.__dict__.update(names)
    core = types.ModuleType("IPython.core")
    core.display = display_module
    root = types.ModuleType("IPython", "rollbox's stand-in for IPython: display() and get_ipython() only.")
    root.__path__ = []
    root.display = display_module
    root.core = core
    root.get_ipython = _get_ipython
    root.version_info = (0, 0, 0, "rollbox")
    return {"IPython": root, "IPython.display": display_module, "IPython.core": core, "IPython.core.display": display_module}


class _FallbackModules:
    """A meta path finder consulted last: it gives modules (IPython) only when no installed
    package does."""

    modules = None

    def find_spec(self, name, path=None, target=None):
        if name != "IPython" and not name.startswith("IPython."):
            return None
        import importlib.machinery

        if self.modules is None:
            self.modules = _ipython_modules()  # once: `IPython.display` is one module
        modules = self.modules
        if name not in modules:
            return None
        return importlib.machinery.ModuleSpec(name, _GivenModule(modules[name]), is_package=name in ("IPython", "IPython.core"))


class _GivenModule:
    """A loader whose module is already built."""

    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass


class _AfterImport:
    """A meta path finder that lets the other finders find the modules in `patches`, then
    patches each right after it loads, before any code can use it."""

    def __init__(self, patches):
        self.patches = patches

    def find_spec(self, name, path=None, target=None):
        patch = self.patches.get(name)
        if patch is None:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


class _PatchingLoader:
    """Loads with `loader`, then applies `patch`; anything else is `loader`'s."""

    def __init__(self, loader, patch):
        self.loader, self.patch = loader, patch

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.patch(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class ThreadWaitError(RuntimeError):
    """A wait that can never end: on wasm, threads run one at a time, each to its end inside
    `start()`, so no other thread can release the lock or set the event."""


ThreadWaitError.__module__ = "rollbox"


def _wait_error(what):
    return ThreadWaitError(
        f"{what} would wait forever: rollbox's wasm sandbox has no threads, so each Thread runs to its end "
        "inside start(), one at a time, and nothing else can ever release it. Code whose threads wait for "
        "each other needs real threads: run it on the process backend (see docs/parity.md)."
    )


class _InlineLock:
    """threading.Lock on wasm: a free lock is taken as usual; a held one can never be released
    by anyone else, so a blocking acquire raises ThreadWaitError instead of hanging, and one
    with a timeout sleeps it out and fails, as it would with nobody to release it."""

    __slots__ = ("_lock",)

    def __init__(self):
        self._lock = _allocate_real_lock()

    def acquire(self, blocking=True, timeout=-1):
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        if timeout is not None and timeout >= 0:
            import time

            time.sleep(timeout)
            return False
        raise _wait_error("acquiring a lock that is held (or waiting on a Condition, Event, Queue or Semaphore)")

    def release(self):
        self._lock.release()

    def locked(self):
        return self._lock.locked()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self._lock.release()

    def _at_fork_reinit(self):
        self._lock = _allocate_real_lock()

    def __repr__(self):
        return f"<{'locked' if self._lock.locked() else 'unlocked'} {type(self).__module__}.Lock object>"


def _allocate_real_lock():
    import _thread

    return _thread.allocate_lock()


class _Threads:
    """The stack size `threading.stack_size` was last given (0: the default), and the Timers
    started but not run yet."""

    stack_size = 0
    timers = []


def _thread_start(self):
    """Thread.start on wasm: runs the thread to its end now, as if it had run alone (a Timer
    waits for its join() or the program's end instead). An exception goes to
    threading.excepthook (printed on stderr) as in a real thread, except ThreadWaitError,
    which ends the cell."""
    import threading

    if not self._initialized:
        raise RuntimeError("thread.__init__() not called")
    if self._started.is_set():
        raise RuntimeError("threads can only be started once")
    self._started.set()
    if isinstance(self, threading.Timer):
        # "Later, unless cancelled": it runs at join() or when the program ends, and a
        # cancelled one never does (matplotlib starts a 5 s warning timer it then cancels).
        _Threads.timers.append(self)
        return
    _run_inline(self)


def _run_inline(self):
    import threading

    ident = threading.get_ident()
    outer = threading._active.get(ident)
    threading._active[ident] = self  # current_thread() is this thread while it runs
    try:
        self.run()
    except ThreadWaitError:
        raise
    except SystemExit:
        pass  # ends the thread quietly, as in CPython
    except BaseException:
        self._invoke_excepthook(self)
    finally:
        self._rollbox_done = True
        if outer is None:
            threading._active.pop(ident, None)
        else:
            threading._active[ident] = outer


def _thread_join(self, timeout=None):
    """Thread.join on wasm: the thread already ran to its end in start()."""
    import threading

    if not self._initialized:
        raise RuntimeError("Thread.__init__() not called")
    if not self._started.is_set():
        raise RuntimeError("cannot join thread before it is started")
    if self is threading.current_thread():
        raise RuntimeError("cannot join current thread")
    if self in _Threads.timers:
        _Threads.timers.remove(self)
        _run_inline(self)


def _thread_is_alive(self):
    return self._started.is_set() and not getattr(self, "_rollbox_done", False)


def _stack_size(size=None):
    """threading.stack_size on wasm: remembered and returned as CPython does. Python-level
    recursion in the sandbox is bounded by sys.setrecursionlimit and the slot's memory, not by
    a thread's stack, so a large size needs nothing more."""
    previous = _Threads.stack_size
    if size is not None:
        if size != 0 and size < 32768:
            raise ValueError(f"size not valid: {size} bytes")
        _Threads.stack_size = size
    return previous


def _patch_threading(threading):
    threading.Lock = _InlineLock
    threading._allocate_lock = _InlineLock
    threading.stack_size = _stack_size
    threading.ThreadWaitError = ThreadWaitError
    threading.Thread.start = _thread_start
    threading.Thread.join = _thread_join
    threading.Thread.is_alive = _thread_is_alive


def _patch_thread_pool(pool_module):
    """ThreadPoolExecutor on wasm runs each task when it is submitted, in order, and hands back
    a finished Future: map, submit, as_completed and wait give what a real pool gives."""
    executor = pool_module.ThreadPoolExecutor

    def submit(self, fn, /, *args, **kwargs):
        from concurrent.futures import _base

        if getattr(self, "_broken", False):
            raise pool_module.BrokenThreadPool(self._broken)
        if getattr(self, "_shutdown", False):
            raise RuntimeError("cannot schedule new futures after shutdown")
        if not getattr(self, "_rollbox_initialized", False):
            self._rollbox_initialized = True
            initializer = getattr(self, "_initializer", None)
            if initializer is not None:
                try:
                    initializer(*getattr(self, "_initargs", ()))
                except BaseException:
                    self._broken = "A thread initializer failed, the thread pool is not usable anymore"
                    raise pool_module.BrokenThreadPool(self._broken) from None
        future = _base.Future()
        future.set_running_or_notify_cancel()
        try:
            result = fn(*args, **kwargs)
        except ThreadWaitError:
            raise
        except BaseException as exc:
            future.set_exception(exc)
        else:
            future.set_result(result)
        return future

    executor.submit = submit


class _NumpyWidths:
    """Whether numpy's integers follow 64-bit Linux (see `_patch_numpy`); `numpy_native_ints`
    switches it."""

    native = True
    # What repr treats as the default integer, each way; set once numpy is patched.
    typeless = None


def numpy_native_ints(enabled=True):
    """Switches numpy's 64-bit integer defaults on wasm32 (on by default): with False, integers
    from Python ints are numpy's own 32-bit default again and sums accumulate in 32 bits, as a
    plain wasm32 numpy does. For comparisons; it changes nothing on a 64-bit host."""
    _NumpyWidths.native = bool(enabled)
    if _NumpyWidths.typeless is not None:
        typeless, native, plain = _NumpyWidths.typeless
        typeless[:] = native if enabled else plain


def _patch_numpy(np):
    """On wasm32 numpy's default integer (C long, intp) has 32 bits, where 64-bit Linux has 64:
    `np.arange(100000).sum()` would wrap around silently. This makes integers created from
    Python ints 64-bit, sums and products accumulate in 64 bits as on 64-bit Linux, and repr
    leave out `dtype=int64` as it does there. What it cannot reach is listed in docs/parity.md."""
    if np.dtype(int).itemsize >= 8:
        return
    core = getattr(np, "_core", None) or np.core
    int64, uint64, ndarray = np.int64, np.uint64, np.ndarray
    python_ints = (int, bool, list, tuple, range)

    def wide(dtype):
        if dtype.itemsize < 8 and dtype.kind in "bi":
            return int64
        if dtype.itemsize < 8 and dtype.kind == "u":
            return uint64
        return None

    def accumulating(original):
        def reduce(a, axis=None, dtype=None, out=None, *args, **kwargs):
            if _NumpyWidths.native and dtype is None and out is None:
                if type(a) in (list, tuple):
                    a = array(a)
                if isinstance(a, ndarray):
                    dtype = wide(a.dtype)
            return original(a, axis, dtype, out, *args, **kwargs)

        return _like(reduce, original)

    def python_int_args(args):
        return all(type(a) in (int, bool) for a in args)

    original_array, original_asarray, original_arange = np.array, np.asarray, np.arange

    def array(obj, dtype=None, *args, **kwargs):
        if not _NumpyWidths.native:
            return original_array(obj, dtype, *args, **kwargs)
        if dtype is int:
            dtype = int64
        result = original_array(obj, dtype, *args, **kwargs)
        if dtype is None and type(obj) in python_ints and result.dtype.kind == "i" and result.dtype.itemsize < 8:
            result = result.astype(int64)
        return result

    def asarray(a, dtype=None, *args, **kwargs):
        if _NumpyWidths.native:
            if dtype is int:
                dtype = int64
            if dtype is None and type(a) in python_ints and not args and not kwargs:
                return array(a)
        return original_asarray(a, dtype, *args, **kwargs)

    def arange(*args, **kwargs):
        if _NumpyWidths.native:
            dtype = kwargs.get("dtype", args[3] if len(args) > 3 else None)
            bounds = list(args[:3]) + [kwargs[k] for k in ("start", "stop", "step") if kwargs.get(k) is not None]
            if dtype is int or (dtype is None and python_int_args(bounds)):
                if len(args) > 3:
                    args = args[:3] + (int64,) + args[4:]
                else:
                    kwargs["dtype"] = int64
        return original_arange(*args, **kwargs)

    def int_dtype(original, fill_position=None):
        """zeros, ones, empty (dtype second) and full (fill value second, dtype third): `int`,
        or a Python int fill value, means int64."""
        dtype_at = 1 if fill_position is None else 2

        def make(*args, **kwargs):
            if _NumpyWidths.native:
                dtype = kwargs.get("dtype", args[dtype_at] if len(args) > dtype_at else None)
                if dtype is None and fill_position is not None and len(args) > fill_position:
                    if type(args[fill_position]) is int:
                        dtype = int
                if dtype is int:
                    if len(args) > dtype_at:
                        args = args[:dtype_at] + (int64,) + args[dtype_at + 1 :]
                    else:
                        kwargs["dtype"] = int64
            return original(*args, **kwargs)

        return _like(make, original)

    np.array = _like(array, original_array)
    np.asarray = _like(asarray, original_asarray)
    np.arange = _like(arange, original_arange)
    for name in ("zeros", "ones", "empty"):
        setattr(np, name, int_dtype(getattr(np, name)))
    np.full = int_dtype(np.full, fill_position=1)
    for name in ("sum", "prod", "cumsum", "cumprod"):
        setattr(np, name, accumulating(getattr(np, name)))
    # `ndarray.sum` and `.prod` call these (looked up on first use, so this must come first).
    methods = core._methods
    methods._sum = accumulating(methods._sum)
    methods._prod = accumulating(methods._prod)
    # repr leaves out the default integer's dtype; on 64-bit Linux that is int64.
    typeless = core.arrayprint._typelessdata
    plain = list(typeless)
    native = [t for t in plain if not (issubclass(t, np.signedinteger) and np.dtype(t).itemsize < 8)] + [int64]
    _NumpyWidths.typeless = (typeless, native, plain)
    numpy_native_ints(_NumpyWidths.native)


def _patch_numpy_random(random):
    """`np.random.randint`'s default dtype is the C long: int32 on wasm32, int64 on 64-bit Linux.
    Passing int64 when no dtype is given makes it draw as it does there (the same generator
    routine), so a seeded stream gives native values, not just native dtypes."""
    np = sys.modules.get("numpy")
    if np is None or np.dtype(int).itemsize >= 8:
        return
    original, int64 = random.randint, np.int64

    def randint(low, high=None, size=None, dtype=int):
        if dtype is not int or not _NumpyWidths.native:
            return original(low, high, size, dtype)
        result = original(low, high, size, int64)
        # As numpy does for `dtype=int`: a single draw is a Python int.
        if size is None and getattr(result, "shape", None) == ():
            return int(result)
        return result

    random.randint = _like(randint, original)


class Wasm32IntegerWarning(RuntimeWarning):
    """A cell used a numpy idiom whose integers are 32-bit on wasm32 but 64-bit on 64-bit Linux,
    one that `_patch_numpy` cannot reach (docs/parity.md, "Integer width")."""


# Where numpy's C default integer (32 bits here) comes from a place no Python hook reaches, the
# slot cannot give the native width, nor see a value wrap inside numpy's C code. So the first
# cell that uses each such idiom gets one warning in stderr, instead of a result that may be
# silently wrong. (idiom, what to write instead)
_NARROW_ADVICE = {
    "astype(int)": "write astype(np.int64)",
    "np.int_": "write np.int64",
    "np.intp": "write np.int64 where the values are not indexes",
    "dtype=int": "write dtype=np.int64",
    "np.dtype(int)": "write np.dtype(np.int64)",
    "RandomState.randint": "pass dtype=np.int64, or use np.random.default_rng()",
    "cumsum/cumprod of a narrow integer array": "write .cumsum(dtype=np.int64)",
}
# Only cells that mention one of these are parsed for the idioms above.
_NARROW_HINTS = ("astype", "int_", "intp", "dtype", "RandomState", "cumsum", "cumprod", "long")
# Functions that `_patch_numpy` already gives `dtype=int` its native meaning.
_WIDENED = frozenset(("array", "asarray", "arange", "zeros", "ones", "empty", "full"))
_NARROW_TYPES = frozenset(("int8", "int16", "int32", "uint8", "uint16", "uint32", "intc", "uintc", "short", "byte"))


class _NarrowWarned:
    idioms = set()


def _narrow_integer_idioms(source):
    """The idioms of `_NARROW_ADVICE` that `source` uses and that were not warned of yet, each
    with its first line. Decided from the syntax alone, before the cell runs."""
    if not _NumpyWidths.native or not _holds_any(source, _NARROW_HINTS):
        return ()
    try:
        tree = compile(source, "<check>", "exec", ast.PyCF_ONLY_AST | _COMPILE_FLAGS)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return ()  # the cell itself reports it
    found = {}
    narrow_array = False
    cumulative = None

    def name_of(node):
        return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", None)

    def is_int(node):
        return (isinstance(node, ast.Name) and node.id == "int") or (
            isinstance(node, ast.Constant) and node.value in ("int", "long", "l", "int_", "intp", "p")
        )

    for node in _walk(tree):
        line = getattr(node, "lineno", 1)
        if isinstance(node, ast.Attribute):
            numpy_value = isinstance(node.value, ast.Name) and node.value.id in ("np", "numpy")
            if node.attr == "int_" or (numpy_value and node.attr in ("long", "uint", "ulong")):
                found.setdefault("np.int_", line)
            elif node.attr in ("intp", "uintp"):
                found.setdefault("np.intp", line)
            elif node.attr in _NARROW_TYPES:
                narrow_array = True
        elif isinstance(node, ast.Constant) and node.value in _NARROW_TYPES:
            narrow_array = True
        elif isinstance(node, ast.Call):
            called = name_of(node.func)
            dtype_int = any(k.arg == "dtype" and is_int(k.value) for k in node.keywords)
            if called == "astype" and ((node.args and is_int(node.args[0])) or dtype_int):
                found.setdefault("astype(int)", line)
            elif called == "dtype" and node.args and is_int(node.args[0]):
                found.setdefault("np.dtype(int)", line)
            elif dtype_int and called not in _WIDENED:
                found.setdefault("dtype=int", line)
            elif called == "RandomState":
                found.setdefault("RandomState.randint", line)
            elif called in ("cumsum", "cumprod") and isinstance(node.func, ast.Attribute):
                if not any(k.arg == "dtype" for k in node.keywords) and cumulative is None:
                    cumulative = line
    if narrow_array and cumulative is not None:
        found.setdefault("cumsum/cumprod of a narrow integer array", cumulative)
    return tuple((idiom, line) for idiom, line in found.items() if idiom not in _NarrowWarned.idioms)


def _walk(tree):
    """Every node under `tree` (`ast.walk`, which the C module `_ast` lacks)."""
    pending = [tree]
    while pending:
        node = pending.pop()
        yield node
        for field in node._fields:
            value = getattr(node, field, None)
            if isinstance(value, ast.AST):
                pending.append(value)
            elif isinstance(value, list):
                pending.extend(item for item in value if isinstance(item, ast.AST))


def _warn_narrow_integers(idioms, cell_number):
    """Writes one `Wasm32IntegerWarning` line per idiom to the cell's stderr, once per slot, and
    only once numpy is loaded (pandas' `astype(int)` is numpy's too)."""
    if "numpy" not in sys.modules:
        return
    for idiom, line in sorted(idioms, key=lambda found: found[1]):
        _NarrowWarned.idioms.add(idiom)
        print(
            f"<cell-{cell_number}>:{line}: Wasm32IntegerWarning: {idiom}: numpy's default integer has 32 bits "
            f"in this sandbox (wasm32) where 64-bit Linux has 64, so results past 2**31 wrap around "
            f"silently; {_NARROW_ADVICE[idiom]} for the native result.",
            file=sys.stderr,
        )


def _like(wrapper, original):
    """`wrapper` under `original`'s name and docstring, so help() and tracebacks read the same."""
    wrapper.__name__, wrapper.__qualname__ = original.__name__, getattr(original, "__qualname__", original.__name__)
    wrapper.__doc__, wrapper.__module__ = original.__doc__, getattr(original, "__module__", None)
    wrapper.__wrapped__ = original
    return wrapper


def _install_compat():
    """Puts the pieces above in place; the patches apply when (or if) each module is loaded."""
    patches = {}
    if _WASM:
        patches = {
            "threading": _patch_threading,
            "concurrent.futures.thread": _patch_thread_pool,
            "numpy": _patch_numpy,
            "numpy.random": _patch_numpy_random,
        }
    for name, patch in patches.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if patches:
        sys.meta_path.insert(0, _AfterImport(patches))
    sys.meta_path.append(_FallbackModules())


_install_compat()


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
    # Its name generator is made (and seeded) on first use: forget it, the next is made anew.
    ("tempfile", lambda m: setattr(m, "_name_sequence", None)),
)


def _fresh_slot():
    """Makes a slot restored from a snapshot its own: new random streams, and no trace of the
    template's setup cells."""
    for name, reseed in _RESEED:
        module = sys.modules.get(name)
        if module is not None:
            reseed(module)
    _forget_setup_cells()


def _unseen(limit):
    """The fork's setup turn in the slot being forked: its stack probe, and the file
    descriptors from 3 up to `limit` that are open (see `_open_fds`), printed: a value would
    become the slot's `_`. It leaves no trace."""
    _forget_last_setup_cell()
    print(_open_fds(limit))


def _forked():
    """Makes a fork its own: new random streams (the fork and its parent must not draw the same
    numbers), and no trace of this turn. Everything else is the parent's."""
    for name, reseed in _RESEED:
        module = sys.modules.get(name)
        if module is not None:
            reseed(module)
    _forget_last_setup_cell()


def _forget_last_setup_cell():
    linecache.cache.pop(f"<cell-{_Cell.count}>", None)
    _Cell.count -= 1


def _seed_slot():
    """Reseeds a booted seeded slot (`--seed`): the host has just rewound the slot's entropy
    stream and virtual clock, so every generator reseeded here from `os.urandom` takes its seed
    from the slot's seed. A restored slot's `_fresh_slot` turn runs after the same rewind: both
    paths reseed alike."""
    _fresh_slot()


def _seed_native(seed):
    """Seeds a `process` slot's native Python (best effort: it still reads the host's clock and
    entropy): `random` now, and every generator `_RESEED` knows that is already imported."""
    import random

    random.seed(seed)
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed(seed & 0xFFFFFFFF)
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
    report["display"] = report["display_at"] = []
    report["result_after"] = 0
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
