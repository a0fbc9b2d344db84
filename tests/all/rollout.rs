//! Rollouts: code extraction, answers and rewards, the model client against a scripted server,
//! end-to-end oracle rollouts over the shipped examples, and resume after an interruption.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{Value, json};

use rollbox::chat::{Message, Role};
use rollbox::rollout::agent::{StopReason, Trajectory};
use rollbox::rollout::answer::{Rational, extract_final_answer, latex_to_sympy, parse_exact_number};
use rollbox::rollout::code_blocks::{CodeBlock, CodeTags, extract_code_blocks};
use rollbox::rollout::config::{AgentConfig, AgentKind, RolloutConfig};
use rollbox::rollout::dataset::{Dataset, Problem, load_dataset, parse_dataset};
use rollbox::rollout::policy::{ChatClient, ChatClientConfig, OraclePolicy, Policy, PolicyError, TurnRequest};
use rollbox::rollout::reward::{MathMethod, RewardBreakdown, code_reward, custom_reward, math_reward};
use rollbox::rollout::runner::{RolloutReporter, SilentRolloutReporter, StopSignal, run_rollout};
use rollbox::rollout::summary::pass_estimate;
use rollbox::rollout::user_tools::{ToolsFile, UserTools, tool_result};
use rollbox::truncation::{ChatTemplate, TokenCounter};
use rollbox::{Backend, ErrorKind, Limits, WasmBackend};

use crate::support::wasm_backend;

