//! The code a notebook agent's message asks to run: `<code>...</code>` blocks (the tags are
//! configurable) and fenced ```` ```python ```` blocks, in the order they appear.
//!
//! Rules, each tested:
//! - tags nest: an opening tag inside a block must be closed before the block ends, so
//!   `<code>print("<code>x</code>")</code>` is one block;
//! - a block whose closing tag or fence never comes runs to the end of the message and is marked
//!   unterminated (servers often stop generation *at* `</code>`, which leaves it out);
//! - fences inside a tagged block are part of its code, not blocks of their own.

use serde::{Deserialize, Serialize};

use crate::rollout::scan_cost::charge;

/// The tags around code in a notebook agent's messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeTags {
    /// The opening tag, `<code>` by default.
    pub open: String,
    /// The closing tag, `</code>` by default.
    pub close: String,
}

impl Default for CodeTags {
    fn default() -> Self {
        CodeTags {
            open: "<code>".to_owned(),
            close: "</code>".to_owned(),
        }
    }
}

/// One block of code found in a message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeBlock {
    /// The code, without its tags or fences, trimmed of blank leading and trailing lines.
    pub code: String,
    /// False when the message ended before the block's closing tag or fence.
    pub terminated: bool,
}

/// The fence openings accepted as Python.
const PYTHON_FENCES: [&str; 2] = ["```python", "```py"];
const FENCE: &str = "```";

/// Every code block in `text`, in order. Blank blocks are skipped.
///
/// One forward pass: each search for the next opening tag, closing tag or fence starts where the
/// last one left off and is repeated only once the reading position has passed what it found,
/// so a reply of `<code> </code>` repeated, or of nested tags, is read a bounded number of times
/// in all, with no recursion.
pub fn extract_code_blocks(text: &str, tags: &CodeTags) -> Vec<CodeBlock> {
    let mut search = Searches {
        open: NextMatch::new(&tags.open),
        close: NextMatch::new(&tags.close),
        fence: NextFence::default(),
    };
    let mut blocks = Vec::new();
    let mut at = 0;
    while let Some((start, kind)) = next_opening(text, at, &mut search) {
        let (block, after) = match kind {
            Opening::Tag => read_tagged(text, start + tags.open.len(), &mut search),
            Opening::Fence(len) => read_fenced(text, start + len),
        };
        if !block.code.trim().is_empty() {
            blocks.push(block);
        }
        at = after;
    }
    blocks
}

/// The searches of one message, each remembering what it found.
struct Searches<'t> {
    open: NextMatch<'t>,
    close: NextMatch<'t>,
    fence: NextFence,
}

/// The next occurrence of a needle at or after a position that only moves forward: a found
/// occurrence is remembered until the position passes it, and once there is none, there is
/// none for good. Together the searches scan the text about once.
struct NextMatch<'n> {
    needle: &'n str,
    found: Option<usize>,
    exhausted: bool,
}

impl<'n> NextMatch<'n> {
    fn new(needle: &'n str) -> Self {
        NextMatch {
            needle,
            found: None,
            exhausted: false,
        }
    }

    /// The first occurrence in `text` at or after `from`; `from` never decreases between calls.
    fn at_or_after(&mut self, text: &str, from: usize) -> Option<usize> {
        if let Some(found) = self.found.filter(|&found| found >= from) {
            return Some(found);
        }
        if self.exhausted {
            return None;
        }
        let rest = text.get(from..).unwrap_or("");
        let found = rest.find(self.needle);
        charge(found.map_or(rest.len(), |i| i + self.needle.len()));
        self.found = found.map(|i| from + i);
        self.exhausted = found.is_none();
        self.found
    }
}

/// The next Python fence at or after a forward-moving position, remembered like [`NextMatch`].
#[derive(Default)]
struct NextFence {
    /// Where it starts and how long its opening line is.
    found: Option<(usize, usize)>,
    exhausted: bool,
}

impl NextFence {
    fn at_or_after(&mut self, text: &str, from: usize) -> Option<(usize, usize)> {
        if let Some(found) = self.found.filter(|&(at, _)| at >= from) {
            return Some(found);
        }
        if self.exhausted {
            return None;
        }
        self.found = find_python_fence(text, from);
        self.exhausted = self.found.is_none();
        self.found
    }
}

