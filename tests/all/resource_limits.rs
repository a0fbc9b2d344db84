//! The limits on what one slot can take from the host and from other slots: processes (process
//! backend), and its disk's bytes and files (both backends). Each test attacks with a real
//! cell (a real fork bomb, real writes) and counts from outside, on the host: processes in the
//! slot's cgroup and in /proc, bytes and files in the slot's folders.

use std::path::Path;
use std::time::{Duration, Instant};

use rollbox::{Backend, LimitKind, Limits, ToolCall};
use serde_json::json;

use crate::process::process_backend;
use crate::support::{NO_HANG, bash, ok, pretty, value};

/// A bash fork bomb: each copy starts two more, in the background, forever.
const BOMB: &str = ":(){ :|:& };:";

/// Processes whose cgroup (any hierarchy) is `dir` or below it, by reading /proc: the count the
/// kernel gives, not rollbox's.
fn processes_in_cgroup(dir: &Path) -> usize {
    // The backend's and the slot's folder names: "/rollbox-PID-N/slot-ID", as /proc shows it.
    let parts: Vec<String> = dir
        .iter()
        .rev()
        .take(2)
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let [slot, backend] = parts.as_slice() else { return 0 };
    let path = format!("/{backend}/{slot}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|entry| {
            std::fs::read_to_string(entry.path().join("cgroup")).is_ok_and(|groups| {
                groups
                    .lines()
                    .filter_map(|line| line.splitn(3, ':').nth(2))
                    .any(|group| group == path || group.starts_with(&format!("{path}/")))
            })
        })
        .count()
}

/// Polls `check` until it holds or [`NO_HANG`] passes (a guard against a stuck suite, never a
/// speed check); returns whether it held.
fn eventually(mut check: impl FnMut() -> bool) -> bool {
    let give_up = Instant::now() + NO_HANG;
    while Instant::now() < give_up {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

const CAP: u32 = 64;

/// The issue's case: a cell that forks without end. `Popen` stops with `EAGAIN` at the slot's
/// cap and the call reports `limit_hit: processes`; a bomb that detaches (`setsid`) fills the slot
/// to its cap and no further, a neighbour slot runs all along, and after release nothing of the
/// bomb is left in /proc. In bubblewrap, whose pid namespace also ends everything with the
/// sandbox's first process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_stops_at_the_slots_process_cap_and_dies_at_release() {
    let (backend, _root) = process_backend(Limits {
        processes: CAP,
        ..Limits::default()
    });
    assert!(matches!(
        backend.isolation(),
        rollbox::process::Isolation::Bubblewrap(_)
    ));
    fork_bombs(&backend).await;
}

/// The same without bubblewrap (`--unsafe-no-isolation`), where nothing but the slot's cgroup
/// holds the bomb: no pid namespace ends it with the sandbox, and a detached copy leaves the
/// process group a timeout kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_without_bubblewrap_is_held_and_ended_by_the_cgroup_alone() {
    let (backend, _root) = crate::process::process_backend_with(rollbox::process::ProcessBackendConfig {
        limits: Limits {
            processes: CAP,
            ..Limits::default()
        },
        unsafe_no_isolation: true,
        ..Default::default()
    });
    fork_bombs(&backend).await;
}

