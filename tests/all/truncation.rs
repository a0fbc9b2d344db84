//! Conversation truncation: token counts against the real Qwen tokenizer, the Python skeleton,
//! each strategy's guarantees (property tests for the budget), the summarisers and the CLI.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use proptest::prelude::*;
use rollbox::chat::{Content, Message, Role};
use rollbox::truncation::skeleton::{defined_names, python_skeleton};
use rollbox::truncation::{
    self, ChatTemplate, Compacted, CompactionKind, CompactionOptions, FnSummarizer, OpenAiSummarizer, SummaryRequest,
    TokenCounter, TruncationError,
};

// ---------------------------------------------------------------------------------------------
// Shared fixtures

/// The real Qwen tokenizer, fetched by `scripts/fetch-tokenizer.sh`. Missing means the test
/// set-up was skipped, which must fail loudly rather than skip the tests that need it.
fn counter() -> &'static TokenCounter {
    static COUNTER: OnceLock<TokenCounter> = OnceLock::new();
    COUNTER.get_or_init(|| {
        let path = std::env::var_os(rollbox::env_vars::TEST_TOKENIZER)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data/qwen-tokenizer.json"));
        assert!(
            path.is_file(),
            "the Qwen tokenizer is missing at {}: run scripts/fetch-tokenizer.sh first (or set {} to a tokenizer.json)",
            path.display(),
            rollbox::env_vars::TEST_TOKENIZER
        );
        TokenCounter::from_file(&path, ChatTemplate::qwen_chatml()).expect("the test tokenizer loads")
    })
}

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/truncation")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()))
}

fn notebook() -> Vec<Message> {
    serde_json::from_str(&fixture("notebook.json")).expect("notebook.json is a message array")
}

fn cell(name: &str) -> String {
    let cells: serde_json::Value = serde_json::from_str(&fixture("cells.json")).expect("cells.json parses");
    cells[name].as_str().expect("cell exists").to_owned()
}

fn total(messages: &[Message]) -> usize {
    counter().count_conversation(messages).expect("counting works")
}

fn options() -> CompactionOptions {
    CompactionOptions {
        keep_last: 2,
        ..CompactionOptions::default()
    }
}

/// Checks the guarantees every successful compaction gives.
fn assert_guarantees(input: &[Message], result: &Compacted, budget: usize, keep_last: usize) {
    let output = &result.messages;
    assert!(total(output) <= budget, "over budget: {} > {budget}", total(output));
    assert_eq!(
        result.report.tokens_after,
        total(output),
        "the report's count is the real count"
    );
    // The system prompt and first user message, word for word.
    let first_user = input.iter().position(|m| m.role == Role::User).map_or(0, |i| i + 1);
    assert_eq!(&output[..first_user], &input[..first_user]);
    // The last K messages, word for word.
    let k = keep_last.min(input.len() - first_user);
    assert_eq!(&output[output.len() - k..], &input[input.len() - k..]);
    assert_tool_pairs_intact(output);
}

