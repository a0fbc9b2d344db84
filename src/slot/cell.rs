//! The cell report every backend that runs the guest shares (`wasm`, and `process` through its
//! native driver): what the guest sends ([`GuestReport`]), how a finished cell becomes an
//! [`ExecutionResult`] ([`finished_cell`]), the text a model sees ([`render_for_model`]), and the
//! byte caps on output with their visible marker ([`cap_text`]).

use std::time::Duration;

use serde::Deserialize;

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
}

impl GuestReport {
    /// Whether the guest cut either stream at its byte cap.
    pub(crate) fn dropped_output(&self) -> bool {
        self.stdout_dropped + self.stderr_dropped > 0
    }

    /// The cell's output: each stream as the guest captured it (with the truncation marker if
    /// it was cut), then what the cell wrote straight to file descriptors 1 and 2.
    pub(crate) fn into_cell(self, fd_stdout: &str, fd_stderr: &str) -> CellOutput {
        CellOutput {
            stdout: with_marker(self.stdout, self.stdout_dropped) + fd_stdout,
            stderr: with_marker(self.stderr, self.stderr_dropped) + fd_stderr,
            result: self.result,
            display: self.display,
            error: self.error,
        }
    }
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
    format!("\n[rollbox: output truncated, {dropped} more bytes not shown]\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_text_cuts_at_a_char_boundary_and_says_how_much() {
        let (s, cut) = cap_text("héllo", 2);
        assert!(cut);
        assert!(s.starts_with('h') && !s.starts_with("hé"));
        assert!(s.contains("5 more bytes"));
        assert_eq!(cap_text("abc", 3), ("abc".to_string(), false));
    }
}