async fn fork_bombs(backend: &rollbox::process::ProcessBackend) {
    assert_eq!(
        backend.process_cap(),
        Ok(CAP),
        "this host has a pids cgroup controller and rollbox runs as root"
    );
    let slot = backend.acquire("bomb").await.unwrap();
    let neighbour = backend.acquire("neighbour").await.unwrap();

    // Forks that fail are an OSError the cell can catch; the call says which limit it met.
    let many = r#"import errno, subprocess
procs, failed = [], None
try:
    for _ in range(1000):
        procs.append(subprocess.Popen(["sleep", "600"]))
except OSError as e:
    failed = e.errno
(len(procs) < 64, failed == errno.EAGAIN)"#;
    let result = ok(backend.execute(&slot, ToolCall::python(many)).await);
    assert_eq!(value(&result), "(True, True)", "{}", pretty(&result));
    assert_eq!(
        result.metadata.limit_hit,
        Some(LimitKind::Processes),
        "{}",
        pretty(&result)
    );
    assert!(result.output.contains("--max-processes"), "{}", pretty(&result));
    ok(backend
        .execute(
            &slot,
            ToolCall::python("for p in procs: p.kill(); p.wait()\nlen(procs)"),
        )
        .await);
    // The slot's interpreter, in its sandbox: what runs between calls.
    let idle = backend.slot_processes(&slot).expect("the slot has a cgroup");

    // A bomb in the foreground runs out of time, and says it met the process cap.
    let result = backend
        .execute(
            &slot,
            ToolCall::new("bash", json!({ "command": format!("{BOMB}; sleep 10"), "timeout": 2 })),
        )
        .await;
    assert!(!result.success);
    assert_eq!(
        result.metadata.limit_hit,
        Some(LimitKind::Processes),
        "{}",
        pretty(&result)
    );
    let message = &result.error.as_ref().expect("an error").message;
    assert!(
        message.contains("time limit") && message.contains("--max-processes"),
        "{message}"
    );
    assert!(
        eventually(|| backend.slot_processes(&slot) == Some(idle)),
        "the bomb died with its command: {:?} left",
        backend.slot_processes(&slot)
    );

    // A bash command's detached processes end with the command.
    let result = backend
        .execute(
            &slot,
            bash(&format!(
                "setsid bash -c '{BOMB}' >/dev/null 2>&1 & sleep 1; echo started"
            )),
        )
        .await;
    assert!(result.output.contains("started"), "{}", pretty(&result));
    let cgroup = backend.slot_cgroup_dir(&slot).expect("the slot has a cgroup");
    assert!(
        eventually(|| backend.slot_processes(&slot) == Some(idle)),
        "the command's bomb died with it: {:?} left",
        backend.slot_processes(&slot)
    );

    // A bomb detached from a cell runs on after it, within the cap.
    let detach = format!(
        "import subprocess\nsubprocess.Popen(['bash', '-c', '{BOMB}'], start_new_session=True, \
         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n'detached'"
    );
    ok(backend.execute(&slot, ToolCall::python(detach)).await);
    assert!(
        eventually(|| backend.slot_processes(&slot).is_some_and(|n| n + 4 >= u64::from(CAP))),
        "the bomb fills its slot: {:?}",
        backend.slot_processes(&slot)
    );
    assert!(backend.slot_processes(&slot) <= Some(u64::from(CAP)));
    let result = ok(backend.execute(&neighbour, bash("echo alive")).await);
    assert_eq!(result.output.trim(), "alive", "{}", pretty(&result));

    backend.release(&slot, true).await.unwrap();
    assert_eq!(
        processes_in_cgroup(&cgroup),
        0,
        "nothing of the slot runs after release"
    );
    assert!(!cgroup.exists(), "the slot's cgroup is removed: {}", cgroup.display());
    let result = ok(backend.execute(&neighbour, bash("echo still")).await);
    assert_eq!(result.output.trim(), "still");
    backend.release(&neighbour, true).await.unwrap();
}

/// Bytes and entries in `folder` and below, as the host's file system reports them.
fn usage(folder: &Path) -> (u64, u64) {
    let (mut bytes, mut files) = (0, 0);
    let mut pending = vec![folder.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).expect("read the slot's folder").flatten() {
            let meta = entry.path().symlink_metadata().expect("stat");
            files += 1;
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                bytes += meta.len();
            }
        }
    }
    (bytes, files)
}

