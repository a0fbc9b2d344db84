//! The adversarial corpus: over a hundred hostile inputs, each a row of a table, each judged by
//! the same mechanical verdict. A hostile model's cells and commands run on the wasm and the
//! process backends; a hostile client's requests and raw bytes go to a real `rollbox serve`
//! process on loopback.
//!
//! The verdict of every case:
//! - **a typed outcome**: the exact `ErrorKind` (and `LimitKind`, exception name or HTTP status
//!   and error code) the table expects, plus any text the result must or must not hold;
//! - **the host healthy**: the backend or server answers a plain call afterwards;
//! - **the slot usable, or its reset reported**: a value the slot held before the case is still
//!   there, unless the result says `state_lost`, and then the slot runs a new cell;
//! - **nothing leaked**: the workspace is gone after release, no file appeared outside it (a
//!   host folder every escape aims at stays empty), no process carrying the case's token
//!   outlives its release, and the server's descriptor count returns to where it started.
//!
//! A case that shows a real gap carries a `known_gap` note: the test prints it and checks the
//! behaviour as it is today, so the gap is visible and a fix shows up as a failing row to
//! update. Every gap is listed in docs/security.md.

use std::path::PathBuf;
use std::time::Duration;

use rollbox::{Backend, ErrorKind, ExecutionResult, LimitKind, Limits, ToolCall};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::support::{NO_HANG, wasm_backend};

// ---- the verdict -------------------------------------------------------------------------------

