//! Finding code cells and cell outputs in messages, and compacting one message at a time.
//!
//! A code cell is a `<code>...</code>` block or a fenced ```` ```python ```` block in an
//! assistant's text, or the `code` argument of a call to one of the code tools (`python` by
//! default). A cell output is a tool result, or a user message that directly follows an
//! assistant message with a code cell (the notebook recipe feeds outputs back as user turns).

use std::cell::RefCell;
use std::ops::Range;

use serde_json::Value;

use crate::chat::{Content, Message, Role};

use super::skeleton::SkeletonCache;
use super::{CompactionKind, CompactionOptions};

/// One code cell in a text: its opening (`<code>`, or a fence with its language and newline),
/// its code and its closing, as byte ranges.
struct CodeCell {
    open: Range<usize>,
    code: Range<usize>,
    close: Range<usize>,
}

/// The languages a fenced block may name to be a code cell.
const FENCE_LANGUAGES: [&str; 4] = ["python", "py", "ipython", "python3"];

/// The first code cell that starts at or after byte `from` of `text`: a `<code>` block, or a
/// ```` ``` ```` fence naming a Python language (then optional blanks and a newline), each up to
/// its nearest closing. An opening without a closing is not a cell. (A hand-written scan: a lazy
/// regex with captures cost a fifth of compacting a message.)
fn next_code_cell(text: &str, mut from: usize) -> Option<CodeCell> {
    const TAG_OPEN: &str = "<code>";
    const TAG_CLOSE: &str = "</code>";
    const FENCE: &str = "```";
    while from < text.len() {
        let tag = text[from..].find(TAG_OPEN).map(|at| from + at);
        let fence = text[from..].find(FENCE).map(|at| from + at);
        let start = match (tag, fence) {
            (Some(tag), Some(fence)) => tag.min(fence),
            (Some(at), None) | (None, Some(at)) => at,
            (None, None) => return None,
        };
        // Where the code starts, and what closes it.
        let opening = match tag == Some(start) {
            true => Some((start + TAG_OPEN.len(), TAG_CLOSE)),
            false => fence_opening_end(text, start + FENCE.len()).map(|code_start| (code_start, FENCE)),
        };
        let cell = opening.and_then(|(code_start, closing)| {
            let code_end = code_start + text[code_start..].find(closing)?;
            Some(CodeCell {
                open: start..code_start,
                code: code_start..code_end,
                close: code_end..code_end + closing.len(),
            })
        });
        match cell {
            Some(cell) => return Some(cell),
            None => from = start + 1,
        }
    }
    None
}

/// Where the code starts after a fence's backticks (which end at `after_ticks`): past a Python
/// language name, blanks and a newline; `None` when the fence does not open a Python cell.
fn fence_opening_end(text: &str, after_ticks: usize) -> Option<usize> {
    let rest = &text[after_ticks..];
    FENCE_LANGUAGES.iter().find_map(|language| {
        let after_language = rest.strip_prefix(language)?;
        let blanks = after_language.len() - after_language.trim_start_matches([' ', '\t']).len();
        after_language[blanks..]
            .starts_with('\n')
            .then(|| after_ticks + language.len() + blanks + 1)
    })
}

const TRACEBACK_START: &str = "Traceback (most recent call last)";

/// Whether `message` holds a code cell, which makes the user message after it a cell output.
pub(crate) fn has_code_cell(message: &Message, options: &CompactionOptions) -> bool {
    message.role == Role::Assistant
        && (next_code_cell(&message.text(), 0).is_some()
            || message
                .tool_calls()
                .iter()
                .any(|call| tool_call_code(&call.function.name, &call.function.arguments, options).is_some()))
}

fn tool_call_code(name: &str, arguments: &str, options: &CompactionOptions) -> Option<String> {
    if !options.code_tool_names.iter().any(|tool| tool == name) {
        return None;
    }
    let parsed: Value = serde_json::from_str(arguments).ok()?;
    parsed.get("code")?.as_str().map(str::to_owned)
}

