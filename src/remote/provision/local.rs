//! The `local` provisioner: `rollbox serve` child processes on loopback, one random token each.
//! For tests, and for using several processes on one big machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use super::{ProvisionError, Provisioner, ServerEndpoint, StderrTail, random_token};
use crate::env_vars;

/// How a [`LocalProvisioner`] starts its servers.
#[derive(Clone, Debug)]
pub struct LocalProvisionerConfig {
    /// The `rollbox` binary to run.
    pub binary: PathBuf,
    /// The backend each server serves (`wasm`, `process`).
    pub server_backend: String,
    /// More arguments for `rollbox serve` (limits, `--max-slots`, ...).
    pub server_args: Vec<String>,
    /// How long a server may take to print its listening line. The first start on a machine
    /// may install and compile the runtime, so this is generous.
    pub startup_timeout: Duration,
    /// How long a server may take to drain and exit after SIGTERM before it is killed.
    pub stop_timeout: Duration,
}

impl LocalProvisionerConfig {
    /// Servers of `binary` serving the wasm backend, with no extra arguments, 120 s to start
    /// and 10 s to stop.
    pub fn new(binary: impl Into<PathBuf>) -> LocalProvisionerConfig {
        LocalProvisionerConfig {
            binary: binary.into(),
            server_backend: "wasm".into(),
            server_args: Vec::new(),
            startup_timeout: Duration::from_secs(120),
            stop_timeout: Duration::from_secs(10),
        }
    }

    /// [`LocalProvisionerConfig::new`] with the running binary: the servers are this very
    /// rollbox.
    pub fn from_current_exe() -> std::io::Result<LocalProvisionerConfig> {
        Ok(LocalProvisionerConfig::new(std::env::current_exe()?))
    }
}

/// Spawns `rollbox serve --listen 127.0.0.1:0` children, each with its own random token passed
/// through [`env_vars::SERVER_TOKEN`], and reads the URL from the line each prints once it
/// listens.
///
/// [`Provisioner::terminate`] and [`Provisioner::shutdown`] stop a server gracefully (SIGTERM,
/// then SIGKILL after [`LocalProvisionerConfig::stop_timeout`]); dropping the provisioner kills
/// any server still running.
pub struct LocalProvisioner {
    config: LocalProvisionerConfig,
    servers: Mutex<HashMap<String, LocalServer>>,
    next: AtomicU64,
}

struct LocalServer {
    child: Child,
    stderr: StderrTail,
}

/// The line `rollbox serve` prints on stdout once it listens.
#[derive(Deserialize)]
struct ListeningLine {
    event: String,
    url: String,
}

