//! The guest's stdout and stderr file descriptors, captured into capped buffers.
//!
//! Cells print through Python's `sys.stdout`, which the guest redirects itself; these buffers
//! catch what bypasses it (C code, `os.write(1, ...)`), so no output is lost and none can grow
//! without bound.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

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
}

impl CapturedStream {
    /// An empty stream that keeps at most `cap` bytes.
    pub(crate) fn new(cap: usize) -> Self {
        CapturedStream {
            inner: Arc::new(Mutex::new(Captured {
                bytes: Vec::new(),
                cap,
                dropped: 0,
            })),
        }
    }

    /// Takes what was written since the last take, and how many bytes were dropped; sets the
    /// cap for what comes next.
    pub(crate) fn take(&self, next_cap: usize) -> (Vec<u8>, usize) {
        let mut captured = self.lock();
        captured.cap = next_cap;
        let dropped = std::mem::take(&mut captured.dropped);
        (std::mem::take(&mut captured.bytes), dropped)
    }

    /// Forgets what was written since the last take (IPython's `clear_output`); the cap for
    /// the rest of the call is unchanged.
    pub(crate) fn clear(&self) {
        let mut captured = self.lock();
        captured.bytes.clear();
        captured.dropped = 0;
    }

    fn append(&self, data: &[u8]) {
        let mut captured = self.lock();
        let room = captured.cap.saturating_sub(captured.bytes.len());
        let kept = data.len().min(room);
        captured.bytes.extend_from_slice(&data[..kept]);
        captured.dropped += data.len() - kept;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        // A panic while holding this lock cannot leave the buffer inconsistent; keep going.
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
