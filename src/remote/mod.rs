//! [`RemoteBackend`]: slots on one or more `rollbox serve` servers, reached over HTTP.
//!
//! Slots are spread over servers, [`PoolConfig::slots_per_server`] each. At least
//! [`PoolConfig::min_servers`] servers are kept warm; more are provisioned on demand up to
//! [`PoolConfig::max_servers`], and a server beyond the minimum is stopped when its last slot
//! is released. Where servers come from is a [`provision::Provisioner`]'s business: child
//! processes on loopback, a list of URLs, or Modal sandboxes.
//!
//! Failure is explicit. A dead server, a timeout or a server error becomes a failed
//! [`ExecutionResult`] of kind [`ErrorKind::Remote`] for exactly the calls it affects, and a
//! batch that spans several servers sends one request per server, in parallel, so one
//! server's trouble never touches another's results. A slot whose server died or forgot it
//! (restarted, expired) is *lost*: see [`RemoteBackend::slot_health`].

pub mod client;
mod pool;
pub mod provision;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::join_all;
use serde::Serialize;

use self::client::{ClientError, ServerClient};
use self::pool::{Pool, ServerKey, SlotEntry};
use self::provision::{
    ListedProvisioner, LocalProvisioner, LocalProvisionerConfig, ModalConfig, ModalProvisioner, ProvisionError,
    Provisioner,
};
use crate::error_text::error_chain;
use crate::server::api::ApiErrorCode;
use crate::server::api::{Health, SlotCall};
use crate::slot::tools::ToolName;
use crate::slot::{Backend, BackendError, ErrorKind, ExecutionMetadata, ExecutionResult, Slot, SlotId, ToolCall};

/// How many servers a new slot may be tried on before acquire gives up, when servers turn
/// out to be unreachable one after another.
const ACQUIRE_ATTEMPTS: usize = 3;

/// How the remote backend spreads slots and how long it waits.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Slots per server (`--slots-per-sandbox`).
    pub slots_per_server: usize,
    /// Servers kept warm, started up front and never stopped for being idle
    /// (`--min-sandboxes`). At least 1: the backend checks the token and learns the tools on
    /// a warm server.
    pub min_servers: usize,
    /// The most servers at once (`--max-sandboxes`).
    pub max_servers: usize,
    /// The longest one call may run on the servers: their `--timeout`. A request's deadline is
    /// derived from it (see [`PoolConfig::request_margin`]).
    pub call_timeout: Duration,
    /// Added to a request's deadline on top of the time its calls may take: network, queueing
    /// and JSON. A batch request may take the longest total call time of any one slot in it
    /// plus this margin.
    pub request_margin: Duration,
    /// How long connecting to a server may take.
    pub connect_timeout: Duration,
    /// The deadline of health checks, acquires and releases.
    pub control_timeout: Duration,
}

impl Default for PoolConfig {
    /// 10 slots per server, 1 to 4 servers, 30 s calls (the default [`crate::Limits`]), a 10 s
    /// margin, 10 s to connect, 30 s for control requests.
    fn default() -> Self {
        PoolConfig {
            slots_per_server: 10,
            min_servers: 1,
            max_servers: 4,
            call_timeout: crate::Limits::default().timeout,
            request_margin: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            control_timeout: Duration::from_secs(30),
        }
    }
}

/// Servers someone else runs, for the `static` provisioner.
#[derive(Clone)]
pub struct ListedConfig {
    /// The servers' base URLs.
    pub urls: Vec<String>,
    /// The bearer token they all expect.
    pub token: Option<String>,
}

