//! Branched rollouts (`--branch-after-turn K`) and shared `setup_code`: a group's prefix runs once
//! in one slot, which is forked into the group's samples.
//!
//! The slots are real (the shared wasm backend, and the process backend for what cannot fork).
//! [`Counting`] wraps the real backend only to count, on the host, what the runner asked of it
//! (setup cells run, slots acquired, forks), so "once per problem" is not the guest's word. The
//! policy is a scripted one, as the oracle is, because the oracle plays the same turns in every
//! sample and so could not show that branches diverge.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use serde_json::Value;

use rollbox::chat::Message;
use rollbox::rollout::agent::Trajectory;
use rollbox::rollout::config::{AgentConfig, AgentKind, RolloutConfig};
use rollbox::rollout::dataset::{Dataset, Problem, parse_dataset};
use rollbox::rollout::policy::{ModelReply, OraclePolicy, Policy, PolicyError, TurnRequest};
use rollbox::rollout::replay::{read_trajectory, replay};
use rollbox::rollout::runner::{RolloutError, SilentRolloutReporter, StopSignal, run_rollout};
use rollbox::slot::tools::ToolName;
use rollbox::{Backend, BackendError, ExecutionResult, Limits, Slot, ToolCall};

use crate::process::process_backend;
use crate::support::shared_wasm;

/// The setup every problem here has: it writes a CSV into the workspace and loads it, as a
/// dataset that ships data would (with `csv`, which the process backend's Python has too).
const SETUP: &str = "import csv\nwith open('data.csv', 'w') as f:\n    f.write('a,b\\n1,2\\n3,4\\n5,6\\n')\n\
                     with open('data.csv') as f:\n    df = list(csv.DictReader(f))";

/// A real backend, counted: what the runner asked of it, seen from the host.
struct Counting {
    inner: Arc<dyn Backend>,
    /// Cells whose code is [`SETUP`].
    setups: AtomicUsize,
    /// Forks asked for, by the trajectory id of the fork.
    forks: Mutex<Vec<String>>,
    /// Slots acquired, by trajectory id.
    acquired: Mutex<Vec<String>>,
}

impl Counting {
    fn new(inner: Arc<dyn Backend>) -> Arc<Self> {
        Arc::new(Counting {
            inner,
            setups: AtomicUsize::new(0),
            forks: Mutex::default(),
            acquired: Mutex::default(),
        })
    }

    fn forks(&self) -> Vec<String> {
        self.forks.lock().unwrap().clone()
    }

    fn acquired(&self) -> Vec<String> {
        self.acquired.lock().unwrap().clone()
    }
}

#[async_trait]
impl Backend for Counting {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn tools(&self) -> Vec<ToolName> {
        self.inner.tools()
    }

    async fn acquire(&self, trajectory_id: &str) -> Result<Slot, BackendError> {
        self.acquired.lock().unwrap().push(trajectory_id.to_owned());
        self.inner.acquire(trajectory_id).await
    }

    async fn acquire_seeded(&self, trajectory_id: &str, seed: u64) -> Result<Slot, BackendError> {
        self.acquired.lock().unwrap().push(trajectory_id.to_owned());
        self.inner.acquire_seeded(trajectory_id, seed).await
    }

    async fn execute_batch(&self, calls: Vec<(Slot, ToolCall)>) -> Vec<ExecutionResult> {
        let setups = calls
            .iter()
            .filter(|(_, call)| call.arguments.get("code").and_then(Value::as_str) == Some(SETUP))
            .count();
        self.setups.fetch_add(setups, Ordering::SeqCst);
        self.inner.execute_batch(calls).await
    }

    async fn fork(&self, slot: &Slot, trajectory_id: &str) -> Result<Slot, BackendError> {
        self.forks.lock().unwrap().push(trajectory_id.to_owned());
        self.inner.fork(slot, trajectory_id).await
    }

    async fn release(&self, slot: &Slot, reset_workspace: bool) -> Result<(), BackendError> {
        self.inner.release(slot, reset_workspace).await
    }
}

/// The shared wasm backend as an `Arc<dyn Backend>`.
struct Shared;

