//! The handlers of the versioned routes, and [`JsonBody`], the body extractor whose
//! rejections are [`ApiFailure`]s.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{Method, Uri};
use serde::de::DeserializeOwned;

use super::api::{
    API_VERSION, AcquireRequest, AcquireResponse, ApiErrorCode, ExecuteRequest, ExecuteResponse, Health,
    ReleaseRequest, ReleaseResponse, SlotList,
};
use super::middleware::DetachedWork;
use super::slots::Full;
use super::{ApiFailure, ServerState};
use crate::seed::derive_slot_seed;
use crate::slot::{BackendError, ErrorKind, ExecutionMetadata, ExecutionResult, Slot, SlotId, ToolCall};

/// The longest trajectory id accepted; it is free text kept for logs and listings.
const MAX_TRAJECTORY_ID_BYTES: usize = 1024;

/// A JSON body of type `T`. An empty body reads as `{}`, so a missing field is named in the
/// error. Too large a body is a 413 and bad JSON a 400, both with an
/// [`ErrorBody`](super::api::ErrorBody) (serde's message for bad JSON); no `Content-Type` is
/// required.
pub(crate) struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiFailure;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiFailure> {
        let bytes = Bytes::from_request(request, state).await.map_err(body_failure)?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text).map(JsonBody).map_err(|e| {
            ApiFailure::bad_request(format!(
                "the request body is not valid JSON of this route's shape: {e}; see docs/API.md"
            ))
        })
    }
}

fn body_failure(rejection: BytesRejection) -> ApiFailure {
    use axum::extract::rejection::FailedToBufferBody;
    match rejection {
        BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_)) => ApiFailure::new(
            ApiErrorCode::PayloadTooLarge,
            "the request body is over the server's size limit; send smaller batches, or start the server with a larger --max-body-bytes",
        ),
        other => ApiFailure::bad_request(format!("failed to read the request body: {other}")),
    }
}

/// `GET /v1/health`.
pub(crate) async fn health(State(state): State<ServerState>) -> Json<Health> {
    let backend = &state.shared.backend;
    Json(Health {
        status: "ok".into(),
        api_version: API_VERSION.into(),
        rollbox_version: env!("CARGO_PKG_VERSION").into(),
        backend: backend.name().into(),
        tools: backend.tools().iter().map(|t| t.as_str().to_owned()).collect(),
        live_slots: state.live_slots(),
        max_slots: state.config().max_slots,
    })
}

/// `GET /v1/tools`: the backend's tools as OpenAI function-calling schemas.
pub(crate) async fn tools(State(state): State<ServerState>) -> Json<Vec<serde_json::Value>> {
    Json(crate::slot::tools::schemas(&state.shared.backend.tools()))
}

/// `POST /v1/slots`.
pub(crate) async fn acquire(
    State(state): State<ServerState>,
    JsonBody(request): JsonBody<AcquireRequest>,
) -> Result<Json<AcquireResponse>, ApiFailure> {
    check_trajectory_id(&request.trajectory_id)?;
    let reservation = state.shared.slots.reserve().map_err(|full| slots_full(&full))?;
    let shared = state.shared.clone();
    // Detached: if the client hangs up mid-start, the slot still lands in the table, where
    // it expires like any other instead of leaking in the backend.
    let started = DetachedWork::run(&state, async move {
        let seed = request.seed.or_else(|| {
            shared
                .config
                .seed
                .map(|seed| derive_slot_seed(seed, &request.trajectory_id, 0))
        });
        let slot = match seed {
            Some(seed) => shared.backend.acquire_seeded(&request.trajectory_id, seed).await?,
            None => shared.backend.acquire(&request.trajectory_id).await?,
        };
        reservation.fill(slot.clone());
        Ok::<Slot, BackendError>(slot)
    })
    .await;
    match started {
        Some(Ok(slot)) => Ok(Json(AcquireResponse { slot })),
        Some(Err(BackendError::Exhausted { capacity })) => Err(slots_full(&Full::Slots { capacity })),
        Some(Err(error)) => Err(ApiFailure::internal("failed to start a slot", &error)),
        None => Err(ApiFailure::new(
            ApiErrorCode::Internal,
            "failed to start a slot: the backend panicked; the details are in the server's log",
        )),
    }
}

