//! `GET /metrics`: counters in Prometheus' text format, written by hand (a handful of
//! series does not need a metrics crate).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::ServerState;
use crate::slot::ExecutionResult;
use crate::slot::tools::ToolName;

/// The label of calls to tools rollbox does not know, so a client's typos cannot grow the
/// label set without bound.
const OTHER_TOOL: &str = "other";

/// The server's counters.
#[derive(Default)]
pub(crate) struct Metrics {
    /// Answers by route template and status.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    /// Tool calls by tool and outcome (`ok` or an error kind).
    calls: Mutex<BTreeMap<(&'static str, String), u64>>,
    expired_slots: AtomicU64,
    in_flight: AtomicI64,
}

impl Metrics {
    /// Counts a request as in flight until the guard is dropped.
    pub(crate) fn request_started(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }

    pub(crate) fn count_request(&self, route: &str, status: u16) {
        let mut requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner);
        *requests.entry((route.to_owned(), status)).or_default() += 1;
    }

    pub(crate) fn count_calls(&self, results: &[ExecutionResult]) {
        let mut calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner);
        for result in results {
            let tool = ToolName::from_name(&result.metadata.tool).map_or(OTHER_TOOL, ToolName::as_str);
            *calls.entry((tool, outcome(result))).or_default() += 1;
        }
    }

    pub(crate) fn count_expired(&self, n: usize) {
        self.expired_slots.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn render(&self, live_slots: usize) -> String {
        let mut text = String::new();
        let requests = self.requests.lock().unwrap_or_else(PoisonError::into_inner).clone();
        family(
            &mut text,
            "rollbox_http_requests_total",
            "counter",
            "HTTP requests answered, by route and status.",
        );
        for ((route, status), n) in &requests {
            let _ = writeln!(
                text,
                "rollbox_http_requests_total{{route=\"{}\",status=\"{status}\"}} {n}",
                escape(route)
            );
        }
        let calls = self.calls.lock().unwrap_or_else(PoisonError::into_inner).clone();
        family(
            &mut text,
            "rollbox_tool_calls_total",
            "counter",
            "Tool calls run, by tool and outcome (ok or the error kind).",
        );
        for ((tool, outcome), n) in &calls {
            let _ = writeln!(
                text,
                "rollbox_tool_calls_total{{tool=\"{tool}\",outcome=\"{}\"}} {n}",
                escape(outcome)
            );
        }
        family(&mut text, "rollbox_live_slots", "gauge", "Slots alive now.");
        let _ = writeln!(text, "rollbox_live_slots {live_slots}");
        family(
            &mut text,
            "rollbox_expired_slots_total",
            "counter",
            "Slots released because they were idle too long.",
        );
        let _ = writeln!(
            text,
            "rollbox_expired_slots_total {}",
            self.expired_slots.load(Ordering::Relaxed)
        );
        family(
            &mut text,
            "rollbox_http_requests_in_flight",
            "gauge",
            "HTTP requests being handled now.",
        );
        let _ = writeln!(
            text,
            "rollbox_http_requests_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        text
    }
}

/// A request in flight; decrements the gauge when dropped.
pub(crate) struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `ok`, or the error kind's wire name (`cell_error`, `limit_exceeded`, ...).
fn outcome(result: &ExecutionResult) -> String {
    match &result.error {
        None if result.success => "ok".to_owned(),
        None => "failed".to_owned(),
        // The wire name, without a match that every new kind would have to extend.
        Some(error) => serde_json::to_value(error.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| "unknown".to_owned()),
    }
}

fn family(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}");
    let _ = writeln!(text, "# TYPE {name} {kind}");
}

/// A label value with Prometheus' three escapes.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// `GET /metrics`.
pub(crate) async fn render(State(state): State<ServerState>) -> impl IntoResponse {
    let body = state.shared.metrics.render(state.live_slots());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
}