/// One backend for every rollout test, shareable as `Arc<dyn Backend>`.
fn backend() -> Arc<dyn Backend> {
    static BACKEND: OnceLock<Arc<WasmBackend>> = OnceLock::new();
    BACKEND
        .get_or_init(|| Arc::new(wasm_backend(Limits::default())))
        .clone()
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn blocks(text: &str) -> Vec<CodeBlock> {
    extract_code_blocks(text, &CodeTags::default())
}

fn block(code: &str, terminated: bool) -> CodeBlock {
    CodeBlock {
        code: code.to_owned(),
        terminated,
    }
}

// ---- code extraction -------------------------------------------------------------------------

#[test]
fn several_blocks_come_out_in_order() {
    let text = "First\n<code>\nx = 1\n</code>\nthen\n```python\ny = x + 1\n```\nand <code>print(y)</code>";
    assert_eq!(
        blocks(text),
        vec![
            block("x = 1\n", true),
            block("y = x + 1\n", true),
            block("print(y)\n", true)
        ]
    );
}

#[test]
fn nested_tags_stay_inside_their_block() {
    let text = "<code>s = '<code>inner</code>'\nprint(s)</code> after <code>z = 3</code>";
    assert_eq!(
        blocks(text),
        vec![
            block("s = '<code>inner</code>'\nprint(s)\n", true),
            block("z = 3\n", true)
        ]
    );
}

#[test]
fn an_unterminated_block_runs_to_the_end_and_says_so() {
    assert_eq!(
        blocks("Let me compute.\n<code>\nprint(2 + 2)\n"),
        vec![block("print(2 + 2)\n", false)]
    );
    assert_eq!(blocks("```python\nprint(1)\n"), vec![block("print(1)\n", false)]);
    assert_eq!(
        blocks("<code>a = 1</code> and then <code>b = "),
        vec![block("a = 1\n", true), block("b =\n", false)]
    );
}

#[test]
fn fences_inside_tags_and_other_languages_are_not_blocks() {
    assert_eq!(
        blocks("<code>\ntext = '''\n```python\n'''\n</code>"),
        vec![block("text = '''\n```python\n'''\n", true)]
    );
    assert_eq!(
        blocks("```bash\nls\n```\n```py\nprint(3)\n```"),
        vec![block("print(3)\n", true)]
    );
    assert!(blocks("no code here, just `inline` and <code></code>").is_empty());
}

#[test]
fn code_tags_are_configurable_and_keep_indentation() {
    let tags = CodeTags {
        open: "<python>".to_owned(),
        close: "</python>".to_owned(),
    };
    let found = extract_code_blocks(
        "<code>ignored</code><python>\n\n    if True:\n        print(1)\n\n</python>",
        &tags,
    );
    assert_eq!(found, vec![block("    if True:\n        print(1)\n", true)]);
}

// ---- answers -----------------------------------------------------------------------------------

#[test]
fn final_answers_are_extracted_with_balanced_braces() {
    assert_eq!(
        extract_final_answer("so \\boxed{\\frac{5}{14}} in all").as_deref(),
        Some("\\frac{5}{14}")
    );
    assert_eq!(
        extract_final_answer("\\boxed{1} then \\boxed{ 2 }").as_deref(),
        Some("2")
    );
    assert_eq!(
        extract_final_answer("\\boxed{3} <answer> 6\\sqrt{5} </answer>").as_deref(),
        Some("6\\sqrt{5}")
    );
    assert_eq!(
        extract_final_answer("<answer>x</answer> and finally \\boxed{y}").as_deref(),
        Some("y")
    );
    assert_eq!(extract_final_answer("\\boxed{unclosed"), None);
    assert_eq!(extract_final_answer("\\boxed{}"), None);
    assert_eq!(extract_final_answer("no answer"), None);
}

#[test]
fn plain_numbers_compare_exactly_on_the_host() {
    let r = |n, d| Rational::new(n, d);
    assert_eq!(parse_exact_number("97.20"), r(486, 5));
    assert_eq!(parse_exact_number("97.2"), parse_exact_number("97.20"));
    assert_eq!(parse_exact_number("\\frac{5}{14}"), r(5, 14));
    assert_eq!(parse_exact_number("$\\dfrac{10}{28}$"), r(5, 14));
    assert_eq!(parse_exact_number("-\\frac{1}{2}"), r(-1, 2));
    assert_eq!(parse_exact_number("12/5"), r(12, 5));
    assert_eq!(parse_exact_number("128,000"), r(128_000, 1));
    assert_eq!(parse_exact_number("80 \\text{ km/h}"), r(80, 1));
    assert_eq!(parse_exact_number("10\\%"), r(10, 1));
    assert_eq!(parse_exact_number("1/0"), None);
    assert_eq!(parse_exact_number("6\\sqrt{5}"), None);
    assert_eq!(parse_exact_number("(1,2)"), None);
}

#[test]
fn latex_becomes_sympy_syntax() {
    assert_eq!(latex_to_sympy("6\\sqrt{5}").as_deref(), Ok("6sqrt(5)"));
    assert_eq!(latex_to_sympy("\\frac{\\sqrt{3}}{2}").as_deref(), Ok("((sqrt(3))/(2))"));
    assert_eq!(latex_to_sympy("2^{10} \\cdot \\pi").as_deref(), Ok("2**(10)*pi"));
    assert_eq!(latex_to_sympy("\\sqrt[3]{8}").as_deref(), Ok("((8)**(1/(3)))"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn math_rewards_decide_equivalence_exactly_or_with_sympy_in_the_slot() {
    let backend = backend();
    let slot = backend.acquire("math-reward").await.expect("slot");
    let cases = [
        ("5/14", Some("\\frac{5}{14}"), 1.0, MathMethod::Exact),
        ("97.20", Some("97.2"), 1.0, MathMethod::Exact),
        ("80", Some("81"), 0.0, MathMethod::Exact),
        ("6\\sqrt{5}", Some("\\sqrt{180}"), 1.0, MathMethod::Sympy),
        ("6\\sqrt{5}", Some("6 \\sqrt{5}"), 1.0, MathMethod::Sympy),
        ("2\\sqrt{10}", Some("\\sqrt{20}"), 0.0, MathMethod::Sympy),
        ("\\frac{\\sqrt{3}}{2}", Some("\\sqrt{3}/2"), 1.0, MathMethod::Sympy),
        ("6\\sqrt{5}", Some("13.416"), 0.0, MathMethod::Sympy),
        ("7", None, 0.0, MathMethod::NoAnswer),
    ];
    for (truth, answer, score, method) in cases {
        let reward = math_reward(backend.as_ref(), &slot, truth, answer).await;
        assert_eq!(reward.score, score, "{truth} vs {answer:?}: {reward:?}");
        let RewardBreakdown::Math { method: used, .. } = reward.breakdown else {
            panic!("not a math reward: {reward:?}")
        };
        assert_eq!(used, method, "{truth} vs {answer:?}");
    }
    // An answer sympy cannot parse scores 0 and says why, rather than failing the rollout.
    let reward = math_reward(backend.as_ref(), &slot, "6\\sqrt{5}", Some("six root five ((")).await;
    assert_eq!(reward.score, 0.0);
    let RewardBreakdown::Math { note, .. } = reward.breakdown else {
        panic!("not a math reward")
    };
    assert!(note.is_some_and(|n| n.contains("sympy could not compare")));
    backend.release(&slot, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn code_rewards_are_the_pass_fraction_with_failures_recorded() {
    let backend = backend();
    let slot = backend.acquire("code-reward").await.expect("slot");
    let define = rollbox::ToolCall::python("def double(x):\n    return x * 2 if x != 3 else 0\n");
    assert!(backend.execute(&slot, define).await.success);
    let tests = [
        "assert double(2) == 4",
        "assert double(3) == 6, 'three'",
        "assert double(0) == 0",
        "undefined_name",
    ]
    .map(String::from);
    let reward = code_reward(backend.as_ref(), &slot, &tests).await;
    assert_eq!(reward.score, 0.5);
    let RewardBreakdown::Code {
        passed,
        total,
        failures,
    } = reward.breakdown
    else {
        panic!("not a code reward")
    };
    assert_eq!((passed, total), (2, 4));
    assert_eq!(failures.iter().map(|f| f.index).collect::<Vec<_>>(), vec![1, 3]);
    assert_eq!(failures[0].error, "AssertionError: three");
    assert!(failures[1].error.starts_with("NameError"), "{:?}", failures[1]);
    backend.release(&slot, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_rewards_run_the_users_function_in_the_slot() {
    let backend = backend();
    let slot = backend.acquire("custom-reward").await.expect("slot");
    assert!(
        backend
            .execute(&slot, rollbox::ToolCall::python("secret = 0.25"))
            .await
            .success
    );
    let source = "import __main__\n\ndef reward(problem, answer, messages):\n    \"\"\"Length bonus plus the notebook's secret.\"\"\"\n    \
                  return len(messages) / 10 + __main__.secret + (answer == problem['ground_truth'])\n";
    let messages = [Message::user("q"), Message::assistant("\\boxed{42}")];
    let reward = custom_reward(backend.as_ref(), &slot, source, &problem(), Some("42"), &messages).await;
    assert!((reward.score - 1.45).abs() < 1e-9, "{reward:?}");
    let broken = custom_reward(
        backend.as_ref(),
        &slot,
        "def reward(p, a, m):\n    return 1 / 0\n",
        &problem(),
        None,
        &[],
    )
    .await;
    assert_eq!(broken.score, 0.0);
    let RewardBreakdown::Custom { error, .. } = broken.breakdown else {
        panic!("not a custom reward")
    };
    assert!(error.is_some_and(|e| e.contains("ZeroDivisionError")));
    backend.release(&slot, true).await.expect("release");
}

#[test]
fn pass_at_k_uses_the_unbiased_estimator() {
    assert_eq!(pass_estimate(8, 0, 1), 0.0);
    assert_eq!(pass_estimate(8, 8, 8), 1.0);
    assert!((pass_estimate(8, 2, 1) - 0.25).abs() < 1e-12);
    assert_eq!(pass_estimate(8, 1, 8), 1.0);
    assert!((pass_estimate(4, 1, 2) - 0.5).abs() < 1e-12);
}

// ---- datasets ----------------------------------------------------------------------------------

#[test]
fn malformed_dataset_lines_are_reported_with_their_numbers() {
    let text = [
        r#"{"instance_id": "a", "problem": "p", "ground_truth": 80}"#,
        "",
        "{not json",
        r#"{"instance_id": "b", "problem": "p"}"#,
        r#"{"instance_id": "a", "problem": "p", "ground_truth": "1"}"#,
        r#"[1, 2]"#,
        r#"{"instance_id": "c", "problem": "p", "test_cases": ["assert True"]}"#,
        r#"{"problem": "no id", "ground_truth": "1"}"#,
    ]
    .join("\n");
    let dataset = parse_dataset(&text);
    let ids: Vec<&str> = dataset.problems.iter().map(|p| p.instance_id.as_str()).collect();
    assert_eq!(ids, vec!["a", "c"]);
    assert_eq!(dataset.problems[0].ground_truth.as_deref(), Some("80"));
    let lines: Vec<usize> = dataset.errors.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![3, 4, 5, 6, 8]);
    assert!(
        dataset.errors[1]
            .message
            .contains("no `ground_truth`, `test_cases` or SWE task"),
        "{}",
        dataset.errors[1].message
    );
    assert!(dataset.errors[2].message.contains("duplicate instance_id `a`"));
}

#[test]
fn the_shipped_examples_load_without_errors() {
    for (file, count) in [("math.jsonl", 40), ("code.jsonl", 24), ("tools.jsonl", 5)] {
        let dataset = load_dataset(&examples_dir().join(file)).expect("readable");
        assert_eq!(dataset.errors, vec![], "{file}");
        assert_eq!(dataset.problems.len(), count, "{file}");
        assert!(
            dataset.problems.iter().all(|p| p.reference_solution.is_some()),
            "{file}"
        );
    }
}

// ---- end-to-end oracle rollouts ----------------------------------------------------------------

fn examples() -> Dataset {
    let mut dataset = load_dataset(&examples_dir().join("math.jsonl")).expect("math examples");
    let code = load_dataset(&examples_dir().join("code.jsonl")).expect("code examples");
    dataset.problems.extend(code.problems);
    dataset
}

fn read_trajectories(dir: &Path) -> Vec<Trajectory> {
    let text = std::fs::read_to_string(dir.join("trajectories.jsonl")).expect("trajectories.jsonl");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad line {e}: {l}")))
        .collect()
}

fn config(kind: AgentKind, out: &Path, group_size: usize, concurrency: usize) -> RolloutConfig {
    RolloutConfig {
        agent: AgentConfig::new(kind),
        group_size,
        concurrency,
        out_dir: out.to_owned(),
        resume: false,
        custom_reward: None,
        score_in_fresh_slot: false,
        seed: None,
        branch_after_turn: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_example_scores_full_reward_under_the_oracle() {
    let dataset = examples();
    let out = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    let config = config(AgentKind::Notebook, out.path(), 1, 4);
    let run = run_rollout(
        backend(),
        Arc::new(OraclePolicy),
        &dataset,
        &config,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    eprintln!(
        "oracle rollout of {} examples: {:.1} s",
        dataset.problems.len(),
        started.elapsed().as_secs_f64()
    );
    let trajectories = read_trajectories(out.path());
    assert_eq!(trajectories.len(), 64);
    let failing: Vec<String> = trajectories
        .iter()
        .filter(|t| t.reward.score < 1.0)
        .map(|t| format!("{}: {:?} {:?}", t.trajectory_id, t.final_answer, t.reward))
        .collect();
    assert!(
        failing.is_empty(),
        "examples below full reward:\n{}",
        failing.join("\n")
    );
    assert!(trajectories.iter().all(|t| t.stop_reason == StopReason::FinalAnswer));
    let summary = &run.summary;
    // A math row's last reference turn holds its answer as text, so full reward alone would
    // pass even if every cell failed.
    assert_eq!(summary.errors_by_kind, Default::default(), "no call failed");
    // The overhead with code is the median over the turns that ran code only; here the last
    // turn of every trajectory runs none.
    let mut with_code: Vec<f64> = trajectories
        .iter()
        .flat_map(|t| &t.steps)
        .filter(|s| !s.calls.is_empty())
        .map(|s| s.overhead_ms)
        .collect();
    let all_turns: usize = trajectories.iter().map(|t| t.steps.len()).sum();
    assert!(!with_code.is_empty() && with_code.len() < all_turns);
    with_code.sort_by(f64::total_cmp);
    let mid = with_code.len() / 2;
    let median = if with_code.len().is_multiple_of(2) {
        (with_code[mid - 1] + with_code[mid]) / 2.0
    } else {
        with_code[mid]
    };
    assert!(
        (summary.median_overhead_ms_per_turn_with_code - median).abs() <= 1e-9 * median.max(1.0),
        "{} != {median}",
        summary.median_overhead_ms_per_turn_with_code
    );
    assert!(summary.oracle_policy && summary.note.contains("oracle policy was used"));
    assert_eq!(summary.mean_reward, 1.0);
    assert_eq!(summary.pass_at_k.get("pass@1"), Some(&1.0));
    assert_eq!(summary.run.written, 64);
    // Each notebook turn's outputs come back in the output tag, and each call keeps its timing.
    let first = &trajectories[0];
    assert_eq!(first.messages[0].role, Role::System);
    assert!(first.messages[2].role == Role::Assistant && first.messages[3].text().starts_with("<output>\n"));
    assert!(first.steps[0].calls[0].result.metadata.duration_us > 0);
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(&run.summary_path).expect("summary.json")).expect("json");
    assert_eq!(written["mean_reward"], json!(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tools_agent_plays_code_examples_as_parallel_tool_calls_in_groups() {
    let mut dataset = load_dataset(&examples_dir().join("code.jsonl")).expect("code examples");
    dataset.problems.truncate(6);
    // The shipped code examples run one block per turn; this copy of the first runs two in its
    // first turn (the definition, then a check that needs it), as two parallel tool calls.
    let mut two_calls = dataset.problems[0].clone();
    two_calls.instance_id = "code-001-two-calls".into();
    let turns = two_calls.reference_solution.as_mut().expect("a reference solution");
    turns[0] = turns[0].replacen("\n\nprint(", "\n</code>\nThen I check it.\n<code>\nprint(", 1);
    assert_eq!(turns[0].matches("<code>").count(), 2, "{}", turns[0]);
    dataset.problems.push(two_calls);
    let out = tempfile::tempdir().expect("tempdir");
    let config = config(AgentKind::Tools, out.path(), 2, 4);
    let run = run_rollout(
        backend(),
        Arc::new(OraclePolicy),
        &dataset,
        &config,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let trajectories = read_trajectories(out.path());
    assert_eq!(trajectories.len(), 14);
    assert!(trajectories.iter().all(|t| t.reward.score == 1.0), "{trajectories:#?}");
    assert_eq!(run.summary.errors_by_kind, Default::default(), "no call failed");
    for id in ["code-001-two-calls/0", "code-001-two-calls/1"] {
        let t = trajectories
            .iter()
            .find(|t| t.trajectory_id == id)
            .unwrap_or_else(|| panic!("no {id}"));
        let first: Vec<(bool, &str)> = t.steps[0]
            .calls
            .iter()
            .map(|c| (c.result.success, c.result.output.as_str()))
            .collect();
        assert_eq!(
            first,
            [(true, ""), (true, "True False\n")],
            "{id}: one step made both calls, in order"
        );
    }
    let ids: HashSet<&str> = trajectories.iter().map(|t| t.trajectory_id.as_str()).collect();
    assert!(ids.contains("code-001/0") && ids.contains("code-001/1"));
    for t in &trajectories {
        let tool_messages = t.messages.iter().filter(|m| m.role == Role::Tool).count();
        let calls: usize = t.steps.iter().map(|s| s.calls.len()).sum();
        assert_eq!(tool_messages, calls, "{}", t.trajectory_id);
        assert!(
            t.messages
                .iter()
                .filter(|m| m.role == Role::Tool)
                .all(|m| m.tool_call_id.is_some())
        );
    }
    assert_eq!(run.summary.pass_at_k.get("pass@2"), Some(&1.0));
}

// ---- resume ------------------------------------------------------------------------------------

/// Interrupts the rollout once `after` trajectories are written, as Ctrl-C would.
struct InterruptAfter {
    after: usize,
    seen: AtomicUsize,
    stop: StopSignal,
}

impl RolloutReporter for InterruptAfter {
    fn on_trajectory(&self, _: &Trajectory) {
        if self.seen.fetch_add(1, Ordering::SeqCst) + 1 == self.after {
            self.stop.stop();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rollout_resumes_where_it_stopped() {
    let mut dataset = load_dataset(&examples_dir().join("code.jsonl")).expect("code examples");
    dataset.problems.truncate(8);
    let out = tempfile::tempdir().expect("tempdir");
    let mut config = config(AgentKind::Notebook, out.path(), 1, 2);
    let stop = StopSignal::new();
    let reporter = InterruptAfter {
        after: 3,
        seen: AtomicUsize::new(0),
        stop: stop.clone(),
    };
    let first = run_rollout(backend(), Arc::new(OraclePolicy), &dataset, &config, &reporter, &stop)
        .await
        .expect("first run");
    assert!(first.summary.run.interrupted);
    let kept = read_trajectories(out.path());
    assert!(kept.len() >= 3 && kept.len() < 8, "kept {}", kept.len());
    assert_eq!(first.summary.run.written, kept.len());
    assert_eq!(
        first.summary.run.written + first.summary.run.abandoned + first.summary.run.not_started,
        8
    );

    // Without --resume the folder is refused rather than appended to twice.
    let refused = run_rollout(
        backend(),
        Arc::new(OraclePolicy),
        &dataset,
        &config,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await;
    assert!(refused.is_err_and(|e| e.to_string().contains("--resume")));

    // A line cut off by a crash is reported and its trajectory runs again.
    let path = out.path().join("trajectories.jsonl");
    let mut text = std::fs::read_to_string(&path).expect("read");
    let last = text.trim_end().rsplit('\n').next().expect("a line").to_owned();
    text.truncate(text.trim_end().len() - last.len());
    text.push_str(&last[..last.len() / 2]);
    std::fs::write(&path, &text).expect("write");

    config.resume = true;
    let second = run_rollout(
        backend(),
        Arc::new(OraclePolicy),
        &dataset,
        &config,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("resumed run");
    assert_eq!(second.summary.run.skipped, kept.len() - 1);
    assert_eq!(second.summary.run.written, 8 - (kept.len() - 1));
    assert_eq!(second.summary.run.unreadable_lines, 1);
    assert_eq!(second.summary.trajectories, 8);
    assert_eq!(second.summary.mean_reward, 1.0);
    let ids: Vec<String> = read_trajectories_lenient(&path);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 8, "{ids:?}");
    assert_eq!(ids.len(), 8);
}

fn read_trajectories_lenient(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("read");
    text.lines()
        .filter_map(|l| serde_json::from_str::<Trajectory>(l).ok())
        .map(|t| t.trajectory_id)
        .collect()
}

// ---- the model client, against a scripted server ------------------------------------------------

/// One scripted reply: an HTTP status, a JSON body, a delay before answering, extra headers.
#[derive(Clone)]
struct Scripted {
    status: u16,
    body: Value,
    delay: Duration,
    retry_after: Option<&'static str>,
}

fn reply(body: Value) -> Scripted {
    Scripted {
        status: 200,
        body,
        delay: Duration::ZERO,
        retry_after: None,
    }
}

fn failure(status: u16) -> Scripted {
    Scripted {
        status,
        body: json!({"error": {"message": format!("scripted {status}")}}),
        delay: Duration::ZERO,
        retry_after: None,
    }
}

fn completion(message: Value) -> Value {
    json!({
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop",
                     "logprobs": {"content": [{"token": "x", "logprob": -0.25}]}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    })
}

/// The scripted server's state: the replies still to give (the last one repeats), every request
/// body received, and the most requests it saw at once.
#[derive(Default)]
struct Script {
    replies: Mutex<VecDeque<Scripted>>,
    requests: Mutex<Vec<Value>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

/// A local OpenAI-compatible server on 127.0.0.1 that serves *scripted* responses, in order:
/// it is not a model, just enough of `/v1/chat/completions` to exercise the client.
async fn scripted_server(replies: Vec<Scripted>) -> (String, Arc<Script>) {
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    let script = Arc::new(Script {
        replies: Mutex::new(replies.into()),
        ..Script::default()
    });
    async fn handle(
        State(script): State<Arc<Script>>,
        axum::Json(body): axum::Json<Value>,
    ) -> axum::response::Response {
        let now = script.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        script.most_in_flight.fetch_max(now, Ordering::SeqCst);
        script.requests.lock().expect("lock").push(body);
        let next = {
            let mut replies = script.replies.lock().expect("lock");
            if replies.len() > 1 {
                replies.pop_front()
            } else {
                replies.front().cloned()
            }
        };
        let next = next.unwrap_or_else(|| failure(500));
        tokio::time::sleep(next.delay).await;
        script.in_flight.fetch_sub(1, Ordering::SeqCst);
        let status = StatusCode::from_u16(next.status).expect("status");
        let mut response = (status, axum::Json(next.body)).into_response();
        if let Some(seconds) = next.retry_after {
            response
                .headers_mut()
                .insert("retry-after", seconds.parse().expect("header"));
        }
        response
    }
    let app = axum::Router::new()
        .route("/v1/chat/completions", axum::routing::post(handle))
        .with_state(script.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}/v1"), script)
}

fn client(url: &str) -> ChatClient {
    let config = ChatClientConfig {
        max_retries: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
        request_timeout: Duration::from_secs(5),
        ..ChatClientConfig::new(url, "scripted-model")
    };
    ChatClient::new(config).expect("client")
}

fn problem() -> Problem {
    Problem {
        instance_id: "p".to_owned(),
        problem: "What is 6 * 7?".to_owned(),
        ground_truth: Some("42".to_owned()),
        test_cases: vec![],
        reference_solution: None,
        setup_code: None,
        swe: None,
    }
}

async fn ask(client: &ChatClient) -> Result<rollbox::rollout::policy::ModelReply, PolicyError> {
    let problem = problem();
    let messages = [Message::user("hi")];
    let tags = CodeTags::default();
    let request = TurnRequest {
        problem: &problem,
        messages: &messages,
        tools: &[],
        turn: 0,
        agent: AgentKind::Notebook,
        code_tags: &tags,
        seed: None,
    };
    client.next_turn(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_retries_429_and_5xx_then_records_usage_and_logprobs() {
    let mut limited = failure(429);
    limited.retry_after = Some("0");
    let answer = completion(json!({"role": "assistant", "content": "\\boxed{42}"}));
    let (url, script) = scripted_server(vec![limited, failure(503), reply(answer)]).await;
    let client = client(&url);
    let reply = ask(&client).await.expect("a reply after retries");
    assert_eq!(reply.attempts, 3);
    assert_eq!(reply.message.text(), "\\boxed{42}");
    assert_eq!(reply.usage.map(|u| u.total_tokens), Some(120));
    assert_eq!(
        reply
            .logprobs
            .as_ref()
            .and_then(|l| l["content"][0]["logprob"].as_f64()),
        Some(-0.25)
    );
    let requests = script.requests.lock().expect("lock");
    assert_eq!(requests[0]["model"], "scripted-model");
    assert_eq!(requests[0]["logprobs"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_gives_up_with_typed_errors() {
    let (url, script) = scripted_server(vec![failure(500)]).await;
    let error = ask(&client(&url)).await.expect_err("always 500");
    assert!(
        matches!(
            error,
            PolicyError::Status {
                status: 500,
                attempts: 4,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(script.requests.lock().expect("lock").len(), 4);

    // A client error is not retried.
    let (url, script) = scripted_server(vec![failure(400)]).await;
    let error = ask(&client(&url)).await.expect_err("400");
    assert!(
        matches!(
            error,
            PolicyError::Status {
                status: 400,
                attempts: 1,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("scripted 400"));
    assert_eq!(script.requests.lock().expect("lock").len(), 1);

    // A reply without choices is a decode error.
    let (url, _) = scripted_server(vec![reply(json!({"object": "chat.completion"}))]).await;
    assert!(matches!(ask(&client(&url)).await, Err(PolicyError::Decode { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_replies_time_out_and_in_flight_requests_are_bounded() {
    let mut slow = reply(completion(json!({"role": "assistant", "content": "late"})));
    slow.delay = Duration::from_millis(800);
    let (url, script) = scripted_server(vec![slow]).await;
    let config = ChatClientConfig {
        max_retries: 1,
        initial_backoff: Duration::from_millis(10),
        request_timeout: Duration::from_millis(200),
        ..ChatClientConfig::new(&url, "scripted-model")
    };
    let error = ask(&ChatClient::new(config).expect("client"))
        .await
        .expect_err("too slow");
    assert_eq!(error.kind(), "model_timeout", "{error:?}");
    assert!(matches!(error, PolicyError::Request { attempts: 2, .. }));
    drop(script);

    let mut steady = reply(completion(json!({"role": "assistant", "content": "ok"})));
    steady.delay = Duration::from_millis(100);
    let (url, script) = scripted_server(vec![steady]).await;
    let config = ChatClientConfig {
        max_in_flight: 2,
        ..ChatClientConfig::new(&url, "scripted-model")
    };
    let client = Arc::new(ChatClient::new(config).expect("client"));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = client.clone();
        tasks.spawn(async move { ask(&client).await.map(|r| r.attempts) });
    }
    while let Some(done) = tasks.join_next().await {
        assert_eq!(done.expect("task").expect("reply"), 1);
    }
    assert_eq!(script.most_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tools_rollout_against_the_scripted_server_runs_parallel_calls_as_one_batch() {
    let calls = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "python", "arguments": "{\"code\": \"a = 6\"}"}},
        {"id": "call_b", "type": "function", "function": {"name": "python", "arguments": "{\"code\": \"b = 7\\nprint(a * b)\"}"}},
        {"id": "call_c", "type": "function", "function": {"name": "python", "arguments": "not json"}}
    ]});
    let done = json!({"role": "assistant", "content": "The product is \\boxed{42}."});
    let (url, script) = scripted_server(vec![reply(completion(calls)), reply(completion(done))]).await;
    let dataset = Dataset {
        problems: vec![problem()],
        errors: vec![],
    };
    let out = tempfile::tempdir().expect("tempdir");
    let config = config(AgentKind::Tools, out.path(), 1, 1);
    let run = run_rollout(
        backend(),
        Arc::new(client(&url)),
        &dataset,
        &config,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let trajectory = read_trajectories(out.path()).pop().expect("one trajectory");
    assert_eq!(trajectory.stop_reason, StopReason::FinalAnswer);
    assert_eq!(trajectory.reward.score, 1.0);
    assert_eq!(trajectory.policy, "scripted-model");
    let tool_messages: Vec<&Message> = trajectory.messages.iter().filter(|m| m.role == Role::Tool).collect();
    assert_eq!(
        tool_messages
            .iter()
            .map(|m| m.tool_call_id.as_deref().unwrap_or(""))
            .collect::<Vec<_>>(),
        ["call_a", "call_b", "call_c"]
    );
    assert_eq!(tool_messages[1].text().trim(), "42");
    assert!(tool_messages[2].text().contains("not a JSON object"));
    assert_eq!(trajectory.steps[0].calls.len(), 3);
    assert_eq!(
        trajectory.tokens.map(|t| (t.prompt_tokens, t.completion_tokens)),
        Some((200, 40))
    );
    assert!(trajectory.steps[0].logprobs.is_some());
    assert_eq!(run.summary.errors_by_kind.get("call_invalid_arguments"), Some(&1));
    assert!(!run.summary.oracle_policy);
    // The request offered the backend's tool schemas.
    let requests = script.requests.lock().expect("lock");
    let offered: Vec<&str> = requests[0]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert!(offered.contains(&"python"), "{offered:?}");
    assert_eq!(requests[1]["messages"].as_array().map(Vec::len), Some(6));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_failures_end_the_trajectory_with_the_error_recorded() {
    let (url, _) = scripted_server(vec![failure(400)]).await;
    let dataset = Dataset {
        problems: vec![problem()],
        errors: vec![],
    };
    let out = tempfile::tempdir().expect("tempdir");
    let run = run_rollout(
        backend(),
        Arc::new(client(&url)),
        &dataset,
        &config(AgentKind::Notebook, out.path(), 1, 1),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let trajectory = read_trajectories(out.path()).pop().expect("one trajectory");
    assert_eq!(trajectory.stop_reason, StopReason::PolicyError);
    assert_eq!(
        trajectory.error.as_ref().map(|e| e.kind.as_str()),
        Some("model_http_status")
    );
    assert_eq!(trajectory.reward.score, 0.0);
    assert_eq!(run.summary.errors_by_kind.get("model_http_status"), Some(&1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notebook_loop_stops_on_max_turns_context_budget_and_no_action() {
    let looping = completion(
        json!({"role": "assistant", "content": "Again.\n<code>\nn = globals().get('n', 0) + 1\nprint(n)\n</code>"}),
    );
    let dataset = Dataset {
        problems: vec![problem()],
        errors: vec![],
    };

    // A model that only ever writes code runs until the turn limit, in one persistent slot.
    let (url, _) = scripted_server(vec![reply(looping.clone())]).await;
    let out = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(AgentKind::Notebook, out.path(), 1, 1);
    cfg.agent.max_turns = 3;
    cfg.agent.output_tag = "result".to_owned();
    run_rollout(
        backend(),
        Arc::new(client(&url)),
        &dataset,
        &cfg,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let t = read_trajectories(out.path()).pop().expect("trajectory");
    assert_eq!((t.stop_reason, t.turns), (StopReason::MaxTurns, 3));
    assert_eq!(
        t.messages.last().map(|m| m.text().into_owned()),
        Some("<result>\n3\n</result>".to_owned())
    );
    assert_eq!(t.reward.score, 0.0);

    // The server reports 120 tokens per reply: a budget of 100 stops after the first turn.
    let (url, _) = scripted_server(vec![reply(looping)]).await;
    let out = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(AgentKind::Notebook, out.path(), 1, 1);
    cfg.agent.max_context_tokens = Some(100);
    run_rollout(
        backend(),
        Arc::new(client(&url)),
        &dataset,
        &cfg,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let t = read_trajectories(out.path()).pop().expect("trajectory");
    assert_eq!((t.stop_reason, t.turns), (StopReason::ContextBudget, 1));

    // A reply with neither code nor an answer ends the trajectory.
    let (url, _) = scripted_server(vec![reply(completion(
        json!({"role": "assistant", "content": "I am not sure."}),
    ))])
    .await;
    let out = tempfile::tempdir().expect("tempdir");
    let cfg = config(AgentKind::Notebook, out.path(), 1, 1);
    run_rollout(
        backend(),
        Arc::new(client(&url)),
        &dataset,
        &cfg,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let t = read_trajectories(out.path()).pop().expect("trajectory");
    assert_eq!((t.stop_reason, t.turns), (StopReason::NoAction, 1));
}

#[test]
fn the_rollout_command_reports_bad_lines_and_writes_its_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = dir.path().join("mixed.jsonl");
    let code = std::fs::read_to_string(examples_dir().join("code.jsonl")).expect("examples");
    let lines: Vec<&str> = code.lines().take(2).collect();
    std::fs::write(&dataset, format!("{}\n{{broken\n{}\n", lines[0], lines[1])).expect("write");
    let out = dir.path().join("out");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["rollout", "--group-size", "2", "--dataset"])
        .arg(&dataset)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run rollbox");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("policy: oracle"), "{stderr}");
    assert!(stderr.contains("mean reward: 1.000"), "{stderr}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
    assert_eq!(summary["trajectories"], 4);
    assert_eq!(summary["pass_at_k"]["pass@2"], 1.0);
    assert_eq!(summary["dataset_errors"].as_array().map(Vec::len), Some(1));
    // A second run into the same folder needs --resume, and then has nothing left to do.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["--quiet", "rollout", "--dataset"])
        .arg(&dataset)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run rollbox");
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--resume"));
    let resumed = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["--quiet", "rollout", "--group-size", "2", "--resume", "--dataset"])
        .arg(&dataset)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run rollbox");
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
    assert_eq!(
        (summary["run"]["skipped"].as_u64(), summary["run"]["written"].as_u64()),
        (Some(4), Some(0))
    );
}

// ---- user tools: schemas from a tools file -------------------------------------------------------

const SAMPLE_TOOLS: &str = r#""""Sample tools: every supported annotation, a default of each kind, private helpers."""
import typing
from typing import Dict, List, Literal, Optional


def search_books(query: str, limit: int = 5, *, genres: Optional[list[str]] = None, sort: Literal["title", "year"] = "title") -> list:
    """Search the catalogue.

    Matches titles and
    authors.

    Args:
        query: Words to look for.
        limit (int): Most results
            to return.
        genres: Only these genres.

    Returns:
        matches: The books found (not a parameter).
    """
    return []


def summarise(values: List[float], weights: Dict[str, float], mode: int | str, extra: typing.Any, flag: bool = False, scale: float = -1.5) -> dict:
    """Summarise numbers."""
    return {}


def _helper(x):
    return x


class Catalogue:
    def method(self) -> None:
        """Methods are not tools."""
"#;

#[test]
fn schemas_come_from_the_signatures_and_docstrings_of_a_tools_file() {
    let file = ToolsFile::parse("sample.py", SAMPLE_TOOLS).expect("sample.py parses");
    let names: Vec<&str> = file.tools.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["search_books", "summarise"]);
    let search = &file.tools[0];
    assert_eq!(
        search.description,
        "Search the catalogue.\n\nMatches titles and authors."
    );
    assert_eq!(
        search.parameters,
        json!({
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Words to look for."},
                "limit": {"type": "integer", "default": 5, "description": "Most results to return."},
                "genres": {"type": ["array", "null"], "items": {"type": "string"}, "default": null, "description": "Only these genres."},
                "sort": {"type": "string", "enum": ["title", "year"], "default": "title"}
            },
            "required": ["query"],
            "additionalProperties": false
        })
    );
    assert_eq!(
        file.tools[1].parameters["properties"],
        json!({
            "values": {"type": "array", "items": {"type": "number"}},
            "weights": {"type": "object", "additionalProperties": {"type": "number"}},
            "mode": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            "extra": {},
            "flag": {"type": "boolean", "default": false},
            "scale": {"type": "number", "default": -1.5}
        })
    );
    assert_eq!(
        file.tools[1].parameters["required"],
        json!(["values", "weights", "mode", "extra"])
    );
    let schema = search.schema();
    assert_eq!(
        (schema["type"].as_str(), schema["function"]["name"].as_str()),
        (Some("function"), Some("search_books"))
    );
}

#[test]
fn tools_files_that_break_the_rules_get_errors_that_say_what_to_do() {
    let doc = "    \"\"\"Doc.\"\"\"\n";
    let cases = [
        (
            format!("def f(x: tuple):\n{doc}"),
            "parameter `x`: the annotation `tuple` is not supported; use str, int",
        ),
        (
            format!("def f(x: MyClass):\n{doc}"),
            "the annotation `MyClass` is not supported",
        ),
        (
            format!("def f(x):\n{doc}"),
            "parameter `x` has no type annotation; annotate it",
        ),
        (
            format!("def f(*xs: int):\n{doc}"),
            "`*xs` cannot be described by a JSON schema; take a list parameter instead",
        ),
        (
            format!("def f(**kw: int):\n{doc}"),
            "`**kw` cannot be described by a JSON schema; take a dict parameter instead",
        ),
        (format!("def f(x: int, /):\n{doc}"), "positional-only parameters"),
        (
            "def f(x: int):\n    return x\n".to_owned(),
            "it has no docstring; add one",
        ),
        (
            format!("async def f(x: int):\n{doc}"),
            "`async def` functions cannot be tools",
        ),
        (
            format!("def f(x: 'int'):\n{doc}"),
            "the quoted annotation `'int'` is not supported",
        ),
        (
            format!("def f(x: dict[int, str]):\n{doc}"),
            "JSON object keys are strings: use dict[str, T]",
        ),
        (
            "def f(x: int):\n    \"\"\"Doc.\n\n    Args:\n        y: Not a parameter.\n    \"\"\"\n".to_owned(),
            "describes `y`, which is not a parameter",
        ),
        (
            format!("import os\n\ndef f(x: int):\n{doc}def f(x: int):\n{doc}"),
            "failed to make a tool of `f` (sample.py, line 5): it is defined twice (also on line 3)",
        ),
        (
            "def _private(x):\n    return x\n".to_owned(),
            "the tools file sample.py defines no tools",
        ),
        (
            "def f(x: int:\n    pass\n".to_owned(),
            "failed to parse the tools file sample.py as Python (line 1)",
        ),
    ];
    for (source, expected) in cases {
        let error = ToolsFile::parse("sample.py", &source).expect_err(&source);
        assert!(
            error.to_string().contains(expected),
            "{source}\ngave: {error}\nexpected: {expected}"
        );
    }
    let error = ToolsFile::parse("sample.py", &format!("def f(x):\n{doc}"))
        .expect_err("unannotated")
        .to_string();
    assert!(
        error.ends_with("or rename it to start with `_` to keep it out of the tools"),
        "{error}"
    );

    // Names are unique across files and never a built-in tool's.
    let file = |label: &str, name: &str| {
        ToolsFile::parse(label, &format!("def {name}(x: int) -> int:\n{doc}    return x\n")).expect("parses")
    };
    let error = UserTools::new(vec![file("a.py", "double"), file("b.py", "double")]).expect_err("duplicate");
    assert_eq!(
        error.to_string(),
        "the tool `double` is defined in both a.py and b.py; rename one, tool names must be unique"
    );
    let error = UserTools::new(vec![ToolsFile::calculator(), file("mine.py", "calculator")])
        .expect_err("clashes with the calculator");
    assert!(
        error.to_string().contains("both rollbox/calculator.py and mine.py"),
        "{error}"
    );
    let error = UserTools::new(vec![file("a.py", "read_file")]).expect_err("built-in");
    assert!(
        error
            .to_string()
            .contains("the tool `read_file` in a.py has the name of a built-in tool"),
        "{error}"
    );
    let missing = ToolsFile::read(Path::new("/nonexistent/tools.py")).expect_err("missing file");
    assert!(
        missing
            .to_string()
            .contains("failed to read the tools file /nonexistent/tools.py")
    );
}

// ---- user tools and the calculator, run in a slot ------------------------------------------------

/// A tools file for the slot tests: counts its loads in `builtins` (which outlives its module)
/// and returns values of several kinds.
const EXTRA_TOOLS: &str = r#""""Tools that report on themselves."""
import builtins

builtins._rollbox_test_loads = getattr(builtins, "_rollbox_test_loads", 0) + 1


def load_count() -> int:
    """How many times this file was loaded in the slot."""
    return builtins._rollbox_test_loads


def describe(name: str, tags: list[str]) -> dict:
    """A record, which comes back as JSON."""
    print("describing", name)
    return {"name": name, "tags": tags}


def odd() -> object:
    """A value JSON cannot hold, which comes back as its repr."""
    return {3}


def fail(reason: str) -> str:
    """Always raises ValueError(reason)."""
    raise ValueError(reason)
"#;

fn slot_tools() -> UserTools {
    let examples = ToolsFile::read(&examples_dir().join("tools.py")).expect("examples/tools.py");
    let extra = ToolsFile::parse("extra.py", EXTRA_TOOLS).expect("extra tools");
    UserTools::new(vec![ToolsFile::calculator(), examples, extra]).expect("no clashes")
}

/// Runs user tool `name` in `slot` the way the tools agent does (the tools already loaded).
async fn call_tool(
    backend: &dyn Backend,
    slot: &rollbox::Slot,
    tools: &UserTools,
    name: &str,
    arguments: Value,
) -> rollbox::ExecutionResult {
    match tools.call(name, &arguments).expect("a user tool") {
        Ok(cell) => tool_result(name, backend.execute(slot, cell).await),
        Err(refused) => refused,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_tools_run_in_a_private_namespace_of_the_slot() {
    let backend = backend();
    let slot = backend.acquire("user-tools").await.expect("slot");
    let tools = slot_tools();
    let loaded = backend.execute(&slot, tools.load_call()).await;
    assert!(loaded.success && loaded.output.is_empty(), "{loaded:?}");
    // The notebook's own names cannot shadow the tools or their helpers.
    assert!(
        backend
            .execute(
                &slot,
                rollbox::ToolCall::python("convert_length = _factor = calculator = None")
            )
            .await
            .success
    );

    let result = call_tool(
        backend.as_ref(),
        &slot,
        &tools,
        "convert_length",
        json!({"value": 26.2, "from_unit": "mi", "to_unit": "km"}),
    )
    .await;
    assert_eq!(
        (result.success, result.output.as_str(), result.metadata.tool.as_str()),
        (true, "42.1648128", "convert_length")
    );
    let result = call_tool(backend.as_ref(), &slot, &tools, "prime_factors", json!({"n": 360})).await;
    assert_eq!(result.output, "[2, 2, 2, 3, 3, 5]");
    let result = call_tool(
        backend.as_ref(),
        &slot,
        &tools,
        "describe",
        json!({"name": "x", "tags": ["a"]}),
    )
    .await;
    assert_eq!(result.output, "describing x\n{\"name\": \"x\", \"tags\": [\"a\"]}");
    assert_eq!(
        call_tool(backend.as_ref(), &slot, &tools, "odd", json!({}))
            .await
            .output,
        "{3}"
    );

    // The function's exception is a clear tool error; the traceback is kept in the cell.
    let result = call_tool(backend.as_ref(), &slot, &tools, "fail", json!({"reason": "no luck"})).await;
    assert!(!result.success);
    assert_eq!(result.error.as_ref().map(|e| e.kind), Some(ErrorKind::CellError));
    assert_eq!(result.output, "`fail` failed: ValueError: no luck");
    let traceback = result
        .cell
        .as_ref()
        .and_then(|c| c.error.as_ref())
        .map(|e| e.traceback.join("\n"))
        .unwrap_or_default();
    assert!(
        traceback.contains("extra.py") && traceback.contains("raise ValueError(reason)"),
        "{traceback}"
    );
    let result = call_tool(backend.as_ref(), &slot, &tools, "prime_factors", json!({"n": 1})).await;
    assert_eq!(
        result.output,
        "`prime_factors` failed: ValueError: n must be an integer from 2 to 10**12"
    );

    // Arguments that do not fit the schema are refused on the host, without running.
    let result = call_tool(backend.as_ref(), &slot, &tools, "convert_length", json!({"value": 1})).await;
    assert_eq!(result.error.as_ref().map(|e| e.kind), Some(ErrorKind::InvalidArguments));
    assert_eq!(
        result.output,
        "`convert_length` needs the argument(s) from_unit; call it again with them"
    );
    let result = call_tool(
        backend.as_ref(),
        &slot,
        &tools,
        "calculator",
        json!({"expression": "1", "precision": 3}),
    )
    .await;
    assert_eq!(
        result.output,
        "`calculator` has no parameter `precision`; its parameters are: expression"
    );

    // Nothing of the tools is in the notebook's globals, and the file was loaded once.
    let probe = "print(sorted(k for k in globals() if 'rollbox' in k or k in ('registry', 'payload', 'prime_factors', 'load_count')))";
    let globals = backend.execute(&slot, rollbox::ToolCall::python(probe)).await;
    assert_eq!(globals.output.trim(), "[]");
    assert_eq!(
        call_tool(backend.as_ref(), &slot, &tools, "load_count", json!({}))
            .await
            .output,
        "1"
    );
    backend.release(&slot, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calculator_answers_arithmetic_and_refuses_everything_else() {
    let backend = backend();
    let slot = backend.acquire("calculator").await.expect("slot");
    let tools = UserTools::calculator_only();
    assert!(backend.execute(&slot, tools.load_call()).await.success);
    let answers = [
        ("2 * (3 + 4) ** 2", "98"),
        ("7 / 2", "3.5"),
        ("-7 // 2", "-4"),
        ("17 % 5", "2"),
        ("0.1 + 0.2", "0.3"),
        ("sqrt(2) / 2", "0.707106781186548"),
        ("2 ** 100", "1267650600228229401496703205376"),
        ("round(hypot(12.5, 7.2), 3)", "14.425"),
        ("log(8, 2) + factorial(5) - comb(5, 2)", "113"),
        ("-(-3) + +2", "5"),
        ("2 * pi", "6.28318530717959"),
    ];
    for (expression, expected) in answers {
        let result = call_tool(
            backend.as_ref(),
            &slot,
            &tools,
            "calculator",
            json!({ "expression": expression }),
        )
        .await;
        assert!(result.success, "{expression}: {result:?}");
        assert_eq!(result.output, expected, "{expression}");
    }
    let long = "1".repeat(1001);
    let refusals = [
        ("__import__('os')", "unknown function `__import__`"),
        (
            "__import__('os').system('ls')",
            "attribute access (`x.y`) is not allowed",
        ),
        ("(lambda: 0)()", "only the listed functions can be called"),
        ("open('/etc/passwd')", "unknown function `open`"),
        ("(1).__class__", "attribute access (`x.y`) is not allowed"),
        ("math.sqrt(4)", "attribute access (`x.y`) is not allowed"),
        ("9 ** 9 ** 9", "would have more than about 1000 digits"),
        ("2 ** 10000", "would have more than about 1000 digits"),
        ("10.0 ** 400", "the result is too large"),
        ("factorial(100000)", "factorial needs an integer from 0 to 450"),
        ("2 ^ 10", "write powers with **"),
        ("1 / 0", "division by zero"),
        ("sqrt(-1)", "sqrt(-1): "),
        ("x", "unknown name `x`"),
        ("'text'", "only numbers are allowed"),
        ("[c for c in ()]", "`ListComp` is not allowed"),
        ("lambda: 0", "`Lambda` is not allowed"),
        ("y = 1", "not a valid expression"),
        (long.as_str(), "the limit is 1000"),
    ];
    for (expression, expected) in refusals {
        let result = call_tool(
            backend.as_ref(),
            &slot,
            &tools,
            "calculator",
            json!({ "expression": expression }),
        )
        .await;
        assert!(!result.success, "{expression} was not refused: {result:?}");
        assert!(
            result.output.starts_with("`calculator` failed: ValueError: "),
            "{expression}: {}",
            result.output
        );
        assert!(result.output.contains(expected), "{expression}: {}", result.output);
    }
    // Nothing the refused expressions named ran: the slot has no `os` and no output leaked.
    let check = backend
        .execute(&slot, rollbox::ToolCall::python("print('os' in globals())"))
        .await;
    assert_eq!(check.output.trim(), "False");
    backend.release(&slot, true).await.expect("release");
}

// ---- user tools in rollouts ----------------------------------------------------------------------

fn tools_config(out: &Path, group_size: usize) -> RolloutConfig {
    let mut config = config(AgentKind::Tools, out, group_size, 4);
    config.agent.user_tools = Arc::new(slot_tools());
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tools_oracle_rollout_calls_user_tools_and_the_calculator() {
    let dataset = load_dataset(&examples_dir().join("tools.jsonl")).expect("tools examples");
    assert_eq!(dataset.errors, vec![]);
    let out = tempfile::tempdir().expect("tempdir");
    let run = run_rollout(
        backend(),
        Arc::new(OraclePolicy),
        &dataset,
        &tools_config(out.path(), 2),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let trajectories = read_trajectories(out.path());
    assert_eq!(trajectories.len(), dataset.problems.len() * 2);
    let failing: Vec<String> = trajectories
        .iter()
        .filter(|t| t.reward.score < 1.0)
        .map(|t| format!("{}: {:#?}", t.trajectory_id, t.steps))
        .collect();
    assert!(failing.is_empty(), "below full reward:\n{}", failing.join("\n"));
    assert_eq!(run.summary.errors_by_kind, Default::default());
    let by_id = |id: &str| {
        trajectories
            .iter()
            .find(|t| t.trajectory_id == id)
            .unwrap_or_else(|| panic!("no {id}"))
    };

    // Two user tools in one message: both ran, each answered by its own tool message.
    let parallel = by_id("tools-004/0");
    let first: Vec<(&str, &str)> = parallel.steps[0]
        .calls
        .iter()
        .map(|c| (c.call.name.as_str(), c.result.output.as_str()))
        .collect();
    assert_eq!(
        first,
        [
            ("convert_length", "3280.839895013123"),
            ("prime_factors", "[7, 11, 13]")
        ]
    );
    assert_eq!(parallel.steps[1].calls[0].result.output, "3311.8");
    let answered: Vec<&str> = parallel
        .messages
        .iter()
        .filter(|m| m.role == Role::Tool)
        .filter_map(|m| m.tool_call_id.as_deref())
        .collect();
    assert_eq!(answered, ["call_0_0", "call_0_1", "call_1_0"]);
    // The calculator and a python block of one message keep their text order.
    let mixed = by_id("tools-005/1");
    let calls: Vec<(&str, &str)> = mixed.steps[0]
        .calls
        .iter()
        .map(|c| (c.call.name.as_str(), c.result.output.trim()))
        .collect();
    assert_eq!(calls, [("calculator", "18446744073709551615"), ("python", "20")]);
}

/// A real backend that records the size of every batch it is given (counted, not mocked).
struct CountingBackend {
    inner: Arc<dyn Backend>,
    batches: Mutex<Vec<Vec<String>>>,
}

#[async_trait::async_trait]
impl Backend for CountingBackend {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn tools(&self) -> Vec<rollbox::ToolName> {
        self.inner.tools()
    }
    async fn acquire(&self, trajectory_id: &str) -> Result<rollbox::Slot, rollbox::BackendError> {
        self.inner.acquire(trajectory_id).await
    }
    async fn execute_batch(&self, calls: Vec<(rollbox::Slot, rollbox::ToolCall)>) -> Vec<rollbox::ExecutionResult> {
        let first_lines = calls
            .iter()
            .map(|(_, c)| {
                c.arguments["code"]
                    .as_str()
                    .unwrap_or(&c.name)
                    .chars()
                    .take(40)
                    .collect()
            })
            .collect();
        self.batches.lock().expect("lock").push(first_lines);
        self.inner.execute_batch(calls).await
    }
    async fn release(&self, slot: &rollbox::Slot, reset_workspace: bool) -> Result<(), rollbox::BackendError> {
        self.inner.release(slot, reset_workspace).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_parallel_tool_calls_run_as_one_batch_with_the_tools_loaded_once() {
    let function = |id: &str, name: &str, arguments: Value| json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments.to_string()}});
    let first = json!({"role": "assistant", "content": null, "tool_calls": [
        function("a", "python", json!({"code": "x = 6"})),
        function("b", "calculator", json!({"expression": "6 * 7"})),
        function("c", "load_count", json!({})),
        function("d", "convert_length", json!({"value": 1})),
        function("e", "no_such_tool", json!({}))
    ]});
    let second = json!({"role": "assistant", "content": null, "tool_calls": [function("f", "load_count", json!({}))]});
    let done = json!({"role": "assistant", "content": "\\boxed{42}"});
    let (url, script) = scripted_server(vec![
        reply(completion(first)),
        reply(completion(second)),
        reply(completion(done)),
    ])
    .await;
    let counting = Arc::new(CountingBackend {
        inner: backend(),
        batches: Mutex::new(Vec::new()),
    });
    let out = tempfile::tempdir().expect("tempdir");
    let dataset = Dataset {
        problems: vec![problem()],
        errors: vec![],
    };
    run_rollout(
        counting.clone(),
        Arc::new(client(&url)),
        &dataset,
        &tools_config(out.path(), 1),
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let trajectory = read_trajectories(out.path()).pop().expect("one trajectory");
    assert_eq!(
        (trajectory.stop_reason, trajectory.reward.score),
        (StopReason::FinalAnswer, 1.0)
    );
    let outputs: Vec<&str> = trajectory.steps[0]
        .calls
        .iter()
        .map(|c| c.result.output.as_str())
        .collect();
    assert_eq!(
        outputs[..4],
        [
            "",
            "42",
            "1",
            "`convert_length` needs the argument(s) from_unit; call it again with them"
        ]
    );
    assert!(outputs[4].contains("no tool named `no_such_tool`"), "{}", outputs[4]);
    assert_eq!(
        trajectory.steps[1].calls[0].result.output, "1",
        "the tools were loaded again"
    );
    // One batch per message: the loader first, then every runnable call in order; the call with
    // bad arguments never reached the backend. The second message needed no loading.
    let batches = counting.batches.lock().expect("lock").clone();
    assert_eq!(batches.len(), 2, "{batches:#?}");
    assert_eq!(batches[0].len(), 5, "{batches:#?}");
    assert!(
        batches[0][0].starts_with("exec(\"import json, sys, types"),
        "{batches:#?}"
    );
    assert_eq!(batches[0][1], "x = 6");
    assert_eq!(batches[0][4], "no_such_tool");
    assert_eq!(batches[1].len(), 1);
    // The model was offered the backend's tools, the calculator and the user tools.
    let requests = script.requests.lock().expect("lock");
    let offered: Vec<&str> = requests[0]["tools"]
        .as_array()
        .expect("tools")
        .iter()
        .filter_map(|t| t["function"]["name"].as_str())
        .collect();
    assert!(
        offered.starts_with(&["python"])
            && offered.ends_with(&[
                "calculator",
                "convert_length",
                "prime_factors",
                "load_count",
                "describe",
                "odd",
                "fail"
            ]),
        "{offered:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oracle_reports_a_bad_tool_call_block_in_a_reference_solution() {
    let bad = Problem {
        reference_solution: Some(vec!["<tool_call>{\"name\": \"calculator\"}</tool_call>".to_owned()]),
        ..problem()
    };
    let messages = [Message::user("hi")];
    let tags = CodeTags::default();
    let request = TurnRequest {
        problem: &bad,
        messages: &messages,
        tools: &[],
        turn: 0,
        agent: AgentKind::Tools,
        code_tags: &tags,
        seed: None,
    };
    let error = OraclePolicy.next_turn(request).await.expect_err("no arguments");
    assert_eq!(error.kind(), "oracle_bad_tool_call");
    assert_eq!(
        error.to_string(),
        "turn 1 of the reference solution of `p` has a bad <tool_call> block: its `arguments` is not an object"
    );
}

// ---- the exact context budget --------------------------------------------------------------------

/// The Qwen tokenizer the truncation tests use (see `scripts/fetch-tokenizer.sh`).
fn test_tokenizer() -> Arc<TokenCounter> {
    static COUNTER: OnceLock<Arc<TokenCounter>> = OnceLock::new();
    COUNTER
        .get_or_init(|| {
            let path = test_tokenizer_path();
            let counter = TokenCounter::from_file(&path, ChatTemplate::qwen_chatml());
            Arc::new(counter.unwrap_or_else(|e| {
                panic!(
                    "the test tokenizer at {} does not load ({e}): run scripts/fetch-tokenizer.sh",
                    path.display()
                )
            }))
        })
        .clone()
}

fn test_tokenizer_path() -> PathBuf {
    std::env::var_os(rollbox::env_vars::TEST_TOKENIZER)
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-data/qwen-tokenizer.json"))
}

/// The first math example, whose reference solution takes two turns.
fn two_turn_problem() -> Dataset {
    let mut dataset = load_dataset(&examples_dir().join("math.jsonl")).expect("math examples");
    dataset
        .problems
        .retain(|p| p.reference_solution.as_ref().is_some_and(|r| r.len() == 2));
    dataset.problems.truncate(1);
    dataset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exact_context_budget_stops_an_oracle_trajectory_before_the_turn_that_exceeds_it() {
    let dataset = two_turn_problem();
    let counter = test_tokenizer();
    let mut agent = AgentConfig::new(AgentKind::Notebook);
    let system = rollbox::rollout::config::default_system_prompt(&agent);
    let opening = [
        Message::system(system),
        Message::user(dataset.problems[0].problem.clone()),
    ];
    let opening_tokens = counter.count_conversation(&opening).expect("count") as u64;

    // A budget the opening fits exactly: the first turn runs, its output pushes the
    // conversation over, and the second turn is never asked for.
    agent.token_counter = Some(counter.clone());
    agent.max_context_tokens = Some(opening_tokens);
    let out = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(AgentKind::Notebook, out.path(), 1, 1);
    cfg.agent = agent.clone();
    let run = run_rollout(
        backend(),
        Arc::new(OraclePolicy),
        &dataset,
        &cfg,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let t = read_trajectories(out.path()).pop().expect("trajectory");
    assert_eq!((t.stop_reason, t.turns), (StopReason::ContextBudget, 1));
    let counted = counter.count_conversation(&t.messages).expect("count") as u64;
    assert_eq!(t.context_tokens, Some(counted));
    assert!(counted > opening_tokens);
    assert_eq!(run.summary.stop_reasons.get("context_budget"), Some(&1));

    // Room for the whole conversation: the trajectory ends on its answer; the last count was
    // the prompt of its last turn, the conversation the first run stopped on.
    let out = tempfile::tempdir().expect("tempdir");
    cfg.out_dir = out.path().to_owned();
    cfg.agent.max_context_tokens = Some(100_000);
    run_rollout(
        backend(),
        Arc::new(OraclePolicy),
        &dataset,
        &cfg,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let t = read_trajectories(out.path()).pop().expect("trajectory");
    assert_eq!((t.stop_reason, t.reward.score), (StopReason::FinalAnswer, 1.0));
    assert_eq!(t.context_tokens, Some(counted));

    // The tools agent's budget counts the tool schemas too: the same opening no longer fits.
    let out = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(AgentKind::Tools, out.path(), 1, 1);
    cfg.agent.system_prompt = opening[0].text().into_owned().into();
    cfg.agent.token_counter = Some(counter);
    cfg.agent.max_context_tokens = Some(opening_tokens);
    run_rollout(
        backend(),
        Arc::new(OraclePolicy),
        &dataset,
        &cfg,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let t = read_trajectories(out.path()).pop().expect("trajectory");
    assert_eq!((t.stop_reason, t.turns), (StopReason::ContextBudget, 0));
    assert!(
        t.context_tokens.is_some_and(|n| n > opening_tokens + 100),
        "{:?}",
        t.context_tokens
    );
}

// ---- scoring in a fresh slot ---------------------------------------------------------------------

/// Problems whose reference solutions are wrong but tamper with the scoring in their slot.
fn gaming_problems() -> Dataset {
    let math = Problem {
        instance_id: "patches-sympy".to_owned(),
        problem: "Simplify sqrt(180).".to_owned(),
        ground_truth: Some("6\\sqrt{5}".to_owned()),
        test_cases: vec![],
        reference_solution: Some(vec![
            "<code>\nimport sympy\nsympy.simplify = lambda expression: 0\n</code>".to_owned(),
            "\\boxed{\\sqrt{7}}".to_owned(),
        ]),
        setup_code: None,
        swe: None,
    };
    let code = Problem {
        instance_id: "patches-isclose".to_owned(),
        problem: "Write area(r), the area of a circle of radius r.".to_owned(),
        ground_truth: None,
        test_cases: vec![
            "import math\nassert math.isclose(area(2.0), 12.566, rel_tol=1e-3)".to_owned(),
            "import math\nassert math.isclose(area(1.0), 3.1416, rel_tol=1e-3)".to_owned(),
        ],
        reference_solution: Some(vec![
            "<code>\nimport math\nPI = 3\n\ndef area(r):\n    return PI * 0 * r\n\nmath.isclose = lambda *args, **kwargs: True\n</code>".to_owned(),
            "\\boxed{done}".to_owned(),
        ]),
        setup_code: None,
        swe: None,
    };
    Dataset {
        problems: vec![math, code],
        errors: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoring_in_a_fresh_slot_defeats_a_policy_that_patches_its_scoring() {
    let dataset = gaming_problems();
    let score = |fresh: bool| {
        let dataset = dataset.clone();
        async move {
            let out = tempfile::tempdir().expect("tempdir");
            let mut cfg = config(AgentKind::Notebook, out.path(), 1, 2);
            cfg.score_in_fresh_slot = fresh;
            run_rollout(
                backend(),
                Arc::new(OraclePolicy),
                &dataset,
                &cfg,
                &SilentRolloutReporter,
                &StopSignal::new(),
            )
            .await
            .expect("rollout");
            let mut trajectories = read_trajectories(out.path());
            trajectories.sort_by(|a, b| a.trajectory_id.cmp(&b.trajectory_id));
            trajectories
                .into_iter()
                .map(|t| (t.trajectory_id, t.reward))
                .collect::<Vec<_>>()
        }
    };
    // In its own slot, each patch wins full reward: the hole the fresh slot closes.
    let own = score(false).await;
    assert!(own.iter().all(|(_, r)| r.score == 1.0 && !r.fresh_slot), "{own:#?}");
    let fresh = score(true).await;
    assert!(fresh.iter().all(|(_, r)| r.score == 0.0 && r.fresh_slot), "{fresh:#?}");
    let RewardBreakdown::Code { failures, .. } = &fresh[0].1.breakdown else {
        panic!("{fresh:#?}")
    };
    assert_eq!(
        failures.iter().map(|f| f.error.as_str()).collect::<Vec<_>>(),
        ["AssertionError: ", "AssertionError: "],
        "{failures:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_code_example_still_scores_full_reward_in_a_fresh_slot() {
    let dataset = load_dataset(&examples_dir().join("code.jsonl")).expect("code examples");
    let out = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(AgentKind::Tools, out.path(), 1, 4);
    cfg.score_in_fresh_slot = true;
    run_rollout(
        backend(),
        Arc::new(OraclePolicy),
        &dataset,
        &cfg,
        &SilentRolloutReporter,
        &StopSignal::new(),
    )
    .await
    .expect("rollout");
    let trajectories = read_trajectories(out.path());
    assert_eq!(trajectories.len(), dataset.problems.len());
    let failing: Vec<String> = trajectories
        .iter()
        .filter(|t| t.reward.score < 1.0 || !t.reward.fresh_slot)
        .map(|t| format!("{}: {:?}", t.trajectory_id, t.reward))
        .collect();
    assert!(failing.is_empty(), "{}", failing.join("\n"));
}

// ---- the new rollout flags, through the real binary ----------------------------------------------

fn rollbox(args: &[&std::ffi::OsStr]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .arg("--quiet")
        .arg("rollout")
        .args(args)
        .output()
        .expect("run rollbox")
}

fn summary_of(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary.json")).expect("json")
}

#[test]
fn the_rollout_command_takes_tools_files_a_tokenizer_budget_and_fresh_slot_scoring() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tools_py = examples_dir().join("tools.py");
    let tools_jsonl = examples_dir().join("tools.jsonl");
    let os = |s: &'static str| std::ffi::OsStr::new(s);

    // The tools examples, offline, scored in fresh slots.
    let out = dir.path().join("tools");
    let run = rollbox(&[
        os("--agent"),
        os("tools"),
        os("--tools-file"),
        tools_py.as_os_str(),
        os("--dataset"),
        tools_jsonl.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--score-in-fresh-slot"),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(summary_of(&out)["mean_reward"], 1.0);
    assert!(read_trajectories(&out).iter().all(|t| t.reward.fresh_slot));

    // An exact budget too small for any prompt stops every trajectory before its first turn.
    let out = dir.path().join("budget");
    let tokenizer = test_tokenizer_path();
    let run = rollbox(&[
        os("--dataset"),
        tools_jsonl.as_os_str(),
        os("--out"),
        out.as_os_str(),
        os("--tokenizer"),
        tokenizer.as_os_str(),
        os("--context-budget"),
        os("10"),
    ]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert_eq!(summary_of(&out)["stop_reasons"], json!({"context_budget": 5}));

    // Usage mistakes are refused before anything runs, saying what to do.
    let bad = dir.path().join("bad_tools.py");
    std::fs::write(&bad, "def calculator(expression: str) -> str:\n    \"\"\"Mine.\"\"\"\n    return expression\n\ndef area(shape):\n    \"\"\"Area.\"\"\"\n").expect("write");
    let out = dir.path().join("refused");
    let cases: [(Vec<&std::ffi::OsStr>, &str); 3] = [
        (
            vec![os("--agent"), os("notebook"), os("--tools-file"), tools_py.as_os_str()],
            "--tools-file needs --agent tools",
        ),
        (
            vec![os("--agent"), os("tools"), os("--tools-file"), bad.as_os_str()],
            "failed to make a tool of `area`",
        ),
        (vec![os("--tokenizer"), tokenizer.as_os_str()], "--context-budget"),
    ];
    for (extra, expected) in cases {
        let mut args = vec![os("--dataset"), tools_jsonl.as_os_str(), os("--out"), out.as_os_str()];
        args.extend(extra);
        let run = rollbox(&args);
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "expected {expected:?} in:\n{stderr}");
    }
    std::fs::write(
        &bad,
        "def calculator(expression: str) -> str:\n    \"\"\"Mine.\"\"\"\n    return expression\n",
    )
    .expect("write");
    let run = rollbox(&[
        os("--agent"),
        os("tools"),
        os("--tools-file"),
        bad.as_os_str(),
        os("--dataset"),
        tools_jsonl.as_os_str(),
        os("--out"),
        out.as_os_str(),
    ]);
    assert!(
        String::from_utf8_lossy(&run.stderr)
            .contains("rename yours, or leave the built-in out (rollout --no-calculator)")
    );
    assert!(!out.exists(), "nothing ran");

    // `rollbox tools` shows the schemas a tools file gives, without running it.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["tools", "--calculator", "--tools-file"])
        .arg(&tools_py)
        .output()
        .expect("run rollbox");
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let schemas: Vec<Value> = serde_json::from_slice(&listed.stdout).expect("JSON");
    let names: Vec<&str> = schemas.iter().filter_map(|s| s["function"]["name"].as_str()).collect();
    assert_eq!(
        names[names.len() - 3..],
        ["calculator", "convert_length", "prime_factors"]
    );
    assert_eq!(
        schemas
            .last()
            .map(|s| s["function"]["parameters"]["properties"]["n"]["type"].clone()),
        Some(json!("integer"))
    );
}

/// In a seeded rollout each model request carries its trajectory's slot seed, the one the
/// trajectory records; an unseeded rollout sends none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_rollout_sends_each_trajectorys_slot_seed_to_the_model() {
    let done = json!({"role": "assistant", "content": "It is \\boxed{42}."});
    let dataset = Dataset {
        problems: vec![problem()],
        errors: vec![],
    };
    for seed in [Some(7), None] {
        let (url, script) = scripted_server(vec![reply(completion(done.clone()))]).await;
        let out = tempfile::tempdir().expect("tempdir");
        let config = RolloutConfig {
            seed,
            ..config(AgentKind::Notebook, out.path(), 2, 2)
        };
        run_rollout(
            backend(),
            Arc::new(client(&url)),
            &dataset,
            &config,
            &SilentRolloutReporter,
            &StopSignal::new(),
        )
        .await
        .expect("rollout");
        let mut sent: Vec<Value> = script
            .requests
            .lock()
            .expect("lock")
            .iter()
            .map(|r| r["seed"].clone())
            .collect();
        sent.sort_by_key(|s| s.as_u64());
        let mut recorded: Vec<Value> = read_trajectories(out.path())
            .iter()
            .map(|t| t.seeds.map_or(Value::Null, |s| json!(s.slot)))
            .collect();
        recorded.sort_by_key(|s| s.as_u64());
        let expected: Vec<Value> = match seed {
            Some(seed) => {
                let mut derived: Vec<u64> = (0..2).map(|s| rollbox::seed::derive_slot_seed(seed, "p", s)).collect();
                derived.sort();
                derived.into_iter().map(|s| json!(s)).collect()
            }
            None => vec![Value::Null, Value::Null],
        };
        assert_eq!(sent, expected);
        assert_eq!(recorded, expected);
    }
}
