//! The limits on what one slot can take from the host and from other slots: processes (process
//! backend), and its disk's bytes and files (both backends). Each test attacks with a real
//! cell (a real fork bomb, real writes) and counts from outside, on the host: processes in the
//! slot's cgroup and in /proc, bytes and files in the slot's folders.

use std::path::Path;
use std::time::{Duration, Instant};

use rollbox::{Backend, LimitKind, Limits, ToolCall};
use serde_json::json;

use crate::process::process_backend;
use crate::support::{NO_HANG, ok, pretty, value};

/// A bash fork bomb: each copy starts two more, in the background, forever.
const BOMB: &str = ":(){ :|:& };:";

fn bash(command: &str) -> ToolCall {
    ToolCall::new("bash", json!({ "command": command }))
}

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
