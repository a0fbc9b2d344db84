//! Rewards, computed in the trajectory's own slot where code must run.
//!
//! - math: the final answer against `ground_truth`; plain numbers are compared exactly on the
//!   host, anything else (radicals, symbols) with sympy inside the sandbox;
//! - code: each of `test_cases` runs as a cell; the reward is the fraction that pass;
//! - custom: a user's Python `reward(problem, answer, messages) -> float`, run in the slot.
//!
//! A reward computed in the slot the model used sees the model's state: that is what lets test
//! cases call the functions it defined, and also what a model could tamper with (see
//! [`crate::rollout::fresh_slot`] for scoring in a new slot instead).

use serde::{Deserialize, Serialize};

use crate::chat::Message;
use crate::rollout::answer::{AnswerLimit, check_answer_limits, latex_to_sympy, parse_exact_number};
use crate::rollout::dataset::Problem;
use crate::rollout::swe::SweTask;
use crate::slot::{Backend, Slot, ToolCall};

/// A trajectory's reward and how it was reached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reward {
    /// The score in `[0, 1]`.
    pub score: f64,
    /// How it was computed.
    pub breakdown: RewardBreakdown,
    /// Whether it was computed in a fresh slot rather than the trajectory's own
    /// ([`crate::rollout::fresh_slot`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh_slot: bool,
}

impl Reward {
    fn new(score: f64, breakdown: RewardBreakdown) -> Self {
        Reward {
            score,
            breakdown,
            fresh_slot: false,
        }
    }
}

/// The details of a [`Reward`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RewardBreakdown {
    /// A math answer compared with the ground truth.
    Math {
        /// The expected answer.
        ground_truth: String,
        /// The answer extracted from the last assistant message.
        answer: Option<String>,
        /// How they were compared.
        method: MathMethod,
        /// Why sympy could not decide, when it could not; or which limit the answer passed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
        /// The name of the parsing limit the answer (or the ground truth) passed, for
        /// [`MathMethod::OverLimit`]: `answer_too_long` or `answer_too_deep` (see
        /// [`crate::rollout::answer::AnswerLimit`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<String>,
    },
    /// A user's reward function, run in the slot.
    Custom {
        /// The answer extracted from the last assistant message.
        answer: Option<String>,
        /// Why the function gave no score (it raised, or returned something not a number).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// An SWE task's test command, run in the trajectory's worktree after its test files were
    /// restored from the base commit.
    Swe {
        /// The command.
        test_command: String,
        /// Its exit code; `None` when it was killed (a time limit) or could not run.
        exit_code: Option<i32>,
        /// The end of what it printed.
        output_tail: String,
        /// Why the tests could not run at all, when they could not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
        /// For a per-test task (FAIL_TO_PASS / PASS_TO_PASS), each test id's outcome.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tests: Vec<crate::rollout::swe::TestOutcome>,
    },
    /// Test cases run in the slot.
    Code {
        /// How many passed.
        passed: usize,
        /// How many ran.
        total: usize,
        /// The ones that failed.
        failures: Vec<TestFailure>,
    },
}

/// How a math answer was compared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MathMethod {
    /// No final answer was found: reward 0.
    NoAnswer,
    /// Both sides are plain numbers, compared exactly as rationals on the host.
    Exact,
    /// Compared symbolically with sympy inside the slot.
    Sympy,
    /// Not compared: the answer (or the ground truth) passed a parsing limit, named in the
    /// breakdown's `limit`. Reward 0.
    OverLimit,
}

/// A test case that did not pass.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TestFailure {
    /// Its index in `test_cases`.
    pub index: usize,
    /// The test's code.
    pub test: String,
    /// What it raised or which limit it hit, as the cell's output shows it.
    pub error: String,
}

/// Scores a trajectory in `slot`: with the user's reward function `custom` when there is one
/// (see [`custom_reward`]), else with [`compute_reward`].
pub async fn score(
    backend: &dyn Backend,
    slot: &Slot,
    problem: &Problem,
    answer: Option<&str>,
    messages: &[Message],
    custom: Option<&str>,
) -> Reward {
    match custom {
        Some(source) => custom_reward(backend, slot, source, problem, answer, messages).await,
        None => compute_reward(backend, slot, problem, answer).await,
    }
}