enum Opening {
    Tag,
    /// A Python fence of this many bytes.
    Fence(usize),
}

fn next_opening(text: &str, from: usize, search: &mut Searches<'_>) -> Option<(usize, Opening)> {
    // An empty opening tag opens nothing (rather than everywhere).
    let tag = (!search.open.needle.is_empty())
        .then(|| search.open.at_or_after(text, from))
        .flatten();
    let fence = search.fence.at_or_after(text, from);
    match (tag, fence) {
        (Some(t), Some((f, len))) if f < t => Some((f, Opening::Fence(len))),
        (Some(t), _) => Some((t, Opening::Tag)),
        (None, Some((f, len))) => Some((f, Opening::Fence(len))),
        (None, None) => None,
    }
}

/// The first ```` ```python ```` or ```` ```py ```` fence at or after `from` followed by the end
/// of its line: where it starts and how long its opening line is.
fn find_python_fence(text: &str, from: usize) -> Option<(usize, usize)> {
    let mut from = from;
    while let Some(found) = text.get(from..).and_then(|rest| rest.find(FENCE)) {
        charge(found + FENCE.len());
        let at = from + found;
        for fence in PYTHON_FENCES {
            if text[at..].starts_with(fence) {
                let after = &text[at + fence.len()..];
                // Only blanks may follow on the fence's line; stop at the first other character,
                // so a line of fences is not read to its end once per fence.
                let mut line_end = Some(after.len());
                let mut scanned = after.len();
                for (i, c) in after.char_indices() {
                    if c == '\n' || !c.is_whitespace() {
                        line_end = (c == '\n').then_some(i);
                        scanned = i + 1;
                        break;
                    }
                }
                charge(scanned);
                if let Some(line_end) = line_end {
                    return Some((at, fence.len() + line_end));
                }
            }
        }
        from = at + FENCE.len();
    }
    charge(text.len().saturating_sub(from));
    None
}

/// Reads from `start` (just after an opening tag) up to its matching closing tag, counting
/// nested openings; returns the block and where reading goes on.
fn read_tagged(text: &str, start: usize, search: &mut Searches<'_>) -> (CodeBlock, usize) {
    let mut depth = 1usize;
    let mut at = start;
    loop {
        let open = search.open.at_or_after(text, at);
        let close = search.close.at_or_after(text, at);
        match (open, close) {
            (Some(o), Some(c)) if o < c => {
                depth += 1;
                at = o + search.open.needle.len();
            }
            (_, Some(c)) => {
                depth -= 1;
                at = c + search.close.needle.len();
                if depth == 0 {
                    let block = CodeBlock {
                        code: tidy(&text[start..c]),
                        terminated: true,
                    };
                    return (block, at);
                }
            }
            (_, None) => {
                let block = CodeBlock {
                    code: tidy(&text[start..]),
                    terminated: false,
                };
                return (block, text.len());
            }
        }
    }
}

/// Reads from `start` (the end of a fence's opening line) up to a line that starts with the
/// closing fence; returns the block and where reading goes on.
fn read_fenced(text: &str, start: usize) -> (CodeBlock, usize) {
    let rest = &text[start..];
    let body = rest.strip_prefix('\n').unwrap_or(rest);
    let body_start = text.len() - body.len();
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        charge(line.len());
        if line.trim_start().starts_with(FENCE) {
            let block = CodeBlock {
                code: tidy(&body[..offset]),
                terminated: true,
            };
            return (block, body_start + offset + line.len());
        }
        offset += line.len();
    }
    (
        CodeBlock {
            code: tidy(body),
            terminated: false,
        },
        text.len(),
    )
}

/// Drops blank lines at either end and trailing whitespace, keeping indentation.
fn tidy(code: &str) -> String {
    charge(3 * code.len());
    // A blank block is skipped: make nothing for it (a reply can hold hundreds of thousands).
    if code.trim().is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = code.lines().collect();
    let first = lines.iter().position(|l| !l.trim().is_empty()).unwrap_or(lines.len());
    let last = lines
        .iter()
        .rposition(|l| !l.trim().is_empty())
        .map_or(first, |i| i + 1);
    let mut out = lines[first..last.max(first)].join("\n").trim_end().to_owned();
    out.push('\n');
    out
}