impl LocalProvisioner {
    /// A provisioner that starts servers as `config` says.
    pub fn new(config: LocalProvisionerConfig) -> LocalProvisioner {
        LocalProvisioner {
            config,
            servers: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// The process id of a running server, for operators (and tests that kill one abruptly).
    pub fn pid(&self, server_id: &str) -> Option<u32> {
        self.lock().get(server_id).and_then(|s| s.child.id())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, LocalServer>> {
        self.servers.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn start_one(&self) -> Result<ServerEndpoint, ProvisionError> {
        let id = format!("local-{}", self.next.fetch_add(1, Ordering::Relaxed));
        let token = random_token()?;
        let mut command = Command::new(&self.config.binary);
        command
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--backend",
                &self.config.server_backend,
            ])
            .args(&self.config.server_args)
            // The server's stdin is a pipe this process holds and never writes: when this
            // process ends, however it ends (SIGKILL included), the pipe closes and the server
            // shuts down as on SIGTERM. (PR_SET_PDEATHSIG would follow the spawning thread,
            // which may be a runtime thread that ends before the process does.)
            .arg("--exit-on-stdin-eof")
            .env(env_vars::SERVER_TOKEN, &token)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().map_err(|source| ProvisionError::Spawn {
            command: self.config.binary.display().to_string(),
            source,
        })?;
        let stderr = match child.stderr.take() {
            Some(stream) => StderrTail::follow(stream, id.clone()),
            None => StderrTail::default(),
        };
        let listening = match child.stdout.take() {
            Some(stdout) => {
                tokio::time::timeout(
                    self.config.startup_timeout,
                    read_listening_url(BufReader::new(stdout).lines()),
                )
                .await
            }
            None => Ok(Err("its stdout was not captured".to_string())),
        };
        let url = match listening {
            Ok(Ok(url)) => url,
            Ok(Err(reason)) => return Err(self.failed_start(id, child, stderr, reason).await),
            Err(_) => {
                let reason = format!("it printed no listening line within {:?}", self.config.startup_timeout);
                return Err(self.failed_start(id, child, stderr, reason).await);
            }
        };
        self.lock().insert(id.clone(), LocalServer { child, stderr });
        Ok(ServerEndpoint {
            id,
            url,
            token: Some(token),
        })
    }

    async fn failed_start(&self, id: String, mut child: Child, stderr: StderrTail, reason: String) -> ProvisionError {
        let _ = child.kill().await;
        let status = child
            .try_wait()
            .ok()
            .flatten()
            .map(|s| format!(" (exit status: {s})"))
            .unwrap_or_default();
        ProvisionError::NotListening {
            server: id,
            reason: format!("{reason}{status}"),
            stderr: stderr.text_after_exit().await,
        }
    }

    /// SIGTERM, a grace period to drain, then SIGKILL.
    async fn stop(&self, id: &str, mut server: LocalServer) -> Result<(), ProvisionError> {
        if let Some(pid) = server.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            // SAFETY: kill(2) with a pid this process spawned and has not reaped (the Child
            // still holds it), so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if let Ok(waited) = tokio::time::timeout(self.config.stop_timeout, server.child.wait()).await {
            let status = waited.map_err(|source| ProvisionError::Stop {
                server: id.to_string(),
                source,
            })?;
            if !status.success() {
                // Killed or crashed earlier (it did not drain on SIGTERM): say so in the log.
                let stderr = server.stderr.text_after_exit().await;
                tracing::warn!(server = id, %status, %stderr, "a local server had exited abnormally");
            }
            return Ok(());
        }
        tracing::warn!(server = id, "the server did not exit after SIGTERM; killing it");
        server.child.kill().await.map_err(|source| ProvisionError::Stop {
            server: id.to_string(),
            source,
        })
    }
}

/// Reads stdout lines until the listening line, and then keeps draining stdout in the
/// background so the server never blocks on a full pipe.
async fn read_listening_url(mut lines: Lines<BufReader<ChildStdout>>) -> Result<String, String> {
    loop {
        match lines.next_line().await {
            Ok(Some(line)) => {
                if let Ok(ListeningLine { event, url }) = serde_json::from_str(&line)
                    && event == "listening"
                {
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    return Ok(url);
                }
            }
            Ok(None) => return Err("it exited before it was listening".to_string()),
            Err(error) => return Err(format!("its stdout could not be read ({error})")),
        }
    }
}

#[async_trait::async_trait]
impl Provisioner for LocalProvisioner {
    fn name(&self) -> &str {
        "local"
    }

    async fn provision(&self, count: usize) -> Result<Vec<ServerEndpoint>, ProvisionError> {
        // Started together: each spends most of its start loading the runtime.
        let started = join_all((0..count).map(|_| self.start_one())).await;
        let (ready, failed): (Vec<_>, Vec<_>) = started.into_iter().partition(Result::is_ok);
        let ready: Vec<ServerEndpoint> = ready.into_iter().filter_map(Result::ok).collect();
        if let Some(Err(error)) = failed.into_iter().next() {
            for endpoint in &ready {
                let _ = self.terminate(endpoint).await;
            }
            return Err(error);
        }
        Ok(ready)
    }

    async fn terminate(&self, server: &ServerEndpoint) -> Result<(), ProvisionError> {
        let Some(running) = self.lock().remove(&server.id) else {
            return Ok(());
        };
        self.stop(&server.id, running).await
    }

    async fn shutdown(&self) -> Result<(), ProvisionError> {
        let running: Vec<(String, LocalServer)> = self.lock().drain().collect();
        let mut outcome = Ok(());
        for (id, server) in running {
            if let Err(error) = self.stop(&id, server).await {
                outcome = Err(error);
            }
        }
        outcome
    }
}