/// What a case's result must be.
#[derive(Clone, Copy, Debug)]
enum Outcome {
    /// The call succeeded.
    Success,
    /// The cell raised this exception (an ordinary `cell_error`).
    Raised(&'static str),
    /// The call failed with this kind.
    Failed(ErrorKind),
    /// The call reached this limit.
    Limit(LimitKind),
    /// The interpreter died: `guest_crashed`, with `state_lost` set.
    Crashed,
    /// A command exited with a non-zero status.
    NonZero,
}

/// One hostile input for a backend.
struct Case {
    name: &'static str,
    call: ToolCall,
    /// Cells run first in the same slot, each of which must succeed (a symlink to follow, a FIFO).
    setup: Vec<ToolCall>,
    outcome: Outcome,
    /// Text the call's output must hold.
    shows: Option<&'static str>,
    /// Text the call's output must not hold: a secret, a forged claim.
    hides: Option<&'static str>,
    /// Whether output was cut at the cap (`truncated`), when the case is about that.
    truncated: Option<bool>,
    /// A gap this case shows; printed, and listed in docs/security.md.
    known_gap: Option<&'static str>,
}

impl Case {
    fn new(name: &'static str, call: ToolCall, outcome: Outcome) -> Case {
        Case {
            name,
            call,
            setup: Vec::new(),
            outcome,
            shows: None,
            hides: None,
            truncated: None,
            known_gap: None,
        }
    }
    fn py(name: &'static str, code: impl Into<String>, outcome: Outcome) -> Case {
        Case::new(name, ToolCall::python(code), outcome)
    }
    fn bash(name: &'static str, command: impl Into<String>, outcome: Outcome) -> Case {
        Case::new(
            name,
            ToolCall::new("bash", json!({ "command": command.into() })),
            outcome,
        )
    }
    fn tool(name: &'static str, tool: &str, arguments: Value, outcome: Outcome) -> Case {
        Case::new(name, ToolCall::new(tool, arguments), outcome)
    }
    fn after(mut self, setup: ToolCall) -> Case {
        self.setup.push(setup);
        self
    }
    fn shows(mut self, text: &'static str) -> Case {
        self.shows = Some(text);
        self
    }
    fn hides(mut self, text: &'static str) -> Case {
        self.hides = Some(text);
        self
    }
    fn truncated(mut self, cut: bool) -> Case {
        self.truncated = Some(cut);
        self
    }
    fn known_gap(mut self, note: &'static str) -> Case {
        self.known_gap = Some(note);
        self
    }
}

/// The case's verdict on its own result; `Err` says what was wrong.
fn judge(case: &Case, result: &ExecutionResult) -> Result<(), String> {
    let kind = result.error.as_ref().map(|e| e.kind);
    let raised = result
        .cell
        .as_ref()
        .and_then(|c| c.error.as_ref())
        .map(|e| e.name.as_str());
    let fits = match case.outcome {
        Outcome::Success => result.success,
        Outcome::Raised(name) => kind == Some(ErrorKind::CellError) && raised == Some(name),
        Outcome::Failed(expected) => kind == Some(expected),
        Outcome::Limit(limit) => kind == Some(ErrorKind::LimitExceeded) && result.metadata.limit_hit == Some(limit),
        Outcome::Crashed => kind == Some(ErrorKind::GuestCrashed) && result.metadata.state_lost,
        Outcome::NonZero => kind == Some(ErrorKind::NonZeroExit),
    };
    if !fits {
        return Err(format!("expected {:?}", case.outcome));
    }
    if let Some(text) = case.shows.filter(|t| !result.output.contains(t)) {
        return Err(format!("the output lacks {text:?}"));
    }
    if let Some(text) = case.hides.filter(|t| result.output.contains(t)) {
        return Err(format!("the output holds {text:?}"));
    }
    if let Some(cut) = case.truncated.filter(|cut| *cut != result.metadata.truncated) {
        return Err(format!("expected truncated: {cut}"));
    }
    Ok(())
}

/// A result in one paragraph: its kind, limit, exception, flags and the start of its output.
fn summary(result: &ExecutionResult) -> String {
    let output: String = result.output.chars().take(400).collect();
    format!(
        "success={} kind={:?} limit={:?} raised={:?} truncated={} state_lost={} output={output:?}",
        result.success,
        result.error.as_ref().map(|e| e.kind),
        result.metadata.limit_hit,
        result
            .cell
            .as_ref()
            .and_then(|c| c.error.as_ref())
            .map(|e| e.name.as_str()),
        result.metadata.truncated,
        result.metadata.state_lost,
    )
}

/// The folder every escape of `backend`'s table aims at: a host path outside every workspace,
/// which must stay empty. [`run_cases`] makes it first and removes it after.
fn escape_target(backend: &str) -> PathBuf {
    std::env::temp_dir().join(format!("rollbox-corpus-escape-{}-{backend}", std::process::id()))
}

fn escape_target_is_empty(backend: &str) -> bool {
    std::fs::read_dir(escape_target(backend))
        .map(|mut d| d.next().is_none())
        .unwrap_or(false)
}

/// How long killed processes may take to disappear after a release before they count as leaked.
const REAPED_WITHIN: Duration = Duration::from_secs(10);

/// A token unique to this run and backend, carried by every process a case starts, so leaks
/// can be found (the tables run in parallel, so each backend has its own).
fn token(backend: &str) -> String {
    format!("corpustoken{}{backend}", std::process::id())
}

/// The live processes whose command line holds `token`.
fn processes_holding(token: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let line = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            line.contains(token)
                .then(|| format!("{}: {line}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Runs every case on `backend`, each in a fresh slot, and returns the failed verdicts.
async fn run_cases(backend: &dyn Backend, cases: Vec<Case>) -> Vec<String> {
    let target = escape_target(backend.name());
    std::fs::create_dir_all(&target).expect("the escape target folder");
    let mut failures = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        if let Some(note) = case.known_gap {
            println!("known_gap [{} {}]: {note}", backend.name(), case.name);
        }
        if let Err(why) = run_case(backend, i, case).await {
            failures.push(format!("[{} {}] {why}", backend.name(), case.name));
        }
    }
    // Empty, or a case already failed for what appeared in it.
    let _ = std::fs::remove_dir(&target);
    failures
}

async fn run_case(backend: &dyn Backend, i: usize, case: &Case) -> Result<(), String> {
    let slot = backend
        .acquire(&format!("corpus-{i}"))
        .await
        .map_err(|e| format!("acquire: {e}"))?;
    let verdict = judge_in_slot(backend, &slot, i, case).await;
    backend
        .release(&slot, true)
        .await
        .map_err(|e| format!("release: {e}"))?;
    verdict?;
    if slot.workspace.exists() {
        return Err(format!(
            "the workspace {} outlived its release",
            slot.workspace.display()
        ));
    }
    if !escape_target_is_empty(backend.name()) {
        return Err(format!(
            "a file appeared in {}",
            escape_target(backend.name()).display()
        ));
    }
    // Killed processes take a moment to be reaped: wait for them, within a guard that only
    // keeps a real leak from passing.
    let deadline = tokio::time::Instant::now() + REAPED_WITHIN;
    let mut leaked = processes_holding(&token(backend.name()));
    while !leaked.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        leaked = processes_holding(&token(backend.name()));
    }
    if !leaked.is_empty() {
        return Err(format!("processes outlived the release: {leaked:?}"));
    }
    Ok(())
}

/// The case's verdict in `slot`: its own outcome, then whether the slot is still usable.
async fn judge_in_slot(backend: &dyn Backend, slot: &rollbox::Slot, i: usize, case: &Case) -> Result<(), String> {
    let slot = slot.clone();
    let canary = format!("kept-{i}");
    let planted = backend
        .execute(&slot, ToolCall::python(format!("corpus_canary = {canary:?}")))
        .await;
    if !planted.success {
        return Err(format!("the canary cell failed: {}", summary(&planted)));
    }
    for setup in &case.setup {
        let result = backend.execute(&slot, setup.clone()).await;
        if !result.success {
            return Err(format!("the setup call failed: {}", summary(&result)));
        }
    }
    let result = tokio::time::timeout(NO_HANG, backend.execute(&slot, case.call.clone()))
        .await
        .map_err(|_| "the call hung".to_string())?;
    judge(case, &result).map_err(|why| format!("{why}; got {}", summary(&result)))?;

    // The slot is usable: its state is kept, or its loss was reported and it runs anew.
    // Printed, not shown as a value: the host captures the streams itself, so even a cell that
    // forged the guest's reports cannot hide the canary.
    let follow = backend.execute(&slot, ToolCall::python("print(corpus_canary)")).await;
    let held = follow.output.contains(&canary);
    if result.metadata.state_lost {
        let fresh = backend.execute(&slot, ToolCall::python("6 * 7")).await;
        if !fresh.output.contains("42") {
            return Err(format!("the reset slot does not run a cell: {}", summary(&fresh)));
        }
    } else if !held {
        return Err(format!(
            "the slot lost its state without saying so: {}; then {}",
            summary(&result),
            summary(&follow)
        ));
    }
    Ok(())
}

/// Fails with every failed verdict at once, so one run shows the whole table.
#[track_caller]
fn assert_no_failures(failures: Vec<String>, cases: usize) {
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

// ---- wasm: a hostile model's cells -------------------------------------------------------------

/// Limits small enough that every exhaustion case ends quickly.
fn tight_limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(2),
        memory_bytes: 256 << 20,
        output_bytes: 4096,
        open_files: 64,
        file_bytes: 1 << 20,
        ..Limits::default()
    }
}

fn wasm_cases() -> Vec<Case> {
    use Outcome::*;
    let escape = escape_target("wasm").display().to_string();
    let write_escape = format!("open({:?}, 'w').write('escaped')", format!("{escape}/x"));
    vec![
        // Escapes: paths, symlinks, /proc, the environment, the host's own tools.
        Case::py(
            "read /etc/passwd",
            "open('/etc/passwd').read()",
            Raised("FileNotFoundError"),
        )
        .hides("root:"),
        Case::py(
            "read through ..",
            "open('../../../../../../etc/passwd').read()",
            Raised("PermissionError"),
        )
        .hides("root:"),
        Case::py(
            "write to the host escape folder",
            write_escape.clone(),
            Raised("FileNotFoundError"),
        ),
        Case::py(
            "chdir to / then write",
            format!("import os; os.chdir('/'); {write_escape}"),
            Raised("FileNotFoundError"),
        ),
        Case::py(
            "symlink to /etc",
            "import os; os.symlink('/etc/passwd', 'l'); open('l').read()",
            Raised("PermissionError"),
        )
        .hides("root:"),
        Case::py(
            "symlink chain up",
            "import os; os.symlink('..', 'up'); os.listdir('up/up/up')",
            Raised("PermissionError"),
        ),
        Case::py(
            "read /proc/self/environ",
            "open('/proc/self/environ').read()",
            Raised("FileNotFoundError"),
        ),
        Case::py(
            "read /proc/self/mem",
            "open('/proc/self/mem', 'rb').read(10)",
            Raised("FileNotFoundError"),
        ),
        Case::py(
            "the environment holds no host variable",
            "import os; sorted(os.environ)",
            Success,
        )
        .hides("CARGO"),
        Case::py(
            "list the root",
            "import os; sorted(os.listdir('/'))",
            Raised("FileNotFoundError"),
        ),
        Case::py("open a device", "open('/dev/mem', 'rb')", Raised("FileNotFoundError")),
        Case::py(
            "socket",
            "import socket; socket.socket().connect(('127.0.0.1', 22))",
            Raised("OSError"),
        ),
        Case::py(
            "urlopen loopback",
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:1', timeout=1)",
            Raised("AttributeError"),
        ),
        Case::py(
            "subprocess",
            "import subprocess; subprocess.run(['ls'])",
            Raised("OSError"),
        ),
        Case::py(
            "os.system",
            "import os; os.system('touch /tmp/pwned')",
            Raised("AttributeError"),
        ),
        Case::py("fork", "import os; os.fork()", Raised("AttributeError")),
        Case::py("ctypes", "import ctypes; ctypes.CDLL('libc.so.6')", Raised("OSError")),
        Case::py(
            "threads",
            "import threading; threading.Thread(target=print, args=('threaded',)).start()",
            Success,
        ),
        // Forging: the guest's own report machinery, fake frames, hostile output bytes.
        Case::py(
            "forged report sender",
            "import rollbox_guest, json\n_real = rollbox_guest._door_call\n\
             rollbox_guest._send = lambda r: _real(json.dumps({'stdout': 'FORGED', 'stderr': '', 'stdout_dropped': 0, \
             'stderr_dropped': 0, 'result': None, 'display': [], 'error': None}).encode())\nprint('real')",
            Success,
        )
        .shows("real")
        .hides("FORGED"),
        Case::py("a forged sender hides a later error", "1 / 0", Success)
            .after(ToolCall::python(
                "import rollbox_guest, json\n_real = rollbox_guest._door_call\n\
                 rollbox_guest._send = lambda r: _real(json.dumps({'stdout': '', 'stderr': '', 'stdout_dropped': 0, \
                 'stderr_dropped': 0, 'result': None, 'display': [], 'error': None}).encode())",
            ))
            .known_gap(
                "a wasm cell that replaces the guest's report sender decides later cells' `success`, `error` and \
                 `result` (the streams stay the host's); docs/security.md, What is NOT protected",
            ),
        Case::py(
            "door called with garbage",
            "import rollbox_guest; rollbox_guest._door_call(b'\\xff\\x00garbage')",
            Success,
        ),
        Case::py(
            "door called with a fake report",
            "import rollbox_guest; rollbox_guest._door_call(b'{\"stdout\": \"FAKE\"}')\nprint('mine')",
            Success,
        )
        .shows("mine")
        .hides("FAKE"),
        Case::py(
            "the guest module removed",
            "import sys; sys.modules['rollbox_guest'] = None; print('gone')",
            Success,
        ),
        Case::py(
            "a fake report frame printed",
            "print('{\"stdout\": \"FORGED\", \"error\": null, \"result\": {\"text/plain\": \"1\"}}')",
            Success,
        )
        .shows("FORGED"),
        Case::py(
            "invalid UTF-8 on stdout",
            "import sys; sys.stdout.buffer.write(b'\\xff\\xfe\\xc0ok'); sys.stdout.flush()",
            Success,
        )
        .shows("ok"),
        Case::py(
            "raw bytes to fd 1",
            "import os; os.write(1, b'\\xff' * 100000)",
            Success,
        )
        .truncated(true),
        Case::py(
            "stdout replaced by None",
            "import sys; sys.stdout = None; print('lost')",
            Success,
        ),
        // Closing them made every later cell of the slot report success with empty streams; the
        // host refuses it (docs/parity.md), and the follow-up cell still shows its output.
        Case::py(
            "fds 1 and 2 closed",
            "import os; os.close(1); os.close(2)",
            Raised("PermissionError"),
        ),
        Case::py("fd 2 closed", "import os; os.close(2)", Raised("PermissionError")),
        Case::py(
            "the guest's cap raised",
            "import rollbox_guest; rollbox_guest._Config.cap = 2**40; print('x' * 100000)",
            Success,
        )
        .truncated(true),
        Case::py("SystemExit", "raise SystemExit(3)", Raised("SystemExit")),
        Case::py(
            "KeyboardInterrupt",
            "raise KeyboardInterrupt",
            Raised("KeyboardInterrupt"),
        ),
        Case::py("os._exit", "import os; os._exit(0)", Crashed),
        Case::py(
            "an exception whose str raises",
            "class E(Exception):\n    def __str__(self): raise RuntimeError('no')\nraise E()",
            Raised("E"),
        ),
        Case::py(
            "a huge exception",
            "raise ValueError('v' * 10**7)",
            Raised("ValueError"),
        )
        .truncated(true),
        Case::py(
            "a value whose repr raises",
            "class R:\n    def __repr__(self): raise RuntimeError('no')\nR()",
            Success,
        )
        .shows("repr() raised RuntimeError"),
        Case::py(
            "a value whose repr is not text",
            "class R:\n    def __repr__(self): return 42\nR()",
            Success,
        )
        .shows("repr() raised TypeError"),
        Case::py(
            "a huge repr",
            "class R:\n    def __repr__(self): return 'r' * 10**7\nR()",
            Success,
        )
        .truncated(true),
        Case::py(
            "an html repr of the wrong type",
            "class R:\n    def _repr_html_(self): return b'bytes'\nR()",
            Success,
        ),
        Case::py(
            "a png repr of garbage",
            "class R:\n    def _repr_png_(self): return 'not png'\nR()",
            Success,
        ),
        // Exhaustion: memory, time, recursion, output, files.
        Case::py("one huge allocation", "b = bytearray(2**30)", Limit(LimitKind::Memory)),
        Case::py(
            "an allocation past the address space",
            "b = bytearray(2**31)",
            Raised("OverflowError"),
        ),
        Case::py(
            "growing without end",
            "xs = []\nwhile True: xs.append('x' * 10**6)",
            Limit(LimitKind::Memory),
        ),
        Case::py("an endless loop", "while True: pass", Limit(LimitKind::Time)),
        Case::py("a long sleep", "import time; time.sleep(1000)", Limit(LimitKind::Time)),
        Case::py("a huge power", "10 ** 10 ** 10", Limit(LimitKind::Time)),
        Case::py("a huge int printed", "str(10 ** 100000)", Raised("ValueError")),
        Case::py(
            "unbounded recursion",
            "def f(): return f()\nf()",
            Raised("RecursionError"),
        ),
        Case::py(
            "recursion with the limit lifted",
            "import sys; sys.setrecursionlimit(10**7)\ndef f(n): return f(n + 1)\nf(0)",
            Limit(LimitKind::Memory),
        ),
        Case::py("a print flood", "for i in range(10**5): print(i)", Success).truncated(true),
        Case::py(
            "a stderr flood",
            "import sys\nfor i in range(10**5): sys.stderr.write('e' * 50)",
            Success,
        )
        .truncated(true),
        Case::py(
            "many open files",
            "import os\nfds = []\nwhile True: fds.append(os.open('/tmp/f', os.O_CREAT | os.O_RDONLY))",
            Raised("OSError"),
        )
        .shows("descriptors"),
        Case::py(
            "a sparse file past the cap",
            "import os; os.truncate(open('/tmp/s', 'wb').name, 2**40)",
            Raised("OSError"),
        ),
        Case::py(
            "json nested deep",
            "import json; json.loads('[' * 100000 + ']' * 100000)",
            Crashed,
        )
        .known_gap(
            "json.loads of deep nesting exhausts the wasm stack: the slot restarts (reported) where CPython raises \
             RecursionError; docs/security.md, Deep nesting on wasm",
        ),
        // Parser abuse: deep nesting, huge literals, bytes no source holds.
        Case::py(
            "150 nested parentheses",
            format!("{}1{}", "(".repeat(150), ")".repeat(150)),
            Raised("MemoryError"),
        ),
        Case::py(
            "5,000 nested lists",
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)),
            Raised("MemoryError"),
        ),
        Case::py("a 100,000-term sum", format!("{}1", "1+".repeat(100_000)), Crashed).known_gap(
            "a 100,000-term sum exhausts the wasm stack in the compiler: the slot restarts (reported) where native \
             CPython raises RecursionError and keeps its state",
        ),
        Case::py(
            "a 5 MB string literal",
            format!("len('{}')", "s".repeat(5 << 20)),
            Success,
        )
        .shows("5242880"),
        Case::py("a syntax error", "def (:", Raised("SyntaxError")),
        Case::py("a NUL byte in the source", "x = 1\0", Raised("SyntaxError")),
        Case::py(
            "deep nested lambdas",
            format!("{}0", "lambda: ".repeat(3000)),
            Raised("MemoryError"),
        ),
        Case::py(
            "an endless generator listed",
            "list(iter(int, 1))",
            Limit(LimitKind::Memory),
        ),
        // The file tools and the call's own shape.
        Case::tool(
            "read_file through ..",
            "read_file",
            json!({"path": "../../etc/passwd"}),
            Failed(ErrorKind::Workspace),
        )
        .hides("root:"),
        Case::tool(
            "read_file absolute",
            "read_file",
            json!({"path": "/etc/passwd"}),
            Failed(ErrorKind::Workspace),
        )
        .hides("root:"),
        Case::tool(
            "write_file through ..",
            "write_file",
            json!({"path": "../../../x", "content": "x"}),
            Failed(ErrorKind::Workspace),
        ),
        Case::tool(
            "write_file to the escape folder",
            "write_file",
            json!({"path": format!("{escape}/x"), "content": "x"}),
            Failed(ErrorKind::Workspace),
        ),
        Case::tool(
            "list_dir ..",
            "list_dir",
            json!({"path": ".."}),
            Failed(ErrorKind::Workspace),
        ),
        Case::tool(
            "read_file of a folder",
            "read_file",
            json!({"path": "d"}),
            Failed(ErrorKind::Workspace),
        )
        .after(ToolCall::python("import os; os.mkdir('d')")),
        Case::tool(
            "read_file of bytes that are not UTF-8",
            "read_file",
            json!({"path": "bin"}),
            Failed(ErrorKind::Workspace),
        )
        .after(ToolCall::python("open('bin', 'wb').write(b'\\xff\\xfe\\x00')")),
        Case::tool(
            "search with a catastrophic pattern",
            "search",
            json!({"pattern": "(a+)+$"}),
            Success,
        )
        .after(ToolCall::python("open('a', 'w').write('a' * 100000 + 'b')")),
        Case::tool(
            "search with an invalid pattern",
            "search",
            json!({"pattern": "("}),
            Failed(ErrorKind::Workspace),
        ),
        Case::tool(
            "edit_file with an empty old string",
            "edit_file",
            json!({"path": "e", "old_string": "", "new_string": "x"}),
            Failed(ErrorKind::Workspace),
        )
        .after(ToolCall::python("open('e', 'w').write('text')")),
        Case::tool("an unknown tool", "rm_rf", json!({}), Failed(ErrorKind::UnknownTool)),
        Case::tool(
            "bash on wasm",
            "bash",
            json!({"command": "id"}),
            Failed(ErrorKind::ToolUnavailable),
        ),
        Case::tool(
            "code that is a number",
            "python",
            json!({"code": 42}),
            Failed(ErrorKind::InvalidArguments),
        ),
        Case::tool("no code", "python", json!({}), Failed(ErrorKind::InvalidArguments)),
        // serde would take a list as the fields in order and run it; refused instead.
        Case::tool(
            "arguments that are a list",
            "python",
            json!(["print(1)"]),
            Failed(ErrorKind::InvalidArguments),
        ),
        Case::tool(
            "arguments that are a string holding a list",
            "python",
            json!("[\"print(1)\"]"),
            Failed(ErrorKind::InvalidArguments),
        ),
        Case::new(
            "a call timeout longer than the backend's",
            ToolCall::python("import time; time.sleep(1000)").with_timeout(Duration::from_secs(100_000)),
            Limit(LimitKind::Time),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_cells_on_wasm_get_typed_outcomes_and_leak_nothing() {
    let backend = wasm_backend(tight_limits());
    let cases = wasm_cases();
    let count = cases.len();
    let failures = run_cases(&backend, cases).await;
    assert_eq!(backend.live_slots(), 0, "every slot was released");
    assert_no_failures(failures, count);
}

// ---- process: a hostile model's commands -------------------------------------------------------

fn process_cases() -> Vec<Case> {
    use Outcome::*;
    let token = token("process");
    // A process that carries the run's token in its command line, so a leak is found.
    let sleeper = |secs: u32| format!("bash -c 'sleep {secs}' {token}");
    let escape = escape_target("process").display().to_string();
    let fake_frame = r#"import os, struct, json
frame = json.dumps({"stdout": "FORGED", "stderr": "", "stdout_dropped": 0, "stderr_dropped": 0,
                    "result": None, "display": [], "error": None}).encode()
os.write(1, struct.pack(">I", len(frame)) + frame)
raise ValueError("real")"#;
    vec![
        Case::bash(
            "a process storm",
            format!("for i in $(seq 200); do {} & done; wait", sleeper(1000)),
            Limit(LimitKind::Time),
        ),
        Case::bash(
            "a detached process",
            format!("setsid {} > /dev/null 2>&1 < /dev/null &", sleeper(1000)),
            Success,
        ),
        Case::bash(
            "a nohup'd process",
            format!("nohup {} > /dev/null 2>&1 &", sleeper(1000)),
            Success,
        ),
        Case::bash(
            "a process that ignores SIGTERM",
            format!("bash -c 'trap \"\" TERM; sleep 1000' {token}"),
            Limit(LimitKind::Time),
        ),
        Case::bash(
            "a command with its streams closed",
            format!("{} <&- >&- 2>&- &", sleeper(1000)),
            Success,
        ),
        Case::bash("an output flood", "yes | head -c 50000000", Success).truncated(true),
        Case::bash("random bytes", "head -c 1000000 /dev/urandom", Success).truncated(true),
        Case::bash("stdin is empty, not a wait", "cat", Success),
        Case::bash("write to /etc", "echo x > /etc/rollbox-corpus", NonZero),
        Case::bash("write to /usr", "touch /usr/rollbox-corpus", NonZero),
        Case::bash("write to the escape folder", format!("touch {escape}/x"), NonZero),
        Case::bash("the network", "exec 3<>/dev/tcp/127.0.0.1/22", NonZero),
        Case::bash("the environment holds no host variable", "env", Success).hides("CARGO"),
        Case::bash("kill every process it can see", "kill -9 -1; echo survived", Success),
        Case::bash("a file past the size cap", "head -c 2000000 /dev/zero > big", NonZero),
        Case::bash("exit with a status", "exit 7", NonZero),
        Case::bash("exit by a signal", "kill -SEGV $$", NonZero),
        Case::tool(
            "read_file of a FIFO",
            "read_file",
            json!({"path": "pipe"}),
            Failed(ErrorKind::Workspace),
        )
        .after(ToolCall::new("bash", json!({"command": "mkfifo pipe"}))),
        Case::tool("search past a FIFO", "search", json!({"pattern": "x"}), Success)
            .after(ToolCall::new("bash", json!({"command": "mkfifo pipe; echo x > f"}))),
        Case::tool(
            "read_file through a symlink out",
            "read_file",
            json!({"path": "out"}),
            Failed(ErrorKind::Workspace),
        )
        .after(ToolCall::new("bash", json!({"command": "ln -s /etc/passwd out"})))
        .hides("root:"),
        Case::tool(
            "write_file through a symlink out",
            "write_file",
            json!({"path": "out/x", "content": "x"}),
            Failed(ErrorKind::Workspace),
        )
        .after(ToolCall::new("bash", json!({"command": format!("ln -s {escape} out")}))),
        Case::py("python: memory", "b = bytearray(2**31)", Limit(LimitKind::Memory)),
        Case::py("python: an endless loop", "while True: pass", Limit(LimitKind::Time)),
        Case::py("python: os._exit", "import os; os._exit(1)", Crashed),
        Case::py(
            "python: SIGKILL of itself",
            "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
            Crashed,
        ),
        Case::py(
            "python: a fork that lingers",
            format!("import os, subprocess; subprocess.Popen(['bash', '-c', 'sleep 1000', '{token}'])"),
            Success,
        ),
        Case::py("python: a print flood", "for i in range(10**5): print(i)", Success).truncated(true),
        Case::py(
            "python: raw bytes to fd 2",
            "import os; os.write(2, b'\\xff' * 100000)",
            Success,
        )
        .truncated(true),
        Case::py(
            "python: 150 nested parentheses",
            format!("{}1{}", "(".repeat(150), ")".repeat(150)),
            Success,
        ),
        // The frame arrives as stray text: fd 1 is not the report channel, so the real error stands.
        Case::py(
            "python: a forged report frame on fd 1",
            fake_frame,
            Raised("ValueError"),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_commands_on_the_process_backend_get_typed_outcomes_and_leak_nothing() {
    let (backend, _root) = crate::process::process_backend(tight_limits());
    let cases = process_cases();
    let count = cases.len();
    let failures = run_cases(&backend, cases).await;
    assert_eq!(backend.live_slots(), 0, "every slot was released");
    assert_no_failures(failures, count);
}

// ---- the server: a hostile client --------------------------------------------------------------

/// The server's bearer token in these cases.
const SERVER_TOKEN: &str = "corpus-token-0123456789abcdef";
/// The server's body limit, small so an oversized body is cheap to send.
const BODY_LIMIT: usize = 64 * 1024;

/// Ten times the server's header and idle timeouts here: a connection still open after this
/// was kept past them. A guard on the server's own timeouts, not a speed check.
const OPEN_TOO_LONG: Duration = Duration::from_secs(20);
/// What [`Server::exchange`] gives for a connection the server kept open too long.
const STILL_OPEN: &[u8] = b"(the server kept the connection open)";

/// What the server must answer.
#[derive(Clone, Copy, Debug)]
enum Answer {
    /// This HTTP status, and this text in the body (an error code, a result's kind).
    Status(u16, &'static str),
    /// The connection closes with no answer, or a 4xx, never a 2xx or 5xx.
    Refused,
}

/// What a request case needs before it runs.
#[derive(Clone, Copy)]
enum Needs {
    Nothing,
    /// A live slot, whose id replaces `{slot}` in the request.
    Slot,
    /// A slot acquired and released, whose id replaces `{slot}`.
    ReleasedSlot,
}

struct Request {
    name: &'static str,
    needs: Needs,
    bytes: Vec<u8>,
    answer: Answer,
}

/// A well-formed HTTP/1.1 request with `body`, the token, and `Connection: close`.
fn http(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: rollbox\r\nAuthorization: Bearer {SERVER_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn post(path: &str, body: &str) -> Vec<u8> {
    http("POST", path, body)
}

fn execute(call: Value) -> Vec<u8> {
    post(
        "/v1/execute",
        &json!({"calls": [{"slot_id": "{slot}", "call": call}]})
            .to_string()
            .replace("\"{slot}\"", "{slot}"),
    )
}

fn run_code(body: Value) -> Vec<u8> {
    post("/run_code", &body.to_string())
}

fn request(name: &'static str, bytes: Vec<u8>, answer: Answer) -> Request {
    Request {
        name,
        needs: Needs::Nothing,
        bytes,
        answer,
    }
}

fn with_slot(name: &'static str, bytes: Vec<u8>, answer: Answer) -> Request {
    Request {
        needs: Needs::Slot,
        ..request(name, bytes, answer)
    }
}

fn with_released_slot(name: &'static str, bytes: Vec<u8>, answer: Answer) -> Request {
    Request {
        needs: Needs::ReleasedSlot,
        ..request(name, bytes, answer)
    }
}

fn server_cases() -> Vec<Request> {
    use Answer::*;
    let deep_json = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let huge = format!("{{\"trajectory_id\": \"{}\"}}", "t".repeat(BODY_LIMIT * 2));
    vec![
        // Authentication and routing.
        request("no token", b"GET /v1/slots HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n".to_vec(), Status(401, "unauthorized")),
        request(
            "a wrong token",
            b"GET /v1/slots HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer nope\r\nConnection: close\r\n\r\n".to_vec(),
            Status(401, "unauthorized"),
        ),
        request(
            "a token of another scheme",
            format!("GET /v1/slots HTTP/1.1\r\nHost: r\r\nAuthorization: Basic {SERVER_TOKEN}\r\nConnection: close\r\n\r\n").into_bytes(),
            Status(401, "unauthorized"),
        ),
        request("an unknown route", http("GET", "/v1/secrets", ""), Status(404, "not_found")),
        request("a path traversal route", http("GET", "/v1/../../etc/passwd", ""), Status(404, "not_found")),
        request("a wrong method", http("GET", "/v1/execute", ""), Status(400, "allow: POST")),
        // Bodies that are not what the route takes.
        request("bad JSON", post("/v1/slots", "{not json"), Status(400, "bad_request")),
        request("JSON of the wrong type", post("/v1/execute", "{\"calls\": \"all\"}"), Status(400, "bad_request")),
        request("a negative slot id", post("/v1/execute", "{\"calls\": [{\"slot_id\": -1, \"call\": {\"name\": \"python\"}}]}"), Status(400, "bad_request")),
        request("a slot id past u64", post("/v1/execute", "{\"calls\": [{\"slot_id\": 1e30, \"call\": {\"name\": \"python\"}}]}"), Status(400, "bad_request")),
        request("a slot id that is text", post("/v1/execute", "{\"calls\": [{\"slot_id\": \"1\", \"call\": {\"name\": \"python\"}}]}"), Status(400, "bad_request")),
        request("JSON nested 10,000 deep", post("/v1/slots", &deep_json), Status(400, "bad_request")),
        request("a body over the limit", post("/v1/slots", &huge), Status(413, "payload_too_large")),
        request(
            "a chunked body over the limit",
            {
                let mut bytes = format!(
                    "POST /v1/slots HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer {SERVER_TOKEN}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                )
                .into_bytes();
                for _ in 0..4 {
                    bytes.extend_from_slice(format!("{:x}\r\n{}\r\n", BODY_LIMIT, "x".repeat(BODY_LIMIT)).as_bytes());
                }
                bytes.extend_from_slice(b"0\r\n\r\n");
                bytes
            },
            Status(413, "payload_too_large"),
        ),
        request(
            "a body that is not UTF-8",
            {
                let mut bytes = post("/v1/slots", "{\"trajectory_id\": \"\u{0}\u{0}\"}");
                let at = bytes.len() - 3;
                bytes[at] = 0xff;
                bytes[at + 1] = 0xfe;
                bytes
            },
            Status(400, "bad_request"),
        ),
        request("a trajectory id of 2 KB", post("/v1/slots", &json!({"trajectory_id": "t".repeat(2048)}).to_string()), Status(400, "bad_request")),
        request("a trajectory id that is a number", post("/v1/slots", "{\"trajectory_id\": 7}"), Status(400, "bad_request")),
        request("a seed that is text", post("/v1/slots", "{\"trajectory_id\": \"t\", \"seed\": \"x\"}"), Status(400, "bad_request")),
        // Slots that are not the caller's, or no longer live.
        request("execute on a slot never acquired", post("/v1/execute", "{\"calls\": [{\"slot_id\": 987654321, \"call\": {\"name\": \"python\", \"arguments\": {\"code\": \"1\"}}}]}"), Status(200, "unknown_slot")),
        request("release a slot never acquired", post("/v1/slots/987654321/release", "{}"), Status(404, "unknown_slot")),
        request("fork a slot never acquired", post("/v1/slots/987654321/fork", "{\"trajectory_id\": \"f\"}"), Status(404, "unknown_slot")),
        request("a slot id in the path that is text", post("/v1/slots/abc/release", "{}"), Status(400, "")),
        with_released_slot("release twice", post("/v1/slots/{slot}/release", "{}"), Status(404, "unknown_slot")),
        with_released_slot("execute after release", execute(json!({"name": "python", "arguments": {"code": "1"}})), Status(200, "unknown_slot")),
        with_slot("an unknown tool in a batch", execute(json!({"name": "rm_rf", "arguments": {}})), Status(200, "unknown_tool")),
        with_slot("a call timeout that is negative", execute(json!({"name": "python", "arguments": {"code": "1"}, "timeout": -5})), Status(400, "bad_request")),
        with_slot("a hostile cell through the server", execute(json!({"name": "python", "arguments": {"code": "while True: pass"}})), Status(200, "\"limit_hit\":\"time\"")),
        with_slot(
            "a print flood through the server",
            execute(json!({"name": "python", "arguments": {"code": "print('x' * 10**6)"}})),
            Status(200, "\"truncated\":true"),
        ),
        with_slot(
            "three hundred calls in one batch",
            post(
                "/v1/execute",
                &format!(
                    "{{\"calls\": [{}]}}",
                    vec!["{\"slot_id\": {slot}, \"call\": {\"name\": \"python\", \"arguments\": {\"code\": \"1\"}}}"; 300].join(",")
                ),
            ),
            Status(200, "results"),
        ),
        // /run_code, SandboxFusion's shape.
        request("run_code: bad base64", run_code(json!({"code": "print(1)", "files": {"a.txt": "!!!"}})), Status(200, "SandboxError")),
        request("run_code: a file through ..", run_code(json!({"code": "print(1)", "files": {"../../x": "eA=="}})), Status(200, "SandboxError")),
        request("run_code: an absolute file", run_code(json!({"code": "print(1)", "files": {"/tmp/x": "eA=="}})), Status(200, "SandboxError")),
        request("run_code: fetch through ..", run_code(json!({"code": "print(1)", "fetch_files": ["../../../etc/passwd"]})), Status(200, "SandboxError")),
        request("run_code: an unknown language", run_code(json!({"code": "print(1)", "language": "cobol"})), Status(200, "SandboxError")),
        request("run_code: no code", run_code(json!({"language": "python"})), Status(400, "bad_request")),
        request("run_code: a negative timeout", run_code(json!({"code": "print(1)", "run_timeout": -1})), Status(200, "SandboxError")),
        request("run_code: an endless loop", run_code(json!({"code": "while True: pass", "run_timeout": 1})), Status(200, "TimeLimitExceeded")),
        request("run_code: a memory bomb", run_code(json!({"code": "b = bytearray(2**30)"})), Status(200, "\"Failed\"")),
        // Raw bytes that are not a request.
        request("garbage bytes", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03garbage\r\n\r\n".to_vec(), Refused),
        request("HTTP/0.9", b"GET /v1/health\r\n\r\n".to_vec(), Refused),
        request("a NUL in a header", b"GET /v1/health HTTP/1.1\r\nHost: r\0x\r\nConnection: close\r\n\r\n".to_vec(), Refused),
        request(
            "a header of 200 KB",
            format!("GET /v1/health HTTP/1.1\r\nHost: r\r\nX-Big: {}\r\nConnection: close\r\n\r\n", "h".repeat(200_000)).into_bytes(),
            Refused,
        ),
        request(
            "Content-Length and chunked at once",
            format!(
                "POST /v1/slots HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer {SERVER_TOKEN}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n"
            )
            .into_bytes(),
            Refused,
        ),
        request(
            "a negative Content-Length",
            b"POST /v1/slots HTTP/1.1\r\nHost: r\r\nContent-Length: -1\r\nConnection: close\r\n\r\n".to_vec(),
            Refused,
        ),
        request(
            "a Content-Length that lies",
            format!(
                "POST /v1/slots HTTP/1.1\r\nHost: r\r\nAuthorization: Bearer {SERVER_TOKEN}\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n{{}}"
            )
            .into_bytes(),
            Refused,
        ),
        request(
            "two requests pipelined, the second bad",
            [http("GET", "/v1/health", "").as_slice(), b"BREW /coffee HTCPCP/1.0\r\n\r\n"].concat(),
            Status(200, "api_version"),
        ),
        request("half a header, then hang up", b"GET /v1/health HTTP/1.1\r\nHost: r\r\nX-Half: ".to_vec(), Refused),
    ]
}

/// A real `rollbox serve` (wasm backend, tight limits, a token) on loopback.
struct Server {
    child: tokio::process::Child,
    address: String,
}

impl Server {
    async fn start() -> Server {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
            .args([
                "--quiet",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--timeout",
                "2",
                "--memory",
                "256",
            ])
            .args([
                "--max-body-bytes",
                &BODY_LIMIT.to_string(),
                "--header-read-timeout",
                "2",
            ])
            .args(["--connection-idle-timeout", "2"])
            // Both caps: the backend keeps the larger of the two for every call (docs/API.md).
            .args(["--max-output", "4096", "--run-code-max-output", "4096"])
            .env(rollbox::env_vars::SERVER_TOKEN, SERVER_TOKEN)
            // The server ends when this pipe closes, so a test that is killed leaves none behind.
            .arg("--exit-on-stdin-eof")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("failed to start rollbox serve");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let line = tokio::time::timeout(NO_HANG, lines.next_line())
            .await
            .expect("a listening line")
            .expect("read")
            .expect("a line");
        let listening: Value = serde_json::from_str(&line).expect("JSON");
        let address = listening["url"]
            .as_str()
            .expect("a url")
            .trim_start_matches("http://")
            .to_owned();
        Server { child, address }
    }

    /// Stops the server as a parent that goes away would (its stdin closes), and checks that it
    /// exits cleanly and leaves no workspace root (`<tmp>/rollbox-<pid>-…`) behind.
    async fn stop(mut self) -> Result<(), String> {
        let pid = self.child.id().expect("the server runs");
        drop(self.child.stdin.take());
        let status = tokio::time::timeout(NO_HANG, self.child.wait())
            .await
            .map_err(|_| "the server did not exit when its stdin closed".to_string())?
            .map_err(|e| format!("wait: {e}"))?;
        if !status.success() {
            return Err(format!("the server exited with {status}"));
        }
        let prefix = format!("rollbox-{pid}-");
        let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default();
        match left.is_empty() {
            true => Ok(()),
            false => Err(format!(
                "the server left {:?} behind",
                left.iter().map(|e| e.path()).collect::<Vec<_>>()
            )),
        }
    }

    fn descriptors(&self) -> usize {
        let pid = self.child.id().expect("the server runs");
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(usize::MAX)
    }

    /// Sends `bytes` on a new connection and reads until the server closes it (or [`NO_HANG`]).
    async fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(&self.address).await.expect("a connection");
        // The server may answer and close before it has read everything (a 413): not an error.
        // No half-close: the server would take it as the client leaving. Requests say
        // `Connection: close`, and the rest are closed by the server's own timeouts.
        let _ = stream.write_all(bytes).await;
        let mut received = Vec::new();
        if tokio::time::timeout(OPEN_TOO_LONG, stream.read_to_end(&mut received))
            .await
            .is_err()
        {
            received.extend_from_slice(STILL_OPEN);
        }
        received
    }

    async fn call(&self, bytes: Vec<u8>) -> (u16, String) {
        let answer = String::from_utf8_lossy(&self.exchange(&bytes).await).into_owned();
        (status_of(&answer), answer)
    }

    async fn acquire(&self) -> u64 {
        let (status, answer) = self.call(post("/v1/slots", "{\"trajectory_id\": \"corpus\"}")).await;
        assert_eq!(status, 200, "{answer}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {answer}"));
        body["slot"]["id"].as_u64().expect("a slot id")
    }

    async fn release(&self, slot: u64) {
        let (status, answer) = self.call(post(&format!("/v1/slots/{slot}/release"), "{}")).await;
        assert_eq!(status, 200, "{answer}");
    }

    async fn live_slots(&self) -> u64 {
        let (status, answer) = self.call(http("GET", "/v1/health", "")).await;
        assert_eq!(status, 200, "health answers: {answer}");
        let body: Value = serde_json::from_str(answer.split("\r\n\r\n").nth(1).unwrap_or_default()).expect("JSON");
        body["live_slots"].as_u64().expect("live_slots")
    }
}

/// The status of an HTTP answer, or 0 when there is none.
fn status_of(answer: &str) -> u16 {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// `request` with `{slot}` replaced by `id` in its path and body, and its `Content-Length` made
/// to fit the new body.
fn with_slot_id(request: &[u8], id: u64) -> Vec<u8> {
    let text = String::from_utf8_lossy(request).replace("{slot}", &id.to_string());
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return text.into_bytes();
    };
    let head: Vec<String> = head
        .split("\r\n")
        .map(|line| match line.strip_prefix("Content-Length: ") {
            Some(_) => format!("Content-Length: {}", body.len()),
            None => line.to_owned(),
        })
        .collect();
    format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
}

async fn run_request(server: &Server, case: &Request) -> Result<(), String> {
    let slot = match case.needs {
        Needs::Nothing => None,
        Needs::Slot => Some(server.acquire().await),
        Needs::ReleasedSlot => {
            let slot = server.acquire().await;
            server.release(slot).await;
            Some(slot)
        }
    };
    let bytes = match slot {
        Some(id) => with_slot_id(&case.bytes, id),
        None => case.bytes.clone(),
    };
    let answer = String::from_utf8_lossy(&server.exchange(&bytes).await).into_owned();
    if let (Needs::Slot, Some(id)) = (case.needs, slot) {
        server.release(id).await;
    }
    let status = status_of(&answer);
    let fits = match case.answer {
        Answer::Status(expected, text) => status == expected && answer.contains(text),
        Answer::Refused => status == 0 || (400..500).contains(&status),
    };
    if !fits {
        let shown: String = answer.chars().take(2000).collect();
        return Err(format!("expected {:?}, got {status}:\n{shown}", case.answer));
    }
    // The host is healthy: a plain request on a new connection is answered.
    server.live_slots().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_to_the_server_get_typed_answers_and_leak_nothing() {
    let server = Server::start().await;
    // Warm up (the first slot loads the runtime), then take the baseline.
    let warm = server.acquire().await;
    server.release(warm).await;
    let baseline = server.descriptors();
    let cases = server_cases();
    let count = cases.len();
    let mut failures = Vec::new();
    for case in &cases {
        if let Err(why) = run_request(&server, case).await {
            failures.push(format!("[server {}] {why}", case.name));
        }
    }
    let live = server.live_slots().await;
    if live != 0 {
        failures.push(format!("{live} slots are still live: a case's slot was not released"));
    }
    // Closed connections are dropped asynchronously: wait (never for long) for the count to
    // come back to where it started.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while server.descriptors() > baseline && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if server.descriptors() > baseline {
        failures.push(format!(
            "the server holds {} descriptors, {baseline} before the cases",
            server.descriptors()
        ));
    }
    if let Err(why) = server.stop().await {
        failures.push(why);
    }
    assert_no_failures(failures, count);
}

/// The three tables together are the corpus the issue asks for: at least a hundred cases.
#[test]
fn the_corpus_has_at_least_a_hundred_cases() {
    let total = wasm_cases().len() + process_cases().len() + server_cases().len();
    assert!(total >= 100, "the corpus has {total} cases");
}

/// The fuzz targets' entries (`rollbox::fuzzing`, used by `fuzz/`) run the real decoders: a
/// forged report's huge exception comes back under the host's cap from both backends' paths,
/// bytes that are not a report are refused, and `/run_code`'s checks refuse bad base64.
#[test]
fn the_fuzz_entries_run_the_real_decoders() {
    let limits = Limits {
        output_bytes: 100,
        ..Limits::default()
    };
    let report = json!({"stdout": "s".repeat(10_000), "stderr": "", "stdout_dropped": 0, "stderr_dropped": 0,
        "result": {"text/plain": "r".repeat(10_000)}, "display": [],
        "error": {"name": "ValueError", "value": "v".repeat(10_000), "traceback": []}})
    .to_string();
    let cells = rollbox::fuzzing::guest_report(report.as_bytes(), b"out", b"", &limits).expect("a report");
    for (cell, cut) in cells {
        assert!(cut, "the cut is reported");
        assert!(cell.error.expect("the error").value.len() < 400);
        assert!(cell.result.expect("the value")["text/plain"].len() < 400);
        assert!(cell.stdout.len() < 400, "{}", cell.stdout.len());
    }
    assert!(rollbox::fuzzing::guest_report(b"{not a report", b"", b"", &limits).is_none());

    let bad = json!({"code": "print(1)", "files": {"a.txt": "!!!"}}).to_string();
    assert!(matches!(
        rollbox::fuzzing::run_code_request(bad.as_bytes()),
        Some(Err(_))
    ));
    let good = json!({"code": "print(1)", "files": {"a.txt": "eA=="}}).to_string();
    assert_eq!(rollbox::fuzzing::run_code_request(good.as_bytes()), Some(Ok(())));
    assert_eq!(rollbox::fuzzing::run_code_request(b"[1, 2"), None);
}