/// Scores a trajectory of `problem` whose final answer is `answer`, in `slot`: its test command
/// for an SWE task, code when the problem has `test_cases`, else math.
pub async fn compute_reward(backend: &dyn Backend, slot: &Slot, problem: &Problem, answer: Option<&str>) -> Reward {
    if let Some(task) = &problem.swe {
        return swe_reward(backend, slot, task).await;
    }
    if !problem.test_cases.is_empty() {
        return code_reward(backend, slot, &problem.test_cases).await;
    }
    let ground_truth = problem.ground_truth.clone().unwrap_or_default();
    math_reward(backend, slot, &ground_truth, answer).await
}

/// Runs a user's reward function in `slot`. `source` is a Python file that defines
/// `reward(problem: dict, answer: str | None, messages: list[dict]) -> float`; it runs in its own
/// namespace (the notebook's is reachable with `import __main__`). A function that raises or
/// returns something that is not a finite number scores 0 with the error recorded.
pub async fn custom_reward(
    backend: &dyn Backend,
    slot: &Slot,
    source: &str,
    problem: &Problem,
    answer: Option<&str>,
    messages: &[Message],
) -> Reward {
    let literal = |v: String| serde_json::to_string(&v).unwrap_or_else(|_| "'null'".to_owned());
    let json = |v: serde_json::Result<String>| literal(v.unwrap_or_else(|_| "null".to_owned()));
    let cell = format!(
        r#"def _rollbox_custom_reward():
    import json
    scope = {{"__name__": "rollbox_reward"}}
    exec(compile({source}, "reward.py", "exec"), scope)
    value = float(scope["reward"](json.loads({problem}), json.loads({answer}), json.loads({messages})))
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"reward() returned {{value}}")
    return value
try:
    print(repr(_rollbox_custom_reward()))
finally:
    del _rollbox_custom_reward
"#,
        source = literal(source.to_owned()),
        problem = json(serde_json::to_string(problem)),
        answer = json(serde_json::to_string(&answer)),
        messages = json(serde_json::to_string(messages)),
    );
    let result = backend.execute(slot, ToolCall::python(cell)).await;
    let score = result
        .success
        .then(|| result.cell.as_ref().and_then(|c| c.stdout.trim().parse::<f64>().ok()))
        .flatten();
    let error = match score {
        Some(_) => None,
        None => Some(result.output.trim().to_owned()),
    };
    Reward::new(
        score.unwrap_or(0.0),
        RewardBreakdown::Custom {
            answer: answer.map(str::to_owned),
            error,
        },
    )
}

/// Compares `answer` with `ground_truth`: exactly when both are plain numbers, else with sympy
/// in `slot`.
pub async fn math_reward(backend: &dyn Backend, slot: &Slot, ground_truth: &str, answer: Option<&str>) -> Reward {
    let Some(answer) = answer else {
        let breakdown = RewardBreakdown::Math {
            ground_truth: ground_truth.to_owned(),
            answer: None,
            method: MathMethod::NoAnswer,
            note: None,
            limit: None,
        };
        return Reward::new(0.0, breakdown);
    };
    let math = |method, equal: bool, note| {
        let breakdown = RewardBreakdown::Math {
            ground_truth: ground_truth.to_owned(),
            answer: Some(answer.to_owned()),
            method,
            note,
            limit: None,
        };
        Reward::new(if equal { 1.0 } else { 0.0 }, breakdown)
    };
    // Checked before any parsing, so no answer can make scoring slow or deep.
    let over_limit = check_answer_limits(answer)
        .map_err(|limit| ("the answer", limit))
        .and_then(|()| check_answer_limits(ground_truth).map_err(|limit| ("the ground truth", limit)));
    let refused = |which: &str, limit: AnswerLimit| {
        let breakdown = RewardBreakdown::Math {
            ground_truth: ground_truth.to_owned(),
            answer: Some(answer.to_owned()),
            method: MathMethod::OverLimit,
            note: Some(format!("not compared: {which} passed a limit: {limit}")),
            limit: Some(limit.name().to_owned()),
        };
        Reward::new(0.0, breakdown)
    };
    if let Err((which, limit)) = over_limit {
        return refused(which, limit);
    }
    if let (Some(expected), Some(given)) = (parse_exact_number(ground_truth), parse_exact_number(answer)) {
        return math(MathMethod::Exact, expected == given, None);
    }
    let check = match sympy_check(answer, ground_truth) {
        Ok(check) => check,
        // The nesting of `\frac`/`\sqrt` without braces can still pass the depth limit.
        Err((which, limit)) => return refused(which, limit),
    };
    let result = backend.execute(slot, ToolCall::python(check)).await;
    let verdict = result
        .cell
        .as_ref()
        .map(|c| c.stdout.trim().to_owned())
        .unwrap_or_default();
    match verdict.as_str() {
        "True" => math(MathMethod::Sympy, true, None),
        "False" => math(MathMethod::Sympy, false, None),
        _ => math(
            MathMethod::Sympy,
            false,
            Some(format!("sympy could not compare them: {}", result.output.trim())),
        ),
    }
}

