//! The three strategies, each a [`Plan`] walked from the newest turn back.

use std::ops::Range;

use crate::chat::Message;
use crate::error_text::error_chain;

use super::plan::{Form, Plan, chars, removal_marker, with_live_names};
use super::summarizer::{Summarizer, SummaryRequest};
use super::{
    Compacted, CompactedMessage, CompactionOptions, CompactionReport, DroppedSpan, Strategy, TokenCounter,
    TruncationError,
};

/// Keeps the system prompt and first user message word for word, the last
/// [`CompactionOptions::keep_last`] messages, and as many of the most recent turns before them as
/// fit; the removed middle becomes one marker message saying how many turns and characters went.
///
/// Returns the input unchanged when it already fits.
pub fn first_user_priority(
    messages: &[Message],
    budget: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
) -> Result<Compacted, TruncationError> {
    if let Some(unchanged) = fits_exactly(messages, budget, counter, options, Strategy::FirstUserPriority)? {
        return Ok(unchanged);
    }
    let mut target = budget;
    loop {
        let compacted =
            first_user_priority_planned(messages, target, counter, options).map_err(|e| lowered(e, budget, target))?;
        match checked(compacted, budget, target, counter, options)? {
            Ok(compacted) => return Ok(compacted),
            Err(lower) => target = lower,
        }
    }
}

fn first_user_priority_planned(
    messages: &[Message],
    budget: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
) -> Result<Compacted, TruncationError> {
    let mut plan = Plan::new(messages, counter, options)?;
    let mut report = new_report(Strategy::FirstUserPriority, budget, messages.len());
    if let Some(total) = fits_unchanged(&mut plan, budget)? {
        report.tokens_before = Some(total);
        return Ok(finish(messages.to_vec(), total, report));
    }
    let (messages, dropped, total) =
        plan.replace_oldest_turns(Form::Original, budget, |_, _, dropped| removal_marker(dropped, &[]))?;
    report.dropped = Some(dropped);
    Ok(finish(messages, total, report))
}

/// Compacts older turns in place, oldest first and only as far as needed: code cells become their
/// Python skeleton and long outputs are cut to head and tail. If that is not enough, removes
/// turns as [`first_user_priority`] does, keeping the newest turns in compacted form; the marker
/// then lists the names the removed code defined.
///
/// A compaction is used only when it is shorter in bytes than the message, so choosing it needs
/// no count of the original.
pub fn ast_compaction(
    messages: &[Message],
    budget: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
) -> Result<Compacted, TruncationError> {
    if let Some(unchanged) = fits_exactly(messages, budget, counter, options, Strategy::AstCompaction)? {
        return Ok(unchanged);
    }
    let mut target = budget;
    loop {
        let compacted =
            ast_compaction_planned(messages, target, counter, options).map_err(|e| lowered(e, budget, target))?;
        match checked(compacted, budget, target, counter, options)? {
            Ok(compacted) => return Ok(compacted),
            Err(lower) => target = lower,
        }
    }
}

fn ast_compaction_planned(
    messages: &[Message],
    budget: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
) -> Result<Compacted, TruncationError> {
    let mut plan = Plan::new(messages, counter, options)?;
    let report = new_report(Strategy::AstCompaction, budget, messages.len());
    match compact_in_place(&mut plan, budget)? {
        Some(in_place) => Ok(finish_in_place(&plan, in_place, report)),
        None => remove_compacted_turns(&mut plan, budget, report),
    }
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
    if let Some(unchanged) = fits_exactly(messages, budget, counter, options, Strategy::LlmCompaction)? {
        return Ok(unchanged);
    }
    let mut target = budget;
    loop {
        let compacted = llm_compaction_planned(messages, target, counter, options, summarizer)
            .await
            .map_err(|e| lowered(e, budget, target))?;
        match checked(compacted, budget, target, counter, options)? {
            Ok(compacted) => return Ok(compacted),
            Err(lower) => target = lower,
        }
    }
}

async fn llm_compaction_planned(
    messages: &[Message],
    budget: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
    summarizer: &dyn Summarizer,
) -> Result<Compacted, TruncationError> {
    let mut plan = Plan::new(messages, counter, options)?;
    let mut report = new_report(Strategy::LlmCompaction, budget, messages.len());
    if let Some(in_place) = compact_in_place(&mut plan, budget)? {
        return Ok(finish_in_place(&plan, in_place, report));
    }
    match summarize_older_turns(&mut plan, budget, options, summarizer).await {
        Ok((messages, span, total)) => {
            report.compacted = compacted_entries(&plan, plan.layout.head_end + span.messages..plan.layout.tail_start);
            report.summarized = Some(span);
            Ok(finish(messages, total, report))
        }
        Err(reason) => {
            tracing::warn!(%reason, "summariser failed; falling back to AST compaction");
            report.summarizer_failure = Some(reason);
            remove_compacted_turns(&mut plan, budget, report)
        }
    }
}

