//! The three strategies. Each counts the conversation once, then works on per-message counts.

use std::collections::HashSet;
use std::error::Error;
use std::ops::Range;

use crate::chat::Message;

use super::cells::{self, compact_message};
use super::plan::{Layout, Working, removal_marker};
use super::summarizer::{Summarizer, SummaryRequest};
use super::{
    Compacted, CompactedMessage, CompactionOptions, CompactionReport, DroppedSpan, Strategy, TokenCounter,
    TruncationError,
};

/// Keeps the system prompt and first user message word for word, the last
/// [`CompactionOptions::keep_last`] messages, and as many of the most recent turns before them as
/// fit; the removed middle becomes one marker message saying how many turns and tokens went.
///
/// Returns the input unchanged when it already fits.
pub fn first_user_priority(
    messages: &[Message],
    budget: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
) -> Result<Compacted, TruncationError> {
    let working = Working::count(messages, counter)?;
    let layout = Layout::of(messages, options);
    let report = new_report(Strategy::FirstUserPriority, budget, &working);
    drop_if_needed(working, &layout, budget, counter, report, |_| Vec::new())
}

/// Compacts older turns in place, oldest first and only as far as needed: code cells become their
/// Python skeleton and long outputs are cut to head and tail. If that is not enough, removes
/// turns as [`first_user_priority`] does; the marker then lists the names the removed code
/// defined.
pub fn ast_compaction(
    messages: &[Message],
    budget: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
) -> Result<Compacted, TruncationError> {
    let mut compaction = AstPass::run(messages, budget, counter, options, Strategy::AstCompaction)?;
    let names = compaction.names_for_spans(options);
    drop_if_needed(compaction.working, &compaction.layout, budget, counter, compaction.report, names)
}

/// [`ast_compaction`] first; if still over budget, replaces the older middle turns with a summary
/// from `summarizer`, keeping as many recent turns as fit beside a summary of at most
/// [`CompactionOptions::summary_max_tokens`]. If the summariser fails or its summary does not
/// fit, returns the [`ast_compaction`] result and says why in
/// [`CompactionReport::summarizer_failure`]; a model failure is never an error.
pub async fn llm_compaction(
    messages: &[Message],
    budget: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
    summarizer: &dyn Summarizer,
) -> Result<Compacted, TruncationError> {
    let mut compaction = AstPass::run(messages, budget, counter, options, Strategy::LlmCompaction)?;
    if compaction.working.total() <= budget {
        let total = compaction.working.total();
        return Ok(finish(compaction.working.messages, total, compaction.report));
    }
    let mut names = compaction.names_for_spans(options);
    let attempt = summarize_older_turns(&compaction.working, &compaction.layout, budget, counter, options, summarizer, &mut names).await;
    match attempt {
        Ok((messages, span, total)) => {
            let mut report = compaction.report;
            report.summarized = Some(span);
            Ok(finish(messages, total, report))
        }
        Err(reason) => {
            tracing::warn!(%reason, "summariser failed; falling back to AST compaction");
            compaction.report.summarizer_failure = Some(reason);
            drop_if_needed(compaction.working, &compaction.layout, budget, counter, compaction.report, names)
        }
    }
}

fn new_report(strategy: Strategy, budget: usize, working: &Working) -> CompactionReport {
    CompactionReport {
        strategy,
        budget,
        tokens_before: working.total(),
        tokens_after: working.total(),
        messages_before: working.messages.len(),
        messages_after: working.messages.len(),
        compacted: Vec::new(),
        dropped: None,
        summarized: None,
        summarizer_failure: None,
    }
}

fn finish(messages: Vec<Message>, total: usize, mut report: CompactionReport) -> Compacted {
    report.tokens_after = total;
    report.messages_after = messages.len();
    Compacted { messages, report }
}

/// Returns `working` as is if it fits, else with the oldest turns replaced by a removal marker
/// listing `names(span)`.
fn drop_if_needed(
    working: Working,
    layout: &Layout,
    budget: usize,
    counter: &TokenCounter,
    mut report: CompactionReport,
    mut names: impl FnMut(Range<usize>) -> Vec<String>,
) -> Result<Compacted, TruncationError> {
    let total = working.total();
    if total <= budget {
        return Ok(finish(working.messages, total, report));
    }
    let (messages, dropped, total) =
        working.replace_oldest_turns(layout, budget, counter, |span, dropped| removal_marker(dropped, &names(span)))?;
    report.dropped = Some(dropped);
    Ok(finish(messages, total, report))
}

/// The in-place half of AST compaction, shared by [`ast_compaction`] and [`llm_compaction`].
struct AstPass<'a> {
    original: &'a [Message],
    working: Working,
    layout: Layout,
    report: CompactionReport,
    /// Names defined by each message's code, kept from its compaction so removal need not
    /// parse it again.
    names: Vec<Option<Vec<String>>>,
}