/// One message compacted in place.
pub(crate) struct Compaction {
    /// The compacted message.
    pub message: Message,
    /// What was done to it.
    pub kind: CompactionKind,
    /// Top-level names defined by its code cells (empty for outputs).
    pub names: Vec<String>,
}

/// The compacted form of `message`, or `None` when there is nothing to compact in it.
/// `follows_code` says whether the previous message held a code cell, which makes a user
/// message a cell output. Skeletons come from `skeletons`, which builds each one once.
pub(crate) fn compact_message(
    message: &Message,
    follows_code: bool,
    options: &CompactionOptions,
    skeletons: &SkeletonCache,
) -> Option<Compaction> {
    let trim = |text: &str| trim_output(text, options);
    match message.role {
        Role::Assistant => compact_assistant(message, options, skeletons),
        Role::Tool => output_compaction(map_text(message, trim)),
        Role::User if follows_code => output_compaction(map_text(message, trim)),
        _ => None,
    }
}

fn output_compaction(message: Option<Message>) -> Option<Compaction> {
    message.map(|message| Compaction {
        message,
        kind: CompactionKind::OutputTrimmed,
        names: Vec::new(),
    })
}

fn compact_assistant(message: &Message, options: &CompactionOptions, skeletons: &SkeletonCache) -> Option<Compaction> {
    let names = RefCell::new(Vec::new());
    let mut changed = map_text(message, |text| {
        let mut replaced = String::new();
        let mut copied = 0;
        while let Some(cell) = next_code_cell(text, copied) {
            let (open, close) = (&text[cell.open.clone()], &text[cell.close.clone()]);
            let skeleton = skeletons.skeleton(&text[cell.code]);
            names.borrow_mut().extend(skeleton.names);
            // A fence's opening already ends its line; `<code>` may not.
            let newline = if open.ends_with('\n') { "" } else { "\n" };
            replaced.push_str(&text[copied..cell.open.start]);
            replaced.push_str(&format!("{open}{newline}{}\n{close}", skeleton.text));
            copied = cell.close.end;
        }
        if copied == 0 {
            return None;
        }
        replaced.push_str(&text[copied..]);
        Some(replaced)
    });
    let mut names = names.into_inner();
    let has_code_call = message
        .tool_calls()
        .iter()
        .any(|call| tool_call_code(&call.function.name, &call.function.arguments, options).is_some());
    if has_code_call {
        let mut compacted = changed.take().unwrap_or_else(|| message.clone());
        for call in compacted.tool_calls.iter_mut().flatten() {
            if tool_call_code(&call.function.name, &call.function.arguments, options).is_none() {
                continue;
            }
            if let Ok(Value::Object(mut arguments)) = serde_json::from_str::<Value>(&call.function.arguments) {
                let code = arguments.get("code").and_then(Value::as_str).unwrap_or("");
                let skeleton = skeletons.skeleton(code);
                names.extend(skeleton.names);
                arguments.insert("code".to_owned(), Value::String(skeleton.text));
                call.function.arguments = Value::Object(arguments).to_string();
            }
        }
        changed = Some(compacted);
    }
    changed.map(|message| Compaction {
        message,
        kind: CompactionKind::CodeSkeleton,
        names,
    })
}

/// Applies `edit` to each text of `message`; `None` when no text changed.
fn map_text(message: &Message, edit: impl Fn(&str) -> Option<String>) -> Option<Message> {
    match &message.content {
        Some(Content::Text(text)) => {
            let edited = edit(text)?;
            Some(Message {
                content: Some(Content::Text(edited)),
                ..message.clone()
            })
        }
        Some(Content::Parts(parts)) => {
            let mut any = false;
            let mut parts = parts.clone();
            for part in &mut parts {
                if let Some(edited) = part.text.as_deref().and_then(&edit) {
                    part.text = Some(edited);
                    any = true;
                }
            }
            any.then(|| Message {
                content: Some(Content::Parts(parts)),
                ..message.clone()
            })
        }
        None => None,
    }
}

