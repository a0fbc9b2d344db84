//! One `rollbox serve` server over HTTP: the v1 routes of [`crate::server::api`], each request
//! with its own deadline and every failure typed, so the backend can say exactly what went
//! wrong and what to do.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::server::api::{
    API_PREFIX, API_VERSION, AcquireRequest, AcquireResponse, ApiErrorCode, ErrorBody, ExecuteRequest, ExecuteResponse,
    Health, ReleaseRequest, ReleaseResponse, SlotCall,
};
use crate::slot::{ExecutionResult, Slot, SlotId};

/// One `rollbox serve` server a provisioner handed out: where it is and how to authenticate.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerEndpoint {
    /// A short name for people and logs (`local-3`, `listed-0`, `modal-sb-…`), unique within
    /// its provisioner.
    pub id: String,
    /// The base URL, without the API prefix (`http://127.0.0.1:40123`).
    pub url: String,
    /// The bearer token the server expects, if it expects one.
    pub token: Option<String>,
}

impl std::fmt::Debug for ServerEndpoint {
    // Never print the token: endpoints end up in logs and error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerEndpoint")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl std::fmt::Display for ServerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.id, self.url)
    }
}

/// How often [`ServerClient::wait_ready`] asks a starting server for its health.
const READY_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The most bytes of a non-JSON error answer quoted in an error message.
const QUOTED_BODY_BYTES: usize = 300;

/// A request to a server failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be made, or broke before the answer was complete.
    #[error("failed to reach server {server}")]
    Transport {
        /// The server.
        server: String,
        /// Why.
        #[source]
        source: reqwest::Error,
    },
    /// No answer came within the request's deadline.
    #[error("server {server} did not answer within {:.1} s", timeout.as_secs_f64())]
    Timeout {
        /// The server.
        server: String,
        /// The deadline.
        timeout: Duration,
    },
    /// The server answered with an error status.
    #[error("server {server} refused the request with status {status}{}: {message}", code.map(|c| format!(" ({})", code_name(c))).unwrap_or_default())]
    Api {
        /// The server.
        server: String,
        /// The HTTP status.
        status: u16,
        /// The API's error code, when the body was an [`ErrorBody`].
        code: Option<ApiErrorCode>,
        /// The server's message, or the start of its body.
        message: String,
    },
    /// The answer was not the JSON the route promises.
    #[error("failed to decode the answer of server {server}")]
    Decode {
        /// The server.
        server: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// An execute answer had a different number of results than calls.
    #[error("server {server} answered {got} results for {sent} calls")]
    ResultCount {
        /// The server.
        server: String,
        /// Calls sent.
        sent: usize,
        /// Results received.
        got: usize,
    },
    /// The server speaks another API version.
    #[error("server {server} speaks API {found}, and this client speaks {API_VERSION}")]
    Version {
        /// The server.
        server: String,
        /// Its version.
        found: String,
    },
}

impl ClientError {
    /// Whether the server itself is gone or cut off (as opposed to slow, or refusing one
    /// request): its slots' state must be taken as lost.
    pub fn server_unreachable(&self) -> bool {
        matches!(self, ClientError::Transport { .. })
    }

    /// Whether the server says the slot is not live there (released, expired, or the server
    /// restarted).
    pub fn unknown_slot(&self) -> bool {
        matches!(
            self,
            ClientError::Api {
                code: Some(ApiErrorCode::UnknownSlot),
                ..
            }
        )
    }

    /// What to do about it, as one sentence for people and models.
    pub fn advice(&self) -> &'static str {
        match self {
            ClientError::Transport { .. } => {
                "the server is unreachable (stopped, crashed or cut off) and the slot's state there is lost: release the slot and acquire a new one, which rollbox places on a working server"
            }
            ClientError::Timeout { .. } => {
                "the calls may still be running there: retry, or allow more time (the client waits for the calls' time limits plus a margin)"
            }
            ClientError::Api { status: 401, .. } => {
                "the token is missing or wrong: set the variable named by --token-env to the server's ROLLBOX_SERVER_TOKEN"
            }
            ClientError::Api { status: 413, .. } => {
                "the request body is over the server's size limit: send smaller arguments (write big files in parts) or raise the server's --max-body-bytes"
            }
            ClientError::Api { status: 503, .. } => {
                "the server is full, at its concurrency limit, or shutting down: retry later or add servers"
            }
            ClientError::Api { status: 504, .. } => {
                "the server's own request timeout passed: send fewer calls per batch or raise its --request-timeout"
            }
            ClientError::Api { status: 404, .. } => {
                "the slot is gone from the server (expired, or the server restarted): acquire a new slot"
            }
            ClientError::Api { status: 500..=599, .. } => "the server failed: see its log, then retry",
            ClientError::Api { .. } => {
                "the request was refused: check the client's and the server's rollbox versions match"
            }
            ClientError::Decode { .. } | ClientError::ResultCount { .. } | ClientError::Version { .. } => {
                "the server is not a compatible rollbox server: run the same rollbox version on both sides"
            }
        }
    }
}

fn code_name(code: ApiErrorCode) -> String {
    serde_json::to_value(code)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{code:?}"))
}

/// A client for one server. Cheap to clone: the HTTP connection pool is shared.
#[derive(Clone)]
pub struct ServerClient {
    endpoint: ServerEndpoint,
    api: String,
    http: reqwest::Client,
}