/// Every tool result follows the call it answers, and every kept call keeps all its results.
fn assert_tool_pairs_intact(messages: &[Message]) {
    for (index, message) in messages.iter().enumerate() {
        if message.role == Role::Tool {
            let id = message.tool_call_id.as_deref().expect("tool results carry an id");
            let call = messages[..index]
                .iter()
                .rev()
                .find(|m| m.role != Role::Tool)
                .expect("a call precedes");
            assert!(
                call.tool_calls().iter().any(|c| c.id == id),
                "tool result {id} lost its call"
            );
        }
        for call in message.tool_calls() {
            let answered = messages[index + 1..]
                .iter()
                .take_while(|m| m.role == Role::Tool)
                .any(|m| m.tool_call_id.as_deref() == Some(call.id.as_str()));
            assert!(answered, "tool call {} lost its result", call.id);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Token counts

/// Reference counts computed once with Hugging Face's own `tokenizers` Python package (0.23.3,
/// installed in a throwaway venv) on the same tokenizer.json:
/// `len(Tokenizer.from_file(path).encode(text, add_special_tokens=False).ids)`.
#[test]
fn qwen_counts_match_hugging_face() {
    let samples: [(&str, usize); 6] = [
        ("The quick brown fox jumps over the lazy dog.", 10),
        (
            "import numpy as np\n\ndef mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)\n\nprint(f\"{mean([1.0, 2.5]):.3f}\")\n",
            42,
        ),
        ("你好，世界！今天天气很好。", 8),
        ("  tabs\t\tand   spaces 🚀🚀\n\n\nend", 12),
        ("before<|im_end|>after", 3),
        (
            "Traceback (most recent call last):\n  File \"<cell>\", line 1, in <module>\nNameError: name 'df' is not defined",
            31,
        ),
    ];
    for (text, expected) in samples {
        assert_eq!(counter().count_text(text).expect("counts"), expected, "for {text:?}");
    }
}

/// `count_text` runs the tokenizer's steps itself and skips the normal form for ASCII text; on
/// every kind of text it must agree with the library's full `encode`.
#[test]
fn counting_agrees_with_full_encoding() {
    let tokenizer = tokenizers::Tokenizer::from_file(tokenizer_path()).expect("tokenizer loads");
    let mut samples: Vec<String> = [
        "plain ascii words, punctuation; and 12345 digits",
        "cafe\u{301} vs caf\u{e9}: decomposed and composed accents",
        "\u{212b}ngstr\u{f6}m \u{fb01}ligature \u{2460} circled",
        "<|im_start|>user\nhello<|im_end|>\n<|endoftext|>",
        "mixed 中文 and emoji 🚀 and\r\nwindows lines\ttabs",
        "",
        "   ",
        "def f(x):\n    return x  # comment\n\n\n",
        "I'LL say don't, it's we've they'd   \t\r\n\r\n  trailing   ",
        "1234567890 3.14159 x1y2z3 0xFF __init__ ...!!! ??? ->>= {}[]()",
        "Names defined by code in the removed turns, still live in the notebook: pd, np, frame_1, x_, _y, Model12, evaluate_3",
        "\u{7f}\u{1}\u{1b}[31mcontrol bytes\u{1b}[0m\u{0}",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    samples.push(notebook().iter().map(|m| m.text()).collect::<Vec<_>>().join("\n"));
    for text in &samples {
        let expected = tokenizer.encode(text.as_str(), false).expect("encodes").len();
        assert_eq!(counter().count_text(text).expect("counts"), expected, "for {text:?}");
    }
}

/// The same Python check on the ChatML rendering `<|im_start|>{role}\n{content}<|im_end|>\n` of
/// these four messages, plus `<|im_start|>assistant\n`, gives 78 tokens.
#[test]
fn chatml_overhead_matches_the_rendered_prompt() {
    let messages = vec![
        Message::system("You are a helpful notebook agent."),
        Message::user("Load the data and plot it."),
        Message::assistant("Sure.\n<code>\nimport pandas as pd\ndf = pd.read_csv('data.csv')\n</code>"),
        Message::user("<output>\n   a  b\n0  1  2\n</output>"),
    ];
    assert_eq!(total(&messages), 78);
    let one_by_one: usize = messages
        .iter()
        .map(|m| counter().count_message(m).expect("counts"))
        .sum();
    assert_eq!(
        one_by_one + counter().generation_prompt_tokens(),
        78,
        "single and batch counts agree"
    );
}

/// Python reference: the Qwen rendering of an assistant tool call and its tool response is 39
/// tokens. Counting the content and the call apart can split a `.\n` pair the tokenizer would
/// merge, so the count may be one token high per call, never low.
#[test]
fn tool_calls_are_counted_never_under() {
    let messages = vec![
        Message::assistant("Running it.").with_tool_call("call_1", "python", r#"{"code": "x = 1"}"#),
        Message::tool("call_1", "1"),
    ];
    let counts = counter().count_messages(&messages).expect("counts");
    let sum: usize = counts.iter().sum();
    assert!((39..=40).contains(&sum), "counted {sum}, reference 39");
}

#[test]
fn missing_tokenizer_is_a_typed_error() {
    let error = TokenCounter::from_file("/nonexistent/tokenizer.json", ChatTemplate::qwen_chatml()).unwrap_err();
    assert!(matches!(error, TruncationError::LoadTokenizer { .. }));
    assert!(
        error
            .to_string()
            .starts_with("failed to load tokenizer from /nonexistent/tokenizer.json")
    );
}

// ---------------------------------------------------------------------------------------------
// Chat types

#[test]
fn chat_messages_round_trip_without_loss() {
    let json = serde_json::json!([
        {"role": "system", "content": "s", "cache_control": {"type": "ephemeral"}},
        {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "data:,"}}]},
        {"role": "assistant", "content": null, "reasoning_content": "hmm",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "python", "arguments": "{\"code\": \"1\"}"}, "index": 0}]},
        {"role": "tool", "tool_call_id": "c1", "name": "python", "content": "1"},
        {"role": "critic", "content": "fine"}
    ]);
    let messages: Vec<Message> = serde_json::from_value(json.clone()).expect("parses");
    assert_eq!(messages[4].role, Role::Other("critic".to_owned()));
    assert_eq!(messages[1].text(), "look");
    assert!(matches!(messages[1].content, Some(Content::Parts(ref parts)) if parts.len() == 2));
    assert_eq!(serde_json::to_value(&messages).expect("serialises"), json);
}

