//! SWE-bench-format rows, as SWE-bench, SWE-Gym and SWE-smith publish them, and scoring by
//! test id: every FAIL_TO_PASS id must now pass and every PASS_TO_PASS id must still pass.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The test command of a per-test row that names none: pytest with its `-rA` summary (one
/// `PASSED id` / `FAILED id - reason` line per test, what [`parse_pytest_report`] reads), run
/// by the environment's `python3` (first on `PATH` when the task has an environment).
const DEFAULT_TEST_COMMAND: &str = "python3 -m pytest -rA -p no:cacheprovider";

/// Rewrites a published SWE-bench row in place into the fields [`super::SweTask`] reads:
/// `problem_statement` becomes `problem`, `patch` becomes `gold_patch`, `FAIL_TO_PASS` and
/// `PASS_TO_PASS` given as JSON-encoded strings (as in the published files) become lists, and a
/// row with test ids but no `test_command` gets pytest over the test patch's files. A row with
/// test ids and a gold patch but no `reference_solution` gets one that applies the gold patch,
/// so the offline oracle can check the task. Rows of rollbox's own shape pass unchanged.
pub fn normalize_swe_bench_row(row: &mut Map<String, Value>) -> Result<(), String> {
    rename_if_absent(row, "problem_statement", "problem");
    rename_if_absent(row, "patch", "gold_patch");
    for field in ["FAIL_TO_PASS", "PASS_TO_PASS"] {
        if let Some(value) = row.get_mut(field) {
            *value = Value::Array(test_ids(field, value)?.into_iter().map(Value::String).collect());
        }
    }
    let per_test = ["FAIL_TO_PASS", "PASS_TO_PASS"]
        .iter()
        .any(|f| row.get(*f).and_then(Value::as_array).is_some_and(|a| !a.is_empty()));
    if !per_test {
        return Ok(());
    }
    let test_patch = row.get("test_patch").and_then(Value::as_str).map(str::to_owned);
    if !row.contains_key("test_command") {
        let files = test_patch.as_deref().map(patched_files).unwrap_or_default();
        let quoted: Vec<String> = files
            .iter()
            .map(|f| format!("'{}'", f.replace('\'', r"'\''")))
            .collect();
        let command = [DEFAULT_TEST_COMMAND.to_owned()]
            .into_iter()
            .chain(quoted)
            .collect::<Vec<_>>();
        row.insert("test_command".to_owned(), Value::String(command.join(" ")));
    }
    if !row.contains_key("reference_solution")
        && let Some(patch) = row.get("gold_patch").and_then(Value::as_str)
    {
        let turns = vec![
            Value::String(apply_patch_turn(patch)),
            Value::String(DONE_TURN.to_owned()),
        ];
        row.insert("reference_solution".to_owned(), Value::Array(turns));
    }
    Ok(())
}

fn rename_if_absent(row: &mut Map<String, Value>, from: &str, to: &str) {
    if !row.contains_key(to)
        && let Some(value) = row.get(from).cloned()
    {
        row.insert(to.to_owned(), value);
    }
}

/// A list of test ids, given as a JSON list or a JSON-encoded string of one.
fn test_ids(field: &str, value: &Value) -> Result<Vec<String>, String> {
    let decoded: Value = match value {
        Value::String(text) => serde_json::from_str(text)
            .map_err(|e| format!("`{field}` is a string that is not a JSON-encoded list of test ids: {e}"))?,
        other => other.clone(),
    };
    serde_json::from_value(decoded).map_err(|e| format!("`{field}` is not a list of test ids (strings): {e}"))
}

/// The files a unified diff changes (its `+++ b/PATH` lines; `/dev/null` for deleted files is
/// skipped), in order, without repeats.
pub(crate) fn patched_files(patch: &str) -> Vec<String> {
    let mut files: Vec<String> = Vec::new();
    for line in patch.lines() {
        if let Some(path) = line.strip_prefix("+++ b/") {
            let path = path.trim_end().to_owned();
            if !files.contains(&path) {
                files.push(path);
            }
        }
    }
    files
}