/// With a Jinja template, the input as it is when its exact count fits `budget`. Counted only
/// when the input has at most [`LIKELY_OVER_BYTES_PER_TOKEN`] bytes per token of budget: a larger
/// one all but never fits, and its count would cost a render of all of it.
fn fits_exactly(
    messages: &[Message],
    budget: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
    strategy: Strategy,
) -> Result<Option<Compacted>, TruncationError> {
    let bytes: usize = messages.iter().map(|m| m.text().len()).sum();
    if !needs_exact_check(counter, options) || bytes > budget.saturating_mul(LIKELY_OVER_BYTES_PER_TOKEN) {
        return Ok(None);
    }
    let exact = counter.count_prompt(messages, &options.tools)?;
    if exact > budget {
        return Ok(None);
    }
    let mut report = new_report(strategy, budget, messages.len());
    report.tokens_before = Some(exact);
    Ok(Some(finish(messages.to_vec(), exact, report)))
}

/// A planned result checked with the exact count when the counter's per-message counts are
/// estimates (a Jinja template): `Ok` with the exact count when it fits `budget`, else `Err`
/// with the lower target to plan for next (the target less the excess, so the loop ends).
fn checked(
    mut compacted: Compacted,
    budget: usize,
    target: usize,
    counter: &TokenCounter,
    options: &CompactionOptions,
) -> Result<Result<Compacted, usize>, TruncationError> {
    compacted.report.budget = budget;
    if !needs_exact_check(counter, options) {
        return Ok(Ok(compacted));
    }
    let exact = counter.count_prompt(&compacted.messages, &options.tools)?;
    if exact <= budget {
        compacted.report.tokens_after = exact;
        if compacted.report.tokens_before.is_some() {
            compacted.report.tokens_before = Some(exact);
        }
        return Ok(Ok(compacted));
    }
    match target.checked_sub(exact - budget) {
        Some(lower) => Ok(Err(lower)),
        None => Err(TruncationError::BudgetTooSmall {
            budget,
            required: exact,
        }),
    }
}

/// Whether a plan's sum of per-message counts can differ from the exact count: with a Jinja
/// template (per-message counts are estimates) or with tools offered (the plan does not count
/// their schemas).
fn needs_exact_check(counter: &TokenCounter, options: &CompactionOptions) -> bool {
    counter.needs_exact_check() || !options.tools.is_empty()
}

/// A plan's error for a lowered `target`, restated for the `budget` asked for.
fn lowered(error: TruncationError, budget: usize, target: usize) -> TruncationError {
    match error {
        TruncationError::BudgetTooSmall { required, .. } => TruncationError::BudgetTooSmall {
            budget,
            required: required + (budget - target),
        },
        other => other,
    }
}

