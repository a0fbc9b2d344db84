//! `--seed`: a seeded slot repeats every observation (docs/reproducibility.md). The wasm
//! checks run over the real runtime; the rollout checks run the real binary twice, so what
//! repeats is checked across processes, not only within one.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rollbox::rollout::replay::strip_timing;
use rollbox::{Backend, ExecutionResult, Limits, Slot, ToolCall};

use crate::process::process_backend;
use crate::support::{ok, pretty, shared_wasm, value};

/// The cells the issue lists, each one's value read by the test. `{object() ...}` is listed by
/// the ids of its members in iteration order, which is what a set of objects hashed by id
/// depends on.
const CELLS: [(&str, &str); 9] = [
    ("random.random()", "import random\nrandom.random()"),
    ("os.urandom(8)", "import os\nos.urandom(8).hex()"),
    ("time.time()", "import time\ntime.time()"),
    ("uuid.uuid4()", "import uuid\nstr(uuid.uuid4())"),
    ("numpy.random.rand()", "import numpy\nnumpy.random.rand()"),
    ("set of objects", "[id(o) for o in {object() for _ in range(5)}]"),
    (
        "time.sleep(5)",
        "t0, m0 = time.time(), time.monotonic()\ntime.sleep(5)\n(time.time() - t0, time.monotonic() - m0)",
    ),
    ("tempfile.mkdtemp()", "import tempfile\ntempfile.mkdtemp()"),
    (
        "environment",
        "import socket\n(sorted(os.environ.items()), os.getcwd(), os.getpid(), socket.gethostname())",
    ),
];

/// Each listed cell's value, run in order in two slots at once (calls of different slots run
/// in parallel, so the unseeded pair's two 5 s sleeps overlap).
async fn run_pair(backend: &dyn Backend, a: &Slot, b: &Slot, timeout: Option<Duration>) -> Vec<(String, String)> {
    let mut calls = Vec::new();
    for (_, code) in CELLS {
        for slot in [a, b] {
            let call = ToolCall::python(code);
            calls.push((slot.clone(), timeout.map_or(call.clone(), |t| call.with_timeout(t))));
        }
    }
    let results: Vec<ExecutionResult> = backend.execute_batch(calls).await.into_iter().map(ok).collect();
    results
        .chunks(2)
        .map(|pair| (value(&pair[0]), value(&pair[1])))
        .collect()
}

#[tokio::test]
async fn a_seeded_wasm_slot_repeats_every_listed_cell_and_an_unseeded_pair_differs() {
    let backend = shared_wasm();
    let (a, b) = (
        backend.acquire_seeded("repro", 42).await.expect("acquire"),
        backend.acquire_seeded("repro", 42).await.expect("acquire"),
    );
    // Under a seed a sleep moves virtual time at once: 5 s of sleep fit in a 2 s time limit.
    let seeded = run_pair(backend, &a, &b, Some(Duration::from_secs(2))).await;
    for ((name, _), (first, second)) in CELLS.iter().zip(&seeded) {
        assert_eq!(first, second, "seeded slots differ on {name}");
    }
    let (u, v) = (
        backend.acquire("unseeded").await.expect("acquire"),
        backend.acquire("unseeded").await.expect("acquire"),
    );
    let unseeded = run_pair(backend, &u, &v, None).await;
    for ((name, _), (first, second)) in CELLS.iter().zip(&unseeded) {
        // Object ids are addresses in linear memory, and every slot of one backend is restored
        // from the same snapshot: they repeat even unseeded within one process. The seed makes
        // them repeat across processes too (the rollout test below). The environment is
        // constant for every slot, seeded or not.
        if *name == "set of objects" || *name == "environment" {
            continue;
        }
        assert_ne!(first, second, "unseeded slots agree on {name}");
    }
    let (elapsed, _) = &seeded[6];
    assert!(
        elapsed.starts_with("(5.0") && elapsed.contains(", 5.0"),
        "virtual time moved by 5 s in the sleep: {elapsed}"
    );
    let (clock, _) = &seeded[2];
    assert!(
        clock.starts_with("17356896"),
        "the clock starts at 2025-01-01T00:00:00Z: {clock}"
    );
    for slot in [a, b, u, v] {
        backend.release(&slot, true).await.expect("release");
    }
}

