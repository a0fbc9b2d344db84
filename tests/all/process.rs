//! The `process` backend over real bash, bubblewrap and the host's Python.

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rollbox::process::{Isolation, ProcessBackend, ProcessBackendConfig, ProcessBackendError};
use rollbox::{Backend, ErrorKind, LimitKind, Limits, Slot, ToolCall};
use serde_json::json;

use crate::conformance;
use crate::support::{bash, ok, pretty, value};

/// A backend with `limits` and bubblewrap isolation, its folders in a fresh temporary root
/// (returned too, so it lives as long as the backend).
pub fn process_backend(limits: Limits) -> (ProcessBackend, tempfile::TempDir) {
    process_backend_with(ProcessBackendConfig {
        limits,
        ..Default::default()
    })
}

/// A backend with `config`, its workspace root replaced by a fresh temporary folder.
pub fn process_backend_with(config: ProcessBackendConfig) -> (ProcessBackend, tempfile::TempDir) {
    let root = tempfile::tempdir().expect("tempdir");
    let config = ProcessBackendConfig {
        workspace_root: Some(root.path().to_path_buf()),
        ..config
    };
    let backend = ProcessBackend::new(config).unwrap_or_else(|e| panic!("failed to start the process backend: {e:?}"));
    (backend, root)
}

#[tokio::test(flavor = "multi_thread")]
async fn process_backend_passes_the_conformance_suite() {
    let (backend, _root) = process_backend(Limits::default());
    assert!(
        matches!(backend.isolation(), Isolation::Bubblewrap(_)),
        "bubblewrap is installed here (scripts/setup-host.sh)"
    );
    conformance::run_all(&backend).await;
    conformance::run_shell(&backend).await;
    assert_eq!(backend.live_slots(), 0);
}