fn new_report(strategy: Strategy, budget: usize, messages: usize) -> CompactionReport {
    CompactionReport {
        strategy,
        budget,
        tokens_before: None,
        tokens_after: 0,
        messages_before: messages,
        messages_after: messages,
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

/// The input's tokens if it fits `budget` as it is; `None` as soon as the newest turns show it
/// does not, before the older ones are tokenised.
fn fits_unchanged(plan: &mut Plan<'_>, budget: usize) -> Result<Option<usize>, TruncationError> {
    let Some(room) = plan.room(budget) else { return Ok(None) };
    let (fitting, used) = plan.newest_fitting_turns(Form::Original, room)?;
    Ok((fitting == plan.layout.turns.len()).then_some(plan.fixed + used))
}

/// A middle with more bytes than this per token of room is taken not to fit unchanged without
/// counting it: code and prose run at 3 to 4 bytes per Qwen token, so such input nearly always
/// needs compaction, and counting its newest originals first would tokenise a budget's worth of
/// text that compaction then replaces. Either order gives the same result (short of a compaction
/// that is shorter in bytes but longer in tokens), so this decides cost only.
const LIKELY_OVER_BYTES_PER_TOKEN: usize = 8;

/// AST compaction without removing turns: `in_form_before` is where compaction stopped (middle
/// messages before it are compacted, the rest original) and `total` the tokens.
struct InPlace {
    in_form_before: usize,
    total: usize,
}

/// Compacts the middle oldest first until it fits; `None` when even all of it compacted does
/// not. Only the newest turns are tokenised: compacted, until they fill the room or all fit;
/// then, if all fit, original, until keeping one more original would not fit.
fn compact_in_place(plan: &mut Plan<'_>, budget: usize) -> Result<Option<InPlace>, TruncationError> {
    let Some(room) = plan.room(budget) else { return Ok(None) };
    let middle = plan.layout.middle();
    if plan.middle_bytes() <= room.saturating_mul(LIKELY_OVER_BYTES_PER_TOKEN)
        && let Some(total) = fits_unchanged(plan, budget)?
    {
        return Ok(Some(InPlace {
            in_form_before: middle.start,
            total,
        }));
    }
    plan.reduce_middle();
    let (fitting, compacted) = plan.newest_fitting_turns(Form::Compacted, room)?;
    if fitting < plan.layout.turns.len() {
        return Ok(None);
    }
    let in_form_before = middle.end - plan.newest_left_original(room - compacted)?;
    let total = plan.fixed
        + middle
            .map(|index| {
                plan.tokens(
                    if index < in_form_before {
                        Form::Compacted
                    } else {
                        Form::Original
                    },
                    index,
                )
            })
            .sum::<usize>();
    Ok(Some(InPlace { in_form_before, total }))
}

fn finish_in_place(plan: &Plan<'_>, in_place: InPlace, mut report: CompactionReport) -> Compacted {
    let InPlace { in_form_before, total } = in_place;
    report.compacted = compacted_entries(plan, plan.layout.head_end..in_form_before);
    if report.compacted.is_empty() {
        report.tokens_before = Some(total);
    }
    finish(plan.assemble(Form::Compacted, in_form_before), total, report)
}

/// All of the middle compacted, and the oldest turns replaced by a marker that lists the names
/// their code defined.
fn remove_compacted_turns(
    plan: &mut Plan<'_>,
    budget: usize,
    mut report: CompactionReport,
) -> Result<Compacted, TruncationError> {
    let (messages, dropped, total) = plan.replace_oldest_turns(Form::Compacted, budget, |plan, span, dropped| {
        removal_marker(dropped, &plan.names_in(span))
    })?;
    report.compacted = compacted_entries(plan, plan.layout.head_end + dropped.messages..plan.layout.tail_start);
    report.dropped = Some(dropped);
    Ok(finish(messages, total, report))
}

/// The report's entries for the messages of `range` that were sent compacted.
fn compacted_entries(plan: &Plan<'_>, range: Range<usize>) -> Vec<CompactedMessage> {
    range
        .filter_map(|index| {
            let compaction = plan.compaction(index)?;
            Some(CompactedMessage {
                index,
                kind: compaction.kind,
                chars_before: chars(&plan.messages[index]),
                chars_after: chars(&compaction.message),
                tokens_after: plan.tokens(Form::Compacted, index),
            })
        })
        .collect()
}

/// Replaces the older middle turns with a model's summary. `Err` carries the reason the summary
/// could not be used.
async fn summarize_older_turns(
    plan: &mut Plan<'_>,
    budget: usize,
    options: &CompactionOptions,
    summarizer: &dyn Summarizer,
) -> Result<(Vec<Message>, DroppedSpan, usize), String> {
    let room = plan
        .room(budget)
        .filter(|room| *room > 0)
        .ok_or("no room left for a summary")?;
    let reserve = options.summary_max_tokens.min(room);
    // Keep the most recent turns that fit beside the reserved summary; summarise the rest.
    let (kept, kept_tokens) = plan
        .newest_fitting_turns(Form::Compacted, room - reserve)
        .map_err(|e| error_chain(&e))?;
    let all = plan.layout.turns.len();
    if kept == all {
        return Err("nothing to summarise".to_owned());
    }
    let (span, mut dropped) = plan.oldest_span(all - kept);
    let span_names = plan.names_in(span.clone());
    let counter = plan.counter();
    let wrapper_tokens = counter
        .count_message(&summary_message(&dropped, "", &span_names))
        .map_err(|e| error_chain(&e))?;
    let max_tokens = reserve
        .checked_sub(wrapper_tokens)
        .filter(|n| *n > 0)
        .ok_or("no room left for a summary")?;
    let compacted: Vec<Message> = span
        .clone()
        .map(|index| plan.version(Form::Compacted, index).clone())
        .collect();
    let request = SummaryRequest {
        messages: compacted,
        max_tokens,
    };
    let summary = summarizer.summarize(request).await.map_err(|e| error_chain(&e))?;
    let summary = summary.trim();
    if summary.is_empty() {
        return Err("the summariser returned an empty summary".to_owned());
    }
    let message = summary_message(&dropped, summary, &span_names);
    let tokens = counter.count_message(&message).map_err(|e| error_chain(&e))?;
    let total = plan.fixed + tokens + kept_tokens;
    if total > budget {
        return Err(format!(
            "the summary took {tokens} tokens, more than the {} left for it",
            room - kept_tokens
        ));
    }
    dropped.replacement_tokens = tokens;
    let mut messages = plan.assemble(Form::Compacted, plan.layout.tail_start);
    messages.splice(span, std::iter::once(message));
    Ok((messages, dropped, total))
}

fn summary_message(span: &DroppedSpan, summary: &str, names: &[String]) -> Message {
    let text = format!(
        "[rollbox: summary of {} earlier messages ({} turns, {} characters), written by a model to fit the context budget]\n{summary}",
        span.messages, span.turns, span.chars
    );
    with_live_names(text, "summarised", names)
}