/// Cuts a long output to its head and tail lines with a count of what was left out, and a
/// traceback to the last line of its error. Long lines are cut too. `None` when already short.
pub(crate) fn trim_output(text: &str, options: &CompactionOptions) -> Option<String> {
    let lines: Vec<&str> = text.lines().collect();
    let trimmed = trim_lines(&lines, options).join("\n");
    (trimmed.len() < text.len()).then_some(trimmed)
}

fn trim_lines(lines: &[&str], options: &CompactionOptions) -> Vec<String> {
    match lines.iter().position(|line| line.starts_with(TRACEBACK_START)) {
        Some(start) => trim_traceback(lines, start, options),
        None => head_and_tail(lines, options),
    }
}

/// Keeps the exception line that ends a traceback, dropping the stack above it. Python prints
/// the stack indented and the exception unindented, so the first unindented line after the
/// header is the error. What follows it (a chained traceback, more output) is trimmed in turn.
fn trim_traceback(lines: &[&str], start: usize, options: &CompactionOptions) -> Vec<String> {
    let mut kept = head_and_tail(&lines[..start], options);
    let is_error = |line: &&str| !line.trim().is_empty() && !line.starts_with(char::is_whitespace);
    match lines[start + 1..]
        .iter()
        .position(is_error)
        .map(|offset| start + 1 + offset)
    {
        Some(error) => {
            kept.push(format!("[... {} traceback lines omitted ...]", error - start));
            kept.push(cut_line(lines[error], options));
            kept.extend(trim_lines(&lines[error + 1..], options));
        }
        None => {
            kept.push(format!("[... {} traceback lines omitted ...]", lines.len() - start));
        }
    }
    kept
}

fn head_and_tail(lines: &[&str], options: &CompactionOptions) -> Vec<String> {
    let (head, tail) = (options.output_head_lines, options.output_tail_lines);
    if lines.len() <= head + tail + 1 {
        return lines.iter().map(|line| cut_line(line, options)).collect();
    }
    let omitted = lines.len() - head - tail;
    let mut kept: Vec<String> = lines[..head].iter().map(|line| cut_line(line, options)).collect();
    kept.push(format!("[... {omitted} lines omitted ...]"));
    kept.extend(lines[lines.len() - tail..].iter().map(|line| cut_line(line, options)));
    kept
}

fn cut_line(line: &str, options: &CompactionOptions) -> String {
    let limit = options.max_line_chars;
    match line.char_indices().nth(limit) {
        None => line.to_owned(),
        Some((cut, _)) => {
            let omitted = line[cut..].chars().count();
            format!("{}[... {omitted} characters omitted]", &line[..cut])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scan finds the same cells as the regex it replaced.
    #[test]
    fn code_cells_are_found_as_the_regex_found_them() {
        let regex =
            regex::Regex::new(r"(?s)(<code>)(.*?)(</code>)|(```(?:python|py|ipython|python3)[ \t]*\n)(.*?)(```)")
                .expect("valid");
        let texts = [
            "no cells here",
            "<code>a = 1</code> and <code>\nb = 2\n</code>",
            "<code> never closed ```python\nx\n``` after",
            "```python3\nx = 1\n```, ```py \t\ny\n```, ```pyt\nno\n```, ```ipython\nz\n```",
            "````python\nfour ticks\n```",
            "```python\n```",
            "```python x\nnot a cell\n```<code>c</code>",
            "é<code>ü = 'ß'</code>é",
            "```python\nunclosed",
            "<code></code><code>",
        ];
        for text in texts {
            let expected: Vec<(Range<usize>, Range<usize>, Range<usize>)> = regex
                .captures_iter(text)
                .map(|c| match c.get(2) {
                    Some(code) => (c.get(1).unwrap().range(), code.range(), c.get(3).unwrap().range()),
                    None => (
                        c.get(4).unwrap().range(),
                        c.get(5).unwrap().range(),
                        c.get(6).unwrap().range(),
                    ),
                })
                .collect();
            let mut found = Vec::new();
            let mut from = 0;
            while let Some(cell) = next_code_cell(text, from) {
                from = cell.close.end;
                found.push((cell.open, cell.code, cell.close));
            }
            assert_eq!(found, expected, "in {text:?}");
        }
    }
}
