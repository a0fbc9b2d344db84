//! A child's output stream, read on its own thread into a capped buffer, so a chatty program
//! never blocks on a full pipe and never fills the host's memory.
//!
//! For the native interpreter the stream is cut into one segment per cell: the driver writes a
//! marker after each cell, and what came before it belongs to that cell.

use std::collections::VecDeque;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::slot::cell::output_cut_marker;

/// The bytes read at once from a pipe.
const READ_CHUNK: usize = 64 * 1024;

/// What a stream carried, capped: the first bytes kept, and how many more were dropped.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Captured {
    kept: Vec<u8>,
    dropped: usize,
}

impl Captured {
    /// The text, with the project's marker when bytes were dropped.
    pub(crate) fn into_text(self) -> String {
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if self.dropped > 0 {
            text.push_str(&output_cut_marker(self.dropped));
        }
        text
    }

    /// Whether bytes were dropped.
    pub(crate) fn truncated(&self) -> bool {
        self.dropped > 0
    }

    fn push(&mut self, bytes: &[u8], cap: usize) {
        let room = cap.saturating_sub(self.kept.len());
        let kept = bytes.len().min(room);
        self.kept.extend_from_slice(&bytes[..kept]);
        self.dropped += bytes.len() - kept;
    }
}

struct State {
    current: Captured,
    /// Finished segments (one per marker seen), oldest first.
    segments: VecDeque<Captured>,
    /// Bytes that may be the start of a marker, held back until the next read settles it.
    held: Vec<u8>,
    eof: bool,
}

/// A stream being read on its own thread.
pub(crate) struct StreamCapture {
    state: Mutex<State>,
    changed: Condvar,
    cap: usize,
    marker: Vec<u8>,
}

impl StreamCapture {
    /// Starts reading `stream`, keeping at most `cap` bytes per segment; `marker` (may be empty)
    /// ends a segment.
    pub(crate) fn start(
        stream: impl Read + Send + 'static,
        cap: usize,
        marker: Vec<u8>,
    ) -> std::io::Result<Arc<StreamCapture>> {
        let capture = Arc::new(StreamCapture::new(cap, marker));
        let reader = capture.clone();
        std::thread::Builder::new()
            .name("rollbox-capture".into())
            .spawn(move || reader.read_all(stream))?;
        Ok(capture)
    }

    fn new(cap: usize, marker: Vec<u8>) -> StreamCapture {
        StreamCapture {
            state: Mutex::new(State {
                current: Captured::default(),
                segments: VecDeque::new(),
                held: Vec::new(),
                eof: false,
            }),
            changed: Condvar::new(),
            cap,
            marker,
        }
    }

    fn read_all(&self, mut stream: impl Read) {
        let mut buffer = vec![0u8; READ_CHUNK];
        loop {
            match stream.read(&mut buffer) {
                Ok(0) => break,
                Ok(n) => self.take_in(&buffer[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        self.finish();
    }

    fn finish(&self) {
        let mut state = self.lock();
        let held = std::mem::take(&mut state.held);
        state.current.push(&held, self.cap);
        state.eof = true;
        self.changed.notify_all();
    }

    fn take_in(&self, bytes: &[u8]) {
        let mut state = self.lock();
        let mut data = std::mem::take(&mut state.held);
        data.extend_from_slice(bytes);
        let mut rest = &data[..];
        if !self.marker.is_empty() {
            while let Some(at) = find(rest, &self.marker) {
                state.current.push(&rest[..at], self.cap);
                let done = std::mem::take(&mut state.current);
                state.segments.push_back(done);
                rest = &rest[at + self.marker.len()..];
            }
        }
        let hold = held_back(rest, &self.marker);
        state.current.push(&rest[..rest.len() - hold], self.cap);
        state.held = rest[rest.len() - hold..].to_vec();
        self.changed.notify_all();
    }

    /// The next finished segment, waiting until `deadline` for its marker; `None` if the marker
    /// did not come (or the stream ended first).
    pub(crate) fn next_segment(&self, deadline: Instant) -> Option<Captured> {
        let mut state = self.lock();
        loop {
            if let Some(segment) = state.segments.pop_front() {
                return Some(segment);
            }
            let left = deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())?;
            if state.eof {
                return None;
            }
            state = self.wait(state, left);
        }
    }

    /// Waits until the stream ends or `deadline` passes, then takes everything not yet taken.
    pub(crate) fn drain(&self, deadline: Instant) -> Captured {
        let mut state = self.lock();
        while !state.eof {
            let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) else {
                break;
            };
            state = self.wait(state, left);
        }
        let mut all = Captured::default();
        for segment in std::mem::take(&mut state.segments)
            .into_iter()
            .chain([std::mem::take(&mut state.current)])
        {
            all.push(&segment.kept, self.cap);
            all.dropped += segment.dropped;
        }
        let held = std::mem::take(&mut state.held);
        all.push(&held, self.cap);
        all
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'a>(&self, state: MutexGuard<'a, State>, left: Duration) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(state, left) {
            Ok((state, _)) => state,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// How many bytes at the end of `data` could begin `marker`, and so must wait for more input.
fn held_back(data: &[u8], marker: &[u8]) -> usize {
    (1..marker.len().min(data.len() + 1))
        .rev()
        .find(|&n| data.ends_with(&marker[..n]))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_at_markers_even_across_reads() {
        let capture = StreamCapture::new(4, b"<END>".to_vec());
        capture.take_in(b"abcdefg<E");
        capture.take_in(b"ND>xy<END>ta");
        capture.take_in(b"il<");
        capture.finish();
        let far = Instant::now() + Duration::from_secs(30);
        assert_eq!(
            capture.next_segment(far),
            Some(Captured {
                kept: b"abcd".to_vec(),
                dropped: 3
            })
        );
        assert_eq!(
            capture.next_segment(far),
            Some(Captured {
                kept: b"xy".to_vec(),
                dropped: 0
            })
        );
        assert_eq!(
            capture.drain(far),
            Captured {
                kept: b"tail".to_vec(),
                dropped: 1
            }
        );
    }

    #[test]
    fn held_back_keeps_only_a_possible_marker_start() {
        assert_eq!(held_back(b"abc<E", b"<END>"), 2);
        assert_eq!(held_back(b"abc", b"<END>"), 0);
        assert_eq!(held_back(b"<", b"<END>"), 1);
        assert_eq!(held_back(b"abc", b""), 0);
    }
}