#[tokio::test]
async fn different_seeds_give_different_streams() {
    let backend = shared_wasm();
    let mut seen = Vec::new();
    for seed in [7, 8] {
        let slot = backend.acquire_seeded("repro-seeds", seed).await.expect("acquire");
        let result = ok(backend
            .execute(
                &slot,
                ToolCall::python("import random, os\n(random.random(), os.urandom(4).hex())"),
            )
            .await);
        seen.push(value(&result));
        backend.release(&slot, true).await.expect("release");
    }
    assert_ne!(seen[0], seen[1]);
}

/// A seeded slot is the same however its interpreter started: bootstrapped (snapshots off) and
/// restored slots see the same streams, since both are rewound before the first cell.
#[tokio::test]
async fn a_configured_seed_derives_each_trajectorys_slot_seed() {
    let backend = rollbox::WasmBackend::new(
        rollbox::WasmBackendConfig {
            seed: Some(7),
            snapshots: false,
            ..rollbox::WasmBackendConfig::from_env()
        },
        &rollbox::SilentReporter,
    )
    .expect("backend");
    let draw = "import random, time\n(random.random(), time.time())";
    let plain = backend.acquire("t1").await.expect("acquire");
    let from_config = value(&ok(backend.execute(&plain, ToolCall::python(draw)).await));
    let derived = rollbox::seed::derive_slot_seed(7, "t1", 0);
    let restored = shared_wasm().acquire_seeded("t1", derived).await.expect("acquire");
    let explicit = value(&ok(shared_wasm().execute(&restored, ToolCall::python(draw)).await));
    assert_eq!(from_config, explicit, "booted and restored slots of one seed agree");
    let other = backend.acquire("t2").await.expect("acquire");
    let other_value = value(&ok(backend.execute(&other, ToolCall::python(draw)).await));
    assert_ne!(from_config, other_value, "each trajectory has its own stream");
    shared_wasm().release(&restored, true).await.expect("release");
}

#[tokio::test]
async fn a_seeded_process_slot_fixes_hashing_and_random_as_best_effort() {
    let (backend, _root) = process_backend(Limits::default());
    let cell = "import random\n(hash('rollbox'), random.random())";
    let mut seen = Vec::new();
    for seed in [5, 5, 6] {
        let slot = backend.acquire_seeded("repro-process", seed).await.expect("acquire");
        let result = backend.execute(&slot, ToolCall::python(cell)).await;
        assert!(result.success, "{}", pretty(&result));
        seen.push(value(&result));
        backend.release(&slot, true).await.expect("release");
    }
    assert_eq!(seen[0], seen[1]);
    assert_ne!(seen[0], seen[2]);
}

fn rollbox() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rollbox"));
    command.arg("--quiet");
    command
}

/// An oracle rollout of `examples/seeded.jsonl` with `--seed seed` into `out`.
fn seeded_rollout(seed: u64, out: &Path) {
    let dataset = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/seeded.jsonl");
    let run = rollbox()
        .args([
            "rollout",
            "--dataset",
            dataset,
            "--group-size",
            "2",
            "--seed",
            &seed.to_string(),
            "--out",
        ])
        .arg(out)
        .output()
        .expect("run rollbox");
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
}

/// `trajectories.jsonl` without timing fields, one line per trajectory, in trajectory order
/// (lines are appended as trajectories finish, in whatever order that is).
fn without_timing(out: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(out.join("trajectories.jsonl")).expect("trajectories.jsonl");
    let mut lines: Vec<(String, String)> = text
        .lines()
        .map(|line| {
            let mut value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            strip_timing(&mut value);
            let id = value["trajectory_id"].as_str().unwrap_or_default().to_string();
            (id, serde_json::to_string(&value).expect("serialise"))
        })
        .collect();
    lines.sort();
    lines.into_iter().map(|(_, line)| line).collect()
}

#[test]
fn a_seeded_oracle_rollout_repeats_byte_for_byte_and_another_seed_differs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runs = ["seven-a", "seven-b", "eight"].map(|name| dir.path().join(name));
    seeded_rollout(7, &runs[0]);
    seeded_rollout(7, &runs[1]);
    seeded_rollout(8, &runs[2]);
    let (first, second, other) = (
        without_timing(&runs[0]),
        without_timing(&runs[1]),
        without_timing(&runs[2]),
    );
    assert_eq!(first.len(), 4);
    assert_eq!(first, second, "two runs with --seed 7 differ");
    for (seven, eight) in first.iter().zip(&other) {
        assert_ne!(
            seven, eight,
            "--seed 7 and --seed 8 agree on a trajectory that uses randomness"
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs[0].join("summary.json")).expect("summary")).expect("json");
    assert_eq!(summary["seed"], 7, "{summary:#}");
    assert_eq!(
        summary["mean_reward"], 1.0,
        "the answers do not depend on the seed: {summary:#}"
    );
    let line: serde_json::Value = serde_json::from_str(&first[0]).expect("json");
    let seeds = &line["seeds"];
    assert_eq!(seeds["run"], 7);
    assert_eq!(
        seeds["slot"].as_u64(),
        Some(rollbox::seed::derive_slot_seed(7, "seeded-001", 0)),
        "{line:#}"
    );
}

