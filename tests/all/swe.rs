//! SWE hooks over the real `process` backend, real git and real pytest, with the example task
//! the project ships (examples/swe.jsonl, built from examples/swe/calc).

use std::path::{Path, PathBuf};

use rollbox::swe::{self, SweTask};
use rollbox::{Backend, Limits, Slot, ToolCall};
use serde_json::json;

use crate::process::process_backend;
use crate::support::{ok, pretty};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// The example task, its repository built into `repos`.
fn example_task(repos: &Path) -> SweTask {
    let mut tasks = swe::load_tasks(&examples().join("swe.jsonl"), repos).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(tasks.len(), 1);
    tasks.remove(0)
}

fn bash(command: &str) -> ToolCall {
    ToolCall::new("bash", json!({ "command": command }))
}

/// Applies the task's gold patch with `git apply`, through the bash tool.
async fn apply_gold_patch(backend: &dyn Backend, slot: &Slot, task: &SweTask) {
    let patch = task.gold_patch.as_deref().expect("the example has a gold patch");
    ok(backend.execute(slot, bash(&format!("git apply <<'ROLLBOX_PATCH'\n{patch}ROLLBOX_PATCH"))).await);
}

#[test]
fn the_example_repository_builds_to_the_dataset_commit() {
    let first = tempfile::tempdir().expect("tempdir");
    let second = tempfile::tempdir().expect("tempdir");
    let task = example_task(first.path());
    let again = swe::build_repo(&examples().join("swe/calc"), &second.path().join("again.git"), "calc: the example's base commit").expect("build");
    assert_eq!(again, task.base_commit, "the same files build the same commit");
    assert_eq!(example_task(first.path()).repo, task.repo, "a second load reuses the built repository");
    let patch_file = std::fs::read_to_string(examples().join("swe/calc-median.patch")).expect("patch file");
    assert_eq!(task.gold_patch.as_deref(), Some(patch_file.as_str()), "the dataset's gold patch is the shipped patch file");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gold_patch_scores_one_and_no_patch_scores_zero() {
    let repos = tempfile::tempdir().expect("tempdir");
    let task = example_task(repos.path());
    let (backend, _root) = process_backend(Limits::default());
    let fixed = backend.acquire("swe-fixed").await.expect("acquire");
    let untouched = backend.acquire("swe-untouched").await.expect("acquire");
    let (a, b) = tokio::join!(swe::prepare(&backend, &fixed, &task), swe::prepare(&backend, &untouched, &task));
    a.expect("prepare");
    b.expect("prepare");
    let head = ok(backend.execute(&untouched, bash("git rev-parse HEAD; git status --porcelain")).await);
    assert_eq!(head.output, format!("{}\n", task.base_commit), "a clean worktree at the base commit");

    apply_gold_patch(&backend, &fixed, &task).await;
    let pass = swe::verify(&backend, &fixed, &task).await.expect("verify");
    assert_eq!((pass.reward, pass.exit_code), (1.0, Some(0)), "{}", pass.output);
    assert!(pass.output.contains("4 passed"), "{}", pass.output);
    let fail = swe::verify(&backend, &untouched, &task).await.expect("verify");
    assert_eq!((fail.reward, fail.exit_code), (0.0, Some(1)), "{}", fail.output);
    assert!(fail.output.contains("test_median_of_an_even_count"), "{}", fail.output);

    // One bare repository in the shared cache, two worktrees of it.
    let cache = backend.shared_cache().join("swe-repos");
    let bares: Vec<_> = std::fs::read_dir(&cache).expect("cache").flatten().filter(|e| e.path().extension().is_some_and(|x| x == "git")).collect();
    assert_eq!(bares.len(), 1, "{:?}", bares.iter().map(|e| e.path()).collect::<Vec<_>>());
    let registrations = bares[0].path().join("worktrees");
    assert_eq!(std::fs::read_dir(&registrations).expect("worktrees").count(), 2);

    for slot in [&fixed, &untouched] {
        swe::cleanup(&backend, slot, &task).await.expect("cleanup");
        assert_eq!(std::fs::read_dir(&slot.workspace).expect("workspace").count(), 0, "cleanup empties the workspace");
    }
    assert_eq!(std::fs::read_dir(&registrations).map(|d| d.count()).unwrap_or(0), 0, "cleanup unregisters the worktrees");
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
    let cheat = ToolCall::new("write_file", json!({"path": "tests/test_stats.py", "content": "def test_nothing():\n    pass\n"}));
    ok(backend.execute(&slot, cheat).await);
    let score = swe::verify(&backend, &slot, &task).await.expect("verify");
    assert_eq!(score.reward, 0.0, "the test files are restored before the tests run: {}", score.output);

    // The oracle's turn applies the patch from a python cell (git through subprocess).
    let turn = &task.reference_solution.as_ref().expect("reference solution")[0];
    let code = turn.split("<code>").nth(1).and_then(|rest| rest.split("</code>").next()).expect("a code block");
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
    assert!(error.to_string().contains("set up the workspace") && error.to_string().contains("bash"), "{error}");
    backend.release(&slot, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_relative_repository_next_to_the_dataset_is_shipped_into_the_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let commit = swe::build_repo(&examples().join("swe/calc"), &dir.path().join("calc.git"), "calc: the example's base commit").expect("build");
    let row = json!({
        "instance_id": "relative", "problem": "p", "repo": "calc.git", "base_commit": commit,
        "test_command": "python3 -m pytest -q -p no:cacheprovider tests",
    });
    std::fs::write(dir.path().join("tasks.jsonl"), format!("{row}\n")).expect("write dataset");
    let task = swe::load_tasks(&dir.path().join("tasks.jsonl"), dir.path()).expect("load").remove(0);
    assert_eq!(Path::new(&task.repo), std::fs::canonicalize(dir.path().join("calc.git")).expect("canonical"));
    let (backend, _root) = process_backend(Limits::default());
    let slot = backend.acquire("swe-relative").await.expect("acquire");
    swe::prepare(&backend, &slot, &task).await.expect("prepare");
    let head = ok(backend.execute(&slot, bash("git rev-parse HEAD; ls")).await);
    assert_eq!(head.output, format!("{commit}\ncalc\ntests\n"), "the staged bundle is gone and the worktree is at the commit");
    swe::cleanup(&backend, &slot, &task).await.expect("cleanup");
    backend.release(&slot, true).await.expect("release");
}