/// Refuses a trajectory id longer than [`MAX_TRAJECTORY_ID_BYTES`].
fn check_trajectory_id(trajectory_id: &str) -> Result<(), ApiFailure> {
    if trajectory_id.len() > MAX_TRAJECTORY_ID_BYTES {
        return Err(ApiFailure::bad_request(format!(
            "trajectory_id is {} bytes long; the limit is {MAX_TRAJECTORY_ID_BYTES}",
            trajectory_id.len()
        )));
    }
    Ok(())
}

pub(super) fn slots_full(full: &Full) -> ApiFailure {
    ApiFailure::unavailable(format!(
        "{}; release slots you no longer need, or retry shortly",
        full.reason()
    ))
}

/// `GET /v1/slots`.
pub(crate) async fn list_slots(State(state): State<ServerState>) -> Json<SlotList> {
    Json(SlotList {
        slots: state.shared.slots.list(),
    })
}

/// `POST /v1/execute`: one result per call, in order. A call for a slot the server does not
/// hold gets an `unknown_slot` result in its place; the rest run as one backend batch.
pub(crate) async fn execute(
    State(state): State<ServerState>,
    JsonBody(request): JsonBody<ExecuteRequest>,
) -> Result<Json<ExecuteResponse>, ApiFailure> {
    let (live, busy) = state.shared.slots.check_out(request.calls.iter().map(|c| c.slot_id));
    let mut results: Vec<Option<ExecutionResult>> = Vec::with_capacity(request.calls.len());
    let mut batch = Vec::with_capacity(request.calls.len());
    let mut positions = Vec::with_capacity(request.calls.len());
    for (index, call) in request.calls.into_iter().enumerate() {
        match live.get(&call.slot_id) {
            Some(slot) => {
                batch.push((slot.clone(), call.call));
                positions.push(index);
                results.push(None);
            }
            None => results.push(Some(unknown_slot(call.slot_id, &call.call, &state))),
        }
    }
    let shared = state.shared.clone();
    let ran = DetachedWork::run(&state, async move {
        let ran = shared.backend.execute_batch(batch).await;
        drop(busy);
        ran
    })
    .await
    .unwrap_or_default();
    let mut ran = ran.into_iter();
    for index in positions {
        results[index] = ran.next();
    }
    let results: Vec<ExecutionResult> = results.into_iter().map(|r| r.unwrap_or_else(missing_result)).collect();
    state.shared.metrics.count_calls(&results);
    Ok(Json(ExecuteResponse { results }))
}

fn unknown_slot(slot_id: SlotId, call: &ToolCall, state: &ServerState) -> ExecutionResult {
    ExecutionResult::failure(
        ErrorKind::UnknownSlot,
        format!(
            "{slot_id} is not live on this server: it was never acquired here, was released, or expired after {:.0} s idle; \
             acquire a new slot",
            state.config().idle_timeout.as_secs_f64()
        ),
        ExecutionMetadata {
            tool: call.name.clone(),
            slot_id: Some(slot_id),
            ..Default::default()
        },
    )
}

/// The result of a call the backend gave no result for (it broke its contract, or panicked).
fn missing_result() -> ExecutionResult {
    ExecutionResult::failure(
        ErrorKind::Backend,
        "the backend returned no result for this call; the details are in the server's log",
        ExecutionMetadata::default(),
    )
}

