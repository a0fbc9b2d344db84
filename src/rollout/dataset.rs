//! Problems from a JSONL file in the verl notebook-recipe field names: `instance_id`, `problem`,
//! `ground_truth`, `test_cases`, `reference_solution`, plus rollbox's own `setup_code`.
//!
//! A line that cannot be read becomes a [`LineError`] with its line number; it never aborts the
//! whole file and is never dropped silently.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::rollout::swe::{SweTask, resolve_repo};

/// The fields that make a dataset row an SWE task.
const SWE_FIELDS: [&str; 3] = ["repo", "base_commit", "test_command"];

/// One problem of a dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    /// A unique id within the dataset; trajectory ids are built from it.
    pub instance_id: String,
    /// The task, as the first user message.
    pub problem: String,
    /// The expected final answer of a math problem (a number, a fraction, a LaTeX expression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ground_truth: Option<String>,
    /// Python snippets that each run as a cell after the trajectory and fail by raising.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_cases: Vec<String>,
    /// The assistant turns the offline oracle policy plays, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_solution: Option<Vec<String>>,
    /// Python that prepares the problem's slot before the first turn (writes or loads a data
    /// file, defines helpers), run as one `python` cell whose output the model never sees. In a
    /// group on a backend that can fork, it runs once per problem and every sample's slot is
    /// forked from that one; otherwise once in each sample's slot. A setup that raises fails
    /// the problem's trajectories (`setup_failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup_code: Option<String>,
    /// For an SWE row (one with `repo`, `base_commit` and `test_command`): the task, read from
    /// the same line. Its slot starts as a git worktree at the base commit and its reward is the
    /// test command (see [`crate::swe`]).
    #[serde(skip)]
    pub swe: Option<SweTask>,
}

/// A dataset line that could not be read, with why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineError {
    /// The 1-based line number in the file.
    pub line: usize,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// The readable problems of a file, plus every line that was not.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    /// The problems, in file order.
    pub problems: Vec<Problem>,
    /// The lines that were skipped, in file order.
    pub errors: Vec<LineError>,
}

impl Dataset {
    /// The problems whose reference solutions call tools in Hermes-style `<tool_call>` blocks:
    /// the `tools` agent's problems. The notebook agent ignores such blocks, so under it the
    /// oracle never calls those tools and the problems score 0.
    pub fn problems_calling_tools(&self) -> Vec<&str> {
        self.problems
            .iter()
            .filter(|p| {
                p.reference_solution
                    .iter()
                    .flatten()
                    .any(|turn| turn.contains(crate::rollout::policy::TOOL_CALL_OPEN))
            })
            .map(|p| p.instance_id.as_str())
            .collect()
    }
}

/// The dataset file could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("failed to read the dataset {path}")]
pub struct DatasetError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Reads a JSONL dataset file with [`load_dataset_with`], building SWE example repositories in
/// `swe-repos/` of rollbox's cache folder (`ROLLBOX_CACHE_DIR`).
pub fn load_dataset(path: &Path) -> Result<Dataset, DatasetError> {
    load_dataset_with(
        path,
        &crate::wasm::runtime::RuntimeOptions::from_env()
            .cache_dir
            .join(SWE_REPOS_SUBDIR),
    )
}

/// Where [`load_dataset`] builds SWE repositories, under rollbox's cache folder.
pub const SWE_REPOS_SUBDIR: &str = "swe-repos";

/// Reads a JSONL dataset file; see [`parse_dataset`]. An SWE row's repository is resolved
/// against the file's folder: a `repo_source` folder is built into a bare repository under
/// `swe_repos_dir` (see [`crate::rollout::swe::build_repo`]), a relative `repo` path made absolute. A row
/// whose repository cannot be made becomes a [`LineError`].
pub fn load_dataset_with(path: &Path, swe_repos_dir: &Path) -> Result<Dataset, DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|source| DatasetError {
        path: path.to_owned(),
        source,
    })?;
    let (numbered, mut errors) = parse_numbered(&text);
    let base = path.parent().unwrap_or(Path::new("."));
    let mut problems = Vec::new();
    for (line, mut problem) in numbered {
        match problem.swe.as_mut().map(|task| resolve_repo(task, base, swe_repos_dir)) {
            Some(Err(error)) => errors.push(LineError {
                line,
                message: crate::error_text::error_chain(&error),
            }),
            _ => problems.push(problem),
        }
    }
    errors.sort_by_key(|e| e.line);
    Ok(Dataset { problems, errors })
}

/// Parses JSONL text: one problem per non-blank line. `ground_truth` may be a JSON string or
/// number. A problem needs a `ground_truth` (math) or `test_cases` (code) to be scored; one with
/// neither, a duplicate `instance_id`, or bad JSON becomes a [`LineError`].
pub fn parse_dataset(text: &str) -> Dataset {
    let (numbered, errors) = parse_numbered(text);
    Dataset {
        problems: numbered.into_iter().map(|(_, problem)| problem).collect(),
        errors,
    }
}

/// The problems with their line numbers, and the unreadable lines.
fn parse_numbered(text: &str) -> (Vec<(usize, Problem)>, Vec<LineError>) {
    let mut problems = Vec::new();
    let mut errors = Vec::new();
    let mut seen = HashSet::new();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(problem) if !seen.insert(problem.instance_id.clone()) => errors.push(LineError {
                line: number,
                message: format!("duplicate instance_id `{}`", problem.instance_id),
            }),
            Ok(problem) => problems.push((number, problem)),
            Err(message) => errors.push(LineError { line: number, message }),
        }
    }
    (problems, errors)
}

fn parse_line(line: &str) -> Result<Problem, String> {
    let mut value: Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    let object = value.as_object_mut().ok_or("not a JSON object")?;
    // SWE-bench's published shape (problem_statement, patch, FAIL_TO_PASS as JSON text, ...).
    crate::rollout::swe::normalize_swe_bench_row(object)?;
    // A numeric ground truth (`80`, `97.2`) is as good as its string form.
    if let Some(number @ Value::Number(_)) = object.get("ground_truth") {
        let text = number.to_string();
        object.insert("ground_truth".to_owned(), Value::String(text));
    }
    let swe_fields: Vec<&str> = SWE_FIELDS.into_iter().filter(|f| object.contains_key(*f)).collect();
    let swe = match swe_fields.len() {
        0 => None,
        n if n == SWE_FIELDS.len() => {
            Some(serde_json::from_value::<SweTask>(value.clone()).map_err(|e| format!("not an SWE task: {e}"))?)
        }
        _ => {
            let missing: Vec<&str> = SWE_FIELDS.into_iter().filter(|f| !swe_fields.contains(f)).collect();
            return Err(format!(
                "has {} but not {}: an SWE task needs all of {}",
                swe_fields.join(", "),
                missing.join(", "),
                SWE_FIELDS.join(", ")
            ));
        }
    };
    let mut problem: Problem = serde_json::from_value(value).map_err(|e| format!("not a problem: {e}"))?;
    if problem.instance_id.trim().is_empty() {
        return Err("`instance_id` is empty".to_owned());
    }
    if problem.ground_truth.is_none() && problem.test_cases.is_empty() && swe.is_none() {
        return Err(
            "has no `ground_truth`, `test_cases` or SWE task (repo, base_commit, test_command), so it cannot be scored"
                .to_owned(),
        );
    }
    problem.swe = swe;
    Ok(problem)
}
