//! SWE-bench-format rows (per-test scoring, the test patch applied only at scoring time) and
//! per-task environments, over the real `process` backend, real git and real pytest.
//!
//! The fast tests use the example repository (examples/swe/calc) and environments whose setup
//! needs no network. The real-project tests (`--ignored`) build three tasks from PyPI sdists
//! with scripts/swe-real-tasks.py and install their dependencies with pip.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rollbox::rollout::dataset::{Dataset, load_dataset_with};
use rollbox::rollout::swe::{self, SweTask, TestExpectation, TestStatus};
use rollbox::{Backend, Limits, ToolCall};
use serde_json::json;

use crate::process::process_backend;
use crate::support::{apply_patch, bash, ok};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// A new test file the agent never sees: one test the bug fails, one it does not.
const TEST_PATCH: &str = "diff --git a/tests/test_extra.py b/tests/test_extra.py
new file mode 100644
--- /dev/null
+++ b/tests/test_extra.py
@@ -0,0 +1,9 @@
+from calc import mean, median
+
+
+def test_median_of_two():
+    assert median([1, 2]) == 1.5
+
+
+def test_mean_of_two():
+    assert mean([1, 2]) == 1.5
";

/// The example repository as a SWE-bench-format row in `dir` (its repository built there):
/// JSON-encoded FAIL_TO_PASS / PASS_TO_PASS, `problem_statement`, `patch`, `test_patch`.
fn calc_row(dir: &Path, extra: serde_json::Value) -> Dataset {
    let commit = swe::build_repo(
        &examples().join("swe/calc"),
        &dir.join("calc.git"),
        "calc: the example's base commit",
    )
    .expect("build");
    let gold = std::fs::read_to_string(examples().join("swe/calc-median.patch")).expect("patch");
    let f2p = [
        "tests/test_extra.py::test_median_of_two",
        "tests/test_stats.py::test_median_of_an_even_count",
    ];
    let p2p = [
        "tests/test_extra.py::test_mean_of_two",
        "tests/test_stats.py::test_mean",
        "tests/test_stats.py::test_median_of_an_odd_count",
        "tests/test_stats.py::test_median_of_nothing",
    ];
    let mut row = json!({
        "instance_id": "calc__calc-1", "repo": "calc.git", "base_commit": commit,
        "environment_setup_commit": commit, "version": "0.1",
        "problem_statement": "median() of an even-length list returns the upper middle value.",
        "patch": gold, "test_patch": TEST_PATCH,
        "FAIL_TO_PASS": serde_json::to_string(&f2p).expect("JSON"),
        "PASS_TO_PASS": serde_json::to_string(&p2p).expect("JSON"),
        "test_command": "python3 -m pytest -rA -p no:cacheprovider tests",
    });
    if let (Some(row), serde_json::Value::Object(extra)) = (row.as_object_mut(), extra) {
        row.extend(extra);
    }
    std::fs::write(dir.join("tasks.jsonl"), format!("{row}\n")).expect("write the dataset");
    let dataset = load_dataset_with(&dir.join("tasks.jsonl"), dir).expect("load");
    assert!(dataset.errors.is_empty(), "{:?}", dataset.errors);
    dataset
}

fn the_task(dataset: &Dataset) -> SweTask {
    dataset.problems[0].swe.clone().expect("an SWE task")
}