impl<'a> AstPass<'a> {
    fn run(
        original: &'a [Message],
        budget: usize,
        counter: &TokenCounter,
        options: &CompactionOptions,
        strategy: Strategy,
    ) -> Result<AstPass<'a>, TruncationError> {
        let mut working = Working::count(original, counter)?;
        let layout = Layout::of(original, options);
        let mut report = new_report(strategy, budget, &working);
        let mut names = vec![None; original.len()];
        let mut total = working.total();
        let mut previous_has_code = layout.head_end > 0 && !cells::code_cells(&original[layout.head_end - 1], options).is_empty();
        for index in layout.middle() {
            if total <= budget {
                break;
            }
            let follows_code = previous_has_code;
            previous_has_code = !cells::code_cells(&original[index], options).is_empty();
            let Some(compaction) = compact_message(&original[index], follows_code, options) else {
                continue;
            };
            let tokens = counter.count_message(&compaction.message)?;
            let before = working.counts[index];
            // A tiny cell's skeleton can be longer than the cell; then the original stays.
            if tokens >= before {
                continue;
            }
            total -= before - tokens;
            working.counts[index] = tokens;
            working.messages[index] = compaction.message;
            names[index] = Some(compaction.names);
            report.compacted.push(CompactedMessage { index, kind: compaction.kind, tokens_before: before, tokens_after: tokens });
        }
        report.tokens_after = total;
        Ok(AstPass { original, working, layout, report, names })
    }

    /// A function from a span of message indices to the names its code defines, in order of
    /// first definition, reusing the names found during compaction.
    fn names_for_spans(&mut self, options: &'a CompactionOptions) -> impl FnMut(Range<usize>) -> Vec<String> + 'a {
        let mut cache = std::mem::take(&mut self.names);
        let original = self.original;
        move |span: Range<usize>| {
            let mut seen = HashSet::new();
            let mut names = Vec::new();
            for index in span {
                let found = cache[index].get_or_insert_with(|| cells::defined_names(&original[index], options));
                for name in found.iter() {
                    if seen.insert(name.clone()) {
                        names.push(name.clone());
                    }
                }
            }
            names
        }
    }
}

/// Replaces the older middle turns with a model's summary. `Err` carries the reason the summary
/// could not be used.
async fn summarize_older_turns(
    working: &Working,
    layout: &Layout,
    budget: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
    summarizer: &dyn Summarizer,
    names: &mut impl FnMut(Range<usize>) -> Vec<String>,
) -> Result<(Vec<Message>, DroppedSpan, usize), String> {
    let fixed = working.fixed_tokens(layout);
    let room = budget.checked_sub(fixed).filter(|room| *room > 0).ok_or("no room left for a summary")?;
    let reserve = options.summary_max_tokens.min(room);
    // Keep the most recent turns that fit beside the reserved summary; summarise the rest.
    let mut kept_tokens = 0;
    let mut first_kept = layout.turns.len();
    while first_kept > 0 {
        let turn = working.tokens_in(layout.turns[first_kept - 1].clone());
        if kept_tokens + turn > room - reserve {
            break;
        }
        kept_tokens += turn;
        first_kept -= 1;
    }
    if first_kept == 0 {
        return Err("nothing to summarise".to_owned());
    }
    let span_end = layout.turns.get(first_kept).map_or(layout.tail_start, |turn| turn.start);
    let span = layout.head_end..span_end;
    let mut dropped = DroppedSpan {
        messages: span.len(),
        turns: first_kept,
        tokens: working.tokens_in(span.clone()),
        replacement_tokens: 0,
    };
    let span_names = names(span.clone());
    let wrapper_tokens = counter.count_message(&summary_message(&dropped, "", &span_names)).map_err(|e| chain(&e))?;
    let max_tokens = reserve.checked_sub(wrapper_tokens).filter(|n| *n > 0).ok_or("no room left for a summary")?;
    let request = SummaryRequest { messages: working.messages[span.clone()].to_vec(), max_tokens };
    let summary = summarizer.summarize(request).await.map_err(|e| chain(&e))?;
    let summary = summary.trim();
    if summary.is_empty() {
        return Err("the summariser returned an empty summary".to_owned());
    }
    let message = summary_message(&dropped, summary, &span_names);
    let tokens = counter.count_message(&message).map_err(|e| chain(&e))?;
    let total = fixed + tokens + kept_tokens;
    if total > budget {
        return Err(format!("the summary took {tokens} tokens, more than the {} left for it", room - kept_tokens));
    }
    dropped.replacement_tokens = tokens;
    let mut messages = working.messages.clone();
    messages.splice(span, std::iter::once(message));
    Ok((messages, dropped, total))
}

fn summary_message(span: &DroppedSpan, summary: &str, names: &[String]) -> Message {
    let mut text = format!(
        "[rollbox: summary of {} earlier messages ({} turns, {} tokens), written by a model to fit the context budget]\n{summary}",
        span.messages, span.turns, span.tokens
    );
    if !names.is_empty() {
        text.push_str("\nNames defined by code in the summarised turns, still live in the notebook: ");
        text.push_str(&names.join(", "));
    }
    Message::user(text)
}

/// An error and its causes on one line, for the report.
fn chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
