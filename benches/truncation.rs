//! Compacting a generated ~128k-token, ~200-turn notebook conversation to 16k tokens.
//!
//! Needs the real Qwen tokenizer: run `scripts/fetch-tokenizer.sh` first (or set
//! ROLLBOX_TEST_TOKENIZER). Run with `cargo bench --bench truncation`.

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use rollbox::chat::Message;
use rollbox::env_vars;
use rollbox::truncation::{self, ChatTemplate, CompactionOptions, TokenCounter};

const BUDGET: usize = 16_000;
const TURNS: usize = 200;
/// Rows each cell prints; with `TURNS` this makes the input about 128k Qwen tokens.
const OUTPUT_ROWS: usize = 10;

fn counter_fresh() -> TokenCounter {
    counter()
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

/// The conversation: system prompt, task, then `TURNS` assistant cells each followed by its
/// output as a user message (the notebook recipe's format), ending with a question.
fn notebook_conversation() -> Vec<Message> {
    let mut messages = vec![
        Message::system(
            "You are a data-science agent in a stateful Jupyter notebook. Put code in <code>...</code> blocks; outputs come back as <output> messages.",
        ),
        Message::user("Build a weekly sales forecast for every region partition and report the error of each."),
    ];
    for turn in 0..TURNS {
        messages.push(Message::assistant(format!(
            "Partition {turn}: I load it, fit the model and evaluate it.\n<code>\n{}</code>",
            code_cell(turn)
        )));
        messages.push(Message::user(cell_output(turn)));
    }
    messages.push(Message::assistant(
        "All partitions are evaluated. Summarise the errors?",
    ));
    messages.push(Message::user("Yes, and plot the worst five."));
    messages
}

fn bench_compaction(c: &mut Criterion) {
    let counter = counter();
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

    let mut group = c.benchmark_group("compact_128k_to_16k");
    group.sample_size(30);
    // Cold: a fresh counter (and tokenizer) each iteration, so nothing is cached: the first call
    // of a rollout, or the CLI. `iter_batched_ref` keeps loading and dropping the 11 MB
    // tokenizer out of the timing. Warm: the counter has seen the conversation, as on every later
    // call of the rollout loop, where only the newest messages are new.
    group.bench_function("count_messages_cold", |b| {
        b.iter_batched_ref(
            counter_fresh,
            |fresh| fresh.count_messages(black_box(&messages)),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("ast_compaction_cold", |b| {
        b.iter_batched_ref(
            counter_fresh,
            |fresh| truncation::ast_compaction(black_box(&messages), BUDGET, fresh, &options),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("ast_compaction_warm", |b| {
        b.iter(|| truncation::ast_compaction(black_box(&messages), BUDGET, &counter, &options))
    });
    group.bench_function("first_user_priority_cold", |b| {
        b.iter_batched_ref(
            counter_fresh,
            |fresh| truncation::first_user_priority(black_box(&messages), BUDGET, fresh, &options),
            BatchSize::PerIteration,
        )
    });
    group.bench_function("first_user_priority_warm", |b| {
        b.iter(|| truncation::first_user_priority(black_box(&messages), BUDGET, &counter, &options))
    });
    group.finish();
}

criterion_group!(benches, bench_compaction);
criterion_main!(benches);
