"""rollbox's native driver: runs rollbox_guest's cells in a real CPython process.

The `process` backend starts `python3 -c LOADER DRIVER_SOURCE MARKER OUTPUT_CAP REPORT_BUDGET`;
the loader runs this file as the module `rollbox_native` and calls `main`, leaving `__main__`
(the cells' namespace) as empty as a fresh interpreter's. The protocol is framed (a 4-byte
big-endian length, then the bytes) over private copies of the original stdin and stdout:

    host -> driver: rollbox_guest.py's source once, then one cell's source per frame
    driver -> host: {"ready": true} once, then one cell report (JSON) per cell

Then fd 0 becomes /dev/null and fd 1 a copy of fd 2, so nothing a cell, a C extension or a
subprocess writes can corrupt the protocol: it all reaches the host on the stderr pipe, which
the host reads as the cell's extra stderr. Before each frame the driver writes MARKER there, so
the host knows where one cell's stray output ends.

At a cell's time limit the host sends the interpreter SIGINT, so the cell stops with
KeyboardInterrupt and the interpreter keeps its state, as Jupyter's interrupt does. SIGINT is
blocked while the driver's own code runs (reading the next frame), so a late one cannot end the
driver, and one still pending when the next cell starts is discarded: it was meant for a cell
that had already ended.
"""

import json
import os
import signal
import sys
import types

GUEST_FILE = "/rollbox/rollbox_guest.py"


def _read_exact(fd, n):
    chunks = []
    while n > 0:
        chunk = os.read(fd, n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_frame(fd):
    header = _read_exact(fd, 4)
    if header is None:
        return None
    return _read_exact(fd, int.from_bytes(header, "big"))


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Door:
    """The `_host` module's `call`, as rollbox_guest expects it: sends one frame to the host."""

    def __init__(self, out_fd, marker, budget):
        self.out_fd = out_fd
        self.marker = marker
        self.budget = budget

    def call(self, data):
        if len(data) > self.budget:
            # rollbox_guest then resends the report without its rich displays.
            raise ValueError(f"the report is {len(data)} bytes, over the {self.budget}-byte budget")
        self._end_stray_output()
        _write_all(self.out_fd, len(data).to_bytes(4, "big") + data)
        return b"ok"

    def _end_stray_output(self):
        for stream in (sys.__stdout__, sys.__stderr__):
            try:
                stream.flush()
            except Exception:
                pass
        _flush_c_stdio()
        _write_all(2, self.marker)


def _flush_c_stdio():
    """C code's printf output sits in libc's buffer until flushed; flush it so it is not lost
    or counted against the next cell. Only when ctypes is already loaded: importing it for
    every interpreter would cost more than the rare C extension that prints."""
    ctypes = sys.modules.get("ctypes")
    if ctypes is None:
        return
    try:
        ctypes.CDLL(None).fflush(None)
    except Exception:
        pass


def _private_protocol_fds():
    """Moves the protocol off fds 0 and 1 and points them at /dev/null and stderr."""
    proto_in, proto_out = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return proto_in, proto_out


def _load_guest(source):
    module = types.ModuleType("rollbox_guest")
    module.__file__ = GUEST_FILE
    sys.modules["rollbox_guest"] = module
    exec(compile(source, GUEST_FILE, "exec"), module.__dict__)
    return module


def _run_interruptible(guest, code):
    """Runs one cell with SIGINT deliverable, and only then."""
    if signal.SIGINT in signal.sigpending():
        signal.sigwait({signal.SIGINT})
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        guest._turn(code, "<turn>")
    finally:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def main():
    marker, output_cap, budget = sys.argv[1].encode(), int(sys.argv[2]), int(sys.argv[3])
    sys.argv = [""]
    # Python's own handler, even when rollbox was started with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    proto_in, proto_out = _private_protocol_fds()
    door = _Door(proto_out, marker, budget)
    host = types.ModuleType("_host")
    host.call = door.call
    sys.modules["_host"] = host
    source = _read_frame(proto_in)
    if source is None:
        return
    guest = _load_guest(source.decode("utf-8"))
    guest._Config.cap = output_cap
    door.call(json.dumps({"ready": True}).encode())
    while True:
        cell = _read_frame(proto_in)
        if cell is None:
            return
        _run_interruptible(guest, cell.decode("utf-8", "replace"))
