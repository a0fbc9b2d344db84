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
pub fn extract_code_blocks(text: &str, tags: &CodeTags) -> Vec<CodeBlock> {
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some((start, kind)) = next_opening(rest, tags) {
        let (block, after) = match kind {
            Opening::Tag => read_tagged(&rest[start + tags.open.len()..], tags),
            Opening::Fence(len) => read_fenced(&rest[start + len..]),
        };
        if !block.code.trim().is_empty() {
            blocks.push(block);
        }
        rest = after;
    }
    blocks
}

enum Opening {
    Tag,
    /// A Python fence of this many bytes.
    Fence(usize),
}

fn next_opening(text: &str, tags: &CodeTags) -> Option<(usize, Opening)> {
    let tag = (!tags.open.is_empty()).then(|| text.find(&tags.open)).flatten();
    let fence = find_python_fence(text);
    match (tag, fence) {
        (Some(t), Some((f, len))) if f < t => Some((f, Opening::Fence(len))),
        (Some(t), _) => Some((t, Opening::Tag)),
        (None, Some((f, len))) => Some((f, Opening::Fence(len))),
        (None, None) => None,
    }
}

/// The first ```` ```python ```` or ```` ```py ```` fence followed by the end of its line.
fn find_python_fence(text: &str) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(found) = text[from..].find(FENCE) {
        let at = from + found;
        for fence in PYTHON_FENCES {
            if text[at..].starts_with(fence) {
                let after = &text[at + fence.len()..];
                let line_end = after.find('\n').unwrap_or(after.len());
                if after[..line_end].trim().is_empty() {
                    return Some((at, fence.len() + line_end));
                }
            }
        }
        from = at + FENCE.len();
    }
    None
}

/// Reads after an opening tag up to its matching closing tag, counting nested openings.
fn read_tagged<'a>(text: &'a str, tags: &CodeTags) -> (CodeBlock, &'a str) {
    let mut depth = 1usize;
    let mut at = 0;
    loop {
        let open = text[at..].find(&tags.open).map(|i| at + i);
        let close = text[at..].find(&tags.close).map(|i| at + i);
        match (open, close) {
            (Some(o), Some(c)) if o < c => {
                depth += 1;
                at = o + tags.open.len();
            }
            (_, Some(c)) => {
                depth -= 1;
                if depth == 0 {
                    let block = CodeBlock {
                        code: tidy(&text[..c]),
                        terminated: true,
                    };
                    return (block, &text[c + tags.close.len()..]);
                }
                at = c + tags.close.len();
            }
            (_, None) => {
                return (
                    CodeBlock {
                        code: tidy(text),
                        terminated: false,
                    },
                    "",
                );
            }
        }
    }
}

/// Reads after a fence's opening line up to a line that starts with the closing fence.
fn read_fenced(text: &str) -> (CodeBlock, &str) {
    let body = text.strip_prefix('\n').unwrap_or(text);
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        if line.trim_start().starts_with(FENCE) {
            let block = CodeBlock {
                code: tidy(&body[..offset]),
                terminated: true,
            };
            return (block, &body[offset + line.len()..]);
        }
        offset += line.len();
    }
    (
        CodeBlock {
            code: tidy(body),
            terminated: false,
        },
        "",
    )
}

/// Drops blank lines at either end and trailing whitespace, keeping indentation.
fn tidy(code: &str) -> String {
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
