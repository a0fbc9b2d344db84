//! `rollbox compact`: fit a conversation read from stdin into a token budget.
//!
//! Reads an OpenAI `messages` array (or an object with a `messages` field, whose other fields are
//! kept) from stdin, writes the compacted conversation in the same shape to stdout, and a short
//! report to stderr.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use serde_json::Value;

use rollbox::chat::Message;
use rollbox::truncation::{
    self, CompactionKind, CompactionOptions, CompactionReport, OpenAiSummarizer, Strategy, TemplateChoice,
    TemplateOrigin, TokenCounter, TruncationError,
};

use super::Printer;

/// Exit code when the kept parts alone do not fit the budget (a usage problem, not a crash).
const EXIT_BUDGET_TOO_SMALL: u8 = 2;

/// Arguments of `rollbox compact`.
#[derive(Debug, clap::Args)]
pub struct CompactArgs {
    /// The model's folder (tokenizer.json beside tokenizer_config.json, as a downloaded model
    /// has them) or its tokenizer.json alone (Hugging Face format).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Token budget for the whole prompt, chat template and generation prompt included.
    #[arg(long)]
    pub max_tokens: usize,
    /// first_user_priority, ast_compaction or llm_compaction (alias ast_llm_compaction).
    #[arg(long, default_value = "ast_compaction")]
    pub strategy: Strategy,
    /// How many of the last messages are always kept word for word.
    #[arg(long, default_value_t = CompactionOptions::default().keep_last)]
    pub keep_last: usize,
    /// The chat template counted around the messages: `auto` (the model's own Jinja template
    /// from its folder; the built-in `qwen` one, with a warning, when it ships none), `qwen`
    /// (ChatML), `bare` (none) or the path of a Jinja template file.
    #[arg(long, alias = "template", value_name = "auto|qwen|bare|PATH", default_value = "auto")]
    pub chat_template: TemplateChoice,
    /// Base URL of an OpenAI-compatible endpoint for llm_compaction (`/v1/chat/completions` is
    /// appended). Its bearer token, if any, is read from ROLLBOX_SUMMARIZER_API_KEY.
    #[arg(long)]
    pub summarizer_url: Option<String>,
    /// Model name to ask the summariser endpoint for.
    #[arg(long, default_value = "default")]
    pub summarizer_model: String,
}

/// Runs `rollbox compact`; with `--quiet` the report is left out.
pub async fn run(args: CompactArgs, printer: Printer) -> anyhow::Result<ExitCode> {
    let counter = TokenCounter::from_model(&args.tokenizer, &args.chat_template)?;
    if !printer.is_quiet() {
        warn_on_fallback(&counter);
    }
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("failed to read the conversation from stdin")?;
    let (mut document, messages) = parse_conversation(&input)?;
    let tools = match document.get("tools") {
        Some(Value::Array(tools)) => tools.clone(),
        Some(Value::Null) | None => Vec::new(),
        Some(_) => bail!("the conversation's `tools` field must be an array of tool schemas"),
    };
    let options = CompactionOptions {
        keep_last: args.keep_last,
        tools,
        ..CompactionOptions::default()
    };

    let outcome = match args.strategy {
        Strategy::FirstUserPriority => truncation::first_user_priority(&messages, args.max_tokens, &counter, &options),
        Strategy::AstCompaction => truncation::ast_compaction(&messages, args.max_tokens, &counter, &options),
        Strategy::LlmCompaction => {
            let Some(url) = &args.summarizer_url else {
                bail!("llm_compaction needs --summarizer-url (an OpenAI-compatible endpoint)");
            };
            let mut summarizer = OpenAiSummarizer::new(url, &args.summarizer_model)?;
            if let Ok(key) = std::env::var(rollbox::env_vars::SUMMARIZER_API_KEY) {
                summarizer = summarizer.with_api_key(key);
            }
            truncation::llm_compaction(&messages, args.max_tokens, &counter, &options, &summarizer).await
        }
    };
    let compacted = match outcome {
        Ok(compacted) => compacted,
        Err(error @ TruncationError::BudgetTooSmall { required, .. }) => {
            eprintln!("error: {error}");
            eprintln!("hint: pass --max-tokens {required} or more, or a smaller --keep-last");
            return Ok(ExitCode::from(EXIT_BUDGET_TOO_SMALL));
        }
        Err(error) => return Err(error.into()),
    };

    let output = serde_json::to_value(&compacted.messages).context("failed to serialise the conversation")?;
    match &mut document {
        Value::Object(object) => {
            object.insert("messages".to_owned(), output);
        }
        other => *other = output,
    }
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer(&mut stdout, &document).context("failed to write the conversation to stdout")?;
    writeln!(stdout).context("failed to write the conversation to stdout")?;
    if !printer.is_quiet() {
        // The strategies do not tokenise text they remove; the report counts the input for people.
        let tokens_before = match compacted.report.tokens_before {
            Some(tokens) => tokens,
            None => counter.count_prompt(&messages, &options.tools)?,
        };
        eprint!("{}", render_report(&compacted.report, tokens_before));
    }
    Ok(ExitCode::SUCCESS)
}