impl std::fmt::Debug for ListedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListedConfig")
            .field("urls", &self.urls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Where the servers come from.
#[derive(Clone, Debug)]
pub enum ProvisionConfig {
    /// `rollbox serve` child processes on loopback.
    Local(LocalProvisionerConfig),
    /// A fixed list of servers.
    Listed(ListedConfig),
    /// Modal sandboxes.
    Modal(ModalConfig),
}

/// Everything a [`RemoteBackend`] needs.
#[derive(Clone, Debug)]
pub struct RemoteBackendConfig {
    /// How slots are spread and how long requests may take.
    pub pool: PoolConfig,
    /// Where servers come from.
    pub provision: ProvisionConfig,
}

/// A remote backend could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RemoteBackendError {
    /// The settings contradict each other.
    #[error("invalid remote backend settings: {0}")]
    Config(String),
    /// The HTTP client could not be built (TLS roots, for one).
    #[error("failed to build the HTTP client")]
    Http(#[source] reqwest::Error),
    /// Servers could not be provisioned.
    #[error("failed to provision servers")]
    Provision(#[from] ProvisionError),
    /// A new server failed its first health check.
    #[error("failed to check the new server")]
    Server(#[source] ClientError),
    /// The servers could not all be stopped.
    #[error("failed to stop the servers")]
    Shutdown(#[source] ProvisionError),
}

impl RemoteBackendError {
    /// What to do about it, when there is something specific to say.
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            // There is no slot yet, so the advice about lost slots does not apply.
            RemoteBackendError::Server(ClientError::Transport { .. } | ClientError::Timeout { .. }) => Some(
                "check that the server is running and that its URL is right (--servers), or that the machine can reach it",
            ),
            RemoteBackendError::Server(error) => Some(error.advice()),
            _ => None,
        }
    }
}

/// Whether a slot's state is still on its server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SlotHealth {
    /// Its server holds it, as far as this client knows.
    Alive,
    /// Its state is gone: release it and acquire a new slot.
    Lost {
        /// Why: the server became unreachable, restarted, or expired the slot.
        reason: String,
    },
}

/// Where a remote slot lives and whether it is alive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RemoteSlotInfo {
    /// The slot's id in the remote backend.
    pub slot_id: SlotId,
    /// The server's name.
    pub server_id: String,
    /// The server's URL.
    pub server_url: String,
    /// The slot's id on its server.
    pub server_slot_id: SlotId,
    /// Alive or lost.
    pub health: SlotHealth,
}

/// One server the backend holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerInfo {
    /// The server's name.
    pub id: String,
    /// Its URL.
    pub url: String,
    /// Why it is down, if it is; a down server is tried again when no other has room.
    pub down: Option<String>,
    /// Slots the backend holds on it.
    pub slots: usize,
}

/// The `remote` backend: slots on `rollbox serve` servers. See the [module docs](self).
pub struct RemoteBackend {
    config: PoolConfig,
    provisioner: Arc<dyn Provisioner>,
    http: reqwest::Client,
    pool: Mutex<Pool>,
    /// Held while the pool grows, so concurrent acquires start one server, not one each.
    growing: tokio::sync::Mutex<()>,
    next_slot: AtomicU64,
    tools: Vec<ToolName>,
    closed: AtomicBool,
}

impl RemoteBackend {
    /// Builds the provisioner `config` names, starts the warm servers and checks each.
    pub async fn start(config: RemoteBackendConfig) -> Result<RemoteBackend, RemoteBackendError> {
        let provisioner: Arc<dyn Provisioner> = match config.provision {
            ProvisionConfig::Local(local) => Arc::new(LocalProvisioner::new(local)),
            ProvisionConfig::Listed(listed) => Arc::new(ListedProvisioner::new(&listed.urls, listed.token)),
            ProvisionConfig::Modal(modal) => Arc::new(ModalProvisioner::start(modal).await?),
        };
        RemoteBackend::with_provisioner(config.pool, provisioner).await
    }