#[async_trait]
impl Backend for Shared {
    fn name(&self) -> &str {
        shared_wasm().name()
    }
    fn tools(&self) -> Vec<ToolName> {
        shared_wasm().tools()
    }
    async fn acquire(&self, trajectory_id: &str) -> Result<Slot, BackendError> {
        shared_wasm().acquire(trajectory_id).await
    }
    async fn acquire_seeded(&self, trajectory_id: &str, seed: u64) -> Result<Slot, BackendError> {
        shared_wasm().acquire_seeded(trajectory_id, seed).await
    }
    async fn execute_batch(&self, calls: Vec<(Slot, ToolCall)>) -> Vec<ExecutionResult> {
        shared_wasm().execute_batch(calls).await
    }
    async fn fork(&self, slot: &Slot, trajectory_id: &str) -> Result<Slot, BackendError> {
        shared_wasm().fork(slot, trajectory_id).await
    }
    async fn release(&self, slot: &Slot, reset_workspace: bool) -> Result<(), BackendError> {
        shared_wasm().release(slot, reset_workspace).await
    }
}

/// Three turns of a notebook agent: turn 0 (the shared prefix) sets state in memory and in a
/// file; turn 1 writes state of the branch's own, numbered in the order branches ask; turn 2
/// prints what the branch can see and answers. It records the messages every request at turn 1
/// saw, and counts requests at turn 0.
#[derive(Default)]
struct Script {
    turn0_requests: AtomicUsize,
    next_branch: AtomicUsize,
    seen_at_turn1: Mutex<HashMap<String, Vec<Vec<Message>>>>,
}

const TURN0: &str = "<code>\nlog = []\nx = 41\nrows = len(df)\nopen('prefix.txt', 'w').write('p')\n</code>";
const TURN2: &str = "<code>\nimport os\nprint(len(log), x - 41 == log[0], rows, open('prefix.txt').read(), \
                     sorted(f for f in os.listdir('.') if f.startswith('branch-')))\n</code>\n\\boxed{42}";

#[async_trait]
impl Policy for Script {
    fn name(&self) -> &str {
        "script"
    }

    async fn next_turn(&self, request: TurnRequest<'_>) -> Result<ModelReply, PolicyError> {
        let text = match request.turn {
            0 => {
                self.turn0_requests.fetch_add(1, Ordering::SeqCst);
                TURN0.to_owned()
            }
            1 => {
                self.seen_at_turn1
                    .lock()
                    .unwrap()
                    .entry(request.problem.instance_id.clone())
                    .or_default()
                    .push(request.messages.to_vec());
                let n = self.next_branch.fetch_add(1, Ordering::SeqCst) + 1;
                format!(
                    "<code>\nimport random\nlog.append({n})\nx += {n}\nopen('branch-{n}.txt', 'w').write('b')\nprint(random.random())\n</code>"
                )
            }
            _ => TURN2.to_owned(),
        };
        Ok(ModelReply {
            message: Message::assistant(text),
            usage: None,
            logprobs: None,
            finish_reason: None,
            attempts: 0,
            anomalies: Vec::new(),
        })
    }
}

fn problems(ids: &[&str], reference: Option<&str>) -> Dataset {
    let lines: Vec<String> = ids
        .iter()
        .map(|id| {
            let mut line = serde_json::json!({
                "instance_id": id,
                "problem": "Load the data and answer 42.",
                "ground_truth": "42",
                "setup_code": SETUP,
            });
            if let Some(reference) = reference {
                line["reference_solution"] = serde_json::json!([reference]);
            }
            line.to_string()
        })
        .collect();
    let dataset = parse_dataset(&lines.join("\n"));
    assert_eq!(dataset.errors, vec![]);
    dataset
}

fn config(out: &Path, group_size: usize, branch_after_turn: Option<usize>) -> RolloutConfig {
    RolloutConfig {
        agent: AgentConfig::new(AgentKind::Notebook),
        group_size,
        concurrency: 8,
        out_dir: out.to_owned(),
        resume: false,
        custom_reward: None,
        score_in_fresh_slot: false,
        seed: None,
        branch_after_turn,
    }
}

fn read_lines(path: &Path) -> Vec<(Trajectory, Value)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| (serde_json::from_str(line).unwrap(), serde_json::from_str(line).unwrap()))
        .collect()
}