/// Without bubblewrap there is no pid namespace to take a command's children down with it:
/// killing the command's process group is all that ends a background grandchild. This is how
/// the process backend runs inside a Modal sandbox.
#[tokio::test(flavor = "multi_thread")]
async fn without_isolation_a_timeout_still_kills_background_children() {
    let (backend, _root) = process_backend_with(ProcessBackendConfig {
        bubblewrap: Some(PathBuf::from("/nonexistent/bwrap")),
        unsafe_no_isolation: true,
        ..Default::default()
    });
    assert_eq!(backend.isolation(), &Isolation::None);
    conformance::timeouts_kill_background_children(&backend).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxed_commands_have_no_network() {
    let (backend, _root) = process_backend(Limits::default());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let slot = backend.acquire("no-network").await.expect("acquire");
    let shell = backend
        .execute(
            &slot,
            bash(&format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected")),
        )
        .await;
    assert_eq!(
        shell.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::NonZeroExit),
        "{}",
        pretty(&shell)
    );
    let code = format!(
        "import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=5)\n    got = 'connected'\nexcept OSError as e:\n    got = type(e).__name__\ngot"
    );
    let python = ok(backend.execute(&slot, ToolCall::python(code)).await);
    assert_ne!(value(&python), "'connected'");
    listener.set_nonblocking(true).expect("nonblocking");
    assert!(
        listener.accept().is_err(),
        "a sandboxed program reached the host's loopback"
    );
    backend.release(&slot, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn sandboxed_commands_see_the_host_read_only_and_no_other_slot() {
    let (backend, _root) = process_backend(Limits::default());
    // Not under /tmp, which the sandbox replaces with the slot's own: there the write would fail
    // for want of the folder, which proves nothing. A clone under /tmp has its target dir there.
    let host_dir = [
        Some(env!("CARGO_TARGET_TMPDIR").to_string()),
        std::env::var("HOME").ok(),
    ]
    .into_iter()
    .flatten()
    .chain(["/var/tmp".to_string()])
    .find(|dir| !std::path::Path::new(dir).starts_with("/tmp"))
    .expect("a folder outside /tmp");
    let outside = tempfile::tempdir_in(host_dir).expect("tempdir");
    let target = outside.path().join("escaped.txt");
    let a = backend.acquire("ro-a").await.expect("acquire");
    let b = backend.acquire("ro-b").await.expect("acquire");
    let write = backend
        .execute(&a, bash(&format!("echo x > {}", target.display())))
        .await;
    assert!(
        !write.success && write.output.contains("Read-only file system"),
        "{}",
        pretty(&write)
    );
    assert!(!target.exists());
    let real = a.workspace.join("a.txt").display().to_string();
    ok(backend
        .execute(
            &a,
            ToolCall::new("write_file", json!({"path": real, "content": "by its real path"})),
        )
        .await);
    let run = ok(backend.execute(&a, bash("ls -A /run")).await);
    assert_eq!(run.output, "", "the host's daemon sockets in /run are hidden");
    let python = ok(backend
        .execute(
            &a,
            ToolCall::python(format!(
                "try:\n    open({:?}, 'w')\n    got = 'written'\nexcept OSError as e:\n    got = e.errno\ngot",
                target.display().to_string()
            )),
        )
        .await);
    assert_eq!(value(&python), "30", "EROFS");
    let mine = ok(backend.execute(&a, bash("cat a.txt")).await);
    assert_eq!(
        mine.output, "by its real path",
        "file tools take the workspace's real path too"
    );
    let peek = backend
        .execute(&b, bash(&format!("cat {}/a.txt", a.workspace.display())))
        .await;
    assert_eq!(
        peek.metadata.exit_code,
        Some(1),
        "another slot's workspace is visible: {}",
        pretty(&peek)
    );
    ok(backend.execute(&a, bash("echo in-tmp > /tmp/t.txt")).await);
    let tmp = backend.execute(&b, bash("cat /tmp/t.txt")).await;
    assert!(!tmp.success, "slots share /tmp: {}", pretty(&tmp));
    let own_tmp = ok(backend.execute(&a, ToolCall::python("open('/tmp/t.txt').read()")).await);
    assert_eq!(
        value(&own_tmp),
        "'in-tmp\\n'",
        "a slot's bash and python share its /tmp"
    );
    // And the other way: what b writes, a cannot see.
    ok(backend
        .execute(&b, bash("echo by-b > b.txt && echo b-tmp > /tmp/b.txt"))
        .await);
    let b_own = ok(backend.execute(&b, bash("cat b.txt /tmp/b.txt")).await);
    assert_eq!(b_own.output, "by-b\nb-tmp\n");
    let peek_back = backend
        .execute(&a, bash(&format!("cat {}/b.txt", b.workspace.display())))
        .await;
    assert_eq!(
        peek_back.metadata.exit_code,
        Some(1),
        "another slot's workspace is visible: {}",
        pretty(&peek_back)
    );
    let tmp_back = backend.execute(&a, bash("cat /tmp/b.txt")).await;
    assert!(!tmp_back.success, "slots share /tmp: {}", pretty(&tmp_back));
    backend.release(&a, true).await.expect("release");
    backend.release(&b, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_timeout_interrupts_first_and_kills_a_cell_that_will_not_stop() {
    let (backend, _root) = process_backend(Limits::default());
    conformance::a_cell_past_its_time_limit_is_interrupted_and_keeps_the_state(&backend).await;
    let slot = backend.acquire("py-timeout").await.expect("acquire");
    ok(backend.execute(&slot, ToolCall::python("x = 1")).await);
    // It swallows the KeyboardInterrupt, so only the kill at the end of the grace period stops it.
    let call = ToolCall::python(
        "import time\nprint('before', flush=True)\ntry:\n    time.sleep(1000)\nexcept BaseException:\n    time.sleep(1000)",
    )
    .with_timeout(Duration::from_secs(1));
    let stuck = backend.execute(&slot, call).await;
    assert_eq!(
        stuck.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::LimitExceeded),
        "{}",
        pretty(&stuck)
    );
    assert_eq!(stuck.metadata.limit_hit, Some(LimitKind::Time));
    assert!(
        stuck.metadata.state_lost && stuck.metadata.interrupted,
        "{}",
        pretty(&stuck)
    );
    assert!(stuck.output.contains("did not stop within"), "{}", stuck.output);
    assert_fresh_interpreter(&backend, &slot).await;
}

/// After a lost interpreter: `x` from before is gone, a new cell runs, and the slot releases.
async fn assert_fresh_interpreter(backend: &ProcessBackend, slot: &Slot) {
    let gone = backend.execute(slot, ToolCall::python("x")).await;
    assert_eq!(
        gone.cell
            .as_ref()
            .and_then(|c| c.error.as_ref())
            .map(|e| e.name.as_str()),
        Some("NameError"),
        "{}",
        pretty(&gone)
    );
    assert_eq!(value(&ok(backend.execute(slot, ToolCall::python("2 + 2")).await)), "4");
    backend.release(slot, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crashed_interpreter_is_replaced() {
    let (backend, _root) = process_backend(Limits::default());
    let slot = backend.acquire("py-crash").await.expect("acquire");
    ok(backend.execute(&slot, ToolCall::python("x = 1")).await);
    let crashed = backend
        .execute(
            &slot,
            ToolCall::python("import os, sys\nos.write(2, b'last words\\n')\nos._exit(3)"),
        )
        .await;
    assert_eq!(
        crashed.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::GuestCrashed),
        "{}",
        pretty(&crashed)
    );
    assert!(crashed.metadata.state_lost);
    assert!(
        crashed.output.contains("last words"),
        "what it wrote before dying is kept: {}",
        crashed.output
    );
    assert_fresh_interpreter(&backend, &slot).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn output_written_straight_to_fds_reaches_the_cell() {
    let (backend, _root) = process_backend(Limits::default());
    let slot = backend.acquire("py-fds").await.expect("acquire");
    let code = "import os, subprocess\nprint('printed')\nos.write(1, b'raw fd 1\\n')\nsubprocess.run(['echo', 'from a subprocess'])\n'done'";
    let r = ok(backend.execute(&slot, ToolCall::python(code)).await);
    let cell = r.cell.as_ref().expect("cell");
    assert_eq!(cell.stdout, "printed\n");
    assert_eq!(cell.stderr, "raw fd 1\nfrom a subprocess\n");
    assert_eq!(value(&r), "'done'");
    let next = ok(backend.execute(&slot, ToolCall::python("'clean'")).await);
    assert_eq!(
        next.cell.as_ref().map(|c| c.stderr.as_str()),
        Some(""),
        "one cell's stray output does not leak into the next"
    );
    backend.release(&slot, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_memory_limit_stops_a_cell_and_keeps_the_state() {
    let (backend, _root) = process_backend(Limits {
        memory_bytes: 512 << 20,
        ..Limits::default()
    });
    let slot = backend.acquire("py-memory").await.expect("acquire");
    ok(backend.execute(&slot, ToolCall::python("kept = 'yes'")).await);
    let big = backend
        .execute(&slot, ToolCall::python("block = bytearray(1 << 30)"))
        .await;
    assert_eq!(
        big.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::LimitExceeded),
        "{}",
        pretty(&big)
    );
    assert_eq!(big.metadata.limit_hit, Some(LimitKind::Memory));
    assert!(!big.metadata.state_lost);
    assert_eq!(
        value(&ok(backend.execute(&slot, ToolCall::python("kept")).await)),
        "'yes'"
    );
    let shell = backend.execute(&slot, bash("python3 -c 'bytearray(1 << 30)'")).await;
    assert_eq!(
        shell.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::NonZeroExit),
        "{}",
        pretty(&shell)
    );
    assert!(shell.output.contains("MemoryError"), "{}", shell.output);
    backend.release(&slot, true).await.expect("release");
}

#[test]
fn without_bubblewrap_the_backend_refuses_to_start() {
    let missing = ProcessBackendConfig {
        bubblewrap: Some(PathBuf::from("/nonexistent/bwrap")),
        ..Default::default()
    };
    let error = ProcessBackend::new(missing).err().expect("must refuse");
    assert!(matches!(error, ProcessBackendError::NoIsolation), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("bubblewrap") && text.contains("--unsafe-no-isolation"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn unsafe_no_isolation_runs_directly_on_the_host() {
    let config = ProcessBackendConfig {
        bubblewrap: Some(PathBuf::from("/nonexistent/bwrap")),
        unsafe_no_isolation: true,
        ..Default::default()
    };
    let (backend, root) = process_backend_with(config);
    assert_eq!(backend.isolation(), &Isolation::None);
    let slot = backend.acquire("unsafe").await.expect("acquire");
    let home = ok(backend.execute(&slot, bash("echo \"$HOME\"; pwd")).await);
    let tmp = slot.workspace.parent().expect("slot root").join("tmp");
    assert_eq!(
        home.output,
        format!("{}\n{}\n", tmp.display(), slot.workspace.display())
    );
    assert!(tmp.starts_with(root.path()));
    conformance::state_persists_across_calls(&backend).await;
    conformance::timeouts_kill_background_children(&backend).await;
    conformance::shell_environment_is_clean(&backend).await;
    backend.release(&slot, true).await.expect("release");
}

#[test]
fn fuel_is_refused() {
    let config = ProcessBackendConfig {
        limits: Limits {
            fuel: Some(1_000_000),
            ..Limits::default()
        },
        ..Default::default()
    };
    let error = ProcessBackend::new(config).err().expect("must refuse");
    assert!(matches!(error, ProcessBackendError::FuelUnsupported), "{error:?}");
    assert!(error.to_string().contains("fuel"));
}

#[tokio::test(flavor = "multi_thread")]
async fn slots_of_one_backend_share_the_cache_folder() {
    let (backend, _root) = process_backend(Limits::default());
    let a = backend.acquire("cache-a").await.expect("acquire");
    let b = backend.acquire("cache-b").await.expect("acquire");
    ok(backend
        .execute(&a, bash("echo shared > \"$ROLLBOX_SHARED_CACHE/note\""))
        .await);
    let seen = ok(backend.execute(&b, bash("cat \"$ROLLBOX_SHARED_CACHE/note\"")).await);
    assert_eq!(seen.output, "shared\n");
    assert!(backend.shared_cache().join("note").exists());
    backend.release(&a, true).await.expect("release");
    backend.release(&b, true).await.expect("release");
}

#[test]
fn the_cli_prints_the_process_tool_schemas() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["tools", "--backend", "process"])
        .output()
        .expect("run rollbox");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let schemas: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let names: Vec<&str> = schemas
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|s| s["function"]["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "python",
            "bash",
            "read_file",
            "write_file",
            "edit_file",
            "list_dir",
            "search"
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_backend_refuses_new_slots_until_one_is_released() {
    let (backend, _root) = process_backend_with(ProcessBackendConfig {
        max_slots: 1,
        ..Default::default()
    });
    let first = backend.acquire("full-1").await.expect("acquire");
    let refused = backend.acquire("full-2").await.expect_err("over capacity");
    assert!(
        matches!(refused, rollbox::BackendError::Exhausted { capacity: 1 }),
        "{refused:?}"
    );
    backend.release(&first, true).await.expect("release");
    let second = backend
        .acquire("full-3")
        .await
        .expect("a released slot frees its place");
    backend.release(&second, true).await.expect("release");
}

/// Mounts and unmounts tmpfs folders under a temporary folder, removing each after, as fast as
/// it can until `stop` is set: what slots being released (here or in another rollbox) do to the
/// host's mount table. Returns how many mounts it made.
fn churn_mounts(stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut mounts = 0;
        while !stop.load(Ordering::Relaxed) {
            let points: Vec<CString> = (0..8)
                .map(|i| CString::new(dir.path().join(format!("m{i}")).as_os_str().as_bytes()).unwrap())
                .collect();
            for point in &points {
                std::fs::create_dir(OsStr::from_bytes(point.as_bytes())).expect("mkdir");
                // SAFETY: NUL-terminated strings that outlive the call.
                let status = unsafe {
                    libc::mount(
                        c"churn".as_ptr(),
                        point.as_ptr(),
                        c"tmpfs".as_ptr(),
                        0,
                        std::ptr::null(),
                    )
                };
                assert_eq!(status, 0, "mount: {}", std::io::Error::last_os_error());
                mounts += 1;
            }
            for point in &points {
                // SAFETY: a NUL-terminated path.
                unsafe { libc::umount2(point.as_ptr(), libc::MNT_DETACH) };
                std::fs::remove_dir(OsStr::from_bytes(point.as_bytes())).expect("rmdir");
            }
        }
        mounts
    })
}

/// Bubblewrap binds the host's root with its mounts and then remounts each one; a mount removed
/// in between made it die (bubblewrap issue 650), and with it a slot's Python or a bash call.
/// That failed 1 rollout in 15 in CI: a reward slot lost its definitions. Started again when
/// bubblewrap dies before the program starts, every call here succeeds while mounts come and go
/// as fast as a thread can make them (without the retry, 16 of the 60 failed). A command that
/// only prints what bubblewrap prints then is not run twice.
#[tokio::test(flavor = "multi_thread")]
async fn slots_start_while_the_hosts_mounts_come_and_go() {
    let (backend, _root) = process_backend(Limits::default());
    let stop = Arc::new(AtomicBool::new(false));
    let churn = churn_mounts(stop.clone());
    let mut failures = Vec::new();
    for round in 0..30 {
        let slot = backend.acquire(&format!("churn-{round}")).await.unwrap();
        for call in [ToolCall::python("print(6 * 7)"), bash("echo $((6 * 7))")] {
            let result = backend.execute(&slot, call).await;
            if !result.success || result.output.trim() != "42" {
                failures.push(pretty(&result));
            }
        }
        backend.release(&slot, true).await.unwrap();
    }
    let slot = backend.acquire("churn-imitation").await.unwrap();
    let imitation = "echo ran >> runs; echo \"bwrap: Can't bind mount /oldroot/ on /newroot/: Unable to apply mount flags\" >&2; exit 1";
    let result = backend.execute(&slot, bash(imitation)).await;
    assert_eq!(result.metadata.exit_code, Some(1), "{}", pretty(&result));
    let runs = ok(backend.execute(&slot, bash("cat runs")).await);
    assert_eq!(runs.output, "ran\n", "the command ran once");
    stop.store(true, Ordering::Relaxed);
    let mounts = churn.join().expect("the churn thread");
    assert!(mounts > 100, "the churn made only {mounts} mounts");
    assert!(
        failures.is_empty(),
        "{} of 60 calls failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