/// The issue's case on wasm: plain writes (`f.write`, which the host did not check before)
/// of many files fill a slot's disk up to its cap and no further; the next write fails with
/// `ENOSPC`, the call reports `limit_hit: disk` naming the flag, the host's own count of the
/// workspace stays under the cap, and removing a file makes room again. The streams of a slot
/// restored from the snapshot are still captured while files are checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm_slot_fills_its_disk_up_to_its_cap_and_no_further() {
    let backend = crate::support::wasm_backend(Limits {
        disk_bytes: 4 << 20,
        ..Limits::default()
    });
    let first = backend.acquire("first").await.unwrap();
    let slot = backend.acquire("disk").await.unwrap();
    for s in [&first, &slot] {
        let result = ok(backend
            .execute(
                s,
                ToolCall::python("print('streams'); import sys; print('err', file=sys.stderr)"),
            )
            .await);
        let cell = result.cell.as_ref().expect("a cell");
        assert_eq!(
            (cell.stdout.as_str(), cell.stderr.as_str()),
            ("streams\n", "err\n"),
            "{}",
            pretty(&result)
        );
    }
    let fill = r#"import errno
written, failed = 0, None
try:
    for i in range(32):
        with open(f"/workspace/f{i}", "wb") as f:
            f.write(b"x" * 2**20)
        written += 1
except OSError as e:
    failed = e.errno
print("filled")
(written, failed == errno.ENOSPC)"#;
    let result = ok(backend.execute(&slot, ToolCall::python(fill)).await);
    assert_eq!(value(&result), "(4, True)", "{}", pretty(&result));
    assert_eq!(result.cell.as_ref().map(|c| c.stdout.as_str()), Some("filled\n"));
    assert_eq!(result.metadata.limit_hit, Some(LimitKind::Disk), "{}", pretty(&result));
    assert!(result.output.contains("--max-disk-bytes"), "{}", pretty(&result));
    let (bytes, _) = usage(&slot.workspace);
    assert!(bytes <= 4 << 20, "the host counts {bytes} bytes in the workspace");

    let room =
        "import os\nos.remove('/workspace/f0')\nwith open('/workspace/again', 'wb') as f:\n    f.write(b'y' * 2**20)";
    let result = ok(backend.execute(&slot, ToolCall::python(room)).await);
    assert_eq!(result.metadata.limit_hit, None, "{}", pretty(&result));

    // The host's own file tool is held to the same cap.
    ok(backend
        .execute(&slot, ToolCall::python("os.remove('/workspace/again')"))
        .await);
    let write = |size: usize| ToolCall::new("write_file", json!({ "path": "tool", "content": "t".repeat(size) }));
    let result = backend.execute(&slot, write(2 << 20)).await;
    assert_eq!(result.metadata.limit_hit, Some(LimitKind::Disk), "{}", pretty(&result));
    assert!(result.output.contains("--max-disk-bytes"), "{}", pretty(&result));
    ok(backend.execute(&slot, write(512 << 10)).await);
    let (bytes, _) = usage(&slot.workspace);
    assert!(bytes <= 4 << 20, "the host counts {bytes} bytes in the workspace");
    backend.release(&slot, true).await.unwrap();
    backend.release(&first, true).await.unwrap();
}

/// The documented hole on wasm, closed: a plain write after a seek far past the end, and plain
/// writes that grow a file past `--max-file-bytes`, fail with `EFBIG` as on the process
/// backend, and nothing lands past the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_write_past_the_file_size_cap_fails_on_wasm() {
    let backend = crate::support::wasm_backend(Limits {
        file_bytes: 1 << 20,
        ..Limits::default()
    });
    let slot = backend.acquire("seek").await.unwrap();
    let cell = r#"import errno, os
def efbig(attempt):
    try:
        attempt()
    except OSError as e:
        return e.errno == errno.EFBIG
    return False
def far(f):
    f.seek(2**40)
    f.write(b"x")
def long(f):
    for _ in range(3):
        f.write(b"z" * 2**19)
