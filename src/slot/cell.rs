//! The cell report every backend that runs the guest shares (`wasm`, and `process` through its
//! native driver): what the guest sends ([`GuestReport`]), how a finished cell becomes an
//! [`ExecutionResult`] ([`finished_cell`]), the text a model sees ([`render_for_model`]), and the
//! byte caps on output with their visible marker ([`cap_text`]).

use std::time::Duration;

use serde::Deserialize;

use super::outputs::{MAX_RUNS, Output, Placed, Run, StreamLog, StreamName, StreamPosition};
use super::{CellError, CellOutput, ErrorKind, ExecutionError, ExecutionMetadata, ExecutionResult, MimeBundle};
use super::{LimitKind, Limits};

/// The guest code that runs cells (see `guest/rollbox_guest.py`), in every backend.
pub(crate) const GUEST_SOURCE: &str = include_str!("../../guest/rollbox_guest.py");
/// Time allowed to start an interpreter and load the guest code.
pub(crate) const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Budget for a cell's rich outputs (figures, HTML) in its report, beyond its text streams.
pub(crate) const DISPLAY_BUDGET_BYTES: usize = 16 << 20;
/// The error name of a cell whose interpreter was stopped and replaced.
pub(crate) const RESTART_ERROR: &str = "RollboxRestart";

/// The largest cell report the host accepts: both text streams at their cap, as JSON, which
/// may escape each byte into six (`\u0001`), plus the display budget.
pub(crate) fn report_budget(limits: &Limits) -> usize {
    limits
        .output_bytes
        .saturating_mul(12)
        .saturating_add(DISPLAY_BUDGET_BYTES)
}

/// A cell's report as the guest sends it (the process backend's native driver sends the same).
#[derive(Deserialize)]
pub(crate) struct GuestReport {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) stdout_dropped: usize,
    pub(crate) stderr_dropped: usize,
    pub(crate) result: Option<MimeBundle>,
    pub(crate) display: Vec<MimeBundle>,
    pub(crate) error: Option<CellError>,
    /// Where each display was shown among the streams (see [`StreamPosition`]); a display
    /// without one goes after all the text.
    #[serde(default)]
    pub(crate) display_at: Vec<StreamPosition>,
    /// Where the final value was shown.
    #[serde(default)]
    pub(crate) result_at: Option<StreamPosition>,
    /// How many displays were shown before the final value.
    #[serde(default)]
    pub(crate) result_after: usize,
    /// The runs of writes as `[fd, bytes written when the run ended]`, for the streams the
    /// report carries ([`Streams::Reported`]); ignored when the host captured them.
    #[serde(default)]
    pub(crate) runs: Vec<(u8, usize)>,
}

/// Where a cell's stdout and stderr come from.
pub(crate) enum Streams {
    /// The host captured both itself, under its own caps, with the order of their writes (the
    /// wasm backend, whose guest writes its streams to file descriptors 1 and 2): whatever
    /// streams and runs the report claims are ignored.
    HostCaptured(StreamLog),
    /// The report carries the streams and their runs (the process backend's native driver),
    /// followed by what the cell wrote straight to file descriptors 1 and 2, as the host
    /// captured it.
    Reported {
        /// The host's capture of fd 1 after the report's stdout.
        fd_stdout: String,
        /// The host's capture of fd 2 after the report's stderr.
        fd_stderr: String,
    },
}

impl StreamLog {
    /// The text written to `stream` as one string, with the marker for what was dropped.
    pub(crate) fn text(&self, stream: StreamName) -> String {
        let i = stream as usize;
        with_marker(String::from_utf8_lossy(&self.kept[i]).into_owned(), self.dropped[i])
    }
}

