//! In-process conversation truncation: fit a chat conversation into a token budget before a model
//! call, counting tokens exactly with the model's own tokenizer.
//!
//! Three strategies, each a function from (messages, budget, counter, options) to a
//! [`Compacted`] conversation with a [`CompactionReport`]:
//!
//! - [`first_user_priority`]: keep the system prompt, the first user message and as many recent
//!   turns as fit; the dropped middle becomes one marker message saying what was removed.
//! - [`ast_compaction`]: first reduce older code cells to their Python skeleton and cut long
//!   outputs, oldest first and only as far as needed; then drop turns as above.
//! - [`llm_compaction`]: AST compaction, then a model's summary of the older middle; if the model
//!   fails, the AST result is returned instead (never an error).
//!
//! Every strategy guarantees: the result's count (by [`TokenCounter::count_prompt`], with the
//! [`CompactionOptions::tools`]) is at most the budget; the system prompt and first user message are kept; the last
//! [`CompactionOptions::keep_last`] messages are word for word; a tool call stays with its
//! results; every top-level name defined in a compacted or dropped code cell still appears; the
//! same input gives the same output. A budget too small for the kept parts is
//! [`TruncationError::BudgetTooSmall`], which says how many tokens they need.
//!
//! With a model's own Jinja chat template ([`TemplateChoice::Auto`]), a strategy plans with
//! per-message estimates (what each message adds to a short canonical conversation), then counts
//! its result exactly with [`TokenCounter::count_prompt`]; if that is over the budget, it plans
//! again with the budget lowered by the excess. So the guarantee holds with the exact count, and
//! a result can fall a few tokens short of the budget where the estimates were high.
//!
//! Counting is incremental and lazy. A strategy counts the pinned head and tail, then walks the
//! middle from the newest turn back and tokenises turns only while they may still fit, so the
//! text of the turns it removes is not tokenised at all (only their characters are counted, for
//! the marker). The [`TokenCounter`] remembers each message's count, so in a rollout loop, where
//! all but the newest messages were seen on the previous call, little is tokenised again.

mod added_tokens;
mod cells;
mod plan;
pub mod skeleton;
mod strategies;
mod summarizer;
mod template;
mod tokens;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::chat::Message;

pub use strategies::{ast_compaction, first_user_priority, llm_compaction};
pub use summarizer::{FnSummarizer, OpenAiSummarizer, Summarizer, SummarizerError, SummaryRequest};
pub use template::{JinjaChatTemplate, ModelFiles, TemplateChoice};
pub use tokens::{ChatTemplate, Counting, TemplateOrigin, TokenCounter};

/// Why truncation could not produce a conversation.
#[derive(Debug, thiserror::Error)]
pub enum TruncationError {
    /// The tokenizer file could not be read or parsed.
    #[error("failed to load tokenizer from {}", path.display())]
    LoadTokenizer {
        /// The file that was tried.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: tokenizers::Error,
    },
    /// A model file (`tokenizer_config.json`, a template file) could not be read.
    #[error("failed to read {}", path.display())]
    ReadModelFile {
        /// The file that was tried.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// A model file was read but does not say what it should.
    #[error("failed to load the chat template from {}: {reason}", path.display())]
    ReadModel {
        /// The file that was read.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A Jinja chat template did not compile or render: the message names the template and its
    /// line; the cause (minijinja's error, with the template's own message for
    /// `raise_exception`) is the source.
    #[error("failed to {action} the chat template {template}{}", at_line(*line))]
    Template {
        /// `compile` or `render`.
        action: &'static str,
        /// Which template: its file, or the config it came from.
        template: String,
        /// The line of the template where it failed, when known.
        line: Option<usize>,
        /// minijinja's error.
        #[source]
        source: minijinja::Error,
    },
    /// The tokenizer failed on some text.
    #[error("failed to count tokens")]
    CountTokens {
        /// What went wrong.
        #[source]
        source: tokenizers::Error,
    },
    /// Even with the whole middle removed, the parts that are always kept do not fit.
    #[error(
        "failed to fit the conversation into {budget} tokens: the system prompt, first user \
         message, last messages kept word for word and the removal marker need {required} tokens"
    )]
    BudgetTooSmall {
        /// The budget asked for.
        budget: usize,
        /// What the kept parts need, generation prompt included.
        required: usize,
    },
}

impl TruncationError {
    pub(crate) fn template(action: &'static str, template: &str, source: minijinja::Error) -> Self {
        TruncationError::Template {
            action,
            template: template.to_owned(),
            line: source.line(),
            source,
        }
    }
}

fn at_line(line: Option<usize>) -> String {
    line.map(|line| format!(" at line {line}")).unwrap_or_default()
}

/// Which truncation strategy to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Strategy {
    /// [`first_user_priority`].
    FirstUserPriority,
    /// [`ast_compaction`].
    AstCompaction,
    /// [`llm_compaction`] (the notebook recipe's `ast_llm_compaction`).
    LlmCompaction,
}