/// `POST /v1/slots/{id}/release`. The id is the number, or its `slot-N` display form.
pub(crate) async fn release(
    State(state): State<ServerState>,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<ReleaseRequest>,
) -> Result<Json<ReleaseResponse>, ApiFailure> {
    let slot_id = parse_slot_id(&id)?;
    let Some(slot) = state.shared.slots.remove(slot_id) else {
        return Err(ApiFailure::new(
            ApiErrorCode::UnknownSlot,
            format!("{slot_id} is not live on this server: never acquired here, already released, or expired"),
        ));
    };
    let shared = state.shared.clone();
    let released = DetachedWork::run(&state, async move {
        shared.backend.release(&slot, request.reset_workspace).await
    })
    .await;
    match released {
        Some(Ok(())) => Ok(Json(ReleaseResponse { slot_id })),
        // The table no longer holds it, so for the client it is gone either way.
        Some(Err(BackendError::UnknownSlot(_))) => Ok(Json(ReleaseResponse { slot_id })),
        Some(Err(error)) => Err(ApiFailure::internal("failed to release the slot", &error)),
        None => Err(ApiFailure::new(
            ApiErrorCode::Internal,
            "failed to release the slot: the backend panicked",
        )),
    }
}

/// `POST /v1/slots/{id}/fork`: a new slot in the state of slot `id` (its variables, modules
/// and files), independent from then on. Calls for `id` wait while it is copied.
pub(crate) async fn fork(
    State(state): State<ServerState>,
    Path(id): Path<String>,
    JsonBody(request): JsonBody<AcquireRequest>,
) -> Result<Json<AcquireResponse>, ApiFailure> {
    check_trajectory_id(&request.trajectory_id)?;
    if request.seed.is_some() {
        return Err(ApiFailure::bad_request(
            "a fork's seed comes from its parent's (docs/reproducibility.md); leave `seed` out",
        ));
    }
    let slot_id = parse_slot_id(&id)?;
    let (live, busy) = state.shared.slots.check_out([slot_id]);
    let Some(parent) = live.get(&slot_id).cloned() else {
        return Err(ApiFailure::new(
            ApiErrorCode::UnknownSlot,
            format!("{slot_id} is not live on this server: never acquired here, already released, or expired"),
        ));
    };
    let reservation = state.shared.slots.reserve().map_err(|full| slots_full(&full))?;
    let shared = state.shared.clone();
    let forked = DetachedWork::run(&state, async move {
        let forked = shared.backend.fork(&parent, &request.trajectory_id).await;
        drop(busy);
        let slot = forked?;
        reservation.fill(slot.clone());
        Ok::<Slot, BackendError>(slot)
    })
    .await;
    match forked {
        Some(Ok(slot)) => Ok(Json(AcquireResponse { slot })),
        Some(Err(BackendError::Exhausted { capacity })) => Err(slots_full(&Full::Slots { capacity })),
        Some(Err(error @ BackendError::Unsupported { .. })) => {
            Err(ApiFailure::new(ApiErrorCode::Unsupported, error.to_string()))
        }
        Some(Err(error @ BackendError::Fork { .. })) => Err(ApiFailure::new(
            ApiErrorCode::ForkRefused,
            crate::error_text::error_chain(&error),
        )),
        Some(Err(error)) => Err(ApiFailure::internal("failed to fork the slot", &error)),
        None => Err(ApiFailure::new(
            ApiErrorCode::Internal,
            "failed to fork the slot: the backend panicked; the details are in the server's log",
        )),
    }
}

fn parse_slot_id(text: &str) -> Result<SlotId, ApiFailure> {
    let digits = text.strip_prefix("slot-").unwrap_or(text);
    digits.parse::<u64>().map(SlotId).map_err(|_| {
        ApiFailure::bad_request(format!(
            "`{text}` is not a slot id; use the number in the slot's `id` field"
        ))
    })
}

/// Any path no route has.
pub(crate) async fn no_route(method: Method, uri: Uri) -> ApiFailure {
    ApiFailure::new(
        ApiErrorCode::NotFound,
        format!(
            "no route for {method} {}; the routes are GET /v1/health, GET /v1/tools, POST|GET /v1/slots, POST /v1/execute, \
             POST /v1/slots/{{id}}/release, POST /run_code and GET /metrics (docs/API.md)",
            uri.path()
        ),
    )
}

/// A known path with the wrong method.
pub(crate) async fn wrong_method(method: Method, uri: Uri) -> ApiFailure {
    ApiFailure::bad_request(format!(
        "{} does not take {method}; see docs/API.md for each route's method",
        uri.path()
    ))
}
