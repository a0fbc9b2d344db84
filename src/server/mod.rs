//! The slot server: any [`crate::Backend`] over HTTP (`rollbox serve`).
//!
//! [`app`] builds the router (tests drive it with `tower::ServiceExt::oneshot`, no socket);
//! [`serve`] runs it on a listener until a shutdown signal, then drains the requests in flight
//! and releases every slot. The wire format is in [`api`]; `docs/API.md` is the reference.
//!
//! Every request passes the same stack, outermost first: a tracing span and the request
//! metrics (`middleware`), the bearer token ([`auth`]), the per-request timeout, and, for the
//! routes that do work, the concurrency limit. Bodies are capped by [`ServerConfig::max_body_bytes`].

pub mod api;
pub mod auth;
mod connections;
mod expiry;
mod failure;
mod metrics;
mod middleware;
mod routes;
pub mod run_code;
mod slots;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::slot::Backend;
pub use auth::BearerToken;
pub use failure::ApiFailure;
use metrics::Metrics;
use middleware::{Admission, DetachedWork};
use slots::{MemoryBudget, SlotTable};

/// How a slot server behaves. [`ServerConfig::default`] lists every default.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The most slots alive at once, counting `/run_code`'s short-lived ones.
    pub max_slots: usize,
    /// A slot with no call for this long is released (with its workspace), so a client that
    /// disappears does not leak it. A slot with a call running never expires.
    pub idle_timeout: Duration,
    /// The largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// The most requests that do work (slots, execute, `/run_code`) running at once.
    pub max_concurrent_requests: usize,
    /// The most such requests waiting for a turn beyond those running; more get 503.
    pub max_queued_requests: usize,
    /// The longest a request may take, its wait for a turn included; longer ones get 504.
    pub request_timeout: Duration,
    /// The bearer token every request must carry. Required unless the server listens on
    /// loopback only.
    pub token: Option<BearerToken>,
    /// The most connections open at once; more wait in the listen backlog until one closes.
    /// Lowered to half of the process's descriptor limit (`RLIMIT_NOFILE`) when that is
    /// smaller, so idle sockets can never use up the descriptors that slots and `accept` need.
    pub max_connections: usize,
    /// How long a request's headers may take to arrive, from their first byte (from the accept,
    /// for a connection's first request); a connection past it is closed. Authentication needs
    /// the headers, so this is what bounds an unauthenticated client that sends them slowly.
    pub header_read_timeout: Duration,
    /// A connection with no request running and no byte moving for this long is closed
    /// (keep-alive idle). Longer than the remote backend's own idle-connection timeout, so
    /// it closes its idle connections before the server does.
    pub connection_idle_timeout: Duration,
    /// The sum of the live slots' memory limits the server admits, in bytes; an acquire past it
    /// gets 503 saying so. `None` (the default) admits slots up to `max_slots` only: a limit
    /// is a ceiling few slots reach (a fresh wasm slot holds about 40 MB), so admitting by
    /// ceilings would cap a 16 GiB host at 16 slots of the default 1 GiB.
    pub memory_budget_bytes: Option<u64>,
    /// The most bytes `/run_code` returns of each stream (stdout, stderr), cut without any
    /// marker in the stream, as SandboxFusion does; see [`run_code::SANDBOX_FUSION_OUTPUT_BYTES`].
    /// The backend must keep at least this many bytes per stream for the cap to be reached.
    pub run_code_output_bytes: usize,
    /// The run seed (`rollbox serve --seed N`): an acquire that names no seed of its own gets
    /// the slot seed `derive_slot_seed(N, trajectory_id, 0)`. `None`: such slots are unseeded.
    pub seed: Option<u64>,
}

impl Default for ServerConfig {
    /// 10,000 slots, 600 s idle timeout, 16 MiB bodies, 512 requests running and 4,096 queued,
    /// a 300 s request timeout (ten times the default cell time limit, for batches), 4,096
    /// connections (at most half the descriptor limit), a 10 s header-read timeout, a 75 s
    /// connection idle timeout, no memory budget, no token, SandboxFusion's 1 MiB per stream for
    /// `/run_code`, and no run seed.
    fn default() -> Self {
        ServerConfig {
            max_slots: 10_000,
            idle_timeout: Duration::from_secs(600),
            max_body_bytes: 16 << 20,
            max_concurrent_requests: 512,
            max_queued_requests: 4_096,
            request_timeout: Duration::from_secs(300),
            max_connections: 4_096,
            header_read_timeout: Duration::from_secs(10),
            connection_idle_timeout: Duration::from_secs(75),
            memory_budget_bytes: None,
            token: None,
            run_code_output_bytes: run_code::SANDBOX_FUSION_OUTPUT_BYTES,
            seed: None,
        }
    }
}