    /// Starts the warm servers from `provisioner` and checks each. On failure every server
    /// started here is stopped again.
    pub async fn with_provisioner(
        config: PoolConfig,
        provisioner: Arc<dyn Provisioner>,
    ) -> Result<RemoteBackend, RemoteBackendError> {
        let config = validated(config, provisioner.limit())?;
        let http = http_client(&config)?;
        let endpoints = provisioner.provision(config.min_servers).await?;
        let clients: Vec<Arc<ServerClient>> = endpoints
            .into_iter()
            .map(|e| Arc::new(ServerClient::new(e, http.clone())))
            .collect();
        let checks = join_all(clients.iter().map(|c| c.health(config.control_timeout))).await;
        let mut tools = Vec::new();
        for check in checks {
            match check {
                Ok(health) => tools = tools_of(&health),
                Err(error) => {
                    for client in &clients {
                        let _ = provisioner.terminate(client.endpoint()).await;
                    }
                    return Err(RemoteBackendError::Server(error));
                }
            }
        }
        let mut pool = Pool::default();
        for client in clients {
            pool.add_server(client, 0);
        }
        Ok(RemoteBackend {
            config,
            provisioner,
            http,
            pool: Mutex::new(pool),
            growing: tokio::sync::Mutex::new(()),
            next_slot: AtomicU64::new(1),
            tools,
            closed: AtomicBool::new(false),
        })
    }

    /// Whether slot `id` is alive or lost; `None` if the backend does not hold it.
    pub fn slot_health(&self, id: SlotId) -> Option<SlotHealth> {
        self.slot_info(id).map(|info| info.health)
    }

    /// Where slot `id` lives and whether it is alive; `None` if the backend does not hold it.
    pub fn slot_info(&self, id: SlotId) -> Option<RemoteSlotInfo> {
        self.lock_pool().slot_info(id)
    }

    /// Every server the backend holds, oldest first.
    pub fn servers(&self) -> Vec<ServerInfo> {
        self.lock_pool().server_infos()
    }

    /// Releases what must be released and stops every server the provisioner started
    /// (terminating Modal sandboxes, ending local processes). Later acquires fail; later
    /// calls get [`ErrorKind::UnknownSlot`].
    pub async fn shutdown(&self) -> Result<(), RemoteBackendError> {
        self.closed.store(true, Ordering::SeqCst);
        let (slots, _servers) = self.lock_pool().drain();
        if !self.provisioner.owns_servers() {
            // Listed servers live on: give their slots back rather than wait for idle expiry.
            let alive = slots.iter().filter(|s| s.lost.is_none());
            join_all(alive.map(|s| s.client.release(s.remote, true, self.config.control_timeout))).await;
        }
        self.provisioner.shutdown().await.map_err(RemoteBackendError::Shutdown)
    }

    fn lock_pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place on a server for a new slot: on a server with room, else on a server that came
    /// back, else on a new server.
    async fn reserve_place(&self) -> Result<(ServerKey, Arc<ServerClient>), BackendError> {
        let per_server = self.config.slots_per_server;
        if let Some(place) = self.lock_pool().reserve(per_server) {
            return Ok(place);
        }
        let _growing = self.growing.lock().await;
        if let Some(place) = self.lock_pool().reserve(per_server) {
            return Ok(place);
        }
        if let Some(place) = self.revive_a_server().await {
            return Ok(place);
        }
        self.grow().await
    }

    /// Asks each down server with room for its health; takes a place on the first that answers.
    async fn revive_a_server(&self) -> Option<(ServerKey, Arc<ServerClient>)> {
        let candidates = self.lock_pool().down_with_room(self.config.slots_per_server);
        for (key, client) in candidates {
            if client.health(self.config.control_timeout).await.is_ok() {
                tracing::info!(server = %client.endpoint(), "a server that was down answers again");
                if let Some(client) = self.lock_pool().revive(key, self.config.slots_per_server) {
                    return Some((key, client));
                }
            }
        }
        None
    }

    /// Provisions one more server, with a place on it taken.
    async fn grow(&self) -> Result<(ServerKey, Arc<ServerClient>), BackendError> {
        let idle_down = self.lock_pool().take_idle_down();
        self.stop_servers(idle_down).await;
        if self.lock_pool().server_count() >= self.config.max_servers {
            return Err(BackendError::Exhausted {
                capacity: self.config.max_servers * self.config.slots_per_server,
            });
        }
        let endpoint = self
            .provisioner
            .provision(1)
            .await
            .map_err(|e| remote_error("failed to start another server", e))?
            .pop();
        let endpoint = endpoint.ok_or_else(|| BackendError::Remote {
            what: "failed to start another server: the provisioner returned none".into(),
            source: None,
        })?;
        let client = Arc::new(ServerClient::new(endpoint, self.http.clone()));
        if let Err(error) = client.health(self.config.control_timeout).await {
            let _ = self.provisioner.terminate(client.endpoint()).await;
            return Err(remote_error("failed to check the new server", error));
        }
        let key = self.lock_pool().add_server(client.clone(), 1);
        Ok((key, client))
    }