/// A cell that prints `True` when the two LaTeX answers are symbolically equal. The answers go
/// in as JSON string literals (valid Python), never spliced in as code; sympy's parser does
/// evaluate them, which is why this runs in the sandbox.
fn sympy_check(answer: &str, ground_truth: &str) -> Result<String, (&'static str, AnswerLimit)> {
    let literal = |s: &str| serde_json::to_string(&s).unwrap_or_else(|_| "''".to_owned());
    let given = literal(&latex_to_sympy(answer).map_err(|limit| ("the answer", limit))?);
    let expected = literal(&latex_to_sympy(ground_truth).map_err(|limit| ("the ground truth", limit))?);
    Ok(format!(
        r#"def _rollbox_equal(given, expected):
    import sympy
    from sympy.parsing.sympy_parser import parse_expr, standard_transformations, implicit_multiplication_application, convert_xor
    rules = standard_transformations + (implicit_multiplication_application, convert_xor)
    a = parse_expr(given, transformations=rules)
    b = parse_expr(expected, transformations=rules)
    difference = sympy.simplify(a - b)
    if difference == 0:
        return True
    if difference.is_number:
        return abs(complex(difference.evalf())) <= 1e-9 * max(1.0, abs(complex(b.evalf())))
    return False
try:
    print(_rollbox_equal({given}, {expected}))
finally:
    del _rollbox_equal
"#,
    ))
}

/// Scores an SWE task with its test command in `slot` (see [`crate::rollout::swe::verify`]): 1.0 when
/// it passes, else 0.0; a slot that cannot run it scores 0.0 with the reason recorded.
pub async fn swe_reward(backend: &dyn Backend, slot: &Slot, task: &SweTask) -> Reward {
    let test_command = task.test_command.clone();
    match crate::rollout::swe::verify(backend, slot, task).await {
        Ok(verified) => {
            let breakdown = RewardBreakdown::Swe {
                test_command,
                exit_code: verified.exit_code,
                output_tail: tail(&verified.output, SWE_OUTPUT_TAIL_CHARS),
                error: None,
                tests: verified.tests,
            };
            Reward::new(verified.reward, breakdown)
        }
        Err(error) => {
            let breakdown = RewardBreakdown::Swe {
                test_command,
                exit_code: None,
                output_tail: String::new(),
                error: Some(crate::error_text::error_chain(&error)),
                tests: Vec::new(),
            };
            Reward::new(0.0, breakdown)
        }
    }
}

/// How much of the test command's output a trajectory keeps.
const SWE_OUTPUT_TAIL_CHARS: usize = 2_000;

/// The last `max_chars` characters of `text`.
fn tail(text: &str, max_chars: usize) -> String {
    let skip = text.chars().count().saturating_sub(max_chars);
    text.chars().skip(skip).collect()
}

/// Runs each test case as its own cell in `slot`, in order; the reward is the pass fraction.
pub async fn code_reward(backend: &dyn Backend, slot: &Slot, test_cases: &[String]) -> Reward {
    let batch = test_cases
        .iter()
        .map(|t| (slot.clone(), ToolCall::python(t.clone())))
        .collect();
    let results = backend.execute_batch(batch).await;
    let mut failures = Vec::new();
    for (index, test) in test_cases.iter().enumerate() {
        let error = match results.get(index) {
            Some(result) if result.success => continue,
            Some(result) => match (
                result.metadata.limit_hit,
                result.cell.as_ref().and_then(|c| c.error.as_ref()),
            ) {
                (Some(limit), _) => format!("{limit} limit reached"),
                (None, Some(e)) => format!("{}: {}", e.name, e.value),
                (None, None) => result.output.trim().to_owned(),
            },
            None => "the backend returned no result for this test".to_owned(),
        };
        failures.push(TestFailure {
            index,
            test: test.clone(),
            error,
        });
    }
    let total = test_cases.len();
    let passed = total - failures.len();
    let score = if total == 0 { 0.0 } else { passed as f64 / total as f64 };
    Reward::new(
        score,
        RewardBreakdown::Code {
            passed,
            total,
            failures,
        },
    )
}