impl Strategy {
    /// The strategy's canonical name, as the notebook recipe spells it.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::FirstUserPriority => "first_user_priority",
            Strategy::AstCompaction => "ast_compaction",
            Strategy::LlmCompaction => "llm_compaction",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A strategy name that is not one of [`Strategy`]'s.
#[derive(Debug, Clone, thiserror::Error)]
#[error("unknown truncation strategy `{0}` (expected first_user_priority, ast_compaction or llm_compaction)")]
pub struct UnknownStrategy(pub String);

impl FromStr for Strategy {
    type Err = UnknownStrategy;

    /// Accepts the names with `_` or `-`, and the recipe's `ast_llm_compaction`.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.replace('-', "_").as_str() {
            "first_user_priority" => Ok(Strategy::FirstUserPriority),
            "ast_compaction" => Ok(Strategy::AstCompaction),
            "llm_compaction" | "ast_llm_compaction" => Ok(Strategy::LlmCompaction),
            _ => Err(UnknownStrategy(name.to_owned())),
        }
    }
}

/// Knobs shared by the strategies. [`CompactionOptions::default`] documents each default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionOptions {
    /// How many of the last messages are always kept word for word (4: the latest exchange of
    /// call, result, reply and the message the model is answering). Extended backwards when it
    /// would otherwise split a tool call from its results.
    pub keep_last: usize,
    /// Lines kept from the start of a long output (5).
    pub output_head_lines: usize,
    /// Lines kept from the end of a long output (5), where results and errors usually are.
    pub output_tail_lines: usize,
    /// Longest line kept in an output, in characters (300); a progress bar or a printed array
    /// can put megabytes on one line.
    pub max_line_chars: usize,
    /// Tool names whose `{"code": ...}` argument is a Python cell (`python`).
    pub code_tool_names: Vec<String>,
    /// Most tokens the summary of [`llm_compaction`] may take (1024).
    pub summary_max_tokens: usize,
    /// The tool schemas sent with the conversation (OpenAI's `tools` array; none). A model's own
    /// Jinja template renders them into the prompt, so they count against the budget.
    pub tools: Vec<serde_json::Value>,
}

impl Default for CompactionOptions {
    fn default() -> Self {
        CompactionOptions {
            keep_last: 4,
            output_head_lines: 5,
            output_tail_lines: 5,
            max_line_chars: 300,
            code_tool_names: vec!["python".to_owned()],
            summary_max_tokens: 1024,
            tools: Vec::new(),
        }
    }
}

/// A compacted conversation and what was done to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Compacted {
    /// The messages to send to the model.
    pub messages: Vec<Message>,
    /// What changed, for logs and the CLI's stderr.
    pub report: CompactionReport,
}

/// What a strategy did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompactionReport {
    /// The strategy that ran.
    pub strategy: Strategy,
    /// The budget asked for.
    pub budget: usize,
    /// Tokens of the input, generation prompt included, when the strategy counted all of it:
    /// `Some` when the input already fit, `None` when it was compacted or cut, because then the
    /// older text is removed without being tokenised. [`TokenCounter::count_conversation`] gives
    /// the number when it is worth a full count.
    pub tokens_before: Option<usize>,
    /// Tokens of the output, generation prompt included; at most `budget`.
    pub tokens_after: usize,
    /// Messages in the input.
    pub messages_before: usize,
    /// Messages in the output.
    pub messages_after: usize,
    /// Messages compacted in place, oldest first.
    pub compacted: Vec<CompactedMessage>,
    /// The middle turns removed and replaced by a marker, if any.
    pub dropped: Option<DroppedSpan>,
    /// The middle turns replaced by a model's summary, if any.
    pub summarized: Option<DroppedSpan>,
    /// Why the summariser's answer was not used, when [`llm_compaction`] fell back to the AST
    /// result.
    pub summarizer_failure: Option<String>,
}

/// One message compacted in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactedMessage {
    /// Its index in the input.
    pub index: usize,
    /// What was done to it.
    pub kind: CompactionKind,
    /// Its characters before (text and tool-call arguments); the original is not tokenised.
    pub chars_before: usize,
    /// Its characters after.
    pub chars_after: usize,
    /// Its tokens after.
    pub tokens_after: usize,
}

/// How a message was compacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompactionKind {
    /// Its code cells were reduced to skeletons.
    CodeSkeleton,
    /// Its output was cut to head and tail lines.
    OutputTrimmed,
}

/// A run of middle messages that was removed (or summarised).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DroppedSpan {
    /// How many messages.
    pub messages: usize,
    /// How many turns: a turn is a message with the tool results that answer it.
    pub turns: usize,
    /// Their characters as they came (text and tool-call arguments). Characters, not tokens:
    /// removed text is never tokenised.
    pub chars: usize,
    /// Tokens of the marker or summary message that replaced them.
    pub replacement_tokens: usize,
}