    /// Gives a place back, stopping the server if it is no longer needed.
    async fn give_back(&self, key: ServerKey) {
        let retired = self.lock_pool().give_back(key, self.config.min_servers);
        self.stop_servers(retired.into_iter().collect()).await;
    }

    async fn stop_servers(&self, servers: Vec<Arc<ServerClient>>) {
        for server in servers {
            if let Err(error) = self.provisioner.terminate(server.endpoint()).await {
                tracing::warn!(server = %server.endpoint(), error = %error_chain(&error), "failed to stop a server");
            }
        }
    }
}

/// One server's share of a batch.
struct ServerBatch {
    key: ServerKey,
    client: Arc<ServerClient>,
    /// Each call's index in the batch, the backend's slot id, and the tool's name.
    items: Vec<(usize, SlotId, String)>,
    calls: Vec<SlotCall>,
}

impl RemoteBackend {
    /// Splits a batch by server. Calls that cannot be sent (unknown or lost slots) get their
    /// result at once.
    fn group_by_server(
        &self,
        calls: Vec<(Slot, ToolCall)>,
        results: &mut [Option<ExecutionResult>],
    ) -> Vec<ServerBatch> {
        let mut batches: Vec<ServerBatch> = Vec::new();
        let pool = self.lock_pool();
        for (index, (slot, call)) in calls.into_iter().enumerate() {
            let Some(entry) = pool.slot(slot.id) else {
                results[index] = Some(failed_call(
                    ErrorKind::UnknownSlot,
                    BackendError::UnknownSlot(slot.id).to_string(),
                    &call.name,
                    slot.id,
                    false,
                ));
                continue;
            };
            if let Some(reason) = &entry.lost {
                let message = format!("slot {} is lost: {reason}; release it and acquire a new one", slot.id);
                results[index] = Some(failed_call(ErrorKind::Remote, message, &call.name, slot.id, true));
                continue;
            }
            let batch = match batches.iter_mut().position(|b| b.key == entry.server) {
                Some(position) => &mut batches[position],
                None => {
                    batches.push(ServerBatch {
                        key: entry.server,
                        client: entry.client.clone(),
                        items: Vec::new(),
                        calls: Vec::new(),
                    });
                    batches.last_mut().expect("just pushed")
                }
            };
            batch.items.push((index, slot.id, call.name.clone()));
            batch.calls.push(SlotCall {
                slot_id: entry.remote,
                call,
            });
        }
        batches
    }

    /// Puts one server's answer (or failure) in place of its calls' results.
    fn settle(
        &self,
        batch: ServerBatch,
        outcome: Result<Vec<ExecutionResult>, ClientError>,
        results: &mut [Option<ExecutionResult>],
    ) {
        match outcome {
            Ok(answers) => {
                for ((index, slot_id, tool), mut result) in batch.items.into_iter().zip(answers) {
                    result.metadata.slot_id = Some(slot_id);
                    if result.error.as_ref().is_some_and(|e| e.kind == ErrorKind::UnknownSlot) {
                        result = self.forgotten_slot(&batch.client, slot_id, &tool);
                    }
                    results[index] = Some(result);
                }
            }
            Err(error) => {
                let unreachable = error.server_unreachable();
                let message = format!("{}; {}", error_chain(&error), error.advice());
                if unreachable {
                    self.lock_pool().mark_down(batch.key, &error_chain(&error));
                }
                for (index, slot_id, tool) in batch.items {
                    results[index] = Some(failed_call(
                        ErrorKind::Remote,
                        message.clone(),
                        &tool,
                        slot_id,
                        unreachable,
                    ));
                }
            }
        }
    }