// ---------------------------------------------------------------------------------------------
// Python skeleton

#[test]
fn skeleton_keeps_imports_assignments_and_fstring_cells_parse() {
    let skeleton = python_skeleton(&cell("imports_and_frame"));
    assert!(skeleton.parsed);
    assert_eq!(
        skeleton.names,
        ["pd", "np", "P", "PurePath", "os", "DATA", "df", "rows", "cols"]
    );
    let expected = "import pandas as pd\nimport numpy as np\nfrom pathlib import Path as P, PurePath\nimport os.path\n\
                    DATA = ...\ndf = ...\ndf[\"total\"] = ...\nrows, cols = ...\n\
                    # [rollbox: cell compacted to its skeleton, 2 of 10 lines omitted]";
    assert_eq!(skeleton.text, expected);
}

#[test]
fn skeleton_of_classes_decorators_and_nested_functions() {
    let skeleton = python_skeleton(&cell("class_nested"));
    assert!(skeleton.parsed);
    assert_eq!(skeleton.names, ["dataclass", "Forecast", "fit", "model"]);
    let expected = "from dataclasses import dataclass\n\
                    @dataclass(frozen=True)\n\
                    class Forecast:\n    \"\"\"A fitted forecast.\"\"\"\n\
                    \x20   horizon: int\n    label: str = ...\n\
                    \x20   def predict(self, xs):\n        \"\"\"Predict for each x.\"\"\"\n        ...\n\
                    \x20   @property\n    def name(self) -> str:\n        ...\n\
                    def fit(frame, horizon=7):\n    ...\n\
                    model = ...\n";
    assert!(skeleton.text.starts_with(expected), "got:\n{}", skeleton.text);
    assert!(
        !skeleton.text.contains("smooth"),
        "nested functions are body, not skeleton"
    );
}

#[test]
fn skeleton_of_async_code_and_module_level_blocks() {
    let skeleton = python_skeleton(&cell("async_code"));
    assert!(skeleton.parsed);
    assert_eq!(
        skeleton.names,
        [
            "asyncio",
            "fetch",
            "crawl",
            "attempt",
            "status",
            "log_file",
            "first_line",
            "pl"
        ]
    );
    assert!(
        skeleton
            .text
            .contains("async def fetch(session, url: str) -> bytes:\n    \"\"\"Fetch one URL.\"\"\"\n    ...\n")
    );
    assert!(skeleton.text.contains("async def crawl(urls):\n    ...\n"));
    assert!(
        skeleton
            .text
            .contains("for attempt in ...: ...\nstatus = ...\nwith ... as log_file: ...\nfirst_line = ...\n")
    );
    assert!(skeleton.text.contains("import polars as pl\npl = ...\n"));
}