/// The last message's text: the outputs of the last turn's code.
fn last_output(trajectory: &Trajectory) -> String {
    trajectory
        .messages
        .last()
        .map(|m| m.text().into_owned())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_branched_group_shares_its_prefix_and_setup_then_each_branch_goes_its_own_way() {
    let backend = Counting::new(Arc::new(Shared));
    let policy = Arc::new(Script::default());
    let out = tempfile::tempdir().unwrap();
    let dataset = problems(&["p1", "p2"], None);
    let run = run_rollout(
        backend.clone(),
        policy.clone(),
        &dataset,
        &config(out.path(), 3, Some(1)),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("the branched rollout runs");
    assert_eq!(run.summary.run.written, 6, "{:?}", run.summary);
    assert_eq!(run.summary.run.groups_forked, 2);
    assert_eq!(run.summary.branch_after_turn, Some(1));

    // Once per problem, counted on the host: the setup cell, the prefix's turn, its slot.
    assert_eq!(
        backend.setups.load(Ordering::SeqCst),
        2,
        "setup_code runs once per problem"
    );
    assert_eq!(
        policy.turn0_requests.load(Ordering::SeqCst),
        2,
        "the prefix turn is asked once per problem"
    );
    let mut acquired = backend.acquired();
    acquired.sort();
    assert_eq!(
        acquired,
        ["p1/prefix", "p2/prefix", "rollout/fork-probe"],
        "no sample acquires a slot: each is a fork"
    );
    let mut forks = backend.forks();
    forks.sort();
    assert_eq!(
        forks,
        [
            "p1/0",
            "p1/1",
            "p1/2",
            "p2/0",
            "p2/1",
            "p2/2",
            "rollout/fork-probe/fork"
        ]
    );

    // The policy saw the same prefix in every continuation of a group.
    for (id, seen) in policy.seen_at_turn1.lock().unwrap().iter() {
        assert_eq!(seen.len(), 3, "{id}");
        assert_eq!(seen[0].len(), 4, "system, problem, the prefix turn, its output");
        assert!(seen.iter().all(|messages| messages == &seen[0]), "{id}: {seen:#?}");
    }

    let lines = read_lines(&run.trajectories_path);
    let mut outputs = Vec::new();
    for (trajectory, raw) in &lines {
        let branch = trajectory.branch.as_ref().expect("every line records its branch");
        let group = &trajectory.instance_id;
        assert_eq!(branch.group_id, *group);
        assert_eq!(branch.parent_trajectory_id, format!("{group}/prefix"));
        assert_eq!(
            (branch.after_turn, branch.prefix_messages, branch.prefix_steps),
            (1, 4, 1)
        );
        assert_eq!(branch.fork_index, trajectory.sample);
        assert_eq!(raw["branch"]["prefix_messages"], 4, "the JSON line carries it: {raw}");
        let setup = trajectory.setup.as_ref().expect("the setup cell is recorded");
        assert!(setup.result.success, "{:?}", setup.result);
        assert_eq!(trajectory.steps.len(), 3);
        assert_eq!(trajectory.reward.score, 1.0);
        let first = &lines.iter().find(|(t, _)| t.instance_id == *group).unwrap().0;
        assert_eq!(
            trajectory.messages[..4],
            first.messages[..4],
            "the shared prefix is the same in every line"
        );
        assert_eq!(trajectory.steps[..1], first.steps[..1]);
        // The prefix's variable, the setup's data frame and the prefix's file are in every
        // branch; each branch sees its own write and no other branch's, in memory and in files.
        let output = last_output(trajectory);
        let n = output
            .split("branch-")
            .nth(1)
            .and_then(|rest| rest.split('.').next())
            .unwrap_or_else(|| panic!("no branch file listed: {output}"))
            .to_owned();
        assert!(
            output.contains(&format!("1 True 3 p ['branch-{n}.txt']")),
            "{}: {output}",
            trajectory.trajectory_id
        );
        outputs.push(n);
    }
    outputs.sort();
    outputs.dedup();
    assert_eq!(outputs.len(), 6, "six branches, six different writes: {outputs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_code_runs_once_per_group_on_a_backend_that_forks_and_per_sample_on_one_that_does_not() {
    let reference = "<code>\nprint(len(df), sum(int(row['b']) for row in df))\n</code>\n\\boxed{42}";
    let dataset = problems(&["s1", "s2"], Some(reference));

    let wasm = Counting::new(Arc::new(Shared));
    let out = tempfile::tempdir().unwrap();
    let run = run_rollout(
        wasm.clone(),
        Arc::new(OraclePolicy),
        &dataset,
        &config(out.path(), 4, None),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("the rollout runs");
    assert_eq!(run.summary.run.written, 8);
    assert_eq!(
        wasm.setups.load(Ordering::SeqCst),
        2,
        "once per problem, not per sample"
    );
    assert_eq!(run.summary.run.groups_forked, 2);
    for (trajectory, _) in read_lines(&run.trajectories_path) {
        assert!(last_output(&trajectory).contains("3 12"), "{trajectory:?}");
        let branch = trajectory.branch.expect("forked from the setup slot");
        assert_eq!(
            (branch.after_turn, branch.prefix_messages, branch.prefix_steps),
            (0, 2, 0)
        );
        assert_eq!(trajectory.reward.score, 1.0);
    }

    // A group of one shares nothing: the setup runs in the sample's own slot, and no fork.
    let single = Counting::new(Arc::new(Shared));
    let out = tempfile::tempdir().unwrap();
    let run = run_rollout(
        single.clone(),
        Arc::new(OraclePolicy),
        &dataset,
        &config(out.path(), 1, None),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("the rollout runs");
    assert_eq!(single.setups.load(Ordering::SeqCst), 2);
    assert!(single.forks().is_empty(), "{:?}", single.forks());
    for (trajectory, _) in read_lines(&run.trajectories_path) {
        assert!(trajectory.branch.is_none());
        assert!(trajectory.setup.is_some());
        assert!(last_output(&trajectory).contains("3 12"), "{trajectory:?}");
    }

    // The process backend cannot fork: the setup runs in every sample's slot.
    let (process, _root) = process_backend(Limits::default());
    let process = Counting::new(Arc::new(process));
    let out = tempfile::tempdir().unwrap();
    let run = run_rollout(
        process.clone(),
        Arc::new(OraclePolicy),
        &dataset,
        &config(out.path(), 2, None),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("the rollout runs");
    assert_eq!(process.setups.load(Ordering::SeqCst), 4, "per sample: 2 problems x 2");
    assert_eq!(run.summary.run.groups_forked, 0);
    assert_eq!(process.forks(), ["rollout/fork-probe/fork"], "only the probe asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branching_on_a_backend_that_cannot_fork_is_refused_before_anything_runs() {
    let (process, _root) = process_backend(Limits::default());
    let out = tempfile::tempdir().unwrap();
    let error = run_rollout(
        Arc::new(process),
        Arc::new(Script::default()),
        &problems(&["r1"], None),
        &config(out.path(), 2, Some(1)),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect_err("the process backend cannot fork");
    assert!(
        matches!(&error, RolloutError::CannotBranch { backend, .. } if backend == "process"),
        "{error:?}"
    );
    let message = rollbox::error_text::error_chain(&error);
    for needed in ["--backend wasm", "without --branch-after-turn", "cannot fork"] {
        assert!(message.contains(needed), "{message}");
    }
    assert!(!out.path().join("trajectories.jsonl").exists(), "nothing ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_branched_trajectory_replays_from_its_prefix_and_its_fork() {
    let out = tempfile::tempdir().unwrap();
    let config = RolloutConfig {
        seed: Some(7),
        ..config(out.path(), 3, Some(1))
    };
    let run = run_rollout(
        Arc::new(Shared),
        Arc::new(Script::default()),
        &problems(&["q1"], None),
        &config,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("the seeded branched rollout runs");
    assert_eq!(run.summary.run.written, 3);
    let mut draws = Vec::new();
    for sample in 0..3 {
        let id = format!("q1/{sample}");
        let trajectory = read_trajectory(&run.trajectories_path, &id).unwrap();
        let seeds = trajectory.seeds.expect("seeded");
        let prefix_slot = seeds
            .prefix_slot
            .expect("a branched trajectory records its prefix slot's seed");
        assert_eq!(prefix_slot, rollbox::rollout::agent::SlotSeeds::prefix(7, "q1"));
        assert_eq!(seeds.slot, rollbox::seed::derive_fork_seed(prefix_slot, sample as u64));
        draws.push(trajectory.steps[1].calls[0].result.output.clone());
        let report = replay(shared_wasm(), &trajectory).await.expect("the replay runs");
        assert_eq!(
            report.calls_compared, 4,
            "the setup, the prefix's call, then two of its own"
        );
        assert_eq!(report.divergence, None, "{id}: {report:#?}");
    }
    draws.sort();
    draws.dedup();
    assert_eq!(draws.len(), 3, "each fork draws from its own stream: {draws:?}");
}

/// A problem with a `setup_code` reads and writes back with it.
#[test]
fn setup_code_is_a_dataset_field() {
    let dataset = problems(&["d1"], None);
    assert_eq!(dataset.problems[0].setup_code.as_deref(), Some(SETUP));
    let line = serde_json::to_value(&dataset.problems[0]).unwrap();
    assert_eq!(line["setup_code"], SETUP);
    let plain: Problem = serde_json::from_str(r#"{"instance_id": "x", "problem": "p", "ground_truth": "1"}"#).unwrap();
    assert_eq!(plain.setup_code, None);
}

/// A `--branch-after-turn` that would branch nothing is refused with what to pass instead.
#[test]
fn the_cli_refuses_a_branch_point_that_branches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
            .args(["--quiet", "rollout", "--dataset", "missing.jsonl", "--out"])
            .arg(dir.path().join("out"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let alone = run(&["--branch-after-turn", "1"]);
    assert!(alone.contains("--group-size 2 or more"), "{alone}");
    let late = run(&["--branch-after-turn", "8", "--group-size", "2"]);
    assert!(late.contains("less than --max-turns (8)"), "{late}");
    let early = run(&["--branch-after-turn", "0", "--group-size", "2"]);
    assert!(early.contains("at least 1"), "{early}");
}

/// The remote backend branches on its servers when they can fork (wasm) and is refused up front
/// when they cannot (process): real `rollbox serve` servers on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_backend_branches_when_its_servers_can_fork() {
    use rollbox::remote::provision::{LocalProvisioner, LocalProvisionerConfig};
    use rollbox::remote::{PoolConfig, RemoteBackend};
    let pool = PoolConfig {
        slots_per_server: 8,
        min_servers: 1,
        max_servers: 1,
        ..PoolConfig::default()
    };
    let wasm = LocalProvisionerConfig::new(env!("CARGO_BIN_EXE_rollbox"));
    let backend = RemoteBackend::with_provisioner(pool.clone(), Arc::new(LocalProvisioner::new(wasm)))
        .await
        .expect("the remote backend starts");
    let backend: Arc<dyn Backend> = Arc::new(backend);
    let out = tempfile::tempdir().unwrap();
    let run = run_rollout(
        backend.clone(),
        Arc::new(Script::default()),
        &problems(&["m1"], None),
        &config(out.path(), 3, Some(1)),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await;
    backend.shutdown().await.expect("shutdown");
    let run = run.expect("the branched rollout runs on remote wasm servers");
    assert_eq!(run.summary.run.written, 3);
    for (trajectory, _) in read_lines(&run.trajectories_path) {
        assert_eq!(trajectory.branch.as_ref().map(|b| b.prefix_messages), Some(4));
        let output = last_output(&trajectory);
        assert!(output.contains("1 True 3 p ['branch-"), "{output}");
    }

    let mut process = LocalProvisionerConfig::new(env!("CARGO_BIN_EXE_rollbox"));
    process.server_backend = "process".into();
    let backend = RemoteBackend::with_provisioner(pool, Arc::new(LocalProvisioner::new(process)))
        .await
        .expect("the remote backend starts");
    let backend: Arc<dyn Backend> = Arc::new(backend);
    let out = tempfile::tempdir().unwrap();
    let refused = run_rollout(
        backend.clone(),
        Arc::new(Script::default()),
        &problems(&["m1"], None),
        &config(out.path(), 3, Some(1)),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await;
    backend.shutdown().await.expect("shutdown");
    let error = refused.expect_err("process servers cannot fork");
    assert!(
        matches!(&error, RolloutError::CannotBranch { backend, .. } if backend == "remote"),
        "{error:?}"
    );
}