    /// A server answered that it does not know a slot this backend holds: it restarted, or the
    /// slot expired. The slot is lost.
    fn forgotten_slot(&self, client: &ServerClient, slot_id: SlotId, tool: &str) -> ExecutionResult {
        let reason = format!(
            "server {} no longer has it (the server restarted, or the slot expired after being idle)",
            client.endpoint()
        );
        self.lock_pool().mark_lost(slot_id, &reason);
        failed_call(
            ErrorKind::Remote,
            format!("slot {slot_id} is lost: {reason}; release it and acquire a new one"),
            tool,
            slot_id,
            true,
        )
    }
}

#[async_trait::async_trait]
impl Backend for RemoteBackend {
    fn name(&self) -> &str {
        "remote"
    }

    async fn shutdown(&self) -> Result<(), BackendError> {
        // The inherent method, which keeps the provisioner's typed error.
        RemoteBackend::shutdown(self)
            .await
            .map_err(|e| remote_error("failed to stop the remote servers", e))
    }

    fn tools(&self) -> Vec<ToolName> {
        self.tools.clone()
    }

    async fn acquire(&self, trajectory_id: &str) -> Result<Slot, BackendError> {
        self.acquire_on_a_server(trajectory_id, None).await
    }

    /// The seed goes to the server in the acquire body (`{"seed": N}`), which seeds the slot as
    /// its own backend can.
    async fn acquire_seeded(&self, trajectory_id: &str, seed: u64) -> Result<Slot, BackendError> {
        self.acquire_on_a_server(trajectory_id, Some(seed)).await
    }
    async fn execute_batch(&self, calls: Vec<(Slot, ToolCall)>) -> Vec<ExecutionResult> {
        let mut results: Vec<Option<ExecutionResult>> = vec![None; calls.len()];
        let mut batches = self.group_by_server(calls, &mut results);
        let requests = batches.iter_mut().map(|batch| {
            let calls = std::mem::take(&mut batch.calls);
            let timeout = request_timeout(&self.config, &calls);
            let client = batch.client.clone();
            async move { client.execute(calls, timeout).await }
        });
        let outcomes = join_all(requests).await;
        for (batch, outcome) in batches.into_iter().zip(outcomes) {
            self.settle(batch, outcome, &mut results);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    ExecutionResult::failure(
                        ErrorKind::Backend,
                        "no result was produced for this call",
                        ExecutionMetadata::default(),
                    )
                })
            })
            .collect()
    }

    async fn fork(&self, slot: &Slot, trajectory_id: &str) -> Result<Slot, BackendError> {
        let parent = self
            .lock_pool()
            .slot(slot.id)
            .cloned()
            .ok_or(BackendError::UnknownSlot(slot.id))?;
        if let Some(lost) = &parent.lost {
            return Err(BackendError::Remote {
                what: format!("failed to fork slot {}: its state is gone ({lost})", slot.id),
                source: None,
            });
        }
        let client = self
            .lock_pool()
            .reserve_on(parent.server, self.config.slots_per_server)
            .ok_or_else(|| BackendError::Remote {
                what: format!(
                    "failed to fork slot {}: its server has no free slot (or is down); release slots there, or raise --slots-per-server",
                    slot.id
                ),
                source: None,
            })?;
        match client
            .fork(parent.remote, trajectory_id, self.config.control_timeout)
            .await
        {
            Ok(remote) => {
                let id = SlotId(self.next_slot.fetch_add(1, Ordering::Relaxed));
                let entry = SlotEntry {
                    server: parent.server,
                    client,
                    remote: remote.id,
                    lost: None,
                };
                self.lock_pool().insert_slot(id, entry);
                Ok(Slot {
                    id,
                    trajectory_id: trajectory_id.to_string(),
                    backend: "remote".into(),
                    workspace: remote.workspace,
                })
            }
            Err(error) => {
                if error.server_unreachable() {
                    self.lock_pool().mark_down(parent.server, &error_chain(&error));
                }
                self.give_back(parent.server).await;
                if let ClientError::Api {
                    code: Some(ApiErrorCode::Unsupported),
                    message,
                    ..
                } = &error
                {
                    return Err(BackendError::Unsupported {
                        backend: "remote".into(),
                        operation: "fork a slot",
                        advice: format!("its servers answered: {message}"),
                    });
                }
                Err(remote_error(&format!("failed to fork slot {}", slot.id), error))
            }
        }
    }

    async fn release(&self, slot: &Slot, reset_workspace: bool) -> Result<(), BackendError> {
        let entry = self
            .lock_pool()
            .remove_slot(slot.id)
            .ok_or(BackendError::UnknownSlot(slot.id))?;
        let outcome = match entry.lost {
            Some(_) => Ok(()),
            None => {
                entry
                    .client
                    .release(entry.remote, reset_workspace, self.config.control_timeout)
                    .await
            }
        };
        if let Err(error) = &outcome
            && error.server_unreachable()
        {
            self.lock_pool().mark_down(entry.server, &error_chain(error));
        }
        self.give_back(entry.server).await;
        match outcome {
            Ok(()) => Ok(()),
            // The server already dropped it: released either way.
            Err(error) if error.unknown_slot() => Ok(()),
            Err(error) => Err(remote_error(
                &format!(
                    "failed to release slot {} (it is forgotten here; the server expires it when idle)",
                    slot.id
                ),
                error,
            )),
        }
    }
}

