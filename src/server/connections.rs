//! The server's own accept loop: a cap on open connections, a header-read timeout and an
//! idle timeout, none of which `axum::serve` has.
//!
//! Without them a client that never finishes its headers (slow-loris) holds a descriptor
//! forever, and authentication, which needs the headers, never runs: a few hundred silent
//! sockets filled the server's descriptor table and every later `accept` failed with "Too many
//! open files". So:
//! - at most [`ConnectionLimits::max_open`] connections are open; the loop takes a permit
//!   *before* it accepts, so past the cap new connections wait in the kernel's backlog instead
//!   of costing a descriptor, and the cap is kept below the process's `RLIMIT_NOFILE`
//!   ([`open_connection_cap`]);
//! - a request's headers must be complete within the header-read timeout of its first byte
//!   (of the accept, for a connection's first request);
//! - a connection with no request running and no byte moving for the idle timeout is closed.
//!
//! A request that is running is bounded by the server's request timeout, not by these.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Instant;

/// How long the loop waits after an accept error that is not the peer's doing (such as
/// "Too many open files") before it accepts again, so such an error never spins a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(250);

/// The share of the process's descriptor limit that connections may hold at most; the rest is
/// for slots (workspaces, pipes, the runtime's files) and the listener itself.
const CONNECTION_SHARE_OF_DESCRIPTORS: u64 = 2;

/// The connection settings the accept loop enforces.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnectionLimits {
    /// The most connections open at once (already kept below the descriptor limit).
    pub(crate) max_open: usize,
    /// How long a request's headers may take to arrive.
    pub(crate) header_read_timeout: Duration,
    /// How long a connection may sit with no request running and no byte moving.
    pub(crate) idle_timeout: Duration,
}

/// The process's soft `RLIMIT_NOFILE`, or `None` when it is unlimited or cannot be read.
pub(crate) fn descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives for the call.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    (read == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// The connection cap to enforce: the configured one, lowered to half of the descriptor limit
/// when that is smaller, and at least 1.
pub(crate) fn open_connection_cap(configured: usize, descriptor_limit: Option<u64>) -> usize {
    let ceiling = descriptor_limit
        .map(|limit| usize::try_from(limit / CONNECTION_SHARE_OF_DESCRIPTORS).unwrap_or(usize::MAX))
        .unwrap_or(usize::MAX);
    configured.min(ceiling).max(1)
}

/// Accepts connections on `listener` and serves `router` on each, within `limits`, until
/// `shutdown` completes; then stops accepting, lets each connection finish the request it is
/// serving, and returns once every connection is closed.
pub(crate) async fn serve_connections(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(limits.max_open));
    // Every connection task holds a receiver; `closed()` on the sender completes when the
    // last one is gone. The value itself says "shut down".
    let (stopping, stop_signal) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit,
            () = &mut shutdown => break,
        };
        // The semaphore is never closed, so a permit always comes.
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        match accepted {
            Ok((stream, _peer)) => {
                let connection = serve_connection(stream, router.clone(), limits, stop_signal.clone(), permit);
                tokio::spawn(connection);
            }
            Err(error) if is_peer_error(&error) => {}
            Err(error) => {
                tracing::warn!(%error, "failed to accept a connection; pausing before the next accept");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
    drop(listener);
    drop(stop_signal);
    let _ = stopping.send(true);
    stopping.closed().await;
}

/// Errors that concern one connection only, not the listener.
fn is_peer_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// Serves HTTP/1.1 on one connection until it ends, its deadline passes, or the server shuts
/// down (then the request in progress finishes first). Holds `_permit` while open.
async fn serve_connection(
    stream: TcpStream,
    router: Router,
    limits: ConnectionLimits,
    mut stop_signal: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(WatchedStream {
        inner: stream,
        activity: activity.clone(),
    });
    let router = TowerToHyperService::new(router);
    let counted = activity.clone();
    let service = hyper::service::service_fn(move |request| {
        let running = counted.request_started();
        let response = hyper::service::Service::call(&router, request);
        async move {
            let response = response.await;
            drop(running);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // Our own deadlines below replace hyper's header timer, which would also count the time
    // between requests as header time.
    builder.header_read_timeout(None);
    let mut connection = pin!(builder.serve_connection(io, service));
    let mut stopping = false;
    loop {
        let deadline = activity.deadline(&limits);
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "a connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep_until(deadline.unwrap_or_else(|| Instant::now() + limits.idle_timeout)) => {
                if activity.deadline(&limits).is_some_and(|deadline| deadline <= Instant::now()) {
                    tracing::debug!("closing a connection past its header-read or idle timeout");
                    return;
                }
            }
            () = activity.request_ended.notified() => {}
            changed = stop_signal.changed(), if !stopping => {
                stopping = true;
                if changed.is_ok() {
                    connection.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// What one connection is doing, for its deadlines.
struct Activity {
    state: Mutex<ActivityState>,
    /// Wakes the connection's task when a request ends, so its idle deadline starts counting.
    request_ended: Notify,
}

struct ActivityState {
    /// Requests whose response is not ready yet.
    running: usize,
    /// When the bytes of a request head that has not been handed to the router started
    /// arriving (the accept, for the first request).
    head_started: Option<Instant>,
    /// The last time a byte was read or written, or a request ended.
    last_progress: Instant,
}

impl Activity {
    fn new() -> Activity {
        let now = Instant::now();
        Activity {
            state: Mutex::new(ActivityState {
                running: 0,
                head_started: Some(now),
                last_progress: now,
            }),
            request_ended: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        // The state is a few plain fields, consistent after any write, so a poisoned lock is safe to reuse.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When the connection must close, or `None` while a request is running.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<Instant> {
        let state = self.lock();
        if state.running > 0 {
            return None;
        }
        Some(match state.head_started {
            Some(started) => started + limits.header_read_timeout,
            None => state.last_progress + limits.idle_timeout,
        })
    }

    fn read_some(&self) {
        let mut state = self.lock();
        let now = Instant::now();
        state.last_progress = now;
        if state.running == 0 && state.head_started.is_none() {
            state.head_started = Some(now);
        }
    }

    fn wrote_some(&self) {
        self.lock().last_progress = Instant::now();
    }

    fn request_started(self: &Arc<Self>) -> RunningRequest {
        let mut state = self.lock();
        state.running += 1;
        state.head_started = None;
        RunningRequest(self.clone())
    }
}

/// A request the router is answering; dropping it marks the end.
struct RunningRequest(Arc<Activity>);

impl Drop for RunningRequest {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.running = state.running.saturating_sub(1);
        state.last_progress = Instant::now();
        // Bytes read while the request ran (its body, or a pipelined head) are not a new head's start.
        state.head_started = None;
        drop(state);
        self.0.request_ended.notify_one();
    }
}

/// A TCP stream that reports its progress to its connection's [`Activity`].
struct WatchedStream {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl AsyncWrite for WatchedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.wrote_some();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, data);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            self.activity.wrote_some();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_below_half_the_descriptor_limit() {
        assert_eq!(open_connection_cap(4_096, Some(256)), 128);
        assert_eq!(open_connection_cap(100, Some(1_048_576)), 100);
        assert_eq!(open_connection_cap(100, None), 100);
        assert_eq!(open_connection_cap(100, Some(1)), 1);
    }
}