fn statuses(score: &swe::SweScore) -> Vec<(String, TestStatus)> {
    score.tests.iter().map(|t| (t.id.clone(), t.status)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_swe_bench_row_is_scored_per_test_id_with_the_test_patch_applied_only_for_scoring() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = calc_row(dir.path(), json!({}));
    assert_eq!(
        dataset.problems[0].problem,
        "median() of an even-length list returns the upper middle value."
    );
    let task = the_task(&dataset);
    assert!(task.scored_per_test() && task.test_patch.is_some());
    let (backend, _root) = process_backend(Limits::default());
    let names = ["gold", "untouched", "breaks-mean", "own-tests"];
    let mut slots = Vec::new();
    for name in names {
        let slot = backend.acquire(name).await.expect("acquire");
        swe::prepare(&backend, &slot, &task).await.expect("prepare");
        slots.push(slot);
    }
    let seen = ok(backend.execute(&slots[0], bash("ls tests")).await);
    assert_eq!(
        seen.output, "test_stats.py\n",
        "the agent never sees the test patch's tests"
    );

    apply_patch(&backend, &slots[0], task.gold_patch.as_deref().expect("gold")).await;
    let gold = swe::verify(&backend, &slots[0], &task).await.expect("verify");
    assert_eq!(gold.reward, 1.0, "{}", gold.output);
    assert_eq!(gold.tests.len(), 6, "{:?}", gold.tests);
    assert!(
        gold.tests.iter().all(|t| t.status == TestStatus::Passed),
        "{:?}",
        gold.tests
    );

    let untouched = swe::verify(&backend, &slots[1], &task).await.expect("verify");
    assert_eq!(untouched.reward, 0.0, "{}", untouched.output);
    for outcome in &untouched.tests {
        let expected = match outcome.expected {
            TestExpectation::FailToPass => TestStatus::Failed,
            TestExpectation::PassToPass => TestStatus::Passed,
        };
        assert_eq!(outcome.status, expected, "{outcome:?}\n{}", untouched.output);
    }

    // Fixes the median, breaks the mean: every FAIL_TO_PASS passes, two PASS_TO_PASS break.
    apply_patch(&backend, &slots[2], task.gold_patch.as_deref().expect("gold")).await;
    ok(backend
        .execute(
            &slots[2],
            bash("sed -i 's|sum(values) / len|sum(values) // len|' calc/stats.py"),
        )
        .await);
    let broken = swe::verify(&backend, &slots[2], &task).await.expect("verify");
    assert_eq!(broken.reward, 0.0, "{}", broken.output);
    let failed: Vec<String> = statuses(&broken)
        .into_iter()
        .filter(|(_, status)| *status == TestStatus::Failed)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        failed,
        [
            "tests/test_extra.py::test_mean_of_two",
            "tests/test_stats.py::test_mean"
        ],
        "{}",
        broken.output
    );

    // An agent that writes the test file itself (tests that pass anything) is scored on the
    // test patch's tests all the same.
    let cheat = ToolCall::new(
        "write_file",
        json!({"path": "tests/test_extra.py", "content": "def test_median_of_two():\n    pass\n"}),
    );
    ok(backend.execute(&slots[3], cheat).await);
    let cheated = swe::verify(&backend, &slots[3], &task).await.expect("verify");
    assert_eq!(cheated.reward, 0.0, "{}", cheated.output);
    assert!(
        statuses(&cheated).contains(&("tests/test_extra.py::test_median_of_two".to_owned(), TestStatus::Failed)),
        "{}",
        cheated.output
    );
    for slot in &slots {
        swe::cleanup(&backend, slot, &task).await.expect("cleanup");
        backend.release(slot, true).await.expect("release");
    }
}

/// The row's generated reference solution (the gold patch applied from a cell) drives a real
/// rollout: the trajectory's reward lists each test id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_rollout_of_a_swe_bench_row_lists_every_test_id_in_its_reward() {
    use rollbox::rollout::config::{AgentConfig, AgentKind, RolloutConfig};
    use rollbox::rollout::policy::OraclePolicy;
    use rollbox::rollout::runner::{SilentRolloutReporter, StopSignal, run_rollout};
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = calc_row(dir.path(), json!({}));
    let (backend, _root) = process_backend(Limits::default());
    let out = tempfile::tempdir().expect("tempdir");
    let config = RolloutConfig {
        agent: AgentConfig::new(AgentKind::Notebook),
        group_size: 2,
        concurrency: 2,
        out_dir: out.path().to_owned(),
        resume: false,
        custom_reward: None,
        score_in_fresh_slot: true,
        seed: None,
        branch_after_turn: None,
    };
    let run = run_rollout(
        Arc::new(backend),
        Arc::new(OraclePolicy),
        &dataset,
        &config,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("the rollout runs");
    assert_eq!(
        (run.summary.run.written, run.summary.mean_reward),
        (2, 1.0),
        "{:?}",
        run.summary.run
    );
    let text = std::fs::read_to_string(&run.trajectories_path).expect("trajectories");
    let trajectory: serde_json::Value = serde_json::from_str(text.lines().next().expect("a line")).expect("JSON");
    let tests = trajectory["reward"]["breakdown"]["tests"]
        .as_array()
        .expect("tests")
        .clone();
    assert_eq!(tests.len(), 6, "{trajectory:#}");
    assert_eq!(
        tests[0],
        json!({"id": "tests/test_extra.py::test_median_of_two", "expected": "fail_to_pass", "status": "passed"})
    );
}

