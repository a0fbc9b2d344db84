//! Fault-injection load: many slots, many cells, and faults on purpose. Cells that run out of
//! time, exhaust memory, crash the interpreter and flood their output, over the wasm backend
//! in this process and over the remote backend with four real `rollbox serve` processes on
//! loopback, some of which are killed with SIGKILL mid-batch (the pool starts replacements).
//!
//! What is checked, mechanically:
//! - every call gets exactly one result, for its own slot: none lost, none duplicated;
//! - each result has the outcome its cell asks for (or, for a slot on a killed server, a
//!   `remote` error with `state_lost`);
//! - every cell prints a token naming its slot, and no result holds another slot's token;
//! - memory returns to its baseline once the slots are released (PSS from `smaps_rollup`: this
//!   process's for wasm in the long run, each server's for remote);
//! - it finishes (every wait is bounded by [`NO_HANG`], a guard, never a speed check).
//!
//! `load_short_*` runs in CI (50 slots × 20 cells). The long run, 1,000 slots × 100 cells, is
//! ignored by default: `cargo test --release --test all -- --ignored load`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use rollbox::remote::provision::{LocalProvisioner, LocalProvisionerConfig};
use rollbox::remote::{PoolConfig, RemoteBackend};
use rollbox::{Backend, ErrorKind, ExecutionResult, LimitKind, Limits, Slot, ToolCall};

use crate::support::{NO_HANG, pretty, wasm_backend};

/// One load run's shape.
#[derive(Clone, Copy)]
struct Plan {
    slots: usize,
    cells: usize,
    /// Slots alive at once: the run goes in waves of this many.
    wave: usize,
    /// Seeds the choice of faults, so a failing run can be repeated.
    seed: u64,
    /// Whether to kill remote servers mid-batch.
    kill_servers: bool,
}

const SHORT: Plan = Plan {
    slots: 50,
    cells: 20,
    wave: 25,
    seed: 13,
    kill_servers: true,
};

const FULL: Plan = Plan {
    slots: 1000,
    cells: 100,
    wave: 100,
    seed: 13,
    kill_servers: true,
};

/// The limits every slot runs under: small, so faults end quickly.
fn load_limits() -> Limits {
    Limits {
        timeout: Duration::from_secs(5),
        memory_bytes: 128 << 20,
        output_bytes: 4096,
        ..Limits::default()
    }
}

/// A cell's fault, and so its expected outcome.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    None,
    Timeout,
    Memory,
    Crash,
    Flood,
}

/// splitmix64: a tiny seeded generator, so the plan of faults needs no new dependency.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// About 2% each of time-outs, memory bombs and floods, 1% crashes.
    fn fault(&mut self) -> Fault {
        match self.next() % 100 {
            0 | 1 => Fault::Timeout,
            2 | 3 => Fault::Memory,
            4 => Fault::Crash,
            5 | 6 => Fault::Flood,
            _ => Fault::None,
        }
    }
}

/// The token a cell of slot `slot` prints: no other slot's token contains it.
fn token(slot: usize) -> String {
    format!("<slot{slot}>")
}

/// Slot `slot`'s cell with `fault`. A plain cell checks the slot's own state (`me`) and
/// prints its token; a flood prints its token past the output cap.
fn cell(slot: usize, index: usize, fault: Fault) -> ToolCall {
    let token = token(slot);
    match fault {
        Fault::None => ToolCall::python(format!(
            "me = globals().get('me', {slot})\nassert me == {slot}, me\nprint('{token}', {index})"
        )),
        Fault::Timeout => ToolCall::python("while True: pass").with_timeout(Duration::from_millis(300)),
        Fault::Memory => ToolCall::python("b = bytearray(2**30)"),
        Fault::Crash => ToolCall::python("import os; os._exit(3)"),
        Fault::Flood => ToolCall::python(format!("for _ in range(20000): print('{token}')")),
    }
}

/// Whether `result` is what `fault` asks for.
fn fits(fault: Fault, slot: usize, result: &ExecutionResult) -> bool {
    let kind = result.error.as_ref().map(|e| e.kind);
    match fault {
        Fault::None => result.success && result.output.contains(&token(slot)),
        Fault::Timeout => kind == Some(ErrorKind::LimitExceeded) && result.metadata.limit_hit == Some(LimitKind::Time),
        Fault::Memory => {
            kind == Some(ErrorKind::LimitExceeded) && result.metadata.limit_hit == Some(LimitKind::Memory)
                || kind == Some(ErrorKind::CellError) && result.output.contains("MemoryError")
        }
        Fault::Crash => kind == Some(ErrorKind::GuestCrashed) && result.metadata.state_lost,
        Fault::Flood => result.success && result.metadata.truncated && result.output.contains(&token(slot)),
    }
}

