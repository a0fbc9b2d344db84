//! The conformance suite: behaviour every `Backend` must share. Each check takes
//! `&dyn Backend`; each backend's test module calls `run_all` (or single checks) with a real
//! instance of itself.

use std::time::Duration;

use rollbox::{Backend, ErrorKind, LimitKind, Slot, SlotId, ToolCall};
use serde_json::json;

use crate::support::{bash, ok, pretty, value};

/// Every check in this module, in turn.
pub async fn run_all(backend: &dyn Backend) {
    state_persists_across_calls(backend).await;
    only_a_final_expression_is_shown(backend).await;
    results_come_back_in_call_order(backend).await;
    slots_are_isolated(backend).await;
    file_tools_round_trip(backend).await;
    paths_cannot_leave_the_workspace(backend).await;
    bad_calls_get_clear_errors(backend).await;
    released_slots_are_gone(backend).await;
    file_tools_refuse_fifos(backend).await;
    a_fork_is_independent_of_its_parent(backend).await;
    outputs_come_back_in_the_order_written(backend).await;
}

/// A fork starts with its parent's variables and files; after it, neither sees the other's
/// writes. A backend that cannot fork says so with `Unsupported`, and its slot lives on.
pub async fn a_fork_is_independent_of_its_parent(backend: &dyn Backend) {
    let parent = backend.acquire("conformance-fork").await.expect("acquire");
    ok(backend
        .execute(&parent, ToolCall::python("x = 41\nopen('f.txt', 'w').write('parent')"))
        .await);
    let child = match backend.fork(&parent, "conformance-fork-child").await {
        Ok(child) => child,
        Err(rollbox::BackendError::Unsupported { .. }) => {
            ok(backend.execute(&parent, ToolCall::python("x")).await);
            backend.release(&parent, true).await.expect("release");
            return;
        }
        Err(error) => panic!(
            "{}: fork failed: {}",
            backend.name(),
            rollbox::error_text::error_chain(&error)
        ),
    };
    let read = "x, open('f.txt').read()";
    assert_eq!(
        value(&ok(backend.execute(&child, ToolCall::python(read)).await)),
        "(41, 'parent')"
    );
    ok(backend
        .execute(&child, ToolCall::python("x = 1\nopen('f.txt', 'w').write('child')"))
        .await);
    assert_eq!(
        value(&ok(backend.execute(&parent, ToolCall::python(read)).await)),
        "(41, 'parent')"
    );
    ok(backend
        .execute(&parent, ToolCall::python("x = 2\nopen('f.txt', 'w').write('parent 2')"))
        .await);
    assert_eq!(
        value(&ok(backend.execute(&child, ToolCall::python(read)).await)),
        "(1, 'child')"
    );
    backend.release(&child, true).await.expect("release");
    backend.release(&parent, true).await.expect("release");
}

/// A cell's `outputs` hold its stdout and stderr interleaved as written, its displays and final
/// value where they were shown, and its exception last, in nbformat's shape; the older fields
/// keep each stream whole.
pub async fn outputs_come_back_in_the_order_written(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-outputs").await.expect("acquire");
    let code = "import sys\nprint('one')\nprint('two', file=sys.stderr)\ndisplay('shown')\nprint('three')\n\
                sys.stderr.write('four\\n')\nprint('five')\n42";
    let result = ok(backend.execute(&slot, ToolCall::python(code)).await);
    let cell = result.cell.as_ref().expect("a cell");
    assert_eq!(
        (cell.stdout.as_str(), cell.stderr.as_str()),
        ("one\nthree\nfive\n", "two\nfour\n")
    );
    let outputs = serde_json::to_value(&cell.outputs).expect("outputs serialise");
    assert_eq!(
        outputs,
        json!([
            {"output_type": "stream", "name": "stdout", "text": "one\n"},
            {"output_type": "stream", "name": "stderr", "text": "two\n"},
            {"output_type": "display_data", "data": {"text/plain": "'shown'"}, "metadata": {}},
            {"output_type": "stream", "name": "stdout", "text": "three\n"},
            {"output_type": "stream", "name": "stderr", "text": "four\n"},
            {"output_type": "stream", "name": "stdout", "text": "five\n"},
            {"output_type": "execute_result", "execution_count": null, "data": {"text/plain": "42"}, "metadata": {}},
        ]),
        "{}",
        pretty(&result)
    );
    let failed = backend.execute(&slot, ToolCall::python("print('before')\n1 / 0")).await;
    let cell = failed.cell.as_ref().expect("a cell");
    let kinds: Vec<_> = serde_json::to_value(&cell.outputs)
        .expect("outputs serialise")
        .as_array()
        .expect("a list")
        .iter()
        .map(|o| (o["output_type"].clone(), o.get("ename").cloned()))
        .collect();
    assert_eq!(
        kinds,
        [
            (json!("stream"), None),
            (json!("error"), Some(json!("ZeroDivisionError")))
        ],
        "{}",
        pretty(&failed)
    );
    backend.release(&slot, true).await.expect("release");
}