/// Setup commands that need no network: a `bin/` with one program, and a line appended to
/// `counter` per build.
fn local_environment(counter: &Path) -> Vec<String> {
    vec![
        "mkdir -p \"$ROLLBOX_SWE_ENV/bin\"".to_owned(),
        "printf '#!/bin/sh\\necho tool of %s\\n' \"$(git rev-parse --short HEAD)\" > \"$ROLLBOX_SWE_ENV/bin/task-tool\"".to_owned(),
        "chmod +x \"$ROLLBOX_SWE_ENV/bin/task-tool\"".to_owned(),
        format!("echo built >> '{}'", counter.display()),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn an_environment_is_built_once_under_its_lock_and_is_first_on_the_slots_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counter = dir.path().join("builds.txt");
    let dataset = calc_row(dir.path(), json!({ "environment_setup": local_environment(&counter) }));
    let task = the_task(&dataset);
    let spec = task.environment().expect("an environment");
    let (backend, _root) = process_backend(Limits::default());
    let cache = backend.shared_cache().to_owned();

    // A slot of a task whose environment was never built is refused with what to run.
    let early = backend.acquire("early").await.expect("acquire");
    let refused = swe::prepare(&backend, &early, &task).await.expect_err("not built");
    assert!(refused.to_string().contains("rollbox swe prepare"), "{refused}");
    swe::cleanup(&backend, &early, &task).await.expect("cleanup");
    backend.release(&early, true).await.expect("release");

    // Four builders at once (threads, as separate processes would be): one builds, the rest wait
    // on the lock and find it ready.
    let built: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| scope.spawn(|| swe::ensure_environment(&cache, &spec, &mut || {}).expect("build")))
            .collect();
        handles.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    assert_eq!(built.iter().filter(|b| **b).count(), 1, "{built:?}");
    assert_eq!(std::fs::read_to_string(&counter).expect("counter"), "built\n");

    let slots = [
        backend.acquire("a").await.expect("acquire"),
        backend.acquire("b").await.expect("acquire"),
    ];
    for slot in &slots {
        swe::prepare(&backend, slot, &task).await.expect("prepare");
        let run = ok(backend.execute(slot, bash("task-tool; git status --porcelain")).await);
        let short = &task.base_commit[..7];
        assert_eq!(
            run.output,
            format!("tool of {short}\n"),
            "on PATH, and the worktree stays clean"
        );
    }
    for slot in &slots {
        swe::cleanup(&backend, slot, &task).await.expect("cleanup");
        let gone = backend.execute(slot, bash("command -v task-tool || echo none")).await;
        assert_eq!(gone.output, "none\n", "cleanup unlinks the environment");
        backend.release(slot, true).await.expect("release");
    }
}