/// Every `<slotN>` token in `text`.
fn tokens_in(text: &str) -> HashSet<usize> {
    let mut found = HashSet::new();
    for piece in text.split("<slot").skip(1) {
        if let Some(number) = piece.split('>').next().and_then(|n| n.parse().ok()) {
            found.insert(number);
        }
    }
    found
}

/// What a run saw, for the record.
#[derive(Debug, Default)]
struct Tally {
    calls: usize,
    results: usize,
    faults: usize,
    lost_to_killed_servers: usize,
    servers_killed: usize,
}

/// Kills one of the remote backend's servers that holds some of `slots`, with SIGKILL;
/// returns whether one was killed.
type Killer = Arc<dyn Fn(u64, &[Slot]) -> bool + Send + Sync>;

/// Runs `plan` over `backend`; panics on the first broken rule, with the whole result.
async fn run(backend: Arc<dyn Backend>, plan: Plan, killer: Option<Killer>) -> Tally {
    let mut dice = Dice(plan.seed);
    let mut tally = Tally::default();
    for first in (0..plan.slots).step_by(plan.wave) {
        let ids: Vec<usize> = (first..(first + plan.wave).min(plan.slots)).collect();
        let acquired = join_all(ids.iter().map(|i| {
            let backend = backend.clone();
            async move { backend.acquire(&format!("load-{i}")).await }
        }))
        .await;
        let slots: Vec<Slot> = acquired
            .into_iter()
            .map(|r| r.unwrap_or_else(|e| panic!("acquire: {e}")))
            .collect();
        // Slots whose server was killed: from then on their calls fail as `remote`.
        let mut lost = vec![false; slots.len()];
        let kill_at = plan.cells / 2;
        for index in 0..plan.cells {
            let faults: Vec<Fault> = ids.iter().map(|_| dice.fault()).collect();
            let batch: Vec<(Slot, ToolCall)> = slots
                .iter()
                .zip(&ids)
                .zip(&faults)
                .map(|((slot, &i), &fault)| (slot.clone(), cell(i, index, fault)))
                .collect();
            tally.calls += batch.len();
            tally.faults += faults.iter().filter(|f| **f != Fault::None).count();
            let running = tokio::spawn({
                let backend = backend.clone();
                async move { backend.execute_batch(batch).await }
            });
            // Mid-batch, every other wave: one server dies with SIGKILL.
            if index == kill_at
                && (first / plan.wave) % 2 == 1
                && let Some(kill) = &killer
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if kill(dice.next(), &slots) {
                    tally.servers_killed += 1;
                }
            }
            let results = tokio::time::timeout(NO_HANG, running)
                .await
                .expect("a batch ends")
                .expect("the batch task");
            assert_eq!(results.len(), slots.len(), "exactly one result per call");
            tally.results += results.len();
            for (n, result) in results.iter().enumerate() {
                let (slot, i, fault) = (&slots[n], ids[n], faults[n]);
                assert_eq!(
                    result.metadata.slot_id,
                    Some(slot.id),
                    "a result for another slot:\n{}",
                    pretty(result)
                );
                let strangers: Vec<usize> = tokens_in(&result.output).into_iter().filter(|t| *t != i).collect();
                assert!(
                    strangers.is_empty(),
                    "slot {i} shows slots {strangers:?}:\n{}",
                    pretty(result)
                );
                let remote_loss = result.error.as_ref().map(|e| e.kind) == Some(ErrorKind::Remote)
                    && result.metadata.state_lost
                    && killer.is_some();
                if remote_loss {
                    lost[n] = true;
                    tally.lost_to_killed_servers += 1;
                    continue;
                }
                assert!(!lost[n], "a slot on a killed server answered:\n{}", pretty(result));
                assert!(
                    fits(fault, i, result),
                    "slot {i} cell {index} ({fault:?}), output of {} bytes:\n{}",
                    result.output.len(),
                    pretty(result)
                );
            }
        }
        for released in join_all(slots.iter().map(|s| backend.release(s, true))).await {
            released.unwrap_or_else(|e| panic!("release: {e}"));
        }
    }
    assert_eq!(tally.results, tally.calls, "every call got exactly one result");
    tally
}