impl GuestReport {
    /// The cell's output, every text in it under the host's caps whatever the guest claimed
    /// or cut itself, and whether anything was cut: each stream, the exception's value and
    /// traceback, and each `text/plain` at [`Limits::output_bytes`]. Its `outputs` are in the
    /// order the streams were written, the displays and final value where the guest says they
    /// were shown among them.
    pub(crate) fn into_cell(mut self, streams: Streams, limits: &Limits) -> (CellOutput, bool) {
        let cap = limits.output_bytes;
        let mut cut = false;
        let mut plain = |bundle: &mut MimeBundle| {
            if let Some(text) = bundle.get_mut("text/plain") {
                let (kept, was_cut) = capped(std::mem::take(text), cap);
                *text = kept;
                cut |= was_cut;
            }
        };
        self.result
            .iter_mut()
            .chain(self.display.iter_mut())
            .for_each(&mut plain);
        let error = self.error.take().map(|error| {
            let (value, value_cut) = capped(error.value, cap);
            let (traceback, traceback_cut) = capped_lines(error.traceback, cap);
            cut |= value_cut || traceback_cut;
            CellError {
                name: capped(error.name, cap).0,
                value,
                traceback,
            }
        });
        let placed = self.placed();
        let error_output = error.as_ref().map(CellError::to_output);
        let (stdout, stderr, outputs) = match streams {
            Streams::HostCaptured(log) => {
                let outputs = log.ordered(placed, error_output);
                (log.text(StreamName::Stdout), log.text(StreamName::Stderr), outputs)
            }
            Streams::Reported { fd_stdout, fd_stderr } => {
                cut |= self.stdout_dropped + self.stderr_dropped > 0;
                let log = self.reported_log(cap);
                cut |= log.dropped != [self.stdout_dropped, self.stderr_dropped];
                let mut outputs = log.ordered(placed, None);
                for (name, text) in [(StreamName::Stdout, &fd_stdout), (StreamName::Stderr, &fd_stderr)] {
                    push_stream(&mut outputs, name, text);
                }
                outputs.extend(error_output);
                (
                    log.text(StreamName::Stdout) + &fd_stdout,
                    log.text(StreamName::Stderr) + &fd_stderr,
                    outputs,
                )
            }
        };
        let cell = CellOutput {
            stdout,
            stderr,
            result: self.result,
            display: self.display,
            error,
            outputs,
        };
        (cell, cut)
    }

    /// The displays and the final value as outputs, each where the report says it was shown.
    fn placed(&self) -> Vec<Placed> {
        let unplaced = [usize::MAX, usize::MAX];
        let mut placed: Vec<Placed> = self
            .display
            .iter()
            .enumerate()
            .map(|(i, data)| Placed {
                at: self.display_at.get(i).copied().unwrap_or(unplaced),
                output: Output::DisplayData {
                    data: data.clone(),
                    metadata: Default::default(),
                },
            })
            .collect();
        if let Some(data) = &self.result {
            let result = Placed {
                at: self.result_at.unwrap_or(unplaced),
                output: Output::ExecuteResult {
                    execution_count: None,
                    data: data.clone(),
                    metadata: Default::default(),
                },
            };
            placed.insert(self.result_after.min(placed.len()), result);
        }
        placed
    }

    /// The streams the report carries as a record, cut at the host's cap, in the runs it
    /// claims (at most [`MAX_RUNS`]).
    fn reported_log(&mut self, cap: usize) -> StreamLog {
        let kept_of = |text: &mut String, dropped: usize| {
            let (kept, extra) = match text.len() > cap {
                true => {
                    let mut end = cap;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    (text.as_bytes()[..end].to_vec(), text.len() - end)
                }
                false => (std::mem::take(text).into_bytes(), 0),
            };
            (kept, dropped.saturating_add(extra))
        };
        let (out, out_dropped) = kept_of(&mut self.stdout, self.stdout_dropped);
        let (err, err_dropped) = kept_of(&mut self.stderr, self.stderr_dropped);
        let runs = self
            .runs
            .iter()
            .filter_map(|&(fd, end)| StreamName::from_fd(fd).map(|stream| Run { stream, end }))
            .take(MAX_RUNS)
            .collect();
        StreamLog {
            kept: [out, err],
            dropped: [out_dropped, err_dropped],
            runs,
        }
    }
}

/// Appends `text` to `outputs` as stream output, joining the last output when it is the same
/// stream's.
fn push_stream(outputs: &mut Vec<Output>, name: StreamName, text: &str) {
    if text.is_empty() {
        return;
    }
    match outputs.last_mut() {
        Some(Output::Stream {
            name: last,
            text: so_far,
        }) if *last == name => so_far.push_str(text),
        _ => outputs.push(Output::Stream {
            name,
            text: text.to_owned(),
        }),
    }
}

