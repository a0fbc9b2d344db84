//! SWE hooks over the real `process` backend, real git and real pytest, with the example task
//! the project ships (examples/swe.jsonl, built from examples/swe/calc).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rollbox::rollout::config::{AgentConfig, AgentKind, RolloutConfig};
use rollbox::rollout::dataset::{Dataset, load_dataset_with};
use rollbox::rollout::policy::OraclePolicy;
use rollbox::rollout::runner::{SilentRolloutReporter, StopSignal, run_rollout};
use rollbox::rollout::swe::{self, SweTask};
use rollbox::{Backend, Limits, Slot, ToolCall};
use serde_json::json;

use crate::process::process_backend;
use crate::support::{apply_patch, bash, ok, pretty};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// The example task, its repository built into `repos`.
fn example_task(repos: &Path) -> SweTask {
    let mut tasks = swe::load_tasks(&examples().join("swe.jsonl"), repos).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tasks.len(), 1);
    tasks.remove(0)
}

/// Applies the task's gold patch with `git apply`, through the bash tool.
async fn apply_gold_patch(backend: &dyn Backend, slot: &Slot, task: &SweTask) {
    let patch = task.gold_patch.as_deref().expect("the example has a gold patch");
    apply_patch(backend, slot, patch).await;
}

#[test]
fn the_example_repository_builds_to_the_dataset_commit() {
    let first = tempfile::tempdir().expect("tempdir");
    let second = tempfile::tempdir().expect("tempdir");
    let task = example_task(first.path());
    let again = swe::build_repo(
        &examples().join("swe/calc"),
        &second.path().join("again.git"),
        "calc: the example's base commit",
    )
    .expect("build");
    assert_eq!(again, task.base_commit, "the same files build the same commit");
    assert_eq!(
        example_task(first.path()).repo,
        task.repo,
        "a second load reuses the built repository"
    );
    let patch_file = std::fs::read_to_string(examples().join("swe/calc-median.patch")).expect("patch file");
    assert_eq!(
        task.gold_patch.as_deref(),
        Some(patch_file.as_str()),
        "the dataset's gold patch is the shipped patch file"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gold_patch_scores_one_and_no_patch_scores_zero() {
    let repos = tempfile::tempdir().expect("tempdir");
    let task = example_task(repos.path());
    let (backend, _root) = process_backend(Limits::default());
    let fixed = backend.acquire("swe-fixed").await.expect("acquire");
    let untouched = backend.acquire("swe-untouched").await.expect("acquire");
    let (a, b) = tokio::join!(
        swe::prepare(&backend, &fixed, &task),
        swe::prepare(&backend, &untouched, &task)
    );
    a.expect("prepare");
    b.expect("prepare");
    let head = ok(backend
        .execute(&untouched, bash("git rev-parse HEAD; git status --porcelain"))
        .await);
    assert_eq!(
        head.output,
        format!("{}\n", task.base_commit),
        "a clean worktree at the base commit"
    );

    apply_gold_patch(&backend, &fixed, &task).await;
    let pass = swe::verify(&backend, &fixed, &task).await.expect("verify");
    assert_eq!((pass.reward, pass.exit_code), (1.0, Some(0)), "{}", pass.output);
    assert!(pass.output.contains("4 passed"), "{}", pass.output);
    let fail = swe::verify(&backend, &untouched, &task).await.expect("verify");
    assert_eq!((fail.reward, fail.exit_code), (0.0, Some(1)), "{}", fail.output);
    assert!(fail.output.contains("test_median_of_an_even_count"), "{}", fail.output);

    // One bare repository in the shared cache, two worktrees of it.
    let cache = backend.shared_cache().join("swe-repos");
    let bares: Vec<_> = std::fs::read_dir(&cache)
        .expect("cache")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "git"))
        .collect();
    assert_eq!(
        bares.len(),
        1,
        "{:?}",
        bares.iter().map(|e| e.path()).collect::<Vec<_>>()
    );
    let registrations = bares[0].path().join("worktrees");
    assert_eq!(std::fs::read_dir(&registrations).expect("worktrees").count(), 2);

    for slot in [&fixed, &untouched] {
        swe::cleanup(&backend, slot, &task).await.expect("cleanup");
        assert_eq!(
            std::fs::read_dir(&slot.workspace).expect("workspace").count(),
            0,
            "cleanup empties the workspace"
        );
    }
    assert_eq!(
        std::fs::read_dir(&registrations).map(|d| d.count()).unwrap_or(0),
        0,
        "cleanup unregisters the worktrees"
    );
    backend.release(&fixed, true).await.expect("release");
    backend.release(&untouched, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn editing_the_tests_does_not_pass_and_the_oracle_solution_does() {
    let repos = tempfile::tempdir().expect("tempdir");
    let task = example_task(repos.path());
    let (backend, _root) = process_backend(Limits::default());
    let slot = backend.acquire("swe-cheat").await.expect("acquire");
    swe::prepare(&backend, &slot, &task).await.expect("prepare");
    let cheat = ToolCall::new(
        "write_file",
        json!({"path": "tests/test_stats.py", "content": "def test_nothing():\n    pass\n"}),
    );
    ok(backend.execute(&slot, cheat).await);
    let score = swe::verify(&backend, &slot, &task).await.expect("verify");
    assert_eq!(
        score.reward, 0.0,
        "the test files are restored before the tests run: {}",
        score.output
    );

    // The oracle's turn applies the patch from a python cell (git through subprocess).
    let turn = &task.reference_solution.as_ref().expect("reference solution")[0];
    let code = turn
        .split("<code>")
        .nth(1)
        .and_then(|rest| rest.split("</code>").next())
        .expect("a code block");
    let applied = ok(backend.execute(&slot, ToolCall::python(code)).await);
    assert!(applied.output.contains("calc/stats.py"), "{}", pretty(&applied));
    let score = swe::verify(&backend, &slot, &task).await.expect("verify");
    assert_eq!(score.reward, 1.0, "{}", score.output);
    swe::cleanup(&backend, &slot, &task).await.expect("cleanup");
    backend.release(&slot, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_without_a_shared_cache_gets_a_clear_error() {
    let repos = tempfile::tempdir().expect("tempdir");
    let task = example_task(repos.path());
    let backend = crate::support::shared_wasm();
    let slot = backend.acquire("swe-wasm").await.expect("acquire");
    let error = swe::prepare(backend, &slot, &task).await.expect_err("wasm has no bash");
    assert!(
        error.to_string().contains("set up the workspace") && error.to_string().contains("bash"),
        "{error}"
    );
    backend.release(&slot, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relative_repository_next_to_the_dataset_is_shipped_into_the_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let commit = swe::build_repo(
        &examples().join("swe/calc"),
        &dir.path().join("calc.git"),
        "calc: the example's base commit",
    )
    .expect("build");
    let row = json!({
        "instance_id": "relative", "problem": "p", "repo": "calc.git", "base_commit": commit,
        "test_command": "python3 -m pytest -q -p no:cacheprovider tests",
    });
    std::fs::write(dir.path().join("tasks.jsonl"), format!("{row}\n")).expect("write dataset");
    let task = swe::load_tasks(&dir.path().join("tasks.jsonl"), dir.path())
        .expect("load")
        .remove(0);
    assert_eq!(
        Path::new(&task.repo),
        std::fs::canonicalize(dir.path().join("calc.git")).expect("canonical")
    );
    let (backend, _root) = process_backend(Limits::default());
    let slot = backend.acquire("swe-relative").await.expect("acquire");
    swe::prepare(&backend, &slot, &task).await.expect("prepare");
    let head = ok(backend.execute(&slot, bash("git rev-parse HEAD; ls")).await);
    assert_eq!(
        head.output,
        format!("{commit}\ncalc\ntests\n"),
        "the staged bundle is gone and the worktree is at the commit"
    );
    swe::cleanup(&backend, &slot, &task).await.expect("cleanup");
    backend.release(&slot, true).await.expect("release");
}

/// The example dataset as `rollbox rollout` reads it (its repository built into `repos`), plus
/// a copy of the task whose reference solution only answers, without patching anything.
fn example_rollout_dataset(repos: &Path) -> Dataset {
    let mut dataset = load_dataset_with(&examples().join("swe.jsonl"), repos).expect("the SWE examples");
    assert!(dataset.errors.is_empty(), "{:?}", dataset.errors);
    let mut unpatched = dataset.problems[0].clone();
    unpatched.instance_id = "no-patch".to_owned();
    unpatched.reference_solution = Some(vec!["Nothing to change. \\boxed{done}".to_owned()]);
    dataset.problems.push(unpatched);
    dataset
}

fn rollout_config(out: &Path, group_size: usize) -> RolloutConfig {
    RolloutConfig {
        agent: AgentConfig::new(AgentKind::Notebook),
        group_size,
        concurrency: 4,
        out_dir: out.to_owned(),
        resume: false,
        custom_reward: None,
        score_in_fresh_slot: false,
        seed: None,
        branch_after_turn: None,
    }
}

/// The issue's end-to-end check: the oracle applies the gold patch in a `process` slot and the
/// task's pytest run scores 1.0; the same task without the patch scores 0.0. Each of the group's
/// trajectories has its own worktree, and every worktree is gone from the cache afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oracle_rollout_scores_one_with_the_gold_patch_and_zero_without() {
    let repos = tempfile::tempdir().expect("tempdir");
    let dataset = example_rollout_dataset(repos.path());
    let (backend, root) = process_backend(Limits::default());
    let out = tempfile::tempdir().expect("tempdir");
    let run = run_rollout(
        Arc::new(backend),
        Arc::new(OraclePolicy),
        &dataset,
        &rollout_config(out.path(), 3),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("the rollout runs");
    assert_eq!(run.summary.run.written, 6, "{:?}", run.summary.run);
    let text = std::fs::read_to_string(&run.trajectories_path).expect("trajectories");
    for line in text.lines() {
        let trajectory: serde_json::Value = serde_json::from_str(line).expect("JSON");
        let id = trajectory["trajectory_id"].as_str().expect("an id");
        let reward = &trajectory["reward"];
        assert_eq!(reward["breakdown"]["kind"], "swe", "{id}: {reward:#}");
        if id.starts_with("no-patch/") {
            assert_eq!(reward["score"], 0.0, "{id}: {reward:#}");
            assert_ne!(reward["breakdown"]["exit_code"], 0, "{id}: {reward:#}");
            assert!(
                reward["breakdown"]["output_tail"]
                    .as_str()
                    .expect("output")
                    .contains("failed"),
                "{id}: {reward:#}"
            );
        } else {
            assert_eq!(reward["score"], 1.0, "{id}: {reward:#}");
            assert_eq!(reward["breakdown"]["exit_code"], 0, "{id}: {reward:#}");
        }
    }
    let cache = root.path().join("shared-cache").join("swe-repos");
    let bare = std::fs::read_dir(&cache)
        .expect("the repository cache")
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "git"))
        .expect("a bare repository");
    let left: Vec<_> = std::fs::read_dir(bare.path().join("worktrees"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "worktrees left registered after release: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_whose_base_commit_is_missing_fails_alone_with_the_reason() {
    let repos = tempfile::tempdir().expect("tempdir");
    let mut dataset = example_rollout_dataset(repos.path());
    dataset.problems.truncate(1);
    let mut broken = dataset.problems[0].clone();
    broken.instance_id = "missing-commit".to_owned();
    broken.swe.as_mut().expect("an SWE task").base_commit = "1111111111111111111111111111111111111111".to_owned();
    dataset.problems.push(broken);
    let (backend, _root) = process_backend(Limits::default());
    let out = tempfile::tempdir().expect("tempdir");
    let run = run_rollout(
        Arc::new(backend),
        Arc::new(OraclePolicy),
        &dataset,
        &rollout_config(out.path(), 1),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("the rollout runs");
    assert_eq!(
        run.summary.run.written, 1,
        "the good task is still scored: {:?}",
        run.summary.run
    );
    assert_eq!(
        run.summary.run.failed_by_kind.get("swe_prepare"),
        Some(&1),
        "{:?}",
        run.summary.run
    );
    assert_eq!(run.summary.mean_reward, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swe_tasks_on_a_backend_without_bash_are_refused_before_anything_runs() {
    let repos = tempfile::tempdir().expect("tempdir");
    let dataset = example_rollout_dataset(repos.path());
    let backend: Arc<dyn Backend> = Arc::new(crate::support::wasm_backend(Limits::default()));
    let out = tempfile::tempdir().expect("tempdir");
    let refused = run_rollout(
        backend,
        Arc::new(OraclePolicy),
        &dataset,
        &rollout_config(out.path(), 1),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await;
    let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("need bash") && message.contains("--backend process"),
        "{message}"
    );
    assert!(!out.path().join("trajectories.jsonl").exists(), "nothing ran");
}

#[test]
fn an_swe_row_missing_a_field_is_a_line_error_that_names_it() {
    let dataset = rollbox::rollout::dataset::parse_dataset(concat!(
        r#"{"instance_id": "a", "problem": "fix it", "repo": "https://example.invalid/r.git", "base_commit": "abc"}"#,
        "\n",
        r#"{"instance_id": "b", "problem": "2+2", "ground_truth": "4"}"#,
    ));
    assert_eq!(dataset.problems.len(), 1);
    assert_eq!(dataset.errors.len(), 1);
    assert_eq!(dataset.errors[0].line, 1);
    assert!(
        dataset.errors[0].message.contains("not test_command"),
        "{}",
        dataset.errors[0].message
    );
}

/// `rollbox rollout` over the example on the process backend, and on local `rollbox serve`
/// servers running it (the remote backend), as the README shows.
#[test]
fn the_rollout_command_runs_the_swe_example_on_process_and_remote_slots() {
    let backends: [&[&str]; 2] = [
        &["--backend", "process"],
        &["--backend", "remote", "--server-backend", "process"],
    ];
    for backend in backends {
        let out = tempfile::tempdir().expect("tempdir");
        let cache = tempfile::tempdir().expect("tempdir");
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
            .args(["--quiet", "rollout", "--group-size", "2", "--dataset"])
            .arg(examples().join("swe.jsonl"))
            .args(backend)
            .arg("--out")
            .arg(out.path())
            .env(rollbox::env_vars::CACHE_DIR, cache.path())
            .output()
            .expect("run rollbox");
        assert!(
            run.status.success(),
            "{backend:?}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).expect("summary"))
                .expect("JSON");
        assert_eq!(
            (&summary["mean_reward"], &summary["trajectories"]),
            (&json!(1.0), &json!(2)),
            "{backend:?}: {summary:#}"
        );
        assert!(
            cache.path().join("swe-repos").join("calc.git").is_dir(),
            "the example repository is built in the cache"
        );
    }
}

/// The example dataset for the tools agent, mixed with a math row: the example itself (its
/// reference solution's code block becomes a `python` tool call), a copy whose reference
/// solution applies the gold patch with a `bash` `<tool_call>` and prints the worktree's top
/// folder, and a math problem that has nothing to do with git.
fn mixed_tools_dataset(repos: &Path) -> Dataset {
    let mut dataset = load_dataset_with(&examples().join("swe.jsonl"), repos).expect("the SWE examples");
    let mut by_bash = dataset.problems[0].clone();
    let patch = by_bash
        .swe
        .as_ref()
        .and_then(|t| t.gold_patch.clone())
        .expect("the example has a gold patch");
    let command = format!("git apply <<'ROLLBOX_PATCH'\n{patch}ROLLBOX_PATCH\ngit rev-parse --show-toplevel");
    let call = json!({ "name": "bash", "arguments": { "command": command } });
    by_bash.instance_id = "by-bash".to_owned();
    by_bash.reference_solution = Some(vec![
        format!("I apply the fix.\n<tool_call>{call}</tool_call>"),
        "Fixed. \\boxed{done}".to_owned(),
    ]);
    dataset.problems.push(by_bash);
    let math = rollbox::rollout::dataset::parse_dataset(
        r#"{"instance_id": "add", "problem": "What is 2+2?", "ground_truth": "4", "reference_solution": ["\\boxed{4}"]}"#,
    );
    dataset.problems.extend(math.problems);
    dataset
}

/// The oracle drives the tools agent too, on a process backend without bubblewrap
/// (`unsafe_no_isolation`), with a math row in the same dataset: every trajectory scores 1.0,
/// and the two samples of a task get two different worktrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_agent_oracle_patches_with_python_or_bash_in_a_mixed_dataset_without_isolation() {
    let repos = tempfile::tempdir().expect("tempdir");
    let dataset = mixed_tools_dataset(repos.path());
    let config = rollbox::process::ProcessBackendConfig {
        bubblewrap: Some(PathBuf::from("/nonexistent/bwrap")),
        unsafe_no_isolation: true,
        ..Default::default()
    };
    let (backend, _root) = crate::process::process_backend_with(config);
    let out = tempfile::tempdir().expect("tempdir");
    let rollout = RolloutConfig {
        agent: AgentConfig::new(AgentKind::Tools),
        ..rollout_config(out.path(), 2)
    };
    let run = run_rollout(
        Arc::new(backend),
        Arc::new(OraclePolicy),
        &dataset,
        &rollout,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("the rollout runs");
    assert_eq!(
        (run.summary.run.written, run.summary.mean_reward),
        (6, 1.0),
        "{:?}",
        run.summary.run
    );
    assert!(
        run.summary.oracle_policy && run.summary.note.contains("oracle policy was used"),
        "{}",
        run.summary.note
    );
    let text = std::fs::read_to_string(&run.trajectories_path).expect("trajectories");
    let mut toplevels = Vec::new();
    for line in text.lines() {
        let trajectory: serde_json::Value = serde_json::from_str(line).expect("JSON");
        let id = trajectory["trajectory_id"].as_str().expect("an id").to_owned();
        let kind = &trajectory["reward"]["breakdown"]["kind"];
        assert_eq!(
            kind,
            if id.starts_with("add/") { "math" } else { "swe" },
            "{id}: {trajectory:#}"
        );
        if id.starts_with("by-bash/") {
            let tool = trajectory["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .find(|m| m["role"] == "tool")
                .expect("the bash result");
            toplevels.push(tool["content"].as_str().expect("text").trim().to_owned());
        }
    }
    assert_eq!(toplevels.len(), 2);
    assert_ne!(toplevels[0], toplevels[1], "each sample works in its own worktree");
}