pub async fn state_persists_across_calls(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-state").await.expect("acquire");
    ok(backend
        .execute(&slot, ToolCall::python("counter = 40\ndef bump(n):\n    return n + 1"))
        .await);
    let result = ok(backend
        .execute(&slot, ToolCall::python("counter = bump(bump(counter))\ncounter"))
        .await);
    assert_eq!(value(&result), "42");
    backend.release(&slot, true).await.expect("release");
}

/// A cell shows the value of its last top-level statement when that is an expression, as
/// Jupyter does, however the text is laid out; a cell that ends in any other statement shows
/// nothing. The guest decides some of these from the text without parsing, so the cases
/// include layouts that look like a statement on their last line but are not.
pub async fn only_a_final_expression_is_shown(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-final-expression").await.expect("acquire");
    ok(backend.execute(&slot, ToolCall::python("x = 5")).await);
    let shown = [
        ("x", "5"),
        ("x = 1; x", "1"),
        ("import os; os.sep", "'/'"),
        ("y = (1,\n 2); y", "(1, 2)"),
        ("[n\nfor n in range(3)]", "[0, 1, 2]"),
        ("(\"\"\"\nimport this\"\"\")", "'\\nimport this'"),
        ("d = {'a': 1}\nd['a'] == 1", "True"),
        ("x = 2\nx # x = 3", "2"),
        ("f = lambda a=1: a * 7\nf()", "7"),
        ("x += 1\nx", "3"),
        ("x = 4\rx", "4"),
        ("x = 5\r\nx\r\n", "5"),
    ];
    for (code, expected) in shown {
        let result = ok(backend.execute(&slot, ToolCall::python(code)).await);
        assert_eq!(value(&result), expected, "cell {code:?}");
    }
    let silent = [
        "x += 1",
        "x = x",
        "for n in range(2):\n    n",
        "def g():\n    return 1",
        "import os",
        "x: int = 4",
        "if x:\n    x\nelse:\n    0",
    ];
    for code in silent {
        let result = ok(backend.execute(&slot, ToolCall::python(code)).await);
        assert!(
            result.cell.as_ref().is_some_and(|c| c.result.is_none()),
            "cell {code:?} showed a value: {}",
            pretty(&result)
        );
    }
    let failed = backend.execute(&slot, ToolCall::python("a = 1\nb = 0\na / b")).await;
    let error = failed
        .cell
        .as_ref()
        .and_then(|c| c.error.as_ref())
        .expect("the division fails");
    assert_eq!(error.name, "ZeroDivisionError");
    assert!(
        error.traceback.iter().any(|line| line.contains("line 3")),
        "the traceback points at the cell's third line: {:?}",
        error.traceback
    );
    let leftover = ok(backend
        .execute(
            &slot,
            ToolCall::python("sorted(n for n in globals() if 'rollbox' in n)"),
        )
        .await);
    assert_eq!(value(&leftover), "[]", "no helper name stays in the cell namespace");
    backend.release(&slot, true).await.expect("release");
}