#[test]
fn a_failing_setup_command_is_an_error_that_names_it_and_the_environment_is_rebuilt_next_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counter = dir.path().join("builds.txt");
    let flag = dir.path().join("fixed");
    let mut setup = local_environment(&counter);
    setup.push(format!(
        "test -e '{}' || {{ echo no dependency here >&2; exit 7; }}",
        flag.display()
    ));
    let dataset = calc_row(dir.path(), json!({ "environment_setup": setup }));
    let spec = the_task(&dataset).environment().expect("an environment");
    let cache = dir.path().join("cache");
    let error = swe::ensure_environment(&cache, &spec, &mut || {}).expect_err("exit 7");
    let message = error.to_string();
    assert!(
        message.contains("exit status: 7") && message.contains("no dependency here") && message.contains("test -e"),
        "{message}"
    );
    assert!(!swe::environment_dir(&cache, &spec).join("READY").exists());
    std::fs::write(&flag, "").expect("flag");
    assert!(swe::ensure_environment(&cache, &spec, &mut || {}).expect("rebuilt"));
    assert!(!swe::ensure_environment(&cache, &spec, &mut || {}).expect("cached"));
    assert_eq!(std::fs::read_to_string(&counter).expect("counter"), "built\nbuilt\n");
}

/// `rollbox swe prepare` builds each distinct environment once, with a line per environment,
/// and finds them cached the second time; a relative `--shared-cache` is taken from the
/// current folder (the setup commands, which run in the checkout, get its absolute path).
#[test]
fn swe_prepare_builds_each_environment_once_with_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counter = dir.path().join("builds.txt");
    calc_row(dir.path(), json!({ "environment_setup": local_environment(&counter) }));
    let run = || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
            .args(["swe", "prepare", "--dataset", "tasks.jsonl", "--shared-cache", "shared"])
            .current_dir(dir.path())
            .env(rollbox::env_vars::CACHE_DIR, dir.path().join("rollbox-cache"))
            .output()
            .expect("run rollbox");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let first = run();
    assert!(
        first.contains("environment 1/1 calc-") && first.contains("building") && first.contains("1 built, 0 already"),
        "{first}"
    );
    let second = run();
    assert!(
        second.contains("ready (cached") && second.contains("0 built, 1 already"),
        "{second}"
    );
    assert_eq!(std::fs::read_to_string(&counter).expect("counter"), "built\n");
    let envs: Vec<_> = std::fs::read_dir(dir.path().join("shared/swe-envs"))
        .expect("the environments")
        .filter_map(Result::ok)
        .filter(|e| e.path().join("env/bin/task-tool").is_file())
        .collect();
    assert_eq!(envs.len(), 1, "the environment is where the slots will look for it");
}

/// A dataset's sidecar (`tasks.rollbox.json`) can give every SWE row that names none of its own
/// an environment setup and a Modal image: `swe prepare` builds the sidecar's environment, and a
/// dry run on Modal starts the rows' sandboxes from the sidecar's image.
#[test]
fn a_sidecar_gives_swe_rows_their_environment_and_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let counter = dir.path().join("builds.txt");
    calc_row(dir.path(), json!({}));
    std::fs::write(
        dir.path().join("tasks.rollbox.json"),
        json!({ "environment_setup": local_environment(&counter), "image_name": "example/calc:1.0" }).to_string(),
    )
    .expect("the sidecar");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["swe", "prepare", "--dataset", "tasks.jsonl", "--shared-cache", "shared"])
        .current_dir(dir.path())
        .env(rollbox::env_vars::CACHE_DIR, dir.path().join("rollbox-cache"))
        .output()
        .expect("run rollbox");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.contains("1 built, 0 already"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&counter).expect("counter"), "built\n");
    let dry_run = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args([
            "rollout",
            "--dataset",
            "tasks.jsonl",
            "--out",
            "out",
            "--backend",
            "remote",
        ])
        .args(["--provision", "modal", "--dry-run"])
        .current_dir(dir.path())
        .env(rollbox::env_vars::CACHE_DIR, dir.path().join("rollbox-cache"))
        .output()
        .expect("run rollbox");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&dry_run.stdout),
        String::from_utf8_lossy(&dry_run.stderr)
    );
    assert!(dry_run.status.success(), "{printed}");
    assert!(
        printed.contains("example/calc:1.0"),
        "the dry run names the sidecar's image: {printed}"
    );
}