/// The oracle's last turn for a generated reference solution.
const DONE_TURN: &str = "The fix is applied. \\boxed{done}";

/// A notebook turn that applies `patch` with `git apply` from a Python cell (through
/// `subprocess`, so it works on the process backend's native Python and, as a `python` tool
/// call, for the tools agent).
fn apply_patch_turn(patch: &str) -> String {
    // A JSON string literal is a valid Python string literal for any text.
    let literal = Value::String(patch.to_owned()).to_string();
    format!(
        "I apply the fix with git.\n<code>\nimport subprocess\npatch = {literal}\n\
         done = subprocess.run(['git', 'apply'], input=patch, text=True, capture_output=True)\n\
         print(done.returncode, done.stderr)\n</code>"
    )
}

/// Whether an id was expected to go from failing to passing, or to keep passing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestExpectation {
    /// A FAIL_TO_PASS id.
    FailToPass,
    /// A PASS_TO_PASS id.
    PassToPass,
}

/// What pytest reported for one test id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestStatus {
    /// `PASSED`.
    Passed,
    /// `XFAIL`: an expected failure, counted as passing (as SWE-bench's harness does).
    Xfail,
    /// `FAILED`.
    Failed,
    /// `ERROR` (in set-up or collection).
    Error,
    /// `XPASS`: an expected failure that passed, counted as failing.
    Xpass,
    /// `SKIPPED`.
    Skipped,
    /// Not in the report at all (not collected, or the run died first): counted as failing.
    Missing,
}

impl TestStatus {
    /// Whether the id counts as passing.
    pub fn passes(self) -> bool {
        matches!(self, TestStatus::Passed | TestStatus::Xfail)
    }
}

/// One test id's outcome in a per-test score.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestOutcome {
    /// The test id, as the dataset names it.
    pub id: String,
    /// Which list it came from.
    pub expected: TestExpectation,
    /// What the run reported.
    pub status: TestStatus,
}

/// The status of each test id in pytest's `-rA` short summary (`PASSED id`, `FAILED id - why`,
/// ...), in order. Lines that are not a summary line are skipped.
pub fn parse_pytest_report(output: &str) -> Vec<(String, TestStatus)> {
    const PREFIXES: [(&str, TestStatus); 6] = [
        ("PASSED ", TestStatus::Passed),
        ("FAILED ", TestStatus::Failed),
        ("ERROR ", TestStatus::Error),
        ("XFAIL ", TestStatus::Xfail),
        ("XPASS ", TestStatus::Xpass),
        ("SKIPPED ", TestStatus::Skipped),
    ];
    let mut report = Vec::new();
    for line in output.lines() {
        let Some((rest, status)) = PREFIXES
            .iter()
            .find_map(|(prefix, status)| line.strip_prefix(prefix).map(|rest| (rest, *status)))
        else {
            continue;
        };
        // `SKIPPED [1] file.py:3: reason` names no test id.
        if rest.starts_with('[') {
            continue;
        }
        report.push((summary_id(rest).to_owned(), status));
    }
    report
}

/// The test id at the start of a summary line's `rest`: up to ` - ` (the reason), except that
/// a parametrized id's brackets may hold ` - ` themselves.
fn summary_id(rest: &str) -> &str {
    let reason = rest.find(" - ");
    let id_end = match (rest.find('['), reason) {
        (Some(open), Some(dash)) if open < dash => rest[open..]
            .find("] - ")
            .map(|close| open + close + 1)
            .unwrap_or(rest.len()),
        (_, Some(dash)) => dash,
        (_, None) => rest.len(),
    };
    rest[..id_end].trim_end()
}