pub async fn results_come_back_in_call_order(backend: &dyn Backend) {
    let a = backend.acquire("conformance-order-a").await.expect("acquire");
    let b = backend.acquire("conformance-order-b").await.expect("acquire");
    let mut calls = Vec::new();
    for i in 0..5 {
        calls.push((
            a.clone(),
            ToolCall::python(format!("seen_a = globals().get('seen_a', []) + [{i}]\nseen_a")),
        ));
        calls.push((b.clone(), ToolCall::python(format!("{i} * 10"))));
    }
    let results = backend.execute_batch(calls).await;
    assert_eq!(results.len(), 10);
    for i in 0..5 {
        let expected: Vec<String> = (0..=i).map(|n| n.to_string()).collect();
        assert_eq!(
            value(&results[2 * i]),
            format!("[{}]", expected.join(", ")),
            "slot a's calls ran out of order"
        );
        assert_eq!(value(&results[2 * i + 1]), (i * 10).to_string());
        assert_eq!(results[2 * i].metadata.slot_id, Some(a.id));
        assert_eq!(results[2 * i + 1].metadata.slot_id, Some(b.id));
    }
    backend.release(&a, true).await.expect("release");
    backend.release(&b, true).await.expect("release");
}

/// Neither of two live slots sees the other's variables or files, whichever wrote first.
pub async fn slots_are_isolated(backend: &dyn Backend) {
    let a = backend.acquire("conformance-iso-a").await.expect("acquire");
    let b = backend.acquire("conformance-iso-b").await.expect("acquire");
    assert_ne!(a.id, b.id);
    assert_ne!(a.workspace, b.workspace);
    for (writer, reader, name) in [(&a, &b, "a"), (&b, &a, "b")] {
        ok(backend
            .execute(
                writer,
                ToolCall::python(format!("secret_{name} = 1\nopen('{name}.txt', 'w').write('{name}')")),
            )
            .await);
        let seen = ok(backend
            .execute(
                reader,
                ToolCall::python(format!(
                    "import os\n('secret_{name}' in globals(), os.path.exists('{name}.txt'))"
                )),
            )
            .await);
        assert_eq!(
            value(&seen),
            "(False, False)",
            "slot {name}'s changes reached the other slot"
        );
        let own = ok(backend
            .execute(
                writer,
                ToolCall::python(format!(
                    "import os\n('secret_{name}' in globals(), os.path.exists('{name}.txt'))"
                )),
            )
            .await);
        assert_eq!(value(&own), "(True, True)", "the probe sees a slot's own changes");
    }
    backend.release(&a, true).await.expect("release");
    backend.release(&b, true).await.expect("release");
}

pub async fn file_tools_round_trip(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-files").await.expect("acquire");
    let write = ToolCall::new(
        "write_file",
        json!({"path": "pkg/notes.txt", "content": "alpha\nbeta\ngamma\n"}),
    );
    ok(backend.execute(&slot, write).await);
    let read = ok(backend
        .execute(
            &slot,
            ToolCall::new("read_file", json!({"path": "pkg/notes.txt", "offset": 2, "limit": 1})),
        )
        .await);
    assert_eq!(read.output, "beta\n");
    let edit = ToolCall::new(
        "edit_file",
        json!({"path": "pkg/notes.txt", "old_string": "beta", "new_string": "BETA"}),
    );
    ok(backend.execute(&slot, edit).await);
    let seen = ok(backend
        .execute(&slot, ToolCall::python("open('pkg/notes.txt').read()"))
        .await);
    assert_eq!(
        value(&seen),
        "'alpha\\nBETA\\ngamma\\n'",
        "the interpreter and the file tools share one workspace"
    );
    let missing = backend
        .execute(
            &slot,
            ToolCall::new(
                "edit_file",
                json!({"path": "pkg/notes.txt", "old_string": "delta", "new_string": "x"}),
            ),
        )
        .await;
    assert_eq!(
        missing.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::Workspace),
        "{}",
        pretty(&missing)
    );
    assert!(missing.output.contains("not found"), "{}", missing.output);
    ok(backend
        .execute(
            &slot,
            ToolCall::new("write_file", json!({"path": "dup.txt", "content": "x x"})),
        )
        .await);
    let dup = backend
        .execute(
            &slot,
            ToolCall::new(
                "edit_file",
                json!({"path": "dup.txt", "old_string": "x", "new_string": "y"}),
            ),
        )
        .await;
    assert!(dup.output.contains("occurs 2 times"), "{}", pretty(&dup));
    let listing = ok(backend.execute(&slot, ToolCall::new("list_dir", json!({}))).await);
    assert_eq!(listing.output, "dup.txt\npkg/");
    let found = ok(backend
        .execute(&slot, ToolCall::new("search", json!({"pattern": "^gam"})))
        .await);
    assert_eq!(found.output, "pkg/notes.txt:3: gamma");
    backend.release(&slot, true).await.expect("release");
}

