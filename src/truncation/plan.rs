//! The shape every strategy works within: a pinned head, a word-for-word tail and the middle
//! turns between them, plus the per-message token counts that make re-counting incremental.

use std::ops::Range;

use crate::chat::{Message, Role};

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
            None => messages.iter().take_while(|m| matches!(m.role, Role::System | Role::Developer)).count(),
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
        Layout { head_end, tail_start, turns }
    }

    /// The middle's message indices, oldest first.
    pub fn middle(&self) -> Range<usize> {
        self.head_end..self.tail_start
    }
}

/// A conversation being compacted: its messages with their current token counts.
#[derive(Debug, Clone)]
pub(crate) struct Working {
    pub messages: Vec<Message>,
    pub counts: Vec<usize>,
    pub generation_prompt: usize,
}

impl Working {
    pub fn count(messages: &[Message], counter: &TokenCounter) -> Result<Working, TruncationError> {
        Ok(Working {
            messages: messages.to_vec(),
            counts: counter.count_messages(messages)?,
            generation_prompt: counter.generation_prompt_tokens(),
        })
    }

    pub fn total(&self) -> usize {
        self.counts.iter().sum::<usize>() + self.generation_prompt
    }

    pub fn tokens_in(&self, range: Range<usize>) -> usize {
        self.counts[range].iter().sum()
    }

    /// Tokens of the parts that are never removed: head, tail and generation prompt.
    pub fn fixed_tokens(&self, layout: &Layout) -> usize {
        self.tokens_in(0..layout.head_end) + self.tokens_in(layout.tail_start..self.messages.len()) + self.generation_prompt
    }

    /// Replaces the oldest middle turns with one message built by `replacement` from the span it
    /// replaces, removing just enough turns for the result to fit `budget`. The replacement is
    /// re-tokenised each time the span grows; nothing else is.
    pub fn replace_oldest_turns(
        self,
        layout: &Layout,
        budget: usize,
        counter: &TokenCounter,
        mut replacement: impl FnMut(Range<usize>, &DroppedSpan) -> Message,
    ) -> Result<(Vec<Message>, DroppedSpan, usize), TruncationError> {
        let fixed = self.fixed_tokens(layout);
        let turn_tokens: Vec<usize> = layout.turns.iter().map(|turn| self.tokens_in(turn.clone())).collect();
        let middle_tokens: usize = turn_tokens.iter().sum();
        // Fewest turns to remove, ignoring the replacement's own size; then grow from there.
        let mut removed = 0;
        let mut removed_tokens = 0;
        while removed < layout.turns.len() && fixed + middle_tokens - removed_tokens > budget {
            removed_tokens += turn_tokens[removed];
            removed += 1;
        }
        loop {
            let span_end = layout.turns.get(removed).map_or(layout.tail_start, |turn| turn.start);
            let span = layout.head_end..span_end;
            let dropped = DroppedSpan {
                messages: span.len(),
                turns: removed,
                tokens: removed_tokens,
                replacement_tokens: 0,
            };
            let marker = replacement(span.clone(), &dropped);
            let marker_tokens = counter.count_message(&marker)?;
            let total = fixed + marker_tokens + middle_tokens - removed_tokens;
            if total <= budget {
                let dropped = DroppedSpan { replacement_tokens: marker_tokens, ..dropped };
                return Ok((self.splice(span, marker), dropped, total));
            }
            if removed == layout.turns.len() {
                // With no middle at all there is nothing to mark, so the marker is not needed.
                let required = if layout.turns.is_empty() { fixed } else { fixed + marker_tokens };
                return Err(TruncationError::BudgetTooSmall { budget, required });
            }
            removed_tokens += turn_tokens[removed];
            removed += 1;
        }
    }

    fn splice(mut self, span: Range<usize>, marker: Message) -> Vec<Message> {
        self.messages.splice(span, std::iter::once(marker));
        self.messages
    }
}

/// The marker that stands in for removed turns. `names` are the top-level names defined by code
/// in them, listed because the notebook still holds them and the model must know they exist.
pub(crate) fn removal_marker(dropped: &DroppedSpan, names: &[String]) -> Message {
    let mut text = format!(
        "[rollbox: {} earlier messages ({} turns, {} tokens) were removed here to fit the context budget.]",
        dropped.messages, dropped.turns, dropped.tokens
    );
    if !names.is_empty() {
        text.push_str("\nNames defined by code in the removed turns, still live in the notebook: ");
        text.push_str(&names.join(", "));
    }
    Message::user(text)
}