#[test]
fn unparseable_cells_fall_back_to_a_line_skeleton() {
    let skeleton = python_skeleton(&cell("syntax_error"));
    assert!(!skeleton.parsed);
    assert_eq!(skeleton.names, ["broken", "threshold", "math", "Half"]);
    assert_eq!(
        skeleton.text,
        "def broken(x:\nthreshold = ...\nimport math\nclass Half(\n\
         # [rollbox: cell compacted to its skeleton, 1 of 5 lines omitted; the cell did not parse, so this skeleton is line-based]"
    );
}

#[test]
fn ipython_magics_are_kept_and_the_rest_still_parses() {
    let skeleton = python_skeleton(&cell("magics"));
    assert!(skeleton.parsed, "magic lines are commented out before parsing");
    assert_eq!(skeleton.names, ["sns", "palette"]);
    assert!(skeleton.text.starts_with(
        "%matplotlib inline\n!pip install -q seaborn\n%time sns.set_theme()\nimport seaborn as sns\npalette = ...\n"
    ));
}

#[test]
fn cells_without_definitions_are_never_dropped_silently() {
    let skeleton = python_skeleton("print(1)\nprint(2)\n");
    assert_eq!(
        skeleton.text,
        "# [rollbox: cell compacted to its skeleton, 2 of 2 lines omitted]"
    );
}

// ---------------------------------------------------------------------------------------------
// Strategies

#[test]
fn input_that_fits_is_returned_unchanged() {
    let input = notebook();
    let budget = total(&input);
    for result in [
        truncation::first_user_priority(&input, budget, counter(), &options()),
        truncation::ast_compaction(&input, budget, counter(), &options()),
    ] {
        let result = result.expect("fits");
        assert_eq!(result.messages, input);
        assert!(result.report.compacted.is_empty() && result.report.dropped.is_none());
    }
}

#[test]
fn first_user_priority_drops_the_middle_behind_a_marker() {
    let input = notebook();
    let budget = 700;
    let result = truncation::first_user_priority(&input, budget, counter(), &options()).expect("fits");
    assert_guarantees(&input, &result, budget, 2);
    let dropped = result.report.dropped.expect("something was dropped");
    let marker = result.messages[2].text();
    assert!(
        marker.starts_with(&format!(
            "[rollbox: {} earlier messages ({} turns, {} characters) were removed",
            dropped.messages, dropped.turns, dropped.chars
        )),
        "marker: {marker}"
    );
    // The kept middle is the most recent part of the input, word for word.
    let kept = &result.messages[3..];
    assert_eq!(kept, &input[input.len() - kept.len()..]);
}

#[test]
fn ast_compaction_compacts_oldest_first_and_only_as_needed() {
    let input = notebook();
    // Just under the input: compacting the first cell (21 tokens saved) is enough.
    let budget = total(&input) - 15;
    let result = truncation::ast_compaction(&input, budget, counter(), &options()).expect("fits");
    assert_guarantees(&input, &result, budget, 2);
    assert!(result.report.dropped.is_none());
    let indices: Vec<usize> = result.report.compacted.iter().map(|c| c.index).collect();
    assert_eq!(indices, [2], "only the oldest cell was needed");
    assert_eq!(result.messages[3..], input[3..]);
    assert!(result.messages[2].text().contains("df = ..."));
}

#[test]
fn ast_compaction_skeletons_every_cell_kind_and_trims_outputs() {
    let input = notebook();
    let budget = 900;
    let result = truncation::ast_compaction(&input, budget, counter(), &options()).expect("fits");
    assert_guarantees(&input, &result, budget, 2);
    assert!(
        result.report.dropped.is_none(),
        "compaction alone suffices: {:?}",
        result.report
    );
    let kinds: Vec<(usize, CompactionKind)> = result.report.compacted.iter().map(|c| (c.index, c.kind)).collect();
    assert!(kinds.contains(&(3, CompactionKind::OutputTrimmed)));
    assert!(kinds.contains(&(5, CompactionKind::OutputTrimmed)));
    for code in [2, 4, 6] {
        assert!(
            kinds.contains(&(code, CompactionKind::CodeSkeleton)),
            "cell {code} compacted: {kinds:?}"
        );
    }
    // The broken cell and the magics cell are so short their skeleton would be no smaller.
    assert_eq!(result.messages[8..11], input[8..11]);
    let output = result.messages[3].text();
    // Head and tail count the `<output>` wrapper lines too.
    assert!(
        output.contains("row 3: value=9\n[... 192 lines omitted ...]\nrow 196: value=38416"),
        "{output}"
    );
    // A traceback keeps only the error's last line.
    let traceback = result.messages[5].text();
    assert!(traceback.contains(
        "[... 5 traceback lines omitted ...]\nTypeError: unsupported operand type(s) for +: 'int' and 'str'"
    ));
    // Prose of older assistant turns stays.
    assert!(
        result.messages[4]
            .text()
            .starts_with("Now a small forecasting class.\n```python\nfrom dataclasses import dataclass\n")
    );
    assert!(result.messages[4].text().ends_with("```\nLet me run it."));
}

