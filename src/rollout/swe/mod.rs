//! SWE tasks: a repository at a base commit in each slot, the agent's edits, then the task's
//! tests as the reward, as in hermes-agent's SWE-smith environment.
//!
//! The hooks run as `bash` calls through any [`crate::Backend`] that has `bash` and gives its
//! slots a shared cache folder (`ROLLBOX_SHARED_CACHE`): the `process` backend, and `remote`
//! over it. The flow for one trajectory:
//!
//! 0. [`ensure_environments`], on the machine that runs the slots (it needs the network): each
//!    distinct environment of the tasks (their `environment_setup`) is built once into the
//!    shared cache, under a lock.
//! 1. [`prepare`]: the repository's bare clone is made once per cache, under a lock, and reused by
//!    every slot; the slot's workspace becomes a `git worktree` of it at the task's base commit,
//!    and the task's ready environment is linked first on the slot's `PATH`.
//! 2. The agent works in the workspace.
//! 3. [`verify`]: the task's test files are restored from the base commit, its test patch (if
//!    any) is applied, and the test command runs. The reward is per test id for a
//!    SWE-bench-format task (every FAIL_TO_PASS passes, no PASS_TO_PASS breaks), else 1.0 when
//!    the command exits 0; the output is kept.
//! 4. [`cleanup`], just before `release`: the worktree is removed from the cache.
//!
//! Rows in SWE-bench's published shape are read by [`normalize_swe_bench_row`].

mod environment;
mod hooks;
mod repo;
mod swe_bench;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use environment::{
    EnvironmentReporter, EnvironmentSpec, SilentEnvironmentReporter, ensure_environment, ensure_environments,
    environment_dir,
};
pub use hooks::{cleanup, prepare, verify};
pub use repo::build_repo;
pub use swe_bench::{TestExpectation, TestOutcome, TestStatus, normalize_swe_bench_row, parse_pytest_report};

/// One SWE task, as a line of a JSONL dataset (`examples/swe.jsonl`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweTask {
    /// A unique id within the dataset.
    pub instance_id: String,
    /// The issue the agent is asked to fix, as its first user message.
    pub problem: String,
    /// What `git clone` takes: a URL the slot can reach (a bubblewrapped slot has no network),
    /// or the path of a repository on the machine that calls [`prepare`], which ships it into the
    /// slot as a git bundle.
    pub repo: String,
    /// The commit the workspace starts at.
    pub base_commit: String,
    /// The command whose exit status is the reward, run in the workspace (`python3 -m pytest ...`).
    pub test_command: String,
    /// Files the tests live in, restored from the base commit before the test command runs, so
    /// an agent cannot pass by editing them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_files: Vec<String>,
    /// The patch that fixes the issue (`git apply` format).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gold_patch: Option<String>,
    /// The assistant turns the offline oracle policy plays, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_solution: Option<Vec<String>>,
    /// A folder of plain files, relative to the dataset file, that [`load_tasks`] builds the
    /// repository from with [`build_repo`] (the example's way to ship a repository as source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo_source: Option<String>,
    /// The tests' patch (SWE-bench's `test_patch`), applied by [`verify`] over the agent's
    /// changes after the agent finished, so the agent never sees the tests it is scored by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_patch: Option<String>,
    /// Test ids that fail at the base commit and must pass after the fix (SWE-bench's
    /// `FAIL_TO_PASS`). When this or [`SweTask::pass_to_pass`] is set, the reward is per test id,
    /// not the test command's exit status.
    #[serde(rename = "FAIL_TO_PASS", default, skip_serializing_if = "Vec::is_empty")]
    pub fail_to_pass: Vec<String>,
    /// Test ids that pass at the base commit and must still pass (SWE-bench's `PASS_TO_PASS`).
    #[serde(rename = "PASS_TO_PASS", default, skip_serializing_if = "Vec::is_empty")]
    pub pass_to_pass: Vec<String>,
    /// The commit the environment is set up from (SWE-bench's `environment_setup_commit`);
    /// `base_commit` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment_setup_commit: Option<String>,
    /// The repository version the row belongs to (SWE-bench's `version`); informational.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Shell commands that build the task's environment once per (repo, setup commit, commands),
    /// on the machine that runs the slots, with network (see [`ensure_environment`]). Empty: the
    /// slot's own tools only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub environment_setup: Vec<String>,
    /// The container image the task's sandbox starts from on Modal (SWE-bench's per-instance
    /// images); ignored by local backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_name: Option<String>,
}

impl SweTask {
    /// Whether the reward is per test id (FAIL_TO_PASS / PASS_TO_PASS), not the exit status.
    pub fn scored_per_test(&self) -> bool {
        !self.fail_to_pass.is_empty() || !self.pass_to_pass.is_empty()
    }

    /// The task's environment, when it names setup commands.
    pub fn environment(&self) -> Option<EnvironmentSpec> {
        (!self.environment_setup.is_empty()).then(|| EnvironmentSpec {
            repo: self.repo.clone(),
            setup_commit: self
                .environment_setup_commit
                .clone()
                .unwrap_or_else(|| self.base_commit.clone()),
            commands: self.environment_setup.clone(),
        })
    }
}

