//! The compaction planner (`rollbox::truncation`): a conversation of the input's making cut to
//! a budget of its choosing by `first_user_priority` and `ast_compaction`, counted with the
//! real Qwen tokenizer (scripts/fetch-tokenizer.sh puts it in target/test-data). Checks,
//! besides no panic: a result fits its budget by the counter's own exact count.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rollbox::chat::Message;
use rollbox::truncation::{ChatTemplate, CompactionOptions, TokenCounter, ast_compaction, first_user_priority};

fn counter() -> &'static TokenCounter {
    static COUNTER: OnceLock<TokenCounter> = OnceLock::new();
    COUNTER.get_or_init(|| {
        let path = std::env::var_os(rollbox::env_vars::TEST_TOKENIZER)
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-data/qwen-tokenizer.json")
            });
        TokenCounter::from_file(&path, ChatTemplate::qwen_chatml())
            .unwrap_or_else(|e| panic!("the tokenizer at {} (scripts/fetch-tokenizer.sh): {e}", path.display()))
    })
}

fuzz_target!(|data: &[u8]| {
    let [high, low, rest @ ..] = data else {
        return;
    };
    let budget = usize::from(u16::from_be_bytes([*high, *low]));
    // Messages separated by NUL; each one's first character picks its role.
    let text = String::from_utf8_lossy(rest);
    let messages: Vec<Message> = text
        .split('\0')
        .enumerate()
        .map(|(i, part)| match (i, part.chars().next()) {
            (0, _) => Message::system(part),
            (_, Some('a')) => Message::assistant(part),
            (_, Some('t')) => Message::assistant("calling").with_tool_call(format!("call_{i}"), "python", part),
            _ => Message::user(part),
        })
        .collect();
    let options = CompactionOptions::default();
    for strategy in [first_user_priority, ast_compaction] {
        if let Ok(compacted) = strategy(&messages, budget, counter(), &options) {
            let count = counter()
                .count_prompt(&compacted.messages, &options.tools)
                .expect("the result counts");
            assert!(count <= budget, "{count} tokens over a budget of {budget}");
        }
    }
});
