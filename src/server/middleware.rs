//! The request stack: a tracing span and metrics per request, the per-request timeout, the
//! concurrency limit; and [`DetachedWork`], which lets backend work finish (and be accounted
//! for) even when its request is gone.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{Notify, Semaphore};
use tracing::Instrument;

use super::api::ApiErrorCode;
use super::{ApiFailure, ServerState};

/// The route label of requests no route matched; keeps the metrics' label set bounded.
const UNMATCHED_ROUTE: &str = "unmatched";

/// Middleware: one span per request (method, path, then status and latency) and the request
/// counters. Outermost, so it sees every answer, 401s and 413s included.
pub(crate) async fn observe(State(state): State<ServerState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or(UNMATCHED_ROUTE, MatchedPath::as_str)
        .to_owned();
    let span = tracing::info_span!(
        "request",
        method = %request.method(),
        path = %request.uri().path(),
        status = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    );
    let metrics = &state.shared.metrics;
    let _in_flight = metrics.request_started();
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    let status = response.status().as_u16();
    span.record("status", status);
    span.record("latency_ms", started.elapsed().as_secs_f64() * 1e3);
    span.in_scope(|| tracing::info!("request finished"));
    metrics.count_request(&route, status);
    response
}

/// Middleware: 504 for a request that runs past the server's request timeout. Work it
/// detached (see [`DetachedWork`]) goes on and is accounted for.
pub(crate) async fn request_timeout(State(state): State<ServerState>, request: Request, next: Next) -> Response {
    let limit = state.config().request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiFailure::new(
            ApiErrorCode::Timeout,
            format!(
                "the request ran past the server's {:.1} s request timeout; work already started may still finish. \
                 Send smaller batches, or start the server with a longer --request-timeout",
                limit.as_secs_f64()
            ),
        )
        .into_response(),
    }
}

/// The concurrency limit: a bounded number of requests run, a bounded number wait in line
/// for a turn, and any more are turned away at once with 503.
///
/// Waiting rather than refusing outright suits RL clients, which send bursts (a whole
/// batch of rollouts at once) and would otherwise see spurious failures; the waiting room is
/// bounded so a flood cannot pile up memory, and a wait counts against the request timeout.
pub(crate) struct Admission {
    /// Permits to be running or waiting.
    admitted: Semaphore,
    /// Permits to be running.
    running: Semaphore,
    running_limit: usize,
    queue_limit: usize,
}

impl Admission {
    pub(crate) fn new(running: usize, queued: usize) -> Self {
        Admission {
            admitted: Semaphore::new(running.saturating_add(queued).min(Semaphore::MAX_PERMITS)),
            running: Semaphore::new(running.min(Semaphore::MAX_PERMITS)),
            running_limit: running,
            queue_limit: queued,
        }
    }
}

/// Middleware: applies the server's [`Admission`].
pub(crate) async fn limit_concurrency(State(state): State<ServerState>, request: Request, next: Next) -> Response {
    let admission = &state.shared.admission;
    let Ok(_admitted) = admission.admitted.try_acquire() else {
        return ApiFailure::unavailable(format!(
            "the server is busy: {} requests are running and {} waiting, its limits; retry shortly, \
             or raise --max-concurrent-requests / --max-queued-requests",
            admission.running_limit, admission.queue_limit
        ))
        .into_response();
    };
    let Ok(_running) = admission.running.acquire().await else {
        return ApiFailure::unavailable("the server is shutting down").into_response();
    };
    next.run(request).await
}

/// Backend work spawned apart from its request, so that a client that hangs up or a request
/// that times out never cuts a batch short halfway (leaving a slot marked idle while it
/// runs, or a `/run_code` slot unreleased). Shutdown waits for it.
#[derive(Default)]
pub(crate) struct DetachedWork {
    running: AtomicUsize,
    finished: Notify,
}

impl DetachedWork {
    /// Runs `work` on its own task and waits for it; `None` if it panicked (logged).
    pub(crate) async fn run<T: Send + 'static>(
        state: &ServerState,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        state.shared.detached.running.fetch_add(1, Ordering::SeqCst);
        // Made before the spawn and moved in: even a task dropped unpolled counts as done.
        let done = Finished(state.shared.clone());
        let task = tokio::spawn(
            async move {
                let _done = done;
                work.await
            }
            .in_current_span(),
        );
        match task.await {
            Ok(value) => Some(value),
            Err(error) => {
                tracing::error!(%error, "a request's backend work panicked");
                None
            }
        }
    }

    /// Waits until no work runs, at most `limit`; whether it got there.
    pub(crate) async fn wait_idle(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let finished = self.finished.notified();
            if self.running.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                return false;
            }
        }
    }
}

/// Marks one piece of detached work done when dropped, panics included.
struct Finished(std::sync::Arc<super::Shared>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.detached.running.fetch_sub(1, Ordering::SeqCst);
        self.0.detached.finished.notify_waiters();
    }
}
