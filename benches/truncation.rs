//! Compacting a generated ~128k-token, ~200-turn notebook conversation to 16k tokens.
//!
//! Needs the real Qwen tokenizer: run `scripts/fetch-tokenizer.sh` first (or set
//! ROLLBOX_TEST_TOKENIZER). Run with `cargo bench --bench truncation`.
//!
//! Two groups: `compact_128k_to_16k` counts with the built-in ChatML template;
//! `compact_128k_to_16k_jinja` renders the Qwen3 model's own chat template (its
//! `tokenizer_config.json`, fetched by the same script) with minijinja, for the same rows.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use rollbox::chat::Message;
use rollbox::env_vars;
use rollbox::truncation::{
    self, ChatTemplate, Compacted, CompactionOptions, TemplateChoice, TokenCounter, TruncationError,
};

const BUDGET: usize = 16_000;
const TURNS: usize = 200;
/// Rows each cell prints; with `TURNS` this makes the input about 128k Qwen tokens.
const OUTPUT_ROWS: usize = 10;

/// Aborts the bench unless a compaction succeeded and fits the budget. Checked inside the timed
/// routine (a comparison, next to milliseconds of work), so a failing call is never counted.
fn fits(result: Result<Compacted, TruncationError>) -> Compacted {
    let compacted = result.unwrap_or_else(|error| panic!("compaction failed: {error}"));
    assert!(
        compacted.report.tokens_after <= BUDGET,
        "compaction left {} tokens, over the budget of {BUDGET}",
        compacted.report.tokens_after
    );
    compacted
}

/// The Qwen3 model folder with its own Jinja chat template.
fn jinja_counter() -> TokenCounter {
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data/models/qwen3");
    assert!(
        folder.join("tokenizer_config.json").is_file(),
        "missing {}: run scripts/fetch-tokenizer.sh first",
        folder.display()
    );
    let counter = TokenCounter::from_model(&folder, &TemplateChoice::Auto).expect("the model folder loads");
    assert!(
        counter.counting().is_some(),
        "the Qwen3 folder's Jinja template is used"
    );
    counter
}

fn counter() -> TokenCounter {
    let path = std::env::var_os(env_vars::TEST_TOKENIZER)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data/qwen-tokenizer.json"));
    assert!(
        path.is_file(),
        "missing {}: run scripts/fetch-tokenizer.sh first",
        path.display()
    );
    TokenCounter::from_file(&path, ChatTemplate::qwen_chatml()).expect("tokenizer loads")
}

/// A code cell that varies with `turn`, so no two cells (and no two tokenizer cache entries)
/// are identical: imports, a class, functions, assignments and some plain statements.
fn code_cell(turn: usize) -> String {
    format!(
        r#"import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

FEATURES_{turn} = ["price", "qty", "region_{turn}", "week"]
frame_{turn} = pd.read_csv(f"data/part_{turn}.csv", parse_dates=["week"])
frame_{turn}["total"] = frame_{turn}["price"] * frame_{turn}["qty"]

@dataclass
class Model{turn}:
    """Gradient-boosted model for partition {turn}.

    Trained on the weekly aggregates.
    """
    depth: int = {depth}

    def fit(self, x, y):
        """Fit on x, y."""
        self.mean_ = float(np.mean(y)) + {turn}
        return self

    def predict(self, x):
        return np.full(len(x), self.mean_)

def evaluate_{turn}(model, x, y):
    """Mean absolute error."""
    return float(np.mean(np.abs(model.predict(x) - y)))

x_train, x_test, y_train, y_test = train_test_split(frame_{turn}[FEATURES_{turn}], frame_{turn}["total"])
score_{turn} = evaluate_{turn}(Model{turn}().fit(x_train, y_train), x_test, y_test)
print(f"partition {turn}: mae={{score_{turn}:.3f}}")
"#,
        depth = turn % 7 + 2
    )
}

fn cell_output(turn: usize) -> String {
    let mut text = String::from("<output>\n");
    for row in 0..OUTPUT_ROWS {
        text.push_str(&format!(
            "week {row:>2} region_{turn} total={:>10.2} mae={:.4}\n",
            (turn * 97 + row * 13) as f64 * 1.37,
            (row as f64 + 1.0) / (turn as f64 + 3.0)
        ));
    }
    if turn % 10 == 3 {
        text.push_str("Traceback (most recent call last):\n  File \"<cell>\", line 12, in <module>\n    score = evaluate(model, x, y)\n  File \"<cell>\", line 4, in evaluate\n    return float(np.mean(np.abs(model.predict(x) - y)))\nValueError: operands could not be broadcast together with shapes (120,) (121,)\n");
    }
    text.push_str("</output>");
    text
}

/// The opening messages: system prompt and task.
fn opening() -> Vec<Message> {
    vec![
        Message::system(
            "You are a data-science agent in a stateful Jupyter notebook. Put code in <code>...</code> blocks; outputs come back as <output> messages.",
        ),
        Message::user("Build a weekly sales forecast for every region partition and report the error of each."),
    ]
}

/// Turn `turn`: an assistant cell, then its output as a user message (the notebook recipe's
/// format).
fn turn_messages(turn: usize) -> [Message; 2] {
    [
        Message::assistant(format!(
            "Partition {turn}: I load it, fit the model and evaluate it.\n<code>\n{}</code>",
            code_cell(turn)
        )),
        Message::user(cell_output(turn)),
    ]
}