/// `text` cut to `max_bytes` with the visible marker, without a copy when it fits.
fn capped(text: String, max_bytes: usize) -> (String, bool) {
    if text.len() <= max_bytes {
        return (text, false);
    }
    cap_text(&text, max_bytes)
}

/// The lines of a traceback, at most `max_bytes` of them in all: the first lines, a marker
/// line, and the last line (the exception itself, capped), so the reader still sees what was
/// raised.
fn capped_lines(lines: Vec<String>, max_bytes: usize) -> (Vec<String>, bool) {
    let total: usize = lines.iter().map(|line| line.len() + 1).sum();
    if total <= max_bytes {
        return (lines, false);
    }
    let last = lines
        .last()
        .map(|line| capped(line.clone(), max_bytes / 2).0)
        .unwrap_or_default();
    let mut room = max_bytes.saturating_sub(last.len());
    let mut kept = Vec::new();
    for line in &lines[..lines.len().saturating_sub(1)] {
        if line.len() + 1 > room {
            break;
        }
        room -= line.len() + 1;
        kept.push(line.clone());
    }
    let dropped = total - kept.iter().map(|line| line.len() + 1).sum::<usize>() - last.len() - 1;
    kept.push(output_cut_marker(dropped).trim().to_owned());
    kept.push(last);
    (kept, true)
}

