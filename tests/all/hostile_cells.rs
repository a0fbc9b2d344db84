//! Cells written to break the host's report: forged reports, caps the guest tries to raise,
//! outputs too large for the report, and crashes whose reason must survive. Each case checks
//! the typed outcome, that the host stayed in charge of what it reports, and that the slot
//! (or its replacement) still works. Over the wasm backend, whose streams the host captures.

use rollbox::{Backend, ErrorKind, LimitKind, Limits, ToolCall};

use crate::support::{ok, pretty, value, wasm_backend};

/// A backend whose output cap is small enough to see every cut.
fn small_cap() -> rollbox::WasmBackend {
    wasm_backend(Limits {
        output_bytes: 1000,
        ..Limits::default()
    })
}

/// A cell that replaces the guest's report sender with one that sends a report of its own
/// making. The streams the host reports are what the cell really wrote to them: the host
/// captures them itself, so the forged `stdout` never reaches the result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_report_cannot_change_the_streams_the_host_reports() {
    let backend = small_cap();
    let slot = backend.acquire("forge").await.unwrap();
    let forge = r#"import rollbox_guest, json
_real = rollbox_guest._door_call
def _forged(report):
    _real(json.dumps({"stdout": "FORGED\n", "stderr": "", "stdout_dropped": 0, "stderr_dropped": 0,
                      "result": None, "display": [], "error": None}).encode())
rollbox_guest._send = _forged"#;
    ok(backend.execute(&slot, ToolCall::python(forge)).await);
    let result = backend.execute(&slot, ToolCall::python("print('real'); 1/0")).await;
    let cell = result.cell.as_ref().expect("a cell result");
    assert_eq!(cell.stdout, "real\n", "{}", pretty(&result));
    assert!(!result.output.contains("FORGED"), "{}", pretty(&result));
    backend.release(&slot, true).await.unwrap();
}

/// The guest's own cap is the guest's business: raising it changes nothing the host keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_guest_cannot_raise_its_output_cap() {
    let backend = small_cap();
    let slot = backend.acquire("cap").await.unwrap();
    ok(backend
        .execute(
            &slot,
            ToolCall::python("import rollbox_guest\nrollbox_guest._Config.cap = 12 * 2**20"),
        )
        .await);
    let result = ok(backend
        .execute(&slot, ToolCall::python("print('x' * (10 * 2**20))"))
        .await);
    let stdout = &result.cell.as_ref().unwrap().stdout;
    assert!(stdout.len() < 1100, "kept {} bytes", stdout.len());
    assert!(result.metadata.truncated);
    assert_eq!(result.metadata.limit_hit, Some(LimitKind::Output));
    backend.release(&slot, true).await.unwrap();
}

/// An exception's text is output like any other: capped by the host, the cut marked, the cell
/// an ordinary cell error, and the slot's state kept. Raw bytes that JSON escapes sixfold and a
/// value far over the report's budget included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_exception_text_is_capped_and_the_state_survives() {
    let backend = small_cap();
    let slot = backend.acquire("exception").await.unwrap();
    ok(backend.execute(&slot, ToolCall::python("kept = 41")).await);
    for cell in [
        "raise ValueError('v' * (5 * 2**20))",
        "raise ValueError('v' * (20 * 2**20))",
        "raise ValueError('\\x01' * (4 * 2**20))",
    ] {
        let result = backend.execute(&slot, ToolCall::python(cell)).await;
        assert_eq!(
            result.error.as_ref().map(|e| e.kind),
            Some(ErrorKind::CellError),
            "{cell}: {}",
            pretty(&result)
        );
        let error = result.cell.as_ref().and_then(|c| c.error.as_ref()).expect("the error");
        assert_eq!(error.name, "ValueError");
        assert!(error.value.len() < 1100, "{cell}: value of {} bytes", error.value.len());
        let traceback: usize = error.traceback.iter().map(String::len).sum();
        assert!(traceback < 2200, "{cell}: traceback of {traceback} bytes");
        assert!(
            result.output.len() < 4000,
            "{cell}: output of {} bytes",
            result.output.len()
        );
        assert!(result.metadata.truncated, "{cell}");
        assert!(!result.metadata.state_lost, "{cell}");
    }
    assert_eq!(
        value(&ok(backend.execute(&slot, ToolCall::python("kept + 1")).await)),
        "42"
    );
    backend.release(&slot, true).await.unwrap();
}