/// The conversation: system prompt, task, then `TURNS` turns, ending with a question.
fn notebook_conversation() -> Vec<Message> {
    let mut messages = opening();
    messages.extend((0..TURNS).flat_map(turn_messages));
    messages.push(Message::assistant(
        "All partitions are evaluated. Summarise the errors?",
    ));
    messages.push(Message::user("Yes, and plot the worst five."));
    messages
}

/// The rollout loop's input at each call: the opening and `TURNS` turns, each call with one new
/// turn that no counter has seen. The oldest turn leaves as the new one comes, so every call
/// compacts the same amount of text.
struct RolloutWindow {
    messages: Vec<Message>,
    next_turn: usize,
}

impl RolloutWindow {
    fn new() -> Self {
        let mut messages = opening();
        messages.extend((0..TURNS).flat_map(turn_messages));
        RolloutWindow {
            messages,
            next_turn: TURNS,
        }
    }

    /// The next call's messages.
    fn advance(&mut self) -> Vec<Message> {
        let opening = opening().len();
        self.messages.drain(opening..opening + 2);
        self.messages.extend(turn_messages(self.next_turn));
        self.next_turn += 1;
        self.messages.clone()
    }
}

fn bench_compaction(c: &mut Criterion) {
    bench_group(c, "compact_128k_to_16k", counter);
    bench_group(c, "compact_128k_to_16k_jinja", jinja_counter);
}

/// The rows of one group, each counter made by `make`.
fn bench_group(c: &mut Criterion, group_name: &str, make: fn() -> TokenCounter) {
    let counter_fresh = make;
    let counter = make();
    let messages = notebook_conversation();
    let options = CompactionOptions::default();
    let tokens = counter.count_conversation(&messages).expect("counts");
    // Printed so a reader of the bench output sees the input size it was run on.
    println!(
        "input: {} messages ({TURNS} turns), {tokens} tokens; budget {BUDGET}",
        messages.len()
    );
    let once = truncation::ast_compaction(&messages, BUDGET, &counter, &options).expect("fits");
    println!(
        "ast_compaction: -> {} tokens, {} messages; {} kept compacted; dropped {:?}",
        once.report.tokens_after,
        once.report.messages_after,
        once.report.compacted.len(),
        once.report.dropped
    );

    println!("{group_name}: counting {:?}", counter.counting());
    let mut group = c.benchmark_group(group_name);
    group.sample_size(30);
    // Cold: a fresh counter each iteration, so no message count is cached: the first call of a
    // rollout's counter. `iter_batched_ref` keeps loading and dropping the 11 MB tokenizer out of
    // the timing; `ast_compaction_with_tokenizer_load` below times the load too, as
    // `rollbox compact` pays it.
    group.bench_function("count_messages_cold", |b| {
        b.iter_batched_ref(
            counter_fresh,
            |fresh| fresh.count_messages(black_box(&messages)).expect("counts"),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("ast_compaction_cold", |b| {
        b.iter_batched_ref(
            counter_fresh,
            |fresh| {
                fits(truncation::ast_compaction(
                    black_box(&messages),
                    BUDGET,
                    fresh,
                    &options,
                ))
            },
            BatchSize::PerIteration,
        )
    });
    // Loading the tokenizer file and building the counter, then one cold compaction: what
    // `rollbox compact` does once its input is read. Dropping the counter is not timed.
    group.bench_function("ast_compaction_with_tokenizer_load", |b| {
        b.iter_with_large_drop(|| {
            let fresh = counter_fresh();
            let result = fits(truncation::ast_compaction(
                black_box(&messages),
                BUDGET,
                &fresh,
                &options,
            ));
            (fresh, result)
        })
    });
    // Warm: the same messages again and again, so every message count is a cache hit. The
    // rollout loop's best case, not its usual one: `rollout_loop` adds a new turn each call.
    group.bench_function("ast_compaction_warm", |b| {
        b.iter(|| {
            fits(truncation::ast_compaction(
                black_box(&messages),
                BUDGET,
                &counter,
                &options,
            ))
        })
    });
    // The rollout loop: one counter for the whole rollout; each call brings one new turn (an
    // assistant cell and its output) that the counter has not seen, beside 199 it has.
    let mut window = RolloutWindow::new();
    let loop_counter = counter_fresh();
    loop_counter.count_messages(&window.messages).expect("counts");
    group.bench_function("ast_compaction_rollout_loop", |b| {
        b.iter_batched_ref(
            || window.advance(),
            |messages| {
                fits(truncation::ast_compaction(
                    black_box(messages),
                    BUDGET,
                    &loop_counter,
                    &options,
                ))
            },
            BatchSize::PerIteration,
        )
    });
    // The rollout's budget check before a turn: the whole 128k conversation's exact count,
    // every message seen before (with a Jinja template that is not local, a full render whose
    // pieces are all remembered).
    group.bench_function("count_prompt_warm", |b| {
        b.iter(|| counter.count_prompt(black_box(&messages), &[]).expect("counts"))
    });
    group.bench_function("first_user_priority_cold", |b| {
        b.iter_batched_ref(
            counter_fresh,
            |fresh| {
                fits(truncation::first_user_priority(
                    black_box(&messages),
                    BUDGET,
                    fresh,
                    &options,
                ))
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("first_user_priority_warm", |b| {
        b.iter(|| {
            fits(truncation::first_user_priority(
                black_box(&messages),
                BUDGET,
                &counter,
                &options,
            ))
        })
    });
    group.finish();
}

criterion_group!(benches, bench_compaction);
criterion_main!(benches);
