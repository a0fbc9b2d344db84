//! The shape every strategy works within (a pinned head, a word-for-word tail and the middle
//! turns between them) and the [`Plan`] that decides, newest turn first, what of the middle fits.
//!
//! A plan tokenises lazily. It counts the head and tail, then walks the middle from the newest
//! turn back, tokenising only turns that may still fit, so the text of turns it removes is never
//! tokenised (the one exception is the turn where the budget runs out). Counts come from the
//! [`TokenCounter`]'s per-message cache when it has seen a message before.

use std::borrow::Cow;
use std::num::NonZero;
use std::ops::Range;

use crate::chat::{Content, Message, Role};

use super::cells::{self, Compaction};
use super::{CompactionOptions, DroppedSpan, TokenCounter, TruncationError};

/// Where the kept parts of a conversation are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Messages `..head_end` are kept word for word: leading system messages and everything up
    /// to the first user message (and any tool results directly after it).
    pub head_end: usize,
    /// Messages `tail_start..` are kept word for word.
    pub tail_start: usize,
    /// The middle, split into turns that are kept or removed whole: a message plus the tool
    /// results that follow it, so a call is never separated from its results.
    pub turns: Vec<Range<usize>>,
}

impl Layout {
    pub fn of(messages: &[Message], options: &CompactionOptions) -> Layout {
        let count = messages.len();
        let mut head_end = match messages.iter().position(|m| m.role == Role::User) {
            Some(first_user) => first_user + 1,
            None => messages
                .iter()
                .take_while(|m| matches!(m.role, Role::System | Role::Developer))
                .count(),
        };
        while head_end < count && messages[head_end].role == Role::Tool {
            head_end += 1;
        }
        let mut tail_start = count.saturating_sub(options.keep_last).max(head_end);
        // A tail that starts at a tool result takes its call (and sibling results) along.
        while tail_start > head_end && tail_start < count && messages[tail_start].role == Role::Tool {
            tail_start -= 1;
        }
        let mut turns: Vec<Range<usize>> = Vec::new();
        for (index, message) in messages.iter().enumerate().take(tail_start).skip(head_end) {
            match turns.last_mut() {
                Some(turn) if message.role == Role::Tool => turn.end = index + 1,
                _ => turns.push(index..index + 1),
            }
        }
        Layout {
            head_end,
            tail_start,
            turns,
        }
    }

    /// The middle's message indices, oldest first.
    pub fn middle(&self) -> Range<usize> {
        self.head_end..self.tail_start
    }

    /// The messages of the oldest `count` turns.
    pub fn oldest_turns(&self, count: usize) -> Range<usize> {
        let end = self.turns.get(count).map_or(self.tail_start, |turn| turn.start);
        self.head_end..end
    }
}

/// Which version of a middle message is meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Form {
    /// The message as it came.
    Original,
    /// Its AST compaction (code skeletons, trimmed outputs), or the original when compaction
    /// would not make it shorter.
    Compacted,
}

/// What a walk over the middle adds up for each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cost {
    /// The tokens of this form.
    Tokens(Form),
    /// The tokens kept by not compacting the message: original minus compacted.
    Expansion,
}

/// What AST compaction makes of one middle message.
struct Reduced {
    /// The compaction, when it is shorter than the original.
    shorter: Option<Compaction>,
    /// Top-level names defined by the message's code, listed when the message is removed.
    names: Vec<String>,
}

/// A conversation being planned: its layout and whatever has been counted or compacted so far.
pub(crate) struct Plan<'a> {
    pub messages: &'a [Message],
    pub layout: Layout,
    counter: &'a TokenCounter,
    options: &'a CompactionOptions,
    /// Tokens of the head, the tail and the generation prompt: what is always sent.
    pub fixed: usize,
    original_tokens: Vec<Option<usize>>,
    compacted_tokens: Vec<Option<usize>>,
    /// Filled for the whole middle by [`Plan::reduce_middle`].
    reduced: Vec<Option<Reduced>>,
    /// The names the middle's code defines, each once, in the order they are first defined;
    /// filled by [`Plan::reduce_middle`]. A span of the oldest turns lists a prefix of them.
    middle_names: Vec<String>,
    /// The message each of `middle_names` is first defined in, in the same order.
    first_defined_in: Vec<usize>,
    /// Characters of the messages before each index (one more entry than messages), so a span's
    /// characters cost two lookups.
    chars_before: Vec<usize>,
}