/// A final value whose rich form is larger than the host takes keeps its text, says what was
/// dropped, and the cell still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_rich_output_is_dropped_not_the_cell() {
    let backend = small_cap();
    let slot = backend.acquire("rich").await.unwrap();
    let cell = "class Huge:\n    def _repr_html_(self):\n        return '<b>' * (14 * 2**20)\nHuge()";
    let result = ok(backend.execute(&slot, ToolCall::python(cell)).await);
    let shown = result
        .cell
        .as_ref()
        .and_then(|c| c.result.as_ref())
        .expect("a final value");
    assert!(!shown.contains_key("text/html"), "{}", pretty(&result));
    assert!(shown["text/plain"].contains("was dropped"), "{}", pretty(&result));
    assert_eq!(value(&ok(backend.execute(&slot, ToolCall::python("1 + 1")).await)), "2");
    backend.release(&slot, true).await.unwrap();
}

/// A crash says why: the trap's own reason, not wasmtime's empty context line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_names_its_trap() {
    let backend = small_cap();
    let slot = backend.acquire("crash").await.unwrap();
    let nested = format!("{}1{}", "(".repeat(150), ")".repeat(150));
    let result = backend.execute(&slot, ToolCall::python(nested)).await;
    if result.success {
        // A runtime with a deeper stack parses it, as native CPython does: nothing to name.
        return;
    }
    let message = &result.error.as_ref().expect("an error").message;
    assert!(!message.contains("wasm backtrace:;"), "{message}");
    assert!(message.contains("stack"), "the trap's reason is named: {message}");
    assert_eq!(value(&ok(backend.execute(&slot, ToolCall::python("1 + 1")).await)), "2");
    backend.release(&slot, true).await.unwrap();
}

/// The issue's case: one slot opening files without end. It stops at its own cap with `EMFILE`
/// (an `OSError` the cell can catch), keeps its state, and can open files again once it closes
/// some; another slot of the same backend opens files all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_that_hoards_descriptors_stops_at_its_cap_and_others_go_on() {
    let backend = wasm_backend(Limits {
        open_files: 32,
        ..Limits::default()
    });
    let hoarder = backend.acquire("hoard").await.unwrap();
    let neighbour = backend.acquire("neighbour").await.unwrap();
    let hoard = r#"import errno, os
held = []
try:
    for i in range(20_000):
        held.append(os.open(f"/tmp/f{i % 8}", os.O_CREAT | os.O_RDONLY))
except OSError as e:
    stopped = (e.errno == errno.EMFILE, e.strerror)
(len(held), stopped)"#;
    let result = ok(backend.execute(&hoarder, ToolCall::python(hoard)).await);
    assert_eq!(
        value(&result),
        "(32, (True, 'No file descriptors available'))",
        "{}",
        pretty(&result)
    );

    let others = "import os\nfds = [os.open('/tmp/mine', os.O_CREAT | os.O_RDONLY) for _ in range(32)]\nfor fd in fds: os.close(fd)\nlen(fds)";
    let result = ok(backend.execute(&neighbour, ToolCall::python(others)).await);
    assert_eq!(value(&result), "32", "{}", pretty(&result));

    // Closing makes room again.
    let again = "os.close(held.pop()); os.close(held.pop())\nheld.append(os.open('/tmp/again', os.O_CREAT | os.O_RDONLY))\nheld.append(os.open('/tmp/again', os.O_CREAT | os.O_RDONLY))\nlen(held)";
    let result = ok(backend.execute(&hoarder, ToolCall::python(again)).await);
    assert_eq!(value(&result), "32", "{}", pretty(&result));
    let full =
        "try:\n    os.open('/tmp/again', os.O_RDONLY)\nexcept OSError as e:\n    full = e.errno == errno.EMFILE\nfull";
    let result = ok(backend.execute(&hoarder, ToolCall::python(full)).await);
    assert_eq!(value(&result), "True", "{}", pretty(&result));
    backend.release(&hoarder, true).await.unwrap();
    backend.release(&neighbour, true).await.unwrap();
}

/// The same hoarding cell on the process backend: its programs run under `RLIMIT_NOFILE`, so the
/// cell stops with `EMFILE` near its cap (the cap counts what the cell opens, plus a few
/// descriptors every program starts with) and the interpreter goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_slot_that_hoards_descriptors_stops_near_its_cap() {
    let (backend, _root) = crate::process::process_backend(Limits {
        open_files: 32,
        ..Limits::default()
    });
    let slot = backend.acquire("hoard").await.unwrap();
    let hoard = r#"import errno, os
held = []
try:
    for i in range(20_000):
        held.append(os.open("/tmp/f", os.O_CREAT | os.O_RDONLY))
except OSError as e:
    stopped = e.errno == errno.EMFILE