#[test]
fn replay_repeats_a_recorded_trajectory_and_reports_the_first_divergence() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("run");
    seeded_rollout(7, &out);
    let file = out.join("trajectories.jsonl");
    let replay = |file: &Path| {
        rollbox()
            .args(["rollout", "--replay"])
            .arg(file)
            .args(["--id", "seeded-002/1"])
            .output()
            .expect("run rollbox")
    };
    let same = replay(&file);
    assert!(same.status.success(), "{}", String::from_utf8_lossy(&same.stderr));
    let report: serde_json::Value = serde_json::from_slice(&same.stdout).expect("a JSON report");
    assert_eq!(report["divergence"], serde_json::Value::Null, "{report:#}");
    assert_eq!(report["calls_compared"], 2, "{report:#}");
    // Another seed's trajectory under this one's id: its first cell's output differs.
    let other = dir.path().join("other");
    seeded_rollout(8, &other);
    let mut lines: Vec<serde_json::Value> = std::fs::read_to_string(other.join("trajectories.jsonl"))
        .expect("trajectories")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let recorded_seeds: serde_json::Value = std::fs::read_to_string(&file)
        .expect("trajectories")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .find(|l| l["trajectory_id"] == "seeded-002/1")
        .expect("the trajectory")["seeds"]
        .clone();
    for line in &mut lines {
        line["seeds"] = recorded_seeds.clone();
    }
    let tampered = dir.path().join("tampered.jsonl");
    let text: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    std::fs::write(&tampered, text.join("\n") + "\n").expect("write");
    let diverged = replay(&tampered);
    assert_eq!(
        diverged.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&diverged.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&diverged.stdout).expect("a JSON report");
    assert_eq!(report["divergence"]["turn"], 0, "{report:#}");
    assert_eq!(report["divergence"]["call"], 0, "{report:#}");
}

#[test]
fn clock_start_without_a_seed_is_refused() {
    let out = rollbox()
        .args(["exec", "--clock-start", "2030-01-01T00:00:00Z", "-c", "1"])
        .output()
        .expect("run rollbox");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("add --seed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn exec_with_a_seed_and_a_clock_start_repeats_and_starts_there() {
    let run = || {
        rollbox()
            .args(["exec", "--json", "--seed", "3", "--clock-start", "2030-01-01T00:00:00Z"])
            .args(["-c", "import time, random\n(int(time.time()), random.random())"])
            .output()
            .expect("run rollbox")
    };
    let (first, second) = (run(), run());
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let value_of = |out: &std::process::Output| {
        let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
        line["cell"]["result"]["text/plain"].clone()
    };
    assert_eq!(value_of(&first), value_of(&second));
    assert!(
        value_of(&first).as_str().is_some_and(|v| v.starts_with("(1893456000,")),
        "{}",
        value_of(&first)
    );
}

/// Fork `i` of a slot seeded `S` gets the stream of `derive_fork_seed(S, i)`: two forks of one
/// parent draw differently, and the same forks of the same seeded parent repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forks_of_a_seeded_slot_differ_from_each_other_and_repeat() {
    let backend = shared_wasm();
    let draw = "import random, os, time\n(random.random(), os.urandom(4).hex(), time.time())";
    let mut runs = Vec::new();
    for _ in 0..2 {
        let parent = backend.acquire_seeded("repro-fork", 11).await.expect("acquire");
        ok(backend
            .execute(&parent, ToolCall::python("import random\nx = random.random()"))
            .await);
        let first = backend.fork(&parent, "repro-fork/0").await.expect("fork");
        let second = backend.fork(&parent, "repro-fork/1").await.expect("fork");
        let draws = (
            value(&ok(backend.execute(&first, ToolCall::python(draw)).await)),
            value(&ok(backend.execute(&second, ToolCall::python(draw)).await)),
        );
        assert_ne!(draws.0, draws.1, "two forks of one parent draw from different streams");
        runs.push(draws);
        for slot in [first, second, parent] {
            backend.release(&slot, true).await.expect("release");
        }
    }
    assert_eq!(runs[0], runs[1], "the same forks of the same seeded parent repeat");
}
