//! A cell's outputs in the order they were produced, in nbformat v4's shape ([`Output`]), and
//! how the host puts them in that order ([`StreamLog::ordered`]).
//!
//! The text of both streams, and the order in which their runs were written, come from the
//! host's own record ([`StreamLog`]): on `wasm` the host saw each write to file descriptors 1
//! and 2 itself. A guest only claims *where* its rich outputs (displays, the final value) sat
//! among those writes, as byte positions; a claim can move a display between two runs of text,
//! which the cell could do anyway by calling `display` at another time, but it cannot reorder,
//! add or hide text the host saw.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::MimeBundle;
use super::cell::output_cut_marker;

/// One output of a cell, as nbformat v4 stores it in a code cell's `outputs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "output_type", rename_all = "snake_case")]
pub enum Output {
    /// Text the cell wrote to one stream; consecutive writes to the same stream are one output.
    Stream {
        /// Which stream.
        name: StreamName,
        /// What was written, with the host's truncation marker where it cut.
        text: String,
    },
    /// A rich output the cell displayed (a figure as `image/png`, base64).
    DisplayData {
        /// Its representations by MIME type; every value is a string, JSON ones serialised.
        data: MimeBundle,
        /// Always empty: rollbox records no display metadata.
        metadata: BTreeMap<String, serde_json::Value>,
    },
    /// The value of the cell's final expression.
    ExecuteResult {
        /// Unknown to the backend (a slot does not number its cells), so `null`.
        execution_count: Option<u64>,
        /// Its representations by MIME type.
        data: MimeBundle,
        /// Always empty.
        metadata: BTreeMap<String, serde_json::Value>,
    },
    /// The exception the cell raised.
    Error {
        /// The exception's class name.
        ename: String,
        /// Its message.
        evalue: String,
        /// The formatted traceback, one entry per line.
        traceback: Vec<String>,
    },
}

/// A cell's two text streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamName {
    /// Standard output (file descriptor 1).
    Stdout,
    /// Standard error (file descriptor 2).
    Stderr,
}

impl StreamName {
    fn index(self) -> usize {
        match self {
            StreamName::Stdout => 0,
            StreamName::Stderr => 1,
        }
    }

    fn other(self) -> StreamName {
        match self {
            StreamName::Stdout => StreamName::Stderr,
            StreamName::Stderr => StreamName::Stdout,
        }
    }

    /// The stream of file descriptor `fd` (1 or 2).
    pub(crate) fn from_fd(fd: u8) -> Option<StreamName> {
        match fd {
            1 => Some(StreamName::Stdout),
            2 => Some(StreamName::Stderr),
            _ => None,
        }
    }
}

/// How many runs of writes a stream record keeps for one cell. Past it, the rest of each
/// stream's text still comes back, after the recorded runs (stdout first): the order coarsens,
/// no text is lost, and a cell that alternates one-byte writes cannot grow the record without
/// bound.
pub(crate) const MAX_RUNS: usize = 8192;

/// Where a rich output sat among the streams: how many bytes had been written to stdout and
/// to stderr (kept or dropped) when it was shown.
pub(crate) type StreamPosition = [usize; 2];

/// One stretch of writes to one stream, with no write to the other in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Run {
    /// The stream written.
    pub(crate) stream: StreamName,
    /// How many bytes had been written to that stream (kept or dropped) when the run ended.
    pub(crate) end: usize,
}

/// A cell's two streams as the host holds them: the bytes kept under the cap, how many more
/// were dropped, and the order of the runs in which they were written.
#[derive(Debug, Default)]
pub(crate) struct StreamLog {
    /// The first bytes written to stdout and to stderr, up to the cap.
    pub(crate) kept: [Vec<u8>; 2],
    /// The bytes written past the cap to each.
    pub(crate) dropped: [usize; 2],
    /// The runs in the order written (at most [`MAX_RUNS`]).
    pub(crate) runs: Vec<Run>,
}

/// A rich output the guest showed, with where it says it was shown.
pub(crate) struct Placed {
    /// Where among the streams it was shown; clamped so outputs keep their given order.
    pub(crate) at: StreamPosition,
    /// The output.
    pub(crate) output: Output,
}

impl StreamLog {
    /// The cell's outputs: stream text in the order written, each of `placed` (in its given
    /// order) at the earliest point where both streams had reached its position, then `error`.
    pub(crate) fn ordered(&self, placed: Vec<Placed>, error: Option<Output>) -> Vec<Output> {
        let mut order = Ordering {
            log: self,
            outputs: Vec::new(),
            written: [0, 0],
            marked: [false, false],
            next_run: 0,
        };
        for item in placed {
            order.write_until(item.at);
            order.outputs.push(item.output);
        }
        order.write_until([usize::MAX, usize::MAX]);
        for stream in [StreamName::Stdout, StreamName::Stderr] {
            order.write(stream, usize::MAX);
        }
        order.outputs.extend(error);
        order.outputs
    }
}