/// File tools refuse paths outside the workspace, and a refused write leaves no file behind.
/// The escapes by relative path are checked on disk next to the workspace (the backends under
/// test keep their workspaces on this machine); the unique name rules out a leftover file.
pub async fn paths_cannot_leave_the_workspace(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-escape").await.expect("acquire");
    let unique = format!("rollbox-escape-{}-{}", std::process::id(), slot.id.0);
    let parent = slot.workspace.parent().expect("a workspace has a parent").to_owned();
    let escapes = [
        (format!("../{unique}.txt"), Some(parent.join(format!("{unique}.txt")))),
        (format!("a/../../{unique}"), Some(parent.join(&unique))),
        ("/etc/passwd".to_owned(), None),
        ("/workspace/../etc/passwd".to_owned(), None),
    ];
    let passwd = std::fs::read("/etc/passwd").expect("read /etc/passwd");
    for (path, on_disk) in &escapes {
        let r = backend
            .execute(&slot, ToolCall::new("read_file", json!({"path": path})))
            .await;
        assert_eq!(
            r.error.as_ref().map(|e| e.kind),
            Some(ErrorKind::Workspace),
            "{path}: {}",
            pretty(&r)
        );
        assert!(r.output.contains("outside the workspace"), "{path}: {}", r.output);
        let w = backend
            .execute(
                &slot,
                ToolCall::new("write_file", json!({"path": path, "content": "x"})),
            )
            .await;
        assert_eq!(
            w.error.as_ref().map(|e| e.kind),
            Some(ErrorKind::Workspace),
            "{path}: writing outside the workspace must fail: {}",
            pretty(&w)
        );
        if let Some(file) = on_disk {
            assert!(!file.exists(), "{path}: the write created {}", file.display());
        }
    }
    assert_eq!(
        std::fs::read("/etc/passwd").expect("read /etc/passwd"),
        passwd,
        "a write changed /etc/passwd"
    );
    backend.release(&slot, true).await.expect("release");
}

pub async fn bad_calls_get_clear_errors(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-bad").await.expect("acquire");
    let unknown = backend.execute(&slot, ToolCall::new("teleport", json!({}))).await;
    assert_eq!(unknown.error.as_ref().map(|e| e.kind), Some(ErrorKind::UnknownTool));
    assert!(
        unknown.output.contains("teleport") && unknown.output.contains("python"),
        "{}",
        unknown.output
    );
    let missing_arg = backend
        .execute(&slot, ToolCall::new("python", json!({"source": "1"})))
        .await;
    assert_eq!(
        missing_arg.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::InvalidArguments)
    );
    assert!(missing_arg.output.contains("code"), "{}", missing_arg.output);
    let as_string = ok(backend
        .execute(&slot, ToolCall::new("python", json!("{\"code\": \"6 * 7\"}")))
        .await);
    assert_eq!(value(&as_string), "42", "arguments given as a JSON string are accepted");
    let syntax = backend.execute(&slot, ToolCall::python("def broken(:\n    pass")).await;
    assert!(!syntax.success);
    assert_eq!(
        syntax
            .cell
            .as_ref()
            .and_then(|c| c.error.as_ref())
            .map(|e| e.name.as_str()),
        Some("SyntaxError"),
        "{}",
        pretty(&syntax)
    );
    assert!(!syntax.metadata.state_lost);
    backend.release(&slot, true).await.expect("release");
}