with open("/tmp/far", "wb", buffering=0) as f:
    far_refused = efbig(lambda: far(f))
with open("/tmp/long", "wb", buffering=0) as f:
    long_refused = efbig(lambda: long(f))
with open("/tmp/append", "ab", buffering=0) as f:
    f.write(b"a" * 2**20)
    append_refused = efbig(lambda: f.write(b"a"))
(far_refused, long_refused, append_refused, os.path.getsize("/tmp/far"), os.path.getsize("/tmp/long"))"#;
    let result = ok(backend.execute(&slot, ToolCall::python(cell)).await);
    assert_eq!(value(&result), "(True, True, True, 0, 1048576)", "{}", pretty(&result));
    backend.release(&slot, true).await.unwrap();
}

/// Files without end on wasm: creating files and folders stops at the slot's file cap with
/// `ENOSPC`, the call reports `limit_hit: files`, the host counts no more entries than the
/// cap, and the slot goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wasm_slot_stops_creating_files_at_its_cap() {
    let backend = crate::support::wasm_backend(Limits {
        disk_files: 50,
        ..Limits::default()
    });
    let slot = backend.acquire("files").await.unwrap();
    let flood = r#"import errno, os
made, failed = 0, None
try:
    os.mkdir("/workspace/d")
    made += 1
    for i in range(10_000):
        open(f"/workspace/d/f{i}", "w").close()
        made += 1
except OSError as e:
    failed = e.errno
(made, failed == errno.ENOSPC)"#;
    let result = ok(backend.execute(&slot, ToolCall::python(flood)).await);
    assert_eq!(value(&result), "(50, True)", "{}", pretty(&result));
    assert_eq!(result.metadata.limit_hit, Some(LimitKind::Files), "{}", pretty(&result));
    assert!(result.output.contains("--max-disk-files"), "{}", pretty(&result));
    assert_eq!(usage(&slot.workspace).1, 50);
    // Opening an existing file is no creation.
    let result = ok(backend
        .execute(&slot, ToolCall::python("open('/workspace/d/f0', 'w').close(); 'ok'"))
        .await);
    assert_eq!(result.metadata.limit_hit, None, "{}", pretty(&result));
    backend.release(&slot, true).await.unwrap();
}