impl<'a> Plan<'a> {
    /// Lays out `messages` and counts the parts that are always kept.
    pub fn new(
        messages: &'a [Message],
        counter: &'a TokenCounter,
        options: &'a CompactionOptions,
    ) -> Result<Self, TruncationError> {
        let layout = Layout::of(messages, options);
        let mut plan = Plan {
            messages,
            counter,
            options,
            fixed: counter.generation_prompt_tokens(),
            original_tokens: vec![None; messages.len()],
            compacted_tokens: vec![None; messages.len()],
            reduced: std::iter::repeat_with(|| None).take(messages.len()).collect(),
            middle_names: Vec::new(),
            first_defined_in: Vec::new(),
            chars_before: std::iter::once(0)
                .chain(messages.iter().scan(0, |total, message| {
                    *total += chars(message);
                    Some(*total)
                }))
                .collect(),
            layout,
        };
        let pinned: Vec<usize> = (0..plan.layout.head_end)
            .chain(plan.layout.tail_start..messages.len())
            .collect();
        plan.count(Form::Original, &pinned)?;
        plan.fixed += pinned
            .iter()
            .map(|&index| plan.tokens(Form::Original, index))
            .sum::<usize>();
        Ok(plan)
    }

    /// The counter this plan counts with.
    pub fn counter(&self) -> &'a TokenCounter {
        self.counter
    }

    /// Tokens left for the middle (and any marker), or `None` when the pinned parts alone exceed
    /// `budget`.
    pub fn room(&self, budget: usize) -> Option<usize> {
        budget.checked_sub(self.fixed)
    }

    /// Bytes of the middle's text and tool calls: a bound on its tokens, without tokenising.
    pub fn middle_bytes(&self) -> usize {
        self.messages[self.layout.middle()].iter().map(size).sum()
    }

    /// Works out the AST compaction of every middle message, in parallel: parsing code is the
    /// costliest step after tokenising, and a compaction that goes past the originals needs the
    /// compacted form of the turns it keeps and the names of those it removes.
    pub fn reduce_middle(&mut self) {
        let (messages, options, middle) = (self.messages, self.options, self.layout.middle());
        let skeletons = self.counter.skeletons();
        let reduce = |index: usize| {
            let follows_code = index > 0 && cells::has_code_cell(&messages[index - 1], options);
            let compaction = cells::compact_message(&messages[index], follows_code, options, skeletons);
            let names = compaction.as_ref().map(|c| c.names.clone()).unwrap_or_default();
            let shorter = compaction.filter(|c| size(&c.message) < size(&messages[index]));
            Reduced { shorter, names }
        };
        let threads = std::thread::available_parallelism().map_or(1, NonZero::get);
        // Below a few dozen messages a thread costs more than it saves.
        let chunk = middle.len().div_ceil(threads).max(MIN_MESSAGES_PER_THREAD);
        let reduced: Vec<Reduced> = std::thread::scope(|scope| {
            let workers: Vec<_> = middle
                .clone()
                .step_by(chunk)
                .map(|start| {
                    let end = (start + chunk).min(middle.end);
                    scope.spawn(move || (start..end).map(reduce).collect::<Vec<_>>())
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|worker| worker.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                .collect()
        });
        let mut seen = std::collections::HashSet::new();
        for (index, reduced) in middle.zip(reduced) {
            for name in &reduced.names {
                if seen.insert(name.clone()) {
                    self.middle_names.push(name.clone());
                    self.first_defined_in.push(index);
                }
            }
            self.reduced[index] = Some(reduced);
        }
    }

    /// How many of the newest middle turns fit in `room` tokens in `form`, and their tokens.
    pub fn newest_fitting_turns(&mut self, form: Form, room: usize) -> Result<(usize, usize), TruncationError> {
        let turns = self.layout.turns.clone();
        self.newest_fitting(&turns, Cost::Tokens(form), room)
    }

    /// With every middle message compacted and `spare` tokens left, how many of the newest
    /// middle messages can stay original. Compaction is oldest first, so these are the ones it
    /// need not touch.
    pub fn newest_left_original(&mut self, spare: usize) -> Result<usize, TruncationError> {
        let messages: Vec<Range<usize>> = self.layout.middle().map(|index| index..index + 1).collect();
        Ok(self.newest_fitting(&messages, Cost::Expansion, spare)?.0)
    }

    /// Walks `units` from the newest back and returns how many fit in `room` and what they cost.
    ///
    /// Tokenising is done in parallel batches. Each batch holds no more bytes than the room left
    /// (a token covers at least one byte, so such a batch all but always fits), which means
    /// nothing older than the first unit that does not fit is tokenised.
    fn newest_fitting(
        &mut self,
        units: &[Range<usize>],
        cost: Cost,
        room: usize,
    ) -> Result<(usize, usize), TruncationError> {
        let form = match cost {
            Cost::Tokens(form) => form,
            Cost::Expansion => Form::Original,
        };
        let (mut fitting, mut used) = (0, 0);
        while fitting < units.len() {
            let end = units.len() - fitting;
            let mut start = end - 1;
            let mut bytes = self.bytes(form, &units[start]);
            while start > 0 && bytes + self.bytes(form, &units[start - 1]) <= room - used {
                start -= 1;
                bytes += self.bytes(form, &units[start]);
            }
            let batch: Vec<usize> = units[start..end].iter().flat_map(Clone::clone).collect();
            self.count(form, &batch)?;
            for unit in units[start..end].iter().rev() {
                let unit_cost: usize = unit.clone().map(|index| self.cost(cost, index)).sum();
                if used + unit_cost > room {
                    return Ok((fitting, used));
                }
                used += unit_cost;
                fitting += 1;
            }
        }
        Ok((fitting, used))
    }

    fn cost(&self, cost: Cost, index: usize) -> usize {
        match cost {
            Cost::Tokens(form) => self.tokens(form, index),
            // Saturating: a compaction shorter in bytes is, very rarely, longer in tokens; then
            // keeping the original costs nothing extra.
            Cost::Expansion => self
                .tokens(Form::Original, index)
                .saturating_sub(self.tokens(Form::Compacted, index)),
        }
    }

    /// Upper bound of a unit's tokens in `form`: its bytes plus the template's overhead.
    fn bytes(&self, form: Form, unit: &Range<usize>) -> usize {
        unit.clone()
            .map(|index| size(self.version(form, index)) + self.counter.overhead_tokens(&self.messages[index].role))
            .sum()
    }

    /// Tokenises, in one batch, whichever of `indices` has no count yet in `form`.
    fn count(&mut self, form: Form, indices: &[usize]) -> Result<(), TruncationError> {
        let missing: Vec<usize> = indices
            .iter()
            .copied()
            .filter(|&index| self.known(form, index).is_none())
            .collect();
        let versions: Vec<&Message> = missing.iter().map(|&index| self.version(form, index)).collect();
        let counts = self.counter.count_each(&versions)?;
        for (index, tokens) in missing.into_iter().zip(counts) {
            match (form, self.compaction(index)) {
                (Form::Compacted, Some(_)) => self.compacted_tokens[index] = Some(tokens),
                _ => self.original_tokens[index] = Some(tokens),
            }
        }
        Ok(())
    }

    fn known(&self, form: Form, index: usize) -> Option<usize> {
        match (form, self.compaction(index)) {
            (Form::Compacted, Some(_)) => self.compacted_tokens[index],
            _ => self.original_tokens[index],
        }
    }

    /// Tokens of message `index` in `form`; it must have been counted.
    pub fn tokens(&self, form: Form, index: usize) -> usize {
        self.known(form, index)
            .expect("the plan counts a message before reading its count")
    }

    /// Message `index` in `form`.
    pub fn version(&self, form: Form, index: usize) -> &Message {
        match (form, self.compaction(index)) {
            (Form::Compacted, Some(compaction)) => &compaction.message,
            _ => &self.messages[index],
        }
    }

    /// The compaction used for message `index`, if it was worked out and is shorter.
    pub fn compaction(&self, index: usize) -> Option<&Compaction> {
        self.reduced[index].as_ref()?.shorter.as_ref()
    }

    /// Top-level names defined by code in `span`, in order of first definition (empty unless
    /// [`Plan::reduce_middle`] ran).
    pub fn names_in(&self, span: Range<usize>) -> Cow<'_, [String]> {
        if span.start == self.layout.head_end {
            // The oldest turns: the names first defined before the span's end.
            let end = self.first_defined_in.partition_point(|&index| index < span.end);
            return Cow::Borrowed(&self.middle_names[..end]);
        }
        let mut names: Vec<String> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for reduced in self.reduced[span].iter().flatten() {
            names.extend(reduced.names.iter().filter(|name| seen.insert(name.as_str())).cloned());
        }
        Cow::Owned(names)
    }

    /// The messages of the oldest `turns` middle turns, and what removing them removes.
    pub fn oldest_span(&self, turns: usize) -> (Range<usize>, DroppedSpan) {
        let span = self.layout.oldest_turns(turns);
        let dropped = DroppedSpan {
            messages: span.len(),
            turns,
            chars: self.chars_before[span.end] - self.chars_before[span.start],
            replacement_tokens: 0,
        };
        (span, dropped)
    }

    /// Replaces the oldest middle turns with one message built by `replacement` from the span
    /// it replaces, keeping as many of the newest turns (in `form`) as fit beside it in `budget`.
    ///
    /// The replacement is tokenised once for the turns that fit on their own, then again each
    /// time more turns have to go to make room for it. Each time, as many turns go as free the
    /// tokens missing plus what the replacement is foreseen to grow by (its bytes growth at the
    /// tokens per byte of the last one counted), so a long replacement, such as a marker listing
    /// hundreds of names, is usually tokenised twice rather than once per step. A foresight that
    /// went one turn too far is caught: when the turn given up would fit in what is left, it is
    /// tried back. That keeps the most turns when a longer span never has a shorter replacement,
    /// which holds for the markers: their name list only grows.
    pub fn replace_oldest_turns(
        &mut self,
        form: Form,
        budget: usize,
        mut replacement: impl FnMut(&Plan<'a>, Range<usize>, &DroppedSpan) -> Message,
    ) -> Result<(Vec<Message>, DroppedSpan, usize), TruncationError> {
        let room = self.room(budget).unwrap_or(0);
        let (mut kept, mut used) = self.newest_fitting_turns(form, room)?;
        let all = self.layout.turns.len();
        // What the most kept turns known to fit give, and the fewest kept turns known not to fit.
        let mut fitting: Option<(Vec<Message>, DroppedSpan, usize)> = None;
        let mut not_fitting = all + 1;
        loop {
            let (span, mut dropped) = self.oldest_span(all - kept);
            let marker = replacement(self, span.clone(), &dropped);
            let marker_tokens = self.counter.count_message(&marker)?;
            let total = self.fixed + used + marker_tokens;
            if total <= budget {
                dropped.replacement_tokens = marker_tokens;
                let mut messages = self.assemble(form, self.layout.tail_start);
                messages.splice(span, std::iter::once(marker));
                // Counted unless it was never a candidate (then it cannot fit anyway).
                let given_up = (kept < all)
                    .then(|| self.counted_turn_tokens(form, all - kept - 1))
                    .flatten();
                match given_up {
                    // The newest turn given up might fit back: try it.
                    Some(tokens) if kept + 1 < not_fitting && total + tokens <= budget => {
                        fitting = Some((messages, dropped, total));
                        kept += 1;
                        used += tokens;
                        continue;
                    }
                    _ => return Ok((messages, dropped, total)),
                }
            }
            not_fitting = kept;
            if let Some((messages, dropped, total)) = fitting {
                return Ok((messages, dropped, total));
            }
            if kept == 0 {
                // With no middle at all there is nothing to mark, so the marker is not needed.
                let required = if all == 0 { self.fixed } else { total };
                return Err(TruncationError::BudgetTooSmall { budget, required });
            }
            let tokens_per_byte = marker_tokens as f64 / size(&marker).max(1) as f64;
            let mut missing = total - budget;
            loop {
                while kept > 0 && missing > 0 {
                    let tokens = self.turn_tokens(form, all - kept);
                    used -= tokens;
                    missing = missing.saturating_sub(tokens);
                    kept -= 1;
                }
                if kept == 0 {
                    break;
                }
                // What the replacement for this many turns is foreseen to add.
                let (span, dropped) = self.oldest_span(all - kept);
                let grown = size(&replacement(self, span, &dropped)).saturating_sub(size(&marker));
                let foreseen = self.fixed + used + marker_tokens + (grown as f64 * tokens_per_byte) as usize;
                if foreseen <= budget {
                    break;
                }
                missing = foreseen - budget;
            }
        }
    }

    /// Tokens of middle turn `turn` in `form`; it must have been counted.
    fn turn_tokens(&self, form: Form, turn: usize) -> usize {
        self.counted_turn_tokens(form, turn)
            .expect("the plan counts a turn before reading its count")
    }

    /// Tokens of middle turn `turn` in `form`, if all its messages have been counted.
    fn counted_turn_tokens(&self, form: Form, turn: usize) -> Option<usize> {
        self.layout.turns[turn]
            .clone()
            .map(|index| self.known(form, index))
            .sum()
    }

    /// The conversation with messages `..in_form_before` in `form` and the rest original.
    pub fn assemble(&self, form: Form, in_form_before: usize) -> Vec<Message> {
        (0..self.messages.len())
            .map(|index| match index < in_form_before {
                true => self.version(form, index).clone(),
                false => self.messages[index].clone(),
            })
            .collect()
    }
}

/// Fewest middle messages worth a thread of their own in [`Plan::reduce_middle`].
const MIN_MESSAGES_PER_THREAD: usize = 16;

/// A message's text and tool-call bytes: what decides whether a compaction is shorter, and a
/// bound on its tokens (each token covers at least one byte).
fn size(message: &Message) -> usize {
    let text = match &message.content {
        None => 0,
        Some(Content::Text(text)) => text.len(),
        Some(Content::Parts(parts)) => parts
            .iter()
            .filter_map(|part| part.text.as_ref())
            .map(String::len)
            .sum(),
    };
    text + message
        .tool_calls()
        .iter()
        .map(|call| call.function.name.len() + call.function.arguments.len())
        .sum::<usize>()
}

/// A message's characters, as the marker reports what was removed: its text and tool calls.
pub(crate) fn chars(message: &Message) -> usize {
    let calls: usize = message
        .tool_calls()
        .iter()
        .map(|call| call.function.arguments.chars().count())
        .sum();
    message.text().chars().count() + calls
}

/// The marker that stands in for removed turns. `names` are the top-level names defined by code
/// in them, listed because the notebook still holds them and the model must know they exist.
pub(crate) fn removal_marker(dropped: &DroppedSpan, names: &[String]) -> Message {
    let header = format!(
        "[rollbox: {} earlier messages ({} turns, {} characters) were removed here to fit the context budget.]",
        dropped.messages, dropped.turns, dropped.chars
    );
    with_live_names(header, "removed", names)
}

/// A user message of `text` followed by the top-level names the `what` (removed, summarised)
/// turns' code defined, which the notebook still holds.
pub(crate) fn with_live_names(mut text: String, what: &str, names: &[String]) -> Message {
    if !names.is_empty() {
        text.push_str(&format!(
            "\nNames defined by code in the {what} turns, still live in the notebook: "
        ));
        text.push_str(&names.join(", "));
    }
    Message::user(text)
}