/// The outcome of [`verify`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweScore {
    /// 1.0 when the test command exited 0, else 0.0.
    pub reward: f64,
    /// The test command's exit code; `None` when it was killed (a timeout).
    pub exit_code: Option<i32>,
    /// What the test command printed (capped by the backend's output limit); for a per-test
    /// task, its summary lines and the end of its log.
    pub output: String,
    /// Each FAIL_TO_PASS and PASS_TO_PASS id's outcome, for a per-test task.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<TestOutcome>,
}

/// An SWE hook or the dataset failed.
#[derive(Debug, thiserror::Error)]
pub enum SweError {
    /// A file or folder on this machine could not be used.
    #[error("failed to {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Host-side git failed.
    #[error("failed to run `git {args}`: {output}")]
    Git {
        /// Its arguments.
        args: String,
        /// What it printed.
        output: String,
    },
    /// A dataset line is not a task.
    #[error("failed to read task {line} of {path}: {message}")]
    Dataset {
        /// The dataset.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A repository built from source does not have the commit the dataset names.
    #[error(
        "the repository built from {source_dir} has commit {built}, but the task says base_commit {expected}; \
         the source folder changed since the dataset was written: update base_commit or restore the files"
    )]
    CommitMismatch {
        /// The source folder.
        source_dir: PathBuf,
        /// The commit built.
        built: String,
        /// The commit the task names.
        expected: String,
    },
    /// A local repository is too large to ship through the bash tool.
    #[error(
        "the repository {path} bundles to {bytes} bytes, over the {limit}-byte limit for shipping it into a slot; serve it by URL instead"
    )]
    TooLarge {
        /// The repository.
        path: PathBuf,
        /// Its bundle's size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// A setup command of a task's environment failed.
    #[error("failed to build the environment {key}: `{command}` ended with {status}: {output}")]
    EnvironmentSetup {
        /// The environment's key.
        key: String,
        /// The command.
        command: String,
        /// How it ended.
        status: String,
        /// The end of what it printed.
        output: String,
    },
    /// A hook's command failed in the slot.
    #[error("failed to {step} for task {instance_id}: {message}")]
    Hook {
        /// Which hook step.
        step: &'static str,
        /// The task.
        instance_id: String,
        /// What the slot said.
        message: String,
    },
}

impl SweError {
    fn io(op: &'static str, path: &Path, source: std::io::Error) -> SweError {
        SweError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Reads a JSONL file of [`SweTask`]s (blank lines skipped), each resolved with
/// [`resolve_repo`] against the dataset's folder.
pub fn load_tasks(dataset: &Path, repos_dir: &Path) -> Result<Vec<SweTask>, SweError> {
    let text = std::fs::read_to_string(dataset).map_err(|e| SweError::io("read", dataset, e))?;
    let base = dataset.parent().unwrap_or(Path::new("."));
    let mut tasks = Vec::new();
    for (index, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let bad = |message: String| SweError::Dataset {
            path: dataset.to_path_buf(),
            line: index + 1,
            message,
        };
        let mut row: serde_json::Value = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        let object = row.as_object_mut().ok_or_else(|| bad("not a JSON object".to_owned()))?;
        normalize_swe_bench_row(object).map_err(bad)?;
        let mut task: SweTask = serde_json::from_value(row).map_err(|e| bad(e.to_string()))?;
        resolve_repo(&mut task, base, repos_dir)?;
        tasks.push(task);
    }
    Ok(tasks)
}

/// Makes `task.repo` usable from this machine: a task with a `repo_source` (a folder relative
/// to `dataset_dir`) gets its repository built under `repos_dir` (see [`build_repo`]) and its
/// `repo` set to that path, and the commit built must be the task's `base_commit`; a `repo`
/// that is a relative path to an existing folder under `dataset_dir` becomes absolute, so
/// [`prepare`] ships it.
pub fn resolve_repo(task: &mut SweTask, dataset_dir: &Path, repos_dir: &Path) -> Result<(), SweError> {
    if let Some(source) = &task.repo_source {
        let source_dir = dataset_dir.join(source);
        let name = source_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| task.instance_id.clone());
        let dest = repos_dir.join(format!("{name}.git"));
        let built = build_repo(&source_dir, &dest, &format!("{name}: the example's base commit"))?;
        if built != task.base_commit {
            return Err(SweError::CommitMismatch {
                source_dir,
                built,
                expected: task.base_commit.clone(),
            });
        }
        task.repo = dest.to_string_lossy().into_owned();
    } else if let Some(local) = existing_relative(dataset_dir, &task.repo) {
        task.repo = local.to_string_lossy().into_owned();
    }
    Ok(())
}

/// `repo` as an absolute path, when it is a relative path to a folder that exists under `base`.
fn existing_relative(base: &Path, repo: &str) -> Option<PathBuf> {
    let path = Path::new(repo);
    if path.is_absolute() || repo.contains("://") {
        return None;
    }
    std::fs::canonicalize(base.join(path)).ok().filter(|p| p.is_dir())
}