#[test]
fn python_tool_call_code_is_compacted_too() {
    let arguments = serde_json::json!({"code": cell("class_nested"), "timeout": 30}).to_string();
    let input = vec![
        Message::system("sys"),
        Message::user("task"),
        Message {
            content: None,
            ..Message::assistant("")
        }
        .with_tool_call("c1", "python", arguments),
        Message::tool("c1", "ok"),
        Message::assistant("done"),
        Message::user("thanks"),
    ];
    let budget = total(&input) - 20;
    let result = truncation::ast_compaction(&input, budget, counter(), &options()).expect("fits");
    assert_guarantees(&input, &result, budget, 2);
    let call = &result.messages[2].tool_calls()[0];
    let arguments: serde_json::Value = serde_json::from_str(&call.function.arguments).expect("still JSON");
    assert!(
        arguments["code"]
            .as_str()
            .expect("code")
            .contains("class Forecast:\n    \"\"\"A fitted forecast.\"\"\"")
    );
    assert_eq!(arguments["timeout"], 30, "other arguments are kept");
}

#[test]
fn every_name_defined_in_compacted_or_dropped_cells_still_appears() {
    let input = notebook();
    let all_names: Vec<String> = [
        "imports_and_frame",
        "class_nested",
        "async_code",
        "syntax_error",
        "magics",
    ]
    .iter()
    .flat_map(|name| defined_names(&cell(name)))
    .collect();
    let full = total(&input);
    for budget in [full - 2200, 900, 600, 300] {
        let result = truncation::ast_compaction(&input, budget, counter(), &options()).expect("fits");
        assert_guarantees(&input, &result, budget, 2);
        let text: String = result
            .messages
            .iter()
            .map(|m| {
                let code: String = m
                    .tool_calls()
                    .iter()
                    .map(|c| {
                        serde_json::from_str::<serde_json::Value>(&c.function.arguments).expect("JSON")["code"]
                            .to_string()
                    })
                    .collect();
                format!("{}\n{}", m.text(), code.replace("\\n", "\n"))
            })
            .collect();
        for name in &all_names {
            let word = regex::Regex::new(&format!(r"\b{}\b", regex::escape(name))).expect("valid");
            assert!(word.is_match(&text), "name {name} vanished at budget {budget}");
        }
    }
}

#[test]
fn dropped_code_names_are_listed_in_the_marker() {
    let input = notebook();
    let result = truncation::ast_compaction(&input, 600, counter(), &options()).expect("fits");
    assert!(result.report.dropped.is_some());
    let marker = result.messages[2].text();
    assert!(
        marker.contains("Names defined by code in the removed turns, still live in the notebook: pd, np,"),
        "{marker}"
    );
}

#[test]
fn same_input_gives_the_same_output() {
    let input = notebook();
    for budget in [total(&input) - 100, 900, 600] {
        let first = truncation::ast_compaction(&input, budget, counter(), &options()).expect("fits");
        let second = truncation::ast_compaction(&input, budget, counter(), &options()).expect("fits");
        assert_eq!(first, second);
    }
}

/// The counter's caches (counts and skeletons) change what is tokenised, never the result.
#[test]
fn a_fresh_counter_and_a_warm_one_give_the_same_result() {
    let input = notebook();
    let fresh = TokenCounter::from_file(tokenizer_path(), ChatTemplate::qwen_chatml()).expect("loads");
    for budget in [total(&input), total(&input) - 100, 900, 600] {
        let warm = truncation::ast_compaction(&input, budget, counter(), &options()).expect("fits");
        let cold = truncation::ast_compaction(&input, budget, &fresh, &options()).expect("fits");
        assert_eq!(warm, cold, "at budget {budget}");
    }
}