impl RemoteBackend {
    /// Acquires a slot on some server, seeded with `seed` if any, trying another server when
    /// one is unreachable.
    async fn acquire_on_a_server(&self, trajectory_id: &str, seed: Option<u64>) -> Result<Slot, BackendError> {
        let mut unreachable = Vec::new();
        for _ in 0..ACQUIRE_ATTEMPTS {
            if self.closed.load(Ordering::SeqCst) {
                return Err(BackendError::Remote {
                    what: "failed to acquire a slot: the remote backend is shut down; start a new one".into(),
                    source: None,
                });
            }
            let (key, client) = self.reserve_place().await?;
            match client.acquire(trajectory_id, seed, self.config.control_timeout).await {
                Ok(remote) => {
                    let id = SlotId(self.next_slot.fetch_add(1, Ordering::Relaxed));
                    let entry = SlotEntry {
                        server: key,
                        client,
                        remote: remote.id,
                        lost: None,
                    };
                    self.lock_pool().insert_slot(id, entry);
                    return Ok(Slot {
                        id,
                        trajectory_id: trajectory_id.to_string(),
                        backend: "remote".into(),
                        workspace: remote.workspace,
                    });
                }
                Err(error) if error.server_unreachable() => {
                    self.lock_pool().mark_down(key, &error_chain(&error));
                    self.give_back(key).await;
                    unreachable.push(error_chain(&error));
                }
                Err(error) => {
                    self.give_back(key).await;
                    return Err(remote_error(
                        &format!("failed to acquire a slot for trajectory `{trajectory_id}`"),
                        error,
                    ));
                }
            }
        }
        Err(BackendError::Remote {
            what: format!(
                "failed to acquire a slot: {} servers in a row were unreachable ({})",
                unreachable.len(),
                unreachable.join("; ")
            ),
            source: None,
        })
    }
}

/// The deadline of a request carrying `calls`: the longest total call time of any one slot
/// (a slot's calls run one after another) plus the margin.
fn request_timeout(config: &PoolConfig, calls: &[SlotCall]) -> Duration {
    let mut per_slot: HashMap<SlotId, Duration> = HashMap::new();
    for call in calls {
        let limit = call
            .call
            .timeout
            .map_or(config.call_timeout, |t| t.min(config.call_timeout));
        *per_slot.entry(call.slot_id).or_default() += limit;
    }
    per_slot.into_values().max().unwrap_or_default() + config.request_margin
}

