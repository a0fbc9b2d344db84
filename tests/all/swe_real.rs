//! Three SWE tasks from real projects' PyPI sdists (inflection, cachetools, isodate), built by
//! scripts/swe-real-tasks.py, with environments that pip-installs their real dependencies.
//! Opt-in (`cargo test --test all swe_real -- --ignored`): they need pip's index for the sdists
//! (cached in the target folder after the first run) and the dependencies, and take a minute.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

use rollbox::rollout::dataset::{Dataset, load_dataset_with};
use rollbox::rollout::swe::{self, SilentEnvironmentReporter, SweTask, TestExpectation, TestStatus};
use rollbox::{Backend, Limits};
use serde_json::json;

use crate::process::process_backend_with;
use crate::support::{apply_patch, bash, ok};

/// Where the tasks, their sdists and their environments are kept between runs: the same
/// paths give the same environment keys, so the venvs are built once per machine.
fn real_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("swe-real")
}

/// The tasks' dataset, built once per test process by the script.
fn real_tasks() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = real_dir().join("tasks");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/swe-real-tasks.py");
        let run = Command::new("python3")
            .arg(script)
            .arg(&out)
            .arg("--sdists")
            .arg(real_dir().join("sdists"))
            .output()
            .expect("run scripts/swe-real-tasks.py");
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        out.join("tasks.jsonl")
    })
}

fn shared_cache() -> PathBuf {
    real_dir().join("shared-cache")
}

fn dataset() -> Dataset {
    let dataset = load_dataset_with(real_tasks(), &real_dir().join("repos")).expect("load");
    assert!(dataset.errors.is_empty(), "{:?}", dataset.errors);
    assert_eq!(dataset.problems.len(), 3);
    dataset
}

/// The environments, built with pip on the first run and found ready after.
fn environments(dataset: &Dataset) {
    let tasks: Vec<SweTask> = dataset.problems.iter().filter_map(|p| p.swe.clone()).collect();
    swe::ensure_environments(&shared_cache(), &tasks, &SilentEnvironmentReporter).expect("the environments build");
}

fn backend() -> (rollbox::process::ProcessBackend, tempfile::TempDir) {
    process_backend_with(rollbox::process::ProcessBackendConfig {
        limits: Limits::default(),
        shared_cache: Some(shared_cache()),
        ..Default::default()
    })
}

/// For each real task, on the process backend with its pip-built environment: the gold patch
/// scores 1.0, no patch 0.0 (its FAIL_TO_PASS ids fail, the rest pass), and a patch that fixes
/// the bug but breaks a PASS_TO_PASS test 0.0.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs pip's index (sdists and dependencies) and about a minute"]
async fn real_tasks_score_one_for_the_gold_patch_and_zero_without_it_or_with_a_breaking_patch() {
    let dataset = dataset();
    environments(&dataset);
    let (backend, _root) = backend();
    for problem in &dataset.problems {
        let task = problem.swe.clone().expect("an SWE task");
        let id = &task.instance_id;
        let breaking_file = real_tasks().with_file_name("breaking").join(format!("{id}.patch"));
        let breaking = std::fs::read_to_string(breaking_file).expect("the breaking patch");
        let slots = [
            backend.acquire("gold").await.expect("acquire"),
            backend.acquire("none").await.expect("acquire"),
            backend.acquire("breaking").await.expect("acquire"),
        ];
        for slot in &slots {
            swe::prepare(&backend, slot, &task).await.expect("prepare");
        }
        // The environment's own Python (a venv without the host's packages) is the slot's.
        let python = ok(backend
            .execute(
                &slots[0],
                bash("python3 -c 'import sys; print(sys.prefix != sys.base_prefix, sys.prefix)'"),
            )
            .await);
        assert!(
            python.output.starts_with("True ") && python.output.trim_end().ends_with("/env"),
            "{id}: {}",
            python.output
        );
        apply_patch(&backend, &slots[0], task.gold_patch.as_deref().expect("gold")).await;
        apply_patch(&backend, &slots[2], &breaking).await;
        let gold = swe::verify(&backend, &slots[0], &task).await.expect("verify");
        assert_eq!(gold.reward, 1.0, "{id}: {:?}\n{}", gold.tests, gold.output);
        let none = swe::verify(&backend, &slots[1], &task).await.expect("verify");
        assert_eq!(none.reward, 0.0, "{id}: {}", none.output);
        for outcome in &none.tests {
            let expected = match outcome.expected {
                TestExpectation::FailToPass => TestStatus::Failed,
                TestExpectation::PassToPass => TestStatus::Passed,
            };
            assert_eq!(outcome.status, expected, "{id}: {outcome:?}");
        }
        let broken = swe::verify(&backend, &slots[2], &task).await.expect("verify");
        assert_eq!(broken.reward, 0.0, "{id}: {}", broken.output);
        assert!(
            broken
                .tests
                .iter()
                .any(|t| t.expected == TestExpectation::PassToPass && t.status == TestStatus::Failed),
            "{id}: a PASS_TO_PASS test breaks: {:?}",
            broken.tests
        );
        for slot in &slots {
            swe::cleanup(&backend, slot, &task).await.expect("cleanup");
            backend.release(slot, true).await.expect("release");
        }
    }
}