/// Bytes the host's disk (or memory) really holds for `folder` and below: allocated blocks.
fn allocated(folder: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut pending = vec![folder.to_path_buf()];
    while let Some(folder) = pending.pop() {
        for entry in std::fs::read_dir(&folder).expect("read the slot's folder").flatten() {
            let meta = entry.path().symlink_metadata().expect("stat");
            total += meta.blocks() * 512;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    total
}

/// Whether `path` is a mount point, by /proc/self/mountinfo.
fn is_mount_point(path: &Path) -> bool {
    let path = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|line| line.split_whitespace().nth(4) == Some(path.as_ref()))
}

/// The issue's case on the process backend: `dd`, `fallocate`, a sparse `truncate` and Python's
/// writes stop at the slot's disk cap (its own tmpfs) with `ENOSPC` or `EFBIG`, the call reports
/// `limit_hit: disk`, the host holds no more than the cap for the slot, files stop at their cap
/// too, a neighbour is unaffected, and a slot released without a reset keeps its workspace on
/// the host's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_slot_fills_its_disk_up_to_its_cap_and_no_further() {
    const CAP: u64 = 8 << 20;
    let (backend, _root) = process_backend(Limits {
        disk_bytes: CAP,
        disk_files: 100,
        ..Limits::default()
    });
    let slot = backend.acquire("disk").await.unwrap();
    let neighbour = backend.acquire("neighbour").await.unwrap();

    ok(backend.execute(&slot, bash("echo kept > keep")).await);
    let fill = "dd if=/dev/zero of=big bs=1M count=64 2>&1 | head -1; fallocate -l 1G pre 2>&1; \
                truncate -s 1T sparse 2>&1; ls";
    let result = backend.execute(&slot, bash(fill)).await;
    assert!(result.output.contains("No space left on device"), "{}", pretty(&result));
    assert_eq!(result.metadata.limit_hit, Some(LimitKind::Disk), "{}", pretty(&result));
    assert!(result.output.contains("--max-disk-bytes"), "{}", pretty(&result));
    let held = allocated(&slot.workspace);
    assert!(held <= CAP, "the slot holds {held} bytes, over its cap of {CAP}");

    let python = "import errno\ntry:\n    open('more', 'wb').write(b'x' * 2**20)\nexcept OSError as e:\n    full = e.errno == errno.ENOSPC\nfull";
    let result = ok(backend.execute(&slot, ToolCall::python(python)).await);
    assert_eq!(value(&result), "True", "{}", pretty(&result));
    let result = ok(backend
        .execute(&neighbour, bash("head -c 4194304 /dev/zero > mine && echo wrote"))
        .await);
    assert_eq!(result.output.trim(), "wrote", "{}", pretty(&result));

    ok(backend.execute(&slot, bash("rm -f big pre sparse more")).await);
    let result = backend
        .execute(
            &slot,
            bash("mkdir d && for i in $(seq 500); do touch d/f$i 2>/dev/null || break; done; ls d | wc -l"),
        )
        .await;
    let made: u64 = result
        .output
        .lines()
        .next()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(u64::MAX);
    assert!(made < 100, "{}", pretty(&result));
    assert_eq!(result.metadata.limit_hit, Some(LimitKind::Files), "{}", pretty(&result));
    assert!(result.output.contains("--max-disk-files"), "{}", pretty(&result));

    assert!(
        is_mount_point(slot.workspace.parent().expect("root")),
        "the slot has its own tmpfs"
    );
    backend.release(&slot, false).await.unwrap();
    assert!(
        !is_mount_point(slot.workspace.parent().expect("root")),
        "the tmpfs is gone"
    );
    assert_eq!(
        std::fs::read_to_string(slot.workspace.join("keep")).ok().as_deref(),
        Some("kept\n"),
        "the released workspace stays on the host's disk"
    );
    backend.release(&neighbour, true).await.unwrap();
    assert!(!is_mount_point(neighbour.workspace.parent().expect("root")));
}

/// The slot tmpfs mounts in this process's mount table whose owner is `pid`.
fn slot_mounts_of(pid: u32) -> usize {
    let source = format!(" rollbox-slot-{pid} ");
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|line| line.contains(&source))
        .count()
}

/// Backend cgroups of the process `pid` under the `pids` hierarchy (cgroup v1 here).
fn cgroups_of(pid: u32) -> usize {
    std::fs::read_dir("/sys/fs/cgroup/pids")
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("rollbox-{pid}-")))
                .count()
        })
        .unwrap_or(0)
}

/// A rollbox killed with SIGKILL runs no clean-up: its slot's tmpfs stays mounted (holding its
/// files in memory) and its cgroup stays. The next process backend on the host unmounts and
/// removes what dead rollbox processes left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_backend_cleans_up_after_a_killed_rollbox() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args([
            "exec",
            "--backend",
            "process",
            "-q",
            "-c",
            "import time; time.sleep(600)",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("rollbox starts");
    let pid = child.id();
    assert!(
        eventually(|| slot_mounts_of(pid) == 1 && cgroups_of(pid) == 1),
        "the slot's tmpfs and cgroup exist while it runs"
    );
    // SAFETY: a plain syscall on our own child, not yet reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    let _ = child.wait();
    assert_eq!(slot_mounts_of(pid), 1, "SIGKILL left the tmpfs mounted");

    let (_backend, _root) = process_backend(Limits::default());
    assert_eq!(slot_mounts_of(pid), 0, "the new backend unmounted the orphan");
    assert_eq!(cgroups_of(pid), 0, "and removed its cgroup");
}