/// Proportional set size of process `pid` (`self` for this one), in bytes.
fn pss(pid: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Whether `after` is back near `baseline`: within half the baseline or 256 MiB, whichever is more.
fn near_baseline(baseline: u64, after: u64) -> bool {
    after <= baseline + (baseline / 2).max(256 << 20)
}

async fn wasm_load(plan: Plan, check_memory: bool) -> Tally {
    let backend = Arc::new(wasm_backend(load_limits()));
    // Warm up with one small run, then take the baseline.
    run(
        backend.clone(),
        Plan {
            slots: plan.wave.min(10),
            cells: 2,
            ..plan
        },
        None,
    )
    .await;
    let baseline = pss("self");
    let tally = run(backend.clone(), plan, None).await;
    assert_eq!(backend.live_slots(), 0);
    let after = pss("self");
    println!(
        "load wasm: {} slots x {} cells: {tally:?}; PSS {} MiB before, {} MiB after",
        plan.slots,
        plan.cells,
        baseline >> 20,
        after >> 20
    );
    if check_memory {
        assert!(near_baseline(baseline, after), "PSS {baseline} before, {after} after");
    }
    tally
}

async fn remote_load(plan: Plan) -> Tally {
    let mut config = LocalProvisionerConfig::new(env!("CARGO_BIN_EXE_rollbox"));
    config.server_args = // Both output caps, as the remote backend's own servers get them: a server keeps the
    // larger of the two for every call (docs/API.md).
    ["--timeout", "5", "--memory", "128", "--max-output", "4096", "--run-code-max-output", "4096"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let provisioner = Arc::new(LocalProvisioner::new(config));
    let pool = PoolConfig {
        slots_per_server: plan.wave.div_ceil(4).max(1),
        min_servers: 4,
        max_servers: 4,
        ..PoolConfig::default()
    };
    let backend = Arc::new(
        RemoteBackend::with_provisioner(pool, provisioner.clone())
            .await
            .unwrap_or_else(|e| panic!("the remote backend starts: {e:?}")),
    );
    let server_pids = {
        let (backend, provisioner) = (backend.clone(), provisioner.clone());
        move || -> Vec<u32> {
            backend
                .servers()
                .iter()
                .filter(|s| s.down.is_none())
                .filter_map(|s| provisioner.pid(&s.id))
                .collect()
        }
    };
    run(
        backend.clone(),
        Plan {
            slots: plan.wave.min(8),
            cells: 2,
            ..plan
        },
        None,
    )
    .await;
    let baseline = server_pids().iter().map(|p| pss(&p.to_string())).max().unwrap_or(0);
    // A killed server cannot remove its workspace root (<root>/<slot>/workspace): the test does.
    let orphaned_roots = Arc::new(std::sync::Mutex::new(Vec::new()));
    let killer: Killer = {
        let (backend, provisioner, orphaned_roots) = (backend.clone(), provisioner.clone(), orphaned_roots.clone());
        Arc::new(move |pick: u64, slots: &[Slot]| {
            let Some(victim) = slots.get((pick % slots.len().max(1) as u64) as usize) else {
                return false;
            };
            let Some(server) = backend.slot_info(victim.id).map(|info| info.server_id) else {
                return false;
            };
            let Some(pid) = provisioner.pid(&server) else {
                return false;
            };
            if let Some(root) = victim.workspace.parent().and_then(|slot_dir| slot_dir.parent()) {
                orphaned_roots.lock().expect("the roots").push(root.to_path_buf());
            }
            // SAFETY: kill(2) of a server this provisioner spawned and still holds.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) == 0 }
        })
    };
    let tally = run(backend.clone(), plan, plan.kill_servers.then_some(killer)).await;
    for root in orphaned_roots.lock().expect("the roots").drain(..) {
        let _ = std::fs::remove_dir_all(root);
    }
    let after: Vec<u64> = server_pids().iter().map(|p| pss(&p.to_string())).collect();
    println!(
        "load remote: {} slots x {} cells over 4 servers: {tally:?}; server PSS {} MiB at baseline, {:?} MiB after",
        plan.slots,
        plan.cells,
        baseline >> 20,
        after.iter().map(|a| a >> 20).collect::<Vec<_>>()
    );
    for a in &after {
        assert!(
            near_baseline(baseline, *a),
            "a server's PSS is {a}, baseline {baseline}"
        );
    }
    backend.shutdown().await.expect("shutdown");
    tally
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_short_over_wasm_loses_nothing() {
    // Other tests share this process, so its PSS is not this test's alone: memory is checked
    // in the long run, which runs by itself.
    let tally = wasm_load(SHORT, false).await;
    assert!(tally.faults > 0, "the plan injected faults: {tally:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_short_over_four_remote_servers_survives_kills() {
    let tally = remote_load(SHORT).await;
    assert!(
        tally.servers_killed > 0 && tally.lost_to_killed_servers > 0,
        "{tally:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the long run: cargo test --release --test all -- --ignored load"]
async fn load_full_over_wasm_loses_nothing() {
    wasm_load(FULL, true).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "the long run: cargo test --release --test all -- --ignored load"]
async fn load_full_over_four_remote_servers_survives_kills() {
    let tally = remote_load(FULL).await;
    assert!(tally.servers_killed > 0, "{tally:?}");
}