(32 <= len(held) <= 48, stopped)"#;
    let result = ok(backend.execute(&slot, ToolCall::python(hoard)).await);
    assert_eq!(value(&result), "(True, True)", "{}", pretty(&result));
    let result = ok(backend.execute(&slot, ToolCall::python("len(held)")).await);
    assert!(value(&result).parse::<usize>().is_ok(), "{}", pretty(&result));
    backend.release(&slot, true).await.unwrap();
}

/// Deep nesting in the parser never crashes the slot: 140 nested parentheses parse (they used to
/// exhaust the wasm stack and lose the slot's state), and deeper ones, up to `compile()` of
/// 2,000, raise a catchable error with the state kept. Native CPython parses up to 199 and
/// raises `SyntaxError` beyond; here the guest's own C-stack check raises `MemoryError` ("Parser
/// stack overflowed") from about 150 (docs/security.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_parser_nesting_parses_or_raises_and_never_crashes() {
    let backend = crate::support::shared_wasm();
    let slot = backend.acquire("nesting").await.unwrap();
    ok(backend.execute(&slot, ToolCall::python("kept = 'state'")).await);
    let code = format!("{}1{}", "(".repeat(140), ")".repeat(140));
    let result = ok(backend.execute(&slot, ToolCall::python(code)).await);
    assert_eq!(value(&result), "1", "{}", pretty(&result));
    for depth in [199, 2000] {
        let deep = format!(
            "try:\n    compile('(' * {depth} + ')' * {depth}, 'deep', 'eval')\nexcept (MemoryError, SyntaxError) as e:\n    \
             caught = type(e).__name__\ncaught, kept"
        );
        let result = ok(backend.execute(&slot, ToolCall::python(deep)).await);
        assert_eq!(
            value(&result),
            "('MemoryError', 'state')",
            "depth {depth}: {}",
            pretty(&result)
        );
    }
    backend.release(&slot, true).await.unwrap();
}

/// The cell that made a 1 TiB sparse file at once (a truncation), a write far past the end, one
/// across the cap, and a plain write after a far seek: each fails with `EFBIG` or is cut at the
/// cap, nothing lands past it, a file up to the cap is written, and the slot goes on, on both
/// backends (`RLIMIT_FSIZE` on process; the host's checked `fd_pwrite`, `fd_write` and
/// `fd_filestat_set_size` on wasm).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparse_and_long_files_stop_at_the_file_size_cap() {
    let limits = Limits {
        file_bytes: 1 << 20,
        ..Limits::default()
    };
    let wasm = wasm_backend(limits);
    let (process, _root) = crate::process::process_backend(limits);
    // A write across the cap is refused whole on wasm and cut at the cap by the kernel (a short
    // write) on the process backend: either way nothing lands past the cap.
    let setup = r#"import errno, os
def stopped(attempt):
    try:
        return attempt() <= 2**20
    except OSError as e:
        return e.errno == errno.EFBIG
def check(attempts):
    with open("/tmp/sparse", "wb", buffering=0) as f:
        refused = [stopped(lambda: attempt(f)) for attempt in attempts]
    with open("/tmp/full", "wb") as f:
        f.write(b"z" * 2**20)
    return refused, os.path.getsize("/tmp/sparse") <= 2**20, os.path.getsize("/tmp/full")
truncate = lambda f: os.truncate("/tmp/sparse", 2**40) or 2**41
pwrite_far = lambda f: os.pwrite(f.fileno(), b"x", 2**40) and 2**41
pwrite_across = lambda f: os.pwrite(f.fileno(), b"y" * (2**20 + 1), 0)
seek_and_write = lambda f: f.seek(2**40) and f.write(b"x") and 2**41"#;
    let cases: [(&dyn Backend, &str, &str); 2] = [
        (
            &wasm,
            "check([truncate, pwrite_far, pwrite_across, seek_and_write])",
            "([True, True, True, True], True, 1048576)",
        ),
        (
            &process,
            "check([truncate, pwrite_far, pwrite_across, seek_and_write])",
            "([True, True, True, True], True, 1048576)",
        ),
    ];
    for (backend, cell, expected) in cases {
        let slot = backend.acquire("long files").await.unwrap();
        ok(backend.execute(&slot, ToolCall::python(setup)).await);
        let result = ok(backend.execute(&slot, ToolCall::python(cell)).await);
        assert_eq!(value(&result), expected, "{}: {}", backend.name(), pretty(&result));
        ok(backend.execute(&slot, ToolCall::python("1")).await);
        backend.release(&slot, true).await.unwrap();
    }
}