pub async fn released_slots_are_gone(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-release").await.expect("acquire");
    let workspace = slot.workspace.clone();
    backend.release(&slot, true).await.expect("release");
    assert!(
        !workspace.exists() || slot.backend == "remote",
        "reset_workspace removes the workspace"
    );
    let after = backend.execute(&slot, ToolCall::python("1")).await;
    assert_eq!(
        after.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::UnknownSlot),
        "{}",
        pretty(&after)
    );
    assert!(
        backend.release(&slot, true).await.is_err(),
        "a second release is an error"
    );
    let never: Slot = Slot {
        id: SlotId(u64::MAX),
        ..slot
    };
    let r = backend.execute(&never, ToolCall::python("1")).await;
    assert_eq!(r.error.map(|e| e.kind), Some(ErrorKind::UnknownSlot));
}

/// The checks every backend that has `bash` must pass (`process`, and `remote` over it). The
/// backend's `output_bytes` limit must be under 1 MiB, and its processes must run on this
/// machine (the background-process check looks for them in this machine's `/proc`).
pub async fn run_shell(backend: &dyn Backend) {
    exit_codes_are_reported(backend).await;
    timeouts_kill_background_children(backend).await;
    shell_output_is_capped(backend).await;
    shell_environment_is_clean(backend).await;
    shell_and_python_share_the_workspace(backend).await;
}

pub async fn exit_codes_are_reported(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-exit").await.expect("acquire");
    let fine = ok(backend.execute(&slot, bash("echo out; echo err >&2")).await);
    assert_eq!(fine.metadata.exit_code, Some(0), "{}", pretty(&fine));
    let streams = fine.cell.as_ref().expect("a command's streams");
    assert_eq!((streams.stdout.as_str(), streams.stderr.as_str()), ("out\n", "err\n"));
    let failed = backend.execute(&slot, bash("echo partial; exit 7")).await;
    assert!(!failed.success);
    assert_eq!(
        failed.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::NonZeroExit),
        "{}",
        pretty(&failed)
    );
    assert_eq!(failed.metadata.exit_code, Some(7));
    assert!(
        failed.output.contains("partial") && failed.output.contains("code 7"),
        "{}",
        failed.output
    );
    let bad = backend
        .execute(&slot, ToolCall::new("bash", json!({"command": "true", "timeout": -1})))
        .await;
    assert_eq!(
        bad.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::InvalidArguments),
        "{}",
        pretty(&bad)
    );
    backend.release(&slot, true).await.expect("release");
}

/// A timed-out command's background grandchild (`sleep`, under an `sh` that waits for it)
/// dies with it. The `sleep` is found by its own command line, a duration unique to this call,
/// so a surviving `sleep` is caught even when its `sh` is gone.
pub async fn timeouts_kill_background_children(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-timeout").await.expect("acquire");
    let duration = unique_sleep_duration();
    assert_eq!(
        processes_running(&["sleep", &duration]),
        0,
        "no `sleep {duration}` runs before the call"
    );
    let command = format!("sh -c 'sleep {duration}; :' & echo started; wait");
    let call = ToolCall::new("bash", json!({ "command": command, "timeout": 1 }));
    let timed_out = backend.execute(&slot, call).await;
    assert_eq!(
        timed_out.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::LimitExceeded),
        "{}",
        pretty(&timed_out)
    );
    assert_eq!(timed_out.metadata.limit_hit, Some(rollbox::LimitKind::Time));
    assert_eq!(timed_out.metadata.exit_code, None);
    assert!(
        timed_out.output.contains("started"),
        "output before the timeout is kept: {}",
        timed_out.output
    );
    // Killed processes take a moment to leave /proc; the generous bound only stops a hang.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while processes_running(&["sleep", &duration]) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the background `sleep {duration}` of a timed-out command survived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let after = ok(backend.execute(&slot, bash("echo alive")).await);
    assert_eq!(after.output, "alive\n");
    backend.release(&slot, true).await.expect("release");
}

