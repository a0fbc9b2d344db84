//! The slot server's wire format, version 1: the JSON bodies `rollbox serve` accepts and
//! answers, shared by the server and by the `remote` backend's client so the two cannot drift.
//!
//! Every route but `/run_code` and `/metrics` lives under [`API_PREFIX`]:
//!
//! | method and path                      | request body        | answer                  |
//! |--------------------------------------|---------------------|-------------------------|
//! | `GET  /v1/health`                    | none                | [`Health`]              |
//! | `GET  /v1/tools`                     | none                | OpenAI tool schemas     |
//! | `POST /v1/slots`                     | [`AcquireRequest`]  | [`AcquireResponse`]     |
//! | `GET  /v1/slots`                     | none                | [`SlotList`]            |
//! | `POST /v1/execute`                   | [`ExecuteRequest`]  | [`ExecuteResponse`]     |
//! | `POST /v1/slots/{id}/release`        | [`ReleaseRequest`]  | [`ReleaseResponse`]     |
//! | `GET  /metrics`                      | none                | Prometheus text         |
//! | `POST /run_code`                     | SandboxFusion's     | SandboxFusion's         |
//!
//! A request that fails as a whole gets a non-2xx status and an [`ErrorBody`]. A call inside an
//! execute batch that fails gets a failed [`ExecutionResult`] in its place, never a failed
//! request: one bad call never hides the results of the others.

use serde::{Deserialize, Serialize};

use crate::slot::{ExecutionResult, Slot, SlotId, ToolCall};

/// The API version this build speaks; it is part of every path.
pub const API_VERSION: &str = "v1";

/// The prefix of every versioned route.
pub const API_PREFIX: &str = "/v1";

/// `GET /v1/health`: the server is up, and what it serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Health {
    /// Always `"ok"` when the server answers.
    pub status: String,
    /// The API version, [`API_VERSION`].
    pub api_version: String,
    /// The rollbox version of the server.
    pub rollbox_version: String,
    /// The backend behind the server (`wasm`, `process`).
    pub backend: String,
    /// The tools that backend runs.
    pub tools: Vec<String>,
    /// Slots alive now.
    pub live_slots: usize,
    /// The most slots the server holds at once.
    pub max_slots: usize,
}

/// `POST /v1/slots`: start a slot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AcquireRequest {
    /// The trajectory the slot is for; free text, kept for logs and listings.
    pub trajectory_id: String,
    /// Seeds the slot (its slot seed, used as it is) so that its every observation repeats;
    /// without one, a server started with `--seed N` derives the slot's seed from `N` and the
    /// trajectory id, and other servers give fresh entropy and real time. See
    /// docs/reproducibility.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// The answer to [`AcquireRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AcquireResponse {
    /// The new slot, as the server's backend names it.
    pub slot: Slot,
}

/// `POST /v1/execute`: run a batch. Calls of different slots run in parallel, calls of one slot
/// in the order given; the answer has one result per call, in the same order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecuteRequest {
    /// The calls.
    pub calls: Vec<SlotCall>,
}

/// One call of a batch: which slot, and what to run there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotCall {
    /// A slot this server handed out.
    pub slot_id: SlotId,
    /// The tool call.
    pub call: ToolCall,
}

/// The answer to [`ExecuteRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecuteResponse {
    /// One result per call, in the order of the request.
    pub results: Vec<ExecutionResult>,
}

/// `POST /v1/slots/{id}/release`: end a slot.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRequest {
    /// Delete the slot's workspace too.
    #[serde(default)]
    pub reset_workspace: bool,
}

/// The answer to [`ReleaseRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseResponse {
    /// The slot that was released.
    pub slot_id: SlotId,
}

/// `GET /v1/slots`: the live slots.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotList {
    /// Every live slot, oldest first.
    pub slots: Vec<SlotStatus>,
}

/// One live slot and how long it has been idle.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotStatus {
    /// The slot.
    pub slot: Slot,
    /// Seconds since its last call ended (or since it was acquired).
    pub idle_secs: f64,
    /// Whether a call is running in it now.
    pub busy: bool,
}

/// The body of every non-2xx answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ApiError,
}

/// What went wrong with a request, by code, with a message that says what to do next.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// A stable, machine-readable code.
    pub code: ApiErrorCode,
    /// A sentence for people.
    pub message: String,
}

/// The codes of [`ApiError`], each with its HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiErrorCode {
    /// 400: the body is not valid JSON of the route's shape.
    BadRequest,
    /// 401: the bearer token is missing or wrong.
    Unauthorized,
    /// 404: the slot is not live on this server (never acquired, released, or expired).
    UnknownSlot,
    /// 404: no route has this path.
    NotFound,
    /// 413: the body is over the server's size limit.
    PayloadTooLarge,
    /// 503: every slot is in use, or the server is at its concurrency limit or shutting down.
    Unavailable,
    /// 409: the slot cannot be forked as it is (it holds files open); the message says what
    /// to change.
    ForkRefused,
    /// 501: the server's backend cannot do this (a fork on the process backend).
    Unsupported,
    /// 504: the request ran past the server's per-request timeout.
    Timeout,
    /// 500: the server failed; the details are in its log.
    Internal,
}

impl ApiErrorCode {
    /// The HTTP status code that carries this error.
    pub fn http_status(self) -> u16 {
        match self {
            ApiErrorCode::BadRequest => 400,
            ApiErrorCode::Unauthorized => 401,
            ApiErrorCode::UnknownSlot | ApiErrorCode::NotFound => 404,
            ApiErrorCode::PayloadTooLarge => 413,
            ApiErrorCode::Unavailable => 503,
            ApiErrorCode::ForkRefused => 409,
            ApiErrorCode::Unsupported => 501,
            ApiErrorCode::Timeout => 504,
            ApiErrorCode::Internal => 500,
        }
    }
}