/// Each expected id's outcome in `report`; the last report line of an id wins (a test that
/// failed in its call and errored in teardown is reported twice).
pub(crate) fn score_tests(
    fail_to_pass: &[String],
    pass_to_pass: &[String],
    report: &[(String, TestStatus)],
) -> Vec<TestOutcome> {
    let status_of = |id: &str| {
        report
            .iter()
            .rev()
            .find(|(reported, _)| reported == id)
            .map(|(_, status)| *status)
            .unwrap_or(TestStatus::Missing)
    };
    let expected = fail_to_pass
        .iter()
        .map(|id| (id, TestExpectation::FailToPass))
        .chain(pass_to_pass.iter().map(|id| (id, TestExpectation::PassToPass)));
    expected
        .map(|(id, expected)| TestOutcome {
            id: id.clone(),
            expected,
            status: status_of(id),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row(value: Value) -> Map<String, Value> {
        let Value::Object(object) = value else {
            panic!("an object")
        };
        object
    }

    #[test]
    fn a_published_row_with_json_encoded_lists_becomes_a_task() {
        let mut published = row(json!({
            "instance_id": "o__r-1", "repo": "o/r", "base_commit": "abc",
            "problem_statement": "It breaks.", "patch": "diff --git a/m.py b/m.py\n",
            "test_patch": "diff --git a/tests/t.py b/tests/t.py\n--- a/tests/t.py\n+++ b/tests/t.py\n",
            "FAIL_TO_PASS": "[\"tests/t.py::test_new\"]", "PASS_TO_PASS": "[]",
            "version": "1.0", "environment_setup_commit": "def",
        }));
        normalize_swe_bench_row(&mut published).expect("normalize");
        assert_eq!(published["problem"], "It breaks.");
        assert_eq!(published["FAIL_TO_PASS"], json!(["tests/t.py::test_new"]));
        assert_eq!(published["PASS_TO_PASS"], json!([]));
        assert_eq!(
            published["test_command"],
            "python3 -m pytest -rA -p no:cacheprovider 'tests/t.py'"
        );
        let task: super::super::SweTask = serde_json::from_value(Value::Object(published)).expect("a task");
        assert!(task.scored_per_test());
        assert_eq!(task.gold_patch.as_deref(), Some("diff --git a/m.py b/m.py\n"));
        assert_eq!(task.environment_setup_commit.as_deref(), Some("def"));
        assert!(task.reference_solution.expect("generated")[0].contains("git', 'apply'"));
    }

    #[test]
    fn a_list_that_is_not_one_says_which_field() {
        let mut bad = row(json!({"FAIL_TO_PASS": "tests/t.py::a"}));
        let error = normalize_swe_bench_row(&mut bad).expect_err("not a list");
        assert!(error.contains("`FAIL_TO_PASS`"), "{error}");
    }

    #[test]
    fn pytest_summary_lines_give_each_id_its_status() {
        let output = "tests/t.py ..F\n=== short test summary info ===\n\
            PASSED tests/t.py::test_a\nPASSED tests/t.py::test_p[a - b]\n\
            FAILED tests/t.py::test_b - AssertionError: 1 != 2\nFAILED tests/t.py::test_q[x - y] - E\nSKIPPED [1] tests/t.py:9: no\n\
            ERROR tests/t.py::test_c - fixture\nXFAIL tests/t.py::test_d - flaky\n";
        let report = parse_pytest_report(output);
        assert_eq!(
            report,
            vec![
                ("tests/t.py::test_a".to_owned(), TestStatus::Passed),
                ("tests/t.py::test_p[a - b]".to_owned(), TestStatus::Passed),
                ("tests/t.py::test_b".to_owned(), TestStatus::Failed),
                ("tests/t.py::test_q[x - y]".to_owned(), TestStatus::Failed),
                ("tests/t.py::test_c".to_owned(), TestStatus::Error),
                ("tests/t.py::test_d".to_owned(), TestStatus::Xfail),
            ]
        );
        let f2p = vec!["tests/t.py::test_a".to_owned(), "tests/t.py::test_gone".to_owned()];
        let p2p = vec!["tests/t.py::test_b".to_owned(), "tests/t.py::test_d".to_owned()];
        let outcomes = score_tests(&f2p, &p2p, &report);
        let statuses: Vec<TestStatus> = outcomes.iter().map(|o| o.status).collect();
        assert_eq!(
            statuses,
            [
                TestStatus::Passed,
                TestStatus::Missing,
                TestStatus::Failed,
                TestStatus::Xfail
            ]
        );
        assert_eq!(outcomes[2].expected, TestExpectation::PassToPass);
    }
}