/// Removed text is not tokenised, so the report gives its characters, and the input's tokens
/// only when it was all counted (it fit).
#[test]
fn removal_reports_characters_and_counts_the_input_only_when_it_fits() {
    let input = notebook();
    let fits = truncation::first_user_priority(&input, total(&input), counter(), &options()).expect("fits");
    assert_eq!(fits.report.tokens_before, Some(total(&input)));
    let cut = truncation::first_user_priority(&input, 700, counter(), &options()).expect("fits");
    assert_eq!(cut.report.tokens_before, None);
    let dropped = cut.report.dropped.expect("something was dropped");
    let removed = &input[2..2 + dropped.messages];
    let chars: usize = removed
        .iter()
        .map(|m| {
            m.text().chars().count()
                + m.tool_calls()
                    .iter()
                    .map(|c| c.function.arguments.chars().count())
                    .sum::<usize>()
        })
        .sum();
    assert_eq!(dropped.chars, chars);
}

#[test]
fn a_tool_call_is_never_separated_from_its_result() {
    let mut input = vec![Message::system("sys"), Message::user("task")];
    for turn in 0..30 {
        let id = format!("call_{turn}");
        input.push(Message::assistant(format!("step {turn}")).with_tool_call(&id, "python", r#"{"code": "x = 1"}"#));
        input.push(Message::tool(&id, "1\n".repeat(turn)));
    }
    // keep_last = 1 would start the tail at a tool result; the tail takes its call along.
    let opts = CompactionOptions {
        keep_last: 1,
        ..CompactionOptions::default()
    };
    for budget in (200..total(&input)).step_by(37) {
        for result in [
            truncation::first_user_priority(&input, budget, counter(), &opts),
            truncation::ast_compaction(&input, budget, counter(), &opts),
        ] {
            assert_guarantees(&input, &result.expect("fits"), budget, 1);
        }
    }
}

#[test]
fn too_small_a_budget_says_what_the_kept_parts_need() {
    let input = notebook();
    let error = truncation::ast_compaction(&input, 100, counter(), &options()).unwrap_err();
    let TruncationError::BudgetTooSmall { budget, required } = error else {
        panic!("wrong error: {error}")
    };
    assert_eq!(budget, 100);
    assert!(error.to_string().contains(&format!("need {required} tokens")));
    // `required` is exact: that budget works, one less does not.
    assert!(truncation::ast_compaction(&input, required, counter(), &options()).is_ok());
    assert!(truncation::ast_compaction(&input, required - 1, counter(), &options()).is_err());
}

// ---------------------------------------------------------------------------------------------
// llm_compaction and the summarisers

fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(future)
}

#[test]
fn llm_compaction_summarises_the_older_middle() {
    let input = notebook();
    // AST compaction alone reaches 774 tokens, so 600 needs the summary.
    let budget = 600;
    let seen = Arc::new(Mutex::new(None));
    let seen_in_callback = Arc::clone(&seen);
    let summarizer = FnSummarizer(move |request: SummaryRequest| {
        let seen = Arc::clone(&seen_in_callback);
        async move {
            *seen.lock().expect("not poisoned") = Some((request.messages.len(), request.max_tokens));
            Ok::<_, std::io::Error>("Loaded sales data into df; Forecast class failed on str input.".to_owned())
        }
    });
    let result = block_on(truncation::llm_compaction(
        &input,
        budget,
        counter(),
        &options(),
        &summarizer,
    ))
    .expect("fits");
    assert_guarantees(&input, &result, budget, 2);
    let span = result.report.summarized.expect("summarised");
    assert_eq!(seen.lock().expect("not poisoned").map(|(n, _)| n), Some(span.messages));
    let summary = result.messages[2].text();
    assert!(summary.contains("Loaded sales data into df"));
    assert!(
        summary.contains("still live in the notebook: pd, np, P, PurePath, os, DATA, df"),
        "{summary}"
    );
}

#[test]
fn llm_compaction_falls_back_to_ast_when_the_model_fails() {
    let input = notebook();
    let budget = 600;
    let failing =
        FnSummarizer(|_: SummaryRequest| async { Err::<String, _>(std::io::Error::other("model overloaded")) });
    let result = block_on(truncation::llm_compaction(
        &input,
        budget,
        counter(),
        &options(),
        &failing,
    ))
    .expect("never an error");
    let ast = truncation::ast_compaction(&input, budget, counter(), &options()).expect("fits");
    assert_eq!(result.messages, ast.messages);
    assert_eq!(
        result.report.summarizer_failure.as_deref(),
        Some("summariser callback failed: model overloaded")
    );
    // A summary longer than the room it was given is not used either.
    let verbose = FnSummarizer(|_: SummaryRequest| async { Ok::<_, std::io::Error>("word ".repeat(5000)) });
    let result = block_on(truncation::llm_compaction(
        &input,
        budget,
        counter(),
        &options(),
        &verbose,
    ))
    .expect("never an error");
    assert_eq!(result.messages, ast.messages);
    assert!(
        result
            .report
            .summarizer_failure
            .expect("fell back")
            .contains("more than the")
    );
}

/// A scripted OpenAI-compatible server on 127.0.0.1: it answers with canned responses (no model
/// runs) and records the requests it received.
async fn scripted_server(status: u16, body: serde_json::Value) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    use axum::http::StatusCode;
    let received = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&received);
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |axum::Json(request): axum::Json<serde_json::Value>| {
            let log = Arc::clone(&log);
            let body = body.clone();
            async move {
                log.lock().expect("not poisoned").push(request);
                (StatusCode::from_u16(status).expect("valid status"), axum::Json(body))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binds");
    let address = listener.local_addr().expect("has an address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), received)
}

#[test]
fn openai_summarizer_against_a_scripted_server() {
    block_on(async {
        let input = notebook();
        let answer =
            serde_json::json!({"choices": [{"message": {"role": "assistant", "content": "Scripted summary."}}]});
        let (base, received) = scripted_server(200, answer).await;
        let summarizer = OpenAiSummarizer::new(&base, "qwen-summary")
            .expect("client")
            .with_api_key("test-key");
        let result = truncation::llm_compaction(&input, 600, counter(), &options(), &summarizer)
            .await
            .expect("fits");
        assert!(result.messages[2].text().contains("Scripted summary."));
        let requests = received.lock().expect("not poisoned").clone();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0]["model"], "qwen-summary");
        assert_eq!(requests[0]["temperature"], 0);
        assert!(requests[0]["max_tokens"].as_u64().expect("max_tokens") > 0);
        assert!(
            requests[0]["messages"][1]["content"]
                .as_str()
                .expect("transcript")
                .contains("[assistant]")
        );

        let (base, _) = scripted_server(500, serde_json::json!({"error": "boom"})).await;
        let summarizer = OpenAiSummarizer::new(&base, "m").expect("client");
        let result = truncation::llm_compaction(&input, 600, counter(), &options(), &summarizer)
            .await
            .expect("falls back");
        assert_eq!(
            result.report.summarizer_failure.as_deref(),
            Some("summariser endpoint answered HTTP 500")
        );
        assert!(result.report.dropped.is_some());
    });
}