/// The state of [`StreamLog::ordered`] as it walks the runs.
struct Ordering<'a> {
    log: &'a StreamLog,
    outputs: Vec<Output>,
    /// How far each stream has been written out, in bytes written.
    written: [usize; 2],
    /// Whether each stream's truncation marker went out.
    marked: [bool; 2],
    next_run: usize,
}

impl Ordering<'_> {
    /// Writes out runs (splitting the last at the position) until both streams reach `at`
    /// or the runs end.
    fn write_until(&mut self, at: StreamPosition) {
        while let Some(run) = self.log.runs.get(self.next_run).copied() {
            if self.written[0] >= at[0] && self.written[1] >= at[1] {
                return;
            }
            let (own, other) = (run.stream.index(), run.stream.other().index());
            let end = run.end.max(self.written[own]);
            // Only when the other stream is already far enough may the position fall inside
            // this run; otherwise the whole run came before it.
            let stop = match self.written[other] >= at[other] {
                true => end.min(at[own].max(self.written[own])),
                false => end,
            };
            self.write(run.stream, stop);
            if stop == end {
                self.next_run += 1;
            }
        }
    }

    /// Writes out `stream` from where it stands up to byte `stop` (of all bytes written), with
    /// its marker once the kept bytes run out.
    fn write(&mut self, stream: StreamName, stop: usize) {
        let i = stream.index();
        let kept = &self.log.kept[i];
        let from = self.written[i].min(kept.len());
        let to = stop.min(kept.len()).max(from);
        let mut text = String::from_utf8_lossy(&kept[from..to]).into_owned();
        let past_kept = stop >= kept.len() && (stop > self.written[i] || stop == usize::MAX);
        if past_kept && self.log.dropped[i] > 0 && !self.marked[i] {
            self.marked[i] = true;
            text.push_str(&output_cut_marker(self.log.dropped[i]));
        }
        self.written[i] = stop.max(self.written[i]);
        if text.is_empty() {
            return;
        }
        match self.outputs.last_mut() {
            Some(Output::Stream { name, text: last }) if *name == stream => last.push_str(&text),
            _ => self.outputs.push(Output::Stream { name: stream, text }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(out: &str, err: &str, runs: &[(StreamName, usize)]) -> StreamLog {
        StreamLog {
            kept: [out.as_bytes().to_vec(), err.as_bytes().to_vec()],
            dropped: [0, 0],
            runs: runs.iter().map(|&(stream, end)| Run { stream, end }).collect(),
        }
    }

    fn texts(outputs: &[Output]) -> Vec<String> {
        outputs
            .iter()
            .map(|o| match o {
                Output::Stream { name, text } => format!("{name:?}:{text}"),
                Output::DisplayData { data, .. } => format!("display:{}", data["text/plain"]),
                Output::ExecuteResult { data, .. } => format!("result:{}", data["text/plain"]),
                Output::Error { ename, .. } => format!("error:{ename}"),
            })
            .collect()
    }

    fn display(text: &str, at: StreamPosition) -> Placed {
        Placed {
            at,
            output: Output::DisplayData {
                data: [("text/plain".to_string(), text.to_string())].into(),
                metadata: BTreeMap::new(),
            },
        }
    }

    use StreamName::{Stderr, Stdout};

    #[test]
    fn runs_come_out_in_the_order_written_with_displays_between_them() {
        let log = log("a\nb\n", "x\n", &[(Stdout, 2), (Stderr, 2), (Stdout, 4)]);
        let outputs = log.ordered(vec![display("d1", [2, 2]), display("d2", [3, 0])], None);
        assert_eq!(
            texts(&outputs),
            [
                "Stdout:a\n",
                "Stderr:x\n",
                "display:d1",
                "Stdout:b",
                "display:d2",
                "Stdout:\n"
            ]
        );
    }

    #[test]
    fn a_position_past_every_write_puts_the_output_at_the_end_and_text_past_the_runs_follows() {
        let log = log("abc", "e", &[(Stdout, 1)]);
        let outputs = log.ordered(vec![display("d", [99, 99])], None);
        assert_eq!(texts(&outputs), ["Stdout:a", "display:d", "Stdout:bc", "Stderr:e"]);
    }

    #[test]
    fn the_marker_follows_the_last_kept_byte() {
        let mut log = log("ab", "", &[(Stdout, 5), (Stderr, 0)]);
        log.dropped = [3, 0];
        let outputs = log.ordered(Vec::new(), None);
        assert_eq!(texts(&outputs), [format!("Stdout:ab{}", output_cut_marker(3))]);
    }

    #[test]
    fn positions_cannot_pull_text_out_of_order() {
        // The claim says the display came after 1 byte of stdout and 1 of stderr, but stderr's
        // first byte was written after all of stdout: the display goes after both.
        let log = log("ab", "e", &[(Stdout, 2), (Stderr, 1)]);
        let outputs = log.ordered(vec![display("d", [1, 1])], None);
        assert_eq!(texts(&outputs), ["Stdout:ab", "Stderr:e", "display:d"]);
    }
}