/// Tells the user when `auto` found no template in the model's files and counts with ChatML.
pub(crate) fn warn_on_fallback(counter: &TokenCounter) {
    if let TemplateOrigin::Fallback { model } = counter.template_origin() {
        eprintln!(
            "warning: {} has no chat template (no tokenizer_config.json `chat_template` or chat_template.jinja); \
             counting with the built-in qwen (ChatML) template, exact only for ChatML models",
            model.display()
        );
        eprintln!("hint: pass the model's folder to --tokenizer, or --chat-template qwen|bare|PATH to choose");
    }
}

/// Splits the input into the document (kept to write back in the same shape) and its messages.
fn parse_conversation(input: &str) -> anyhow::Result<(Value, Vec<Message>)> {
    let document: Value = serde_json::from_str(input).context("failed to parse the conversation as JSON")?;
    let messages = match &document {
        Value::Array(_) => &document,
        Value::Object(object) => object
            .get("messages")
            .context("the conversation object has no `messages` field")?,
        _ => bail!("the conversation must be an array of messages or an object with a `messages` field"),
    };
    let messages: Vec<Message> =
        serde_json::from_value(messages.clone()).context("failed to read the messages (OpenAI chat format)")?;
    Ok((document, messages))
}

/// The human-readable report; `tokens_before` is the input's count.
fn render_report(report: &CompactionReport, tokens_before: usize) -> String {
    let mut text = format!(
        "rollbox compact: {} to {} tokens\n  tokens:   {} -> {} ({} -> {} messages)\n",
        report.strategy,
        report.budget,
        tokens_before,
        report.tokens_after,
        report.messages_before,
        report.messages_after
    );
    if !report.compacted.is_empty() {
        let cells = report
            .compacted
            .iter()
            .filter(|c| c.kind == CompactionKind::CodeSkeleton)
            .count();
        let outputs = report.compacted.len() - cells;
        let before: usize = report.compacted.iter().map(|c| c.chars_before).sum();
        let after: usize = report.compacted.iter().map(|c| c.chars_after).sum();
        text.push_str(&format!(
            "  compacted: {cells} messages' code cells to skeletons, {outputs} outputs cut to head and tail ({before} -> {after} characters)\n"
        ));
    }
    if let Some(summary) = &report.summarized {
        text.push_str(&format!(
            "  summarised: {} messages in {} turns ({} characters) into a {}-token summary\n",
            summary.messages, summary.turns, summary.chars, summary.replacement_tokens
        ));
    }
    if let Some(reason) = &report.summarizer_failure {
        text.push_str(&format!(
            "  summariser not used, fell back to AST compaction: {reason}\n"
        ));
    }
    if let Some(dropped) = &report.dropped {
        text.push_str(&format!(
            "  removed:  {} messages in {} turns ({} characters), replaced by a {}-token marker\n",
            dropped.messages, dropped.turns, dropped.chars, dropped.replacement_tokens
        ));
    }
    if report.compacted.is_empty() && report.dropped.is_none() && report.summarized.is_none() {
        text.push_str("  unchanged: the conversation already fits\n");
    }
    text
}