impl ServerConfig {
    /// Checks that every setting is in range.
    pub fn validate(&self) -> Result<(), ServerError> {
        let positive = [
            ("max_slots", self.max_slots),
            ("max_body_bytes", self.max_body_bytes),
            ("max_concurrent_requests", self.max_concurrent_requests),
            ("run_code_output_bytes", self.run_code_output_bytes),
            ("max_connections", self.max_connections),
        ];
        if self.memory_budget_bytes == Some(0) {
            return Err(ServerError::InvalidConfig(
                "the memory budget must be at least 1 byte; leave it unset for none".into(),
            ));
        }
        if let Some((name, _)) = positive.into_iter().find(|(_, value)| *value == 0) {
            return Err(ServerError::InvalidConfig(format!("{name} must be at least 1")));
        }
        let timeouts = [
            self.idle_timeout,
            self.request_timeout,
            self.header_read_timeout,
            self.connection_idle_timeout,
        ];
        if timeouts.iter().any(Duration::is_zero) {
            return Err(ServerError::InvalidConfig(
                "the idle, request, header-read and connection idle timeouts must be longer than zero".into(),
            ));
        }
        Ok(())
    }

    /// Checks that a server listening on `ip` would not be open to the network without a
    /// token: only loopback may go without one.
    pub fn check_exposure(&self, ip: IpAddr) -> Result<(), ServerError> {
        if self.token.is_none() && !ip.is_loopback() {
            return Err(ServerError::TokenRequired { ip });
        }
        Ok(())
    }
}

/// The server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Listening beyond loopback needs a token.
    #[error(
        "refusing to listen on {ip} without a bearer token: anyone who can reach it could run code; \
         set {env} or pass --token-file, or listen on 127.0.0.1",
        env = crate::env_vars::SERVER_TOKEN
    )]
    TokenRequired {
        /// The address asked for.
        ip: IpAddr,
    },
    /// A setting is out of range.
    #[error("invalid server settings: {0}")]
    InvalidConfig(String),
    /// The token is not usable.
    #[error("invalid bearer token: {0}")]
    InvalidToken(&'static str),
    /// The server was set up outside a tokio runtime, which its expiry task needs.
    #[error("failed to start the slot expiry task: no tokio runtime is running; build the server inside one")]
    NoRuntime,
    /// The listener's address could not be read.
    #[error("failed to read the listening address")]
    Address(#[source] std::io::Error),
}

/// The budget `config` asks for, with `backend`'s per-slot memory limit as each slot's charge.
fn memory_budget(config: &ServerConfig, backend: &dyn Backend) -> Result<Option<MemoryBudget>, ServerError> {
    let Some(budget_bytes) = config.memory_budget_bytes else {
        return Ok(None);
    };
    let Some(slot_bytes) = backend.slot_memory_bytes() else {
        return Err(ServerError::InvalidConfig(format!(
            "a memory budget needs a backend whose slots hold memory in this server; the {} backend's do not",
            backend.name()
        )));
    };
    if slot_bytes > budget_bytes {
        return Err(ServerError::InvalidConfig(format!(
            "the memory budget ({} MiB) is smaller than one slot's memory limit ({} MiB): raise it or lower --memory",
            budget_bytes >> 20,
            slot_bytes >> 20
        )));
    }
    Ok(Some(MemoryBudget {
        budget_bytes,
        slot_bytes,
    }))
}

/// The server's shared state: the backend, the live slots, the metrics. Cheap to clone.
#[derive(Clone)]
pub struct ServerState {
    shared: Arc<Shared>,
}

struct Shared {
    backend: Arc<dyn Backend>,
    config: ServerConfig,
    slots: Arc<SlotTable>,
    metrics: Metrics,
    admission: Admission,
    detached: DetachedWork,
}

impl ServerState {
    /// Serves `backend` under `config`, and starts the task that expires idle slots (it ends
    /// when the last clone of the state is dropped). Must run inside a tokio runtime.
    pub fn new(backend: Arc<dyn Backend>, config: ServerConfig) -> Result<ServerState, ServerError> {
        config.validate()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ServerError::NoRuntime)?;
        let shared = Arc::new(Shared {
            slots: Arc::new(SlotTable::new(
                config.max_slots,
                memory_budget(&config, backend.as_ref())?,
            )),
            admission: Admission::new(config.max_concurrent_requests, config.max_queued_requests),
            metrics: Metrics::default(),
            detached: DetachedWork::default(),
            backend,
            config,
        });
        runtime.spawn(expiry::reap_idle_slots(Arc::downgrade(&shared)));
        Ok(ServerState { shared })
    }

    /// The settings the server runs with.
    pub fn config(&self) -> &ServerConfig {
        &self.shared.config
    }

    /// How many slots are alive.
    pub fn live_slots(&self) -> usize {
        self.shared.slots.live()
    }

    /// Waits (at most one request timeout) for work whose request already ended, then
    /// releases every slot with its workspace. Returns how many slots were released.
    pub async fn shut_down(&self) -> usize {
        let shared = &self.shared;
        if !shared.detached.wait_idle(shared.config.request_timeout).await {
            tracing::warn!("some work was still running after the request timeout; releasing its slots anyway");
        }
        let slots = shared.slots.take_all();
        for slot in &slots {
            if let Err(error) = shared.backend.release(slot, true).await {
                tracing::warn!(slot = %slot.id, %error, "failed to release a slot at shutdown");
            }
        }
        slots.len()
    }
}