/// The loopback server's bearer token (at least 16 characters, as the server requires).
const TOKEN: &str = "swe-real-test-token-0123456789ab";

fn rollout(args: &[&str], out: &Path) -> serde_json::Value {
    let cache = tempfile::tempdir().expect("tempdir");
    let run = Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["--quiet", "rollout", "--group-size", "2", "--dataset"])
        .arg(real_tasks())
        .args(args)
        .arg("--out")
        .arg(out)
        .env(rollbox::env_vars::CACHE_DIR, cache.path())
        .env(rollbox::env_vars::SERVER_TOKEN, TOKEN)
        .output()
        .expect("run rollbox");
    assert!(
        run.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("JSON")
}

/// `rollbox rollout` over the three tasks with the oracle, on the process backend and on a
/// real `rollbox serve --backend process` on loopback whose shared cache holds the
/// environments (built there by `rollbox swe prepare`): every trajectory scores 1.0.
#[test]
#[ignore = "needs pip's index (sdists and dependencies) and about a minute"]
fn the_rollout_command_scores_the_real_tasks_on_process_and_on_a_process_server() {
    let cache = shared_cache();
    let prepare = Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["swe", "prepare", "--dataset"])
        .arg(real_tasks())
        .arg("--shared-cache")
        .arg(&cache)
        .output()
        .expect("run rollbox swe prepare");
    assert!(prepare.status.success(), "{}", String::from_utf8_lossy(&prepare.stderr));
    assert!(
        String::from_utf8_lossy(&prepare.stderr).contains("environment 3/3"),
        "{}",
        String::from_utf8_lossy(&prepare.stderr)
    );

    let out = tempfile::tempdir().expect("tempdir");
    let cache_arg = cache.display().to_string();
    let summary = rollout(&["--backend", "process", "--shared-cache", &cache_arg], out.path());
    assert_eq!(
        (&summary["mean_reward"], &summary["trajectories"]),
        (&json!(1.0), &json!(6)),
        "{summary:#}"
    );

    let mut server = Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["--quiet", "serve", "--listen", "127.0.0.1:0", "--backend", "process"])
        .arg("--shared-cache")
        .arg(&cache)
        .env(rollbox::env_vars::SERVER_TOKEN, TOKEN)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn rollbox serve");
    let mut line = String::new();
    BufReader::new(server.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("a listening line");
    let listening: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    let url = listening["url"].as_str().expect("a url").to_owned();
    let out = tempfile::tempdir().expect("tempdir");
    let remote = ["--backend", "remote", "--provision", "static", "--servers", &url];
    let summary = rollout(&remote, out.path());
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        (&summary["mean_reward"], &summary["trajectories"]),
        (&json!(1.0), &json!(6)),
        "{summary:#}"
    );
}

/// The reuse target, measured: a group of 8 trajectories of one repository version,
/// each slot's acquire and `prepare` (worktree plus ready environment) timed in turn. Printed,
/// not asserted (no timed assertions): run with `--nocapture` and read the numbers.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement; needs pip's index on the first run"]
async fn environment_reuse_for_a_group_of_eight() {
    let dataset = dataset();
    environments(&dataset);
    let (backend, _root) = backend();
    let task = dataset.problems[2].swe.clone().expect("an SWE task");
    let mut slots = Vec::new();
    let mut millis = Vec::new();
    for index in 0..8 {
        let started = Instant::now();
        let slot = backend.acquire(&format!("reuse-{index}")).await.expect("acquire");
        swe::prepare(&backend, &slot, &task).await.expect("prepare");
        millis.push(started.elapsed().as_secs_f64() * 1e3);
        slots.push(slot);
    }
    println!(
        "{}: acquire + prepare per trajectory, ms: {millis:.1?}",
        task.instance_id
    );
    for slot in &slots {
        swe::cleanup(&backend, slot, &task).await.expect("cleanup");
        backend.release(slot, true).await.expect("release");
    }
}