// ---------------------------------------------------------------------------------------------
// Property tests

fn arbitrary_message() -> impl Strategy<Value = Vec<Message>> {
    let code = prop::sample::select(vec![
        "imports_and_frame",
        "class_nested",
        "async_code",
        "syntax_error",
        "magics",
    ]);
    prop_oneof![
        (code.clone(), "[a-z ]{0,40}")
            .prop_map(|(name, prose)| vec![Message::assistant(format!("{prose}\n<code>\n{}</code>", cell(name)))]),
        (1usize..80).prop_map(|lines| vec![Message::user(format!(
            "<output>\n{}</output>",
            "line of output 123\n".repeat(lines)
        ))]),
        ("[a-z ]{1,200}").prop_map(|text| vec![Message::assistant(text)]),
        ("[a-z ]{1,60}").prop_map(|text| vec![Message::user(text)]),
        (code, 0usize..40, any::<u16>()).prop_map(|(name, lines, id)| {
            let id = format!("call_{id}");
            let arguments = serde_json::json!({ "code": cell(name) }).to_string();
            vec![
                Message {
                    content: None,
                    ..Message::assistant("")
                }
                .with_tool_call(&id, "python", arguments),
                Message::tool(&id, "out\n".repeat(lines)),
            ]
        }),
    ]
}