impl ServerClient {
    /// A client for `endpoint` over `http`.
    pub fn new(endpoint: ServerEndpoint, http: reqwest::Client) -> ServerClient {
        let api = format!("{}{API_PREFIX}", endpoint.url.trim_end_matches('/'));
        ServerClient { endpoint, api, http }
    }

    /// The server this client talks to.
    pub fn endpoint(&self) -> &ServerEndpoint {
        &self.endpoint
    }

    /// `GET /v1/health`, checking the server speaks this client's API version.
    pub async fn health(&self, timeout: Duration) -> Result<Health, ClientError> {
        let health: Health = self
            .send(self.http.get(format!("{}/health", self.api)), timeout)
            .await?;
        if health.api_version != API_VERSION {
            return Err(ClientError::Version {
                server: self.endpoint.to_string(),
                found: health.api_version,
            });
        }
        Ok(health)
    }

    /// Asks for the server's health until it answers, or until `within` has passed (then the
    /// last failure is returned). A server that refuses the token or speaks another version
    /// fails at once: waiting would not change that.
    pub async fn wait_ready(&self, within: Duration, request_timeout: Duration) -> Result<Health, ClientError> {
        let deadline = Instant::now() + within;
        loop {
            match self.health(request_timeout).await {
                Ok(health) => return Ok(health),
                Err(error @ (ClientError::Version { .. } | ClientError::Api { status: 401, .. })) => return Err(error),
                Err(error) if Instant::now() + READY_POLL_INTERVAL >= deadline => return Err(error),
                Err(_) => tokio::time::sleep(READY_POLL_INTERVAL).await,
            }
        }
    }

    /// `POST /v1/slots`: a new slot, as the server names it; seeded with `seed`, if any.
    pub async fn acquire(
        &self,
        trajectory_id: &str,
        seed: Option<u64>,
        timeout: Duration,
    ) -> Result<Slot, ClientError> {
        let body = AcquireRequest {
            trajectory_id: trajectory_id.to_string(),
            seed,
        };
        let answer: AcquireResponse = self.post(format!("{}/slots", self.api), &body, timeout).await?;
        Ok(answer.slot)
    }

    /// `POST /v1/slots/{id}/fork`: a new slot on this server in the state of `slot`.
    pub async fn fork(&self, slot: SlotId, trajectory_id: &str, timeout: Duration) -> Result<Slot, ClientError> {
        let body = AcquireRequest {
            trajectory_id: trajectory_id.to_string(),
            // A fork's seed comes from its parent's.
            seed: None,
        };
        let answer: AcquireResponse = self
            .post(format!("{}/slots/{}/fork", self.api, slot.0), &body, timeout)
            .await?;
        Ok(answer.slot)
    }

    /// `POST /v1/execute`: one result per call, in order.
    pub async fn execute(&self, calls: Vec<SlotCall>, timeout: Duration) -> Result<Vec<ExecutionResult>, ClientError> {
        let sent = calls.len();
        let answer: ExecuteResponse = self
            .post(format!("{}/execute", self.api), &ExecuteRequest { calls }, timeout)
            .await?;
        if answer.results.len() != sent {
            return Err(ClientError::ResultCount {
                server: self.endpoint.to_string(),
                sent,
                got: answer.results.len(),
            });
        }
        Ok(answer.results)
    }

    /// `POST /v1/slots/{id}/release`.
    pub async fn release(&self, slot: SlotId, reset_workspace: bool, timeout: Duration) -> Result<(), ClientError> {
        let url = format!("{}/slots/{}/release", self.api, slot.0);
        let _: ReleaseResponse = self.post(url, &ReleaseRequest { reset_workspace }, timeout).await?;
        Ok(())
    }

    async fn post<T: DeserializeOwned>(
        &self,
        url: String,
        body: &impl Serialize,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        self.send(self.http.post(url).json(body), timeout).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let mut request = request.timeout(timeout);
        if let Some(token) = &self.endpoint.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| self.transport_error(e, timeout))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| self.transport_error(e, timeout))?;
        if !status.is_success() {
            return Err(self.api_error(status.as_u16(), &body));
        }
        serde_json::from_slice(&body).map_err(|source| ClientError::Decode {
            server: self.endpoint.to_string(),
            source,
        })
    }

    fn transport_error(&self, source: reqwest::Error, timeout: Duration) -> ClientError {
        let server = self.endpoint.to_string();
        if source.is_timeout() {
            ClientError::Timeout { server, timeout }
        } else {
            ClientError::Transport { server, source }
        }
    }

    fn api_error(&self, status: u16, body: &[u8]) -> ClientError {
        let server = self.endpoint.to_string();
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(ErrorBody { error }) => ClientError::Api {
                server,
                status,
                code: Some(error.code),
                message: error.message,
            },
            Err(_) => {
                let text = String::from_utf8_lossy(body);
                let (quoted, _) = crate::slot::cell::cap_text(text.trim(), QUOTED_BODY_BYTES);
                ClientError::Api {
                    server,
                    status,
                    code: None,
                    message: if quoted.is_empty() {
                        "(empty body)".into()
                    } else {
                        quoted
                    },
                }
            }
        }
    }
}