/// The router for `state`, every route and middleware in place.
pub fn app(state: ServerState) -> Router {
    use axum::middleware::from_fn_with_state;
    // Health and metrics skip the concurrency limit so a saturated server still answers them.
    let work = Router::new()
        .route("/v1/tools", get(routes::tools))
        .route("/v1/slots", post(routes::acquire).get(routes::list_slots))
        .route("/v1/execute", post(routes::execute))
        .route("/v1/slots/{id}/release", post(routes::release))
        .route("/v1/slots/{id}/fork", post(routes::fork))
        .route("/run_code", post(run_code::run_code))
        .route_layer(from_fn_with_state(state.clone(), middleware::limit_concurrency));
    Router::new()
        .route("/v1/health", get(routes::health))
        .route("/metrics", get(metrics::render))
        .merge(work)
        .fallback(routes::no_route)
        .method_not_allowed_fallback(routes::wrong_method)
        .layer(from_fn_with_state(state.clone(), middleware::request_timeout))
        .layer(from_fn_with_state(state.clone(), auth::require_token))
        .layer(from_fn_with_state(state.clone(), middleware::observe))
        .layer(DefaultBodyLimit::max(state.config().max_body_bytes))
        .with_state(state)
}

/// What [`serve`] did on its way out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShutdownSummary {
    /// Slots that were still alive and were released.
    pub released_slots: usize,
}

/// Serves `state` on `listener` until `shutdown` completes, then stops accepting, lets the
/// requests in flight finish, and releases every slot. Connections are capped and timed out
/// as [`ServerConfig`] says (see `connections`).
///
/// Refuses to start if the listener is reachable beyond loopback and no token is set.
pub async fn serve(
    listener: TcpListener,
    state: ServerState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<ShutdownSummary, ServerError> {
    let address: SocketAddr = listener.local_addr().map_err(ServerError::Address)?;
    state.config().check_exposure(address.ip())?;
    let config = state.config();
    let limits = connections::ConnectionLimits {
        max_open: connections::open_connection_cap(config.max_connections, connections::descriptor_limit()),
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.connection_idle_timeout,
    };
    tracing::info!(%address, backend = state.shared.backend.name(), max_connections = limits.max_open, "serving slots");
    connections::serve_connections(listener, app(state.clone()), limits, shutdown).await;
    let released_slots = state.shut_down().await;
    tracing::info!(released_slots, "server stopped");
    Ok(ShutdownSummary { released_slots })
}
