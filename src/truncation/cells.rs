//! Finding code cells and cell outputs in messages, and compacting one message at a time.
//!
//! A code cell is a `<code>...</code>` block or a fenced ```` ```python ```` block in an
//! assistant's text, or the `code` argument of a call to one of the code tools (`python` by
//! default). A cell output is a tool result, or a user message that directly follows an
//! assistant message with a code cell (the notebook recipe feeds outputs back as user turns).

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::LazyLock;

use regex::{Captures, Regex};
use serde_json::Value;

use crate::chat::{Content, Message, Role};

use super::{CompactionKind, CompactionOptions};
use super::skeleton::SkeletonCache;

static CODE_CELL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?s)(<code>)(.*?)(</code>)|(```(?:python|py|ipython|python3)[ \t]*\n)(.*?)(```)")
        .expect("static regex is valid")
});

const TRACEBACK_START: &str = "Traceback (most recent call last)";

/// Whether `message` holds a code cell, which makes the user message after it a cell output.
pub(crate) fn has_code_cell(message: &Message, options: &CompactionOptions) -> bool {
    message.role == Role::Assistant
        && (CODE_CELL.is_match(&message.text())
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
    message.map(|message| Compaction { message, kind: CompactionKind::OutputTrimmed, names: Vec::new() })
}

fn compact_assistant(message: &Message, options: &CompactionOptions, skeletons: &SkeletonCache) -> Option<Compaction> {
    let names = RefCell::new(Vec::new());
    let mut changed = map_text(message, |text| {
        let replaced = CODE_CELL.replace_all(text, |captures: &Captures| {
            let (open, code, close) = match captures.get(2) {
                Some(code) => (&captures[1], code.as_str(), &captures[3]),
                None => (&captures[4], captures.get(5).map_or("", |m| m.as_str()), &captures[6]),
            };
            let skeleton = skeletons.skeleton(code);
            names.borrow_mut().extend(skeleton.names);
            // A fence's opening already ends its line; `<code>` may not.
            let newline = if open.ends_with('\n') { "" } else { "\n" };
            format!("{open}{newline}{}\n{close}", skeleton.text)
        });
        match replaced {
            Cow::Borrowed(_) => None,
            Cow::Owned(text) => Some(text),
        }
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
    changed.map(|message| Compaction { message, kind: CompactionKind::CodeSkeleton, names })
}

/// Applies `edit` to each text of `message`; `None` when no text changed.
fn map_text(message: &Message, edit: impl Fn(&str) -> Option<String>) -> Option<Message> {
    match &message.content {
        Some(Content::Text(text)) => {
            let edited = edit(text)?;
            Some(Message { content: Some(Content::Text(edited)), ..message.clone() })
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
            any.then(|| Message { content: Some(Content::Parts(parts)), ..message.clone() })
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
    match lines[start + 1..].iter().position(is_error).map(|offset| start + 1 + offset) {
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