/// How long a cell interrupted at its `timeout` has to stop before it is stopped for good: a quarter of
/// the limit, from 50 ms to 1 s. A Python loop stops at its next bytecode check, well within it.
pub(crate) fn interrupt_grace(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// The result of a cell that reported after it was interrupted at its time limit: its own
/// output (usually a `KeyboardInterrupt` traceback), as a time limit, with the state kept. A cell
/// that caught the exception and finished still ran past its limit, and is reported so.
pub(crate) fn kept_after_interrupt(mut result: ExecutionResult, timeout: Duration) -> ExecutionResult {
    let message = format!(
        "the cell ran past its {:.3} s time limit and was interrupted (KeyboardInterrupt); the interpreter kept its state, \
         so variables and imports from earlier cells are still there",
        timeout.as_secs_f64()
    );
    if !result.output.is_empty() && !result.output.ends_with('\n') {
        result.output.push('\n');
    }
    result.output.push_str(&message);
    result.success = false;
    result.error = Some(ExecutionError {
        kind: ErrorKind::LimitExceeded,
        message,
    });
    result.metadata.limit_hit = Some(LimitKind::Time);
    result
}

/// What a cell that was interrupted at its time limit and did not stop within its grace period
/// is told, before how it was stopped.
pub(crate) fn did_not_stop(timeout: Duration) -> String {
    format!(
        "the cell ran past its {:.3} s time limit, did not stop within {:.3} s of the KeyboardInterrupt it was sent \
         (stuck in C code, or catching the exception),",
        timeout.as_secs_f64(),
        interrupt_grace(timeout).as_secs_f64()
    )
}

/// The result of a cell that ran to its end, in either backend. `out_of_memory` says its
/// `MemoryError` came from the slot's memory limit, which makes it a limit, not a cell error.
pub(crate) fn finished_cell(
    cell: CellOutput,
    truncated: bool,
    out_of_memory: bool,
    limits: &Limits,
) -> ExecutionResult {
    let error = cell.error.as_ref().map(|e| match out_of_memory {
        true => ExecutionError {
            kind: ErrorKind::LimitExceeded,
            message: format!(
                "the cell needed more than its {} MiB memory limit (MemoryError); the interpreter state is kept",
                limits.memory_bytes >> 20
            ),
        },
        false => ExecutionError {
            kind: ErrorKind::CellError,
            message: format!("{}: {}", e.name, e.value),
        },
    });
    let limit_hit = match (out_of_memory, truncated) {
        (true, _) => Some(LimitKind::Memory),
        (false, true) => Some(LimitKind::Output),
        _ => None,
    };
    ExecutionResult {
        success: cell.error.is_none(),
        output: render_for_model(&cell),
        error,
        cell: Some(cell),
        metadata: ExecutionMetadata {
            limit_hit,
            truncated,
            ..Default::default()
        },
    }
}

/// The text a model sees for a cell: its streams, displays, final value and traceback.
pub(crate) fn render_for_model(cell: &CellOutput) -> String {
    let mut text = String::new();
    let mut push = |part: &str| {
        if part.is_empty() {
            return;
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(part);
    };
    push(&cell.stdout);
    push(&cell.stderr);
    for display in &cell.display {
        let kinds: Vec<&str> = display
            .keys()
            .filter(|k| *k != "text/plain")
            .map(String::as_str)
            .collect();
        let plain = display.get("text/plain").map(String::as_str).unwrap_or("");
        if kinds.is_empty() {
            push(plain);
        } else {
            push(&format!("[display: {}] {plain}", kinds.join(", ")));
        }
    }
    if let Some(result) = &cell.result {
        push(result.get("text/plain").map(String::as_str).unwrap_or(""));
    }
    if let Some(error) = &cell.error {
        if error.traceback.is_empty() {
            push(&format!("{}: {}", error.name, error.value));
        } else {
            push(&error.traceback.join("\n"));
        }
    }
    text
}

/// `text` with the marker for `dropped` bytes appended, when any were dropped.
pub(crate) fn with_marker(mut text: String, dropped: usize) -> String {
    if dropped > 0 {
        text.push_str(&output_cut_marker(dropped));
    }
    text
}

/// `text` cut to at most `max_bytes` (at a character boundary), followed by a marker saying how
/// many bytes were dropped; and whether it was cut.
pub fn cap_text(text: &str, max_bytes: usize) -> (String, bool) {
    if text.len() <= max_bytes {
        return (text.to_string(), false);
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut capped = String::with_capacity(end + 64);
    capped.push_str(&text[..end]);
    capped.push_str(&output_cut_marker(text.len() - end));
    (capped, true)
}

/// The visible marker that replaces `dropped` bytes of output.
pub fn output_cut_marker(dropped: usize) -> String {
    format!("{MARKER_HEAD}{dropped}{MARKER_TAIL}")
}

/// The marker's text before and after its byte count.
const MARKER_HEAD: &str = "\n[rollbox: output truncated, ";
const MARKER_TAIL: &str = " more bytes not shown]\n";

/// `text` without the [`output_cut_marker`]s in it, and the bytes they said were dropped. For
/// callers that report truncation beside a stream instead of inside it (SandboxFusion's
/// `/run_code`, whose clients compare stdout byte for byte). Only call it on a stream the
/// backend said it truncated: a program may print marker-like text itself.
pub fn strip_output_cut_markers(text: &str) -> (String, usize) {
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0usize;
    let mut rest = text;
    while let Some(at) = rest.find(MARKER_HEAD) {
        let after = &rest[at + MARKER_HEAD.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[digits..]
            .starts_with(MARKER_TAIL)
            .then(|| after[..digits].parse::<usize>())
        {
            Some(Ok(count)) => {
                kept.push_str(&rest[..at]);
                dropped = dropped.saturating_add(count);
                rest = &after[digits + MARKER_TAIL.len()..];
            }
            _ => {
                // Not a marker after all: keep its first byte (a newline) and look further on.
                kept.push_str(&rest[..at + 1]);
                rest = &rest[at + 1..];
            }
        }
    }
    kept.push_str(rest);
    (kept, dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_stripped_and_their_counts_added_up() {
        let text = format!("abc{}tail{}", output_cut_marker(12), output_cut_marker(3));
        assert_eq!(strip_output_cut_markers(&text), ("abctail".to_string(), 15));
        let lookalike = "x\n[rollbox: output truncated, many more bytes not shown]\n";
        assert_eq!(strip_output_cut_markers(lookalike), (lookalike.to_string(), 0));
        let (capped, cut) = cap_text("hello world", 5);
        assert!(cut);
        assert_eq!(strip_output_cut_markers(&capped), ("hello".to_string(), 6));
    }

    #[test]
    fn cap_text_cuts_at_a_char_boundary_and_says_how_much() {
        let (s, cut) = cap_text("héllo", 2);
        assert!(cut);
        assert!(s.starts_with('h') && !s.starts_with("hé"));
        assert!(s.contains("5 more bytes"));
        assert_eq!(cap_text("abc", 3), ("abc".to_string(), false));
    }
}