fn arbitrary_conversation() -> impl Strategy<Value = Vec<Message>> {
    prop::collection::vec(arbitrary_message(), 0..30).prop_map(|turns| {
        let mut messages = vec![
            Message::system("You are a notebook agent."),
            Message::user("Analyse the data."),
        ];
        messages.extend(turns.into_iter().flatten());
        messages
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn never_over_budget_and_head_kept(input in arbitrary_conversation(), budget in 40usize..6000, keep_last in 0usize..5, strategy in 0u8..2) {
        let opts = CompactionOptions { keep_last, ..CompactionOptions::default() };
        let result = match strategy {
            0 => truncation::first_user_priority(&input, budget, counter(), &opts),
            _ => truncation::ast_compaction(&input, budget, counter(), &opts),
        };
        match result {
            Ok(result) => {
                prop_assert!(total(&result.messages) <= budget);
                prop_assert_eq!(&result.messages[..2], &input[..2]);
                assert_guarantees(&input, &result, budget, keep_last);
            }
            Err(TruncationError::BudgetTooSmall { required, .. }) => prop_assert!(required > budget),
            Err(other) => prop_assert!(false, "unexpected error: {other}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CLI

fn tokenizer_path() -> PathBuf {
    let _ = counter(); // fails with the fetch hint when missing
    std::env::var_os(rollbox::env_vars::TEST_TOKENIZER)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data/qwen-tokenizer.json"))
}

fn run_compact(stdin: &str, extra: &[&str]) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let tokenizer = tokenizer_path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .arg("compact")
        .arg("--tokenizer")
        .arg(&tokenizer)
        // A tokenizer.json alone has no template of its own: name the built-in one, as `auto`
        // would fall back to it with a warning on stderr.
        .args(["--chat-template", "qwen"])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rollbox runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("writes stdin");
    child.wait_with_output().expect("rollbox finishes")
}

#[test]
fn cli_compacts_stdin_to_stdout_with_a_report() {
    let input = fixture("notebook.json");
    let output = run_compact(
        &input,
        &[
            "--max-tokens",
            "600",
            "--strategy",
            "ast_compaction",
            "--keep-last",
            "2",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stderr: {stderr}");
    let messages: Vec<Message> = serde_json::from_slice(&output.stdout).expect("stdout is a message array");
    assert!(total(&messages) <= 600);
    let library = truncation::ast_compaction(&notebook(), 600, counter(), &options()).expect("fits");
    assert_eq!(messages, library.messages, "the CLI and the library agree");
    assert!(
        stderr.starts_with("rollbox compact: ast_compaction to 600 tokens\n  tokens:   "),
        "{stderr}"
    );
    assert!(stderr.contains("compacted:") && stderr.contains("removed:"), "{stderr}");
}

#[test]
fn cli_keeps_an_object_document_and_its_other_fields() {
    let document = format!(r#"{{"id": "rollout-7", "messages": {}}}"#, fixture("notebook.json"));
    let output = run_compact(&document, &["--max-tokens", "900", "--strategy", "first-user-priority"]);
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&output.stdout).expect("stdout is JSON");
    assert_eq!(value["id"], "rollout-7");
    assert!(value["messages"].as_array().expect("messages").len() < notebook().len());
}

#[test]
fn cli_reports_a_budget_too_small_with_a_hint() {
    let output = run_compact(&fixture("notebook.json"), &["--max-tokens", "50"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("error: failed to fit the conversation into 50 tokens"),
        "{stderr}"
    );
    assert!(stderr.contains("hint: pass --max-tokens "), "{stderr}");
    assert!(output.stdout.is_empty());
}
