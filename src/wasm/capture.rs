//! The guest's stdout and stderr file descriptors, captured into capped buffers.
//!
//! Cells print through Python's `sys.stdout`, which the guest redirects itself; these buffers
//! catch what bypasses it (C code, `os.write(1, ...)`), so no output is lost and none can grow
//! without bound. Each write is stamped from one process-wide counter, so the host itself knows
//! the order in which a cell wrote to its two streams ([`take_streams`]), whatever the guest
//! reports.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

use crate::slot::outputs::{MAX_RUNS, Run, StreamLog, StreamName};

/// Stamps every captured write, in every slot: two writes to a slot's streams compare in the
/// order they happened.
static WRITE_STAMP: AtomicU64 = AtomicU64::new(0);

/// A capped in-memory stream; clones share one buffer.
#[derive(Clone, Default)]
pub(crate) struct CapturedStream {
    inner: Arc<Mutex<Captured>>,
}

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    cap: usize,
    dropped: usize,
    /// Runs of writes since the last take: (the stamp of the run's last write, the bytes
    /// written when it ended, kept or dropped), at most [`MAX_RUNS`].
    runs: Vec<(u64, usize)>,
}

impl CapturedStream {
    /// An empty stream that keeps at most `cap` bytes.
    pub(crate) fn new(cap: usize) -> Self {
        CapturedStream {
            inner: Arc::new(Mutex::new(Captured {
                bytes: Vec::new(),
                cap,
                dropped: 0,
                runs: Vec::new(),
            })),
        }
    }

    /// Takes what was written since the last take, and how many bytes were dropped; sets the
    /// cap for what comes next.
    pub(crate) fn take(&self, next_cap: usize) -> (Vec<u8>, usize) {
        let (bytes, dropped, _) = self.take_runs(next_cap);
        (bytes, dropped)
    }

    /// [`CapturedStream::take`], with the runs of writes since the last take.
    fn take_runs(&self, next_cap: usize) -> (Vec<u8>, usize, Vec<(u64, usize)>) {
        let mut captured = self.lock();
        captured.cap = next_cap;
        let dropped = std::mem::take(&mut captured.dropped);
        let runs = std::mem::take(&mut captured.runs);
        (std::mem::take(&mut captured.bytes), dropped, runs)
    }

    /// Forgets what was written since the last take (IPython's `clear_output`); the cap for
    /// the rest of the call is unchanged.
    pub(crate) fn clear(&self) {
        let mut captured = self.lock();
        captured.bytes.clear();
        captured.dropped = 0;
        captured.runs.clear();
    }

    fn append(&self, data: &[u8]) {
        let mut captured = self.lock();
        let room = captured.cap.saturating_sub(captured.bytes.len());
        let kept = data.len().min(room);
        captured.bytes.extend_from_slice(&data[..kept]);
        captured.dropped += data.len() - kept;
        let end = captured.bytes.len() + captured.dropped;
        // Stamped under the stream's lock: a slot's guest writes from one thread, so its two
        // streams' stamps follow the order of its writes.
        let stamp = WRITE_STAMP.fetch_add(1, Ordering::Relaxed);
        let full = captured.runs.len() >= MAX_RUNS;
        match captured.runs.last_mut() {
            // Nothing was written anywhere since this stream's last write: the same run.
            Some(last) if last.0 + 1 == stamp => *last = (stamp, end),
            // Past the cap the rest goes out after the recorded runs (see `MAX_RUNS`).
            _ if full => {}
            _ => captured.runs.push((stamp, end)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        // A panic while holding this lock cannot leave the buffer inconsistent; keep going.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Takes both streams of a cell (see [`CapturedStream::take`]) as one record, its runs in the
/// order the host saw them written.
pub(crate) fn take_streams(stdout: &CapturedStream, stderr: &CapturedStream, next_cap: usize) -> StreamLog {
    let (out_bytes, out_dropped, out_runs) = stdout.take_runs(next_cap);
    let (err_bytes, err_dropped, err_runs) = stderr.take_runs(next_cap);
    let mut stamped: Vec<(u64, Run)> = out_runs
        .into_iter()
        .map(|(stamp, end)| (stamp, StreamName::Stdout, end))
        .chain(
            err_runs
                .into_iter()
                .map(|(stamp, end)| (stamp, StreamName::Stderr, end)),
        )
        .map(|(stamp, stream, end)| (stamp, Run { stream, end }))
        .collect();
    stamped.sort_unstable_by_key(|(stamp, _)| *stamp);
    let mut runs: Vec<Run> = Vec::with_capacity(stamped.len());
    for (_, run) in stamped {
        match runs.last_mut() {
            Some(last) if last.stream == run.stream => last.end = run.end,
            _ => runs.push(run),
        }
    }
    StreamLog {
        kept: [out_bytes, err_bytes],
        dropped: [out_dropped, err_dropped],
        runs,
    }
}

impl IsTerminal for CapturedStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl OutputStream for CapturedStream {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always writable: past the cap, bytes are counted and dropped, never refused, so the
        // guest never blocks or errors on output.
        Ok(1 << 20)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CapturedStream {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CapturedStream {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