/// Checks the settings and caps the server count at what the provisioner can supply.
fn validated(mut config: PoolConfig, limit: Option<usize>) -> Result<PoolConfig, RemoteBackendError> {
    let invalid = |text: String| Err(RemoteBackendError::Config(text));
    if config.slots_per_server == 0 {
        return invalid("--slots-per-sandbox must be at least 1".into());
    }
    if config.min_servers == 0 {
        return invalid(
            "--min-sandboxes must be at least 1: the backend checks the token and learns the tools on a warm server"
                .into(),
        );
    }
    if config.max_servers < config.min_servers {
        return invalid(format!(
            "--max-sandboxes ({}) must be at least --min-sandboxes ({})",
            config.max_servers, config.min_servers
        ));
    }
    if config.call_timeout.is_zero() {
        return invalid("the call timeout must be positive".into());
    }
    if let Some(limit) = limit {
        if config.min_servers > limit {
            return invalid(format!(
                "--min-sandboxes is {} but only {limit} servers are listed; list more with --servers or lower it",
                config.min_servers
            ));
        }
        config.max_servers = config.max_servers.min(limit);
    }
    Ok(config)
}

/// How long an idle connection to a server is kept for reuse.
const CLIENT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

fn http_client(config: &PoolConfig) -> Result<reqwest::Client, RemoteBackendError> {
    reqwest::Client::builder()
        .connect_timeout(config.connect_timeout)
        .tcp_nodelay(true)
        // Enough idle connections to reuse one per concurrent request to a busy server.
        .pool_max_idle_per_host(1024)
        // Below the server's connection idle timeout (75 s by default), so the client drops an
        // idle connection before the server closes it under a request about to be sent.
        .pool_idle_timeout(CLIENT_POOL_IDLE_TIMEOUT)
        .build()
        .map_err(RemoteBackendError::Http)
}

fn tools_of(health: &Health) -> Vec<ToolName> {
    health
        .tools
        .iter()
        .filter_map(|name| ToolName::from_name(name))
        .collect()
}

fn failed_call(kind: ErrorKind, message: String, tool: &str, slot_id: SlotId, state_lost: bool) -> ExecutionResult {
    let metadata = ExecutionMetadata {
        tool: tool.to_string(),
        slot_id: Some(slot_id),
        state_lost,
        ..Default::default()
    };
    ExecutionResult::failure(kind, message, metadata)
}

/// A [`BackendError::Remote`] that says `what` failed, with the client's advice where `error`
/// is a client error, and `error` kept whole as its source.
fn remote_error(what: &str, error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> BackendError {
    let error = error.into();
    let advice = error
        .downcast_ref::<ClientError>()
        .map(|e| format!(" ({})", e.advice()))
        .unwrap_or_default();
    BackendError::Remote {
        what: format!("{what}{advice}"),
        source: Some(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_may_take_its_slowest_slots_calls_plus_the_margin() {
        let config = PoolConfig {
            call_timeout: Duration::from_secs(30),
            request_margin: Duration::from_secs(10),
            ..PoolConfig::default()
        };
        let call = |slot: u64, timeout: Option<u64>| SlotCall {
            slot_id: SlotId(slot),
            call: ToolCall {
                timeout: timeout.map(Duration::from_secs),
                ..ToolCall::python("1")
            },
        };
        // Slot 1 runs two calls in turn (30 s + 5 s); slot 2 runs one in parallel; a per-call
        // limit above the servers' is capped at theirs.
        let calls = [call(1, None), call(2, Some(100)), call(1, Some(5))];
        assert_eq!(request_timeout(&config, &calls), Duration::from_secs(45));
    }

    #[test]
    fn contradictory_settings_are_refused_with_the_flag_to_fix() {
        let refused = |config: PoolConfig, limit| {
            validated(config, limit)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(
            refused(
                PoolConfig {
                    min_servers: 0,
                    ..PoolConfig::default()
                },
                None
            )
            .contains("--min-sandboxes must be at least 1")
        );
        assert!(
            refused(
                PoolConfig {
                    min_servers: 5,
                    max_servers: 2,
                    ..PoolConfig::default()
                },
                None
            )
            .contains("--max-sandboxes (2)")
        );
        assert!(
            refused(
                PoolConfig {
                    min_servers: 3,
                    ..PoolConfig::default()
                },
                Some(2)
            )
            .contains("only 2 servers are listed")
        );
        let capped = validated(
            PoolConfig {
                max_servers: 8,
                ..PoolConfig::default()
            },
            Some(3),
        )
        .map(|c| c.max_servers)
        .ok();
        assert_eq!(capped, Some(3), "no more servers than the list holds");
    }
}