/// A `sleep` duration no other call uses: 1000 s and a fraction made of this test process's
/// id and a counter, so the `sleep` process carries a mark of its own in its command line.
fn unique_sleep_duration() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("1000.{:010}{n:06}", std::process::id())
}

/// How many processes on this machine run with exactly the arguments `argv`.
fn processes_running(argv: &[&str]) -> usize {
    pids_running(argv).len()
}

/// The processes on this machine that run with exactly the arguments `argv`. Panics when
/// `/proc` cannot be listed: a check that sees no process must not pass for that reason.
fn pids_running(argv: &[&str]) -> Vec<u32> {
    let entries = std::fs::read_dir("/proc").unwrap_or_else(|e| panic!("cannot list /proc to look for processes: {e}"));
    let wanted: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|name| name.parse::<u32>().ok()))
        // A process may end between the listing and this read; it is not running then.
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| cmdline == wanted))
        .collect()
}

#[test]
fn the_process_check_finds_a_sleep_whose_shell_is_gone() {
    let duration = unique_sleep_duration();
    // The shell starts the sleep in the background and exits at once: only the sleep is left,
    // and only its own command line carries the mark.
    let status = std::process::Command::new("sh")
        .args(["-c", &format!("sleep {duration} >/dev/null 2>&1 &")])
        .status()
        .expect("run sh");
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let pids = loop {
        let pids = pids_running(&["sleep", &duration]);
        if !pids.is_empty() {
            break pids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the check never saw `sleep {duration}`"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    for pid in pids {
        let pid = i32::try_from(pid).expect("a pid");
        // SAFETY: kill(2) on the sleep this test started, found by its unique command line.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0, "kill {pid}");
    }
}

pub async fn shell_output_is_capped(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-shell-cap").await.expect("acquire");
    let flood = backend
        .execute(
            &slot,
            bash("head -c 3000000 /dev/zero | tr '\\0' x; head -c 3000000 /dev/zero | tr '\\0' y >&2"),
        )
        .await;
    assert!(
        flood.success,
        "{}",
        flood.error.as_ref().map(|e| e.message.as_str()).unwrap_or("")
    );
    assert!(flood.metadata.truncated);
    assert_eq!(flood.metadata.limit_hit, Some(rollbox::LimitKind::Output));
    let streams = flood.cell.as_ref().expect("streams");
    for (name, text, ch) in [("stdout", &streams.stdout, 'x'), ("stderr", &streams.stderr, 'y')] {
        assert!(text.len() < 3_000_000 && text.starts_with(ch), "{name} was not capped");
        assert!(text.contains("output truncated"), "{name} lacks the truncation marker");
    }
    backend.release(&slot, true).await.expect("release");
}

pub async fn shell_environment_is_clean(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-env").await.expect("acquire");
    let listing = ok(backend.execute(&slot, bash("env")).await);
    let names: Vec<&str> = listing
        .output
        .lines()
        .filter_map(|line| line.split_once('=').map(|(name, _)| name))
        .collect();
    const ALLOWED: [&str; 10] = [
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "PWD",
        "OLDPWD",
        "SHLVL",
        "_",
        "ROLLBOX_SHARED_CACHE",
        "ROLLBOX_SLOT_ENV",
    ];
    for name in &names {
        assert!(
            ALLOWED.contains(name),
            "`{name}` leaked into the command's environment:\n{}",
            listing.output
        );
    }
    // Cargo sets this in the test process; the command must not see it.
    assert!(std::env::var_os("CARGO_MANIFEST_DIR").is_some());
    assert!(!names.contains(&"CARGO_MANIFEST_DIR"));
    backend.release(&slot, true).await.expect("release");
}

pub async fn shell_and_python_share_the_workspace(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-shared-ws").await.expect("acquire");
    ok(backend
        .execute(&slot, bash("mkdir -p d && echo from-bash > d/b.txt"))
        .await);
    let seen = ok(backend.execute(&slot, ToolCall::python("open('d/b.txt').read()")).await);
    assert_eq!(value(&seen), "'from-bash\\n'");
    ok(backend
        .execute(&slot, ToolCall::python("open('d/p.txt', 'w').write('from-python')"))
        .await);
    ok(backend
        .execute(
            &slot,
            ToolCall::new("write_file", json!({"path": "d/f.txt", "content": "from-tool"})),
        )
        .await);
    let both = ok(backend.execute(&slot, bash("cat d/p.txt; echo; cat d/f.txt")).await);
    assert_eq!(both.output, "from-python\nfrom-tool");
    let same_dir = ok(backend.execute(&slot, bash("pwd")).await);
    let python_dir = ok(backend.execute(&slot, ToolCall::python("import os; os.getcwd()")).await);
    assert_eq!(value(&python_dir), format!("'{}'", same_dir.output.trim_end()));
    backend.release(&slot, true).await.expect("release");
}

/// A FIFO in the workspace (made by a cell's `mkfifo`, here from the host) never blocks a file
/// tool: opening one to read or write waits for the other end forever. Each tool answers at
/// once with a clear error, and the slot goes on working.
pub async fn file_tools_refuse_fifos(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-fifo").await.expect("acquire");
    let made = std::process::Command::new("mkfifo")
        .arg(slot.workspace.join("pipe"))
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo failed in {}", slot.workspace.display());
    let calls = [
        ToolCall::new("read_file", json!({"path": "pipe"})),
        ToolCall::new("search", json!({"pattern": "x", "path": "pipe"})),
        ToolCall::new(
            "edit_file",
            json!({"path": "pipe", "old_string": "a", "new_string": "b"}),
        ),
        ToolCall::new("write_file", json!({"path": "pipe", "content": "x"})),
    ];
    for call in calls {
        let name = call.name.clone();
        let result = tokio::time::timeout(crate::support::NO_HANG, backend.execute(&slot, call))
            .await
            .unwrap_or_else(|_| panic!("{name} on a FIFO hung"));
        assert!(!result.success, "{name} on a FIFO: {}", pretty(&result));
        assert_eq!(
            result.error.as_ref().map(|e| e.kind),
            Some(ErrorKind::Workspace),
            "{}",
            pretty(&result)
        );
    }
    let listed = ok(backend
        .execute(&slot, ToolCall::new("search", json!({"pattern": "x", "path": "."})))
        .await);
    assert!(
        listed.output.contains("no matches"),
        "a walk skips the FIFO: {}",
        pretty(&listed)
    );
    backend.release(&slot, true).await.expect("release");
}

/// With rollback on (`--rollback`), a cell the host has to stop leaves the slot as it was just
/// before that cell, for each way a cell is stopped: the time limit (a loop that swallows the
/// `KeyboardInterrupt` it is sent first), the memory limit (an allocation refused, then a crash,
/// as a C extension that aborts when malloc fails), and a crash (`os.abort()`, a wasm trap).
/// Variables, imports and the memory the cell changed go back; the files it wrote stay.
pub async fn a_stopped_cell_rolls_the_slot_back(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-rollback").await.expect("acquire");
    ok(backend
        .execute(&slot, ToolCall::python("kept = [1, 2, 3]\nimport json"))
        .await);
    let stopped_cells = [
        (
            "time",
            "try:\n    while True: pass\nexcept BaseException:\n    while True: pass",
            ErrorKind::LimitExceeded,
        ),
        (
            "memory",
            "try:\n    hog = bytearray(3 << 29)\nexcept MemoryError:\n    import os; os.abort()",
            ErrorKind::LimitExceeded,
        ),
        ("trap", "import os; os.abort()", ErrorKind::GuestCrashed),
    ];
    for (kind, stop, error_kind) in stopped_cells {
        let cell = format!(
            "import tabnanny\nkept.append('{kind}')\nlost = 1\nopen('{kind}.txt', 'w').write('written')\n{stop}"
        );
        let stopped = backend
            .execute(
                &slot,
                ToolCall::python(cell).with_timeout(std::time::Duration::from_millis(500)),
            )
            .await;
        assert!(!stopped.success, "{kind}: {}", pretty(&stopped));
        assert_eq!(
            stopped.error.as_ref().map(|e| e.kind),
            Some(error_kind),
            "{kind}: {}",
            pretty(&stopped)
        );
        assert!(
            stopped.metadata.rolled_back && !stopped.metadata.state_lost,
            "{kind}: {}",
            pretty(&stopped)
        );
        assert!(stopped.output.contains("rolled back"), "{kind}: {}", stopped.output);
        let after = ok(backend
            .execute(
                &slot,
                ToolCall::python(format!(
                    "import sys\n(kept, 'lost' in globals(), 'tabnanny' in sys.modules, 'json' in sys.modules, open('{kind}.txt').read())"
                )),
            )
            .await);
        assert_eq!(
            value(&after),
            "([1, 2, 3], False, False, True, 'written')",
            "{kind}: the slot is as it was before the cell, but for the file"
        );
    }
    backend.release(&slot, true).await.expect("release");
}

/// A slot of the default profile (wasm, and remote over wasm servers) starts with numpy, sympy,
/// scipy and pandas imported: importing them loads no module at all, so it costs nothing, and
/// no name is bound in the cell's namespace until the cell binds it.
pub async fn the_default_profile_is_imported_already(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-profile").await.expect("acquire");
    let imported = ok(backend
        .execute(
            &slot,
            ToolCall::python(
                "import sys\nbound = [n for n in ('numpy', 'sympy', 'scipy', 'pandas') if n in globals()]\nbefore = set(sys.modules)\nimport numpy, sympy, scipy, pandas, scipy.optimize\nx = sympy.Symbol('x')\nsympy.solve(x**2 - 4, x)\n(bound, sorted(set(sys.modules) - before))",
            ),
        )
        .await);
    assert_eq!(
        value(&imported),
        "([], [])",
        "{}: nothing bound at first, and nothing left to import",
        backend.name()
    );
    backend.release(&slot, true).await.expect("release");
}

/// A cell past its time limit is interrupted as Jupyter stops one: CPython raises
/// `KeyboardInterrupt` in it, the result is a time limit marked `interrupted`, and the slot keeps
/// its variables, with what the cell did before the interrupt. A busy loop and a sleep.
pub async fn a_cell_past_its_time_limit_is_interrupted_and_keeps_the_state(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-interrupt").await.expect("acquire");
    ok(backend.execute(&slot, ToolCall::python("kept = 1")).await);
    for code in [
        "kept += 1\nwhile True:\n    pass",
        "kept += 1\nimport time\ntime.sleep(3600)",
    ] {
        let call = ToolCall::python(code).with_timeout(Duration::from_millis(500));
        let r = backend.execute(&slot, call).await;
        assert!(!r.success, "{}", pretty(&r));
        assert_eq!(r.metadata.limit_hit, Some(LimitKind::Time), "{}", pretty(&r));
        assert_eq!(r.error.as_ref().map(|e| e.kind), Some(ErrorKind::LimitExceeded));
        assert!(r.metadata.interrupted && !r.metadata.state_lost, "{}", pretty(&r));
        assert!(
            r.output.contains("KeyboardInterrupt") && r.output.contains("kept its state"),
            "{}",
            r.output
        );
    }
    assert_eq!(
        value(&ok(backend.execute(&slot, ToolCall::python("kept")).await)),
        "3",
        "the state is kept, with what the interrupted cells did before the interrupt"
    );
    backend.release(&slot, true).await.expect("release");
}
