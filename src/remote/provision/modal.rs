//! The `modal` provisioner: Modal sandboxes that run `rollbox serve`, reached through Modal's
//! encrypted tunnels.
//!
//! Modal's official SDK is Python, so rollbox drives a small helper (`modal_helper.py`, embedded
//! in the binary and run with `python3 -c`) over JSON lines on its stdin and stdout. The helper
//! is started in its own process group, so a Ctrl-C in the terminal reaches rollbox, which
//! shuts down in order (terminate everything, then close the helper's stdin); if rollbox dies
//! instead, the helper's stdin closes and it terminates every sandbox it created itself.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::{ProvisionError, Provisioner, ServerEndpoint, StderrTail, random_token};
use crate::env_vars;
use crate::remote::client::ServerClient;

/// The helper's source, shipped inside the binary.
const HELPER_SOURCE: &str = include_str!("modal_helper.py");

/// Where the rollbox binary is put inside the image.
pub const REMOTE_BINARY: &str = "/usr/local/bin/rollbox";

/// How long a terminate request to the helper may take.
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the helper may take to exit once its stdin is closed.
const HELPER_EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// How Modal sandboxes are made.
#[derive(Clone, Debug)]
pub struct ModalConfig {
    /// A Python that can `import modal`, logged in (`modal setup`).
    pub python: PathBuf,
    /// The Modal app the sandboxes belong to (looked up, created if missing).
    pub app_name: String,
    /// The local rollbox binary to put in the image. It must run on the image's Linux: any
    /// image for a static build (`scripts/build-static-rollbox.sh`); for a dynamically linked
    /// one, x86_64 with glibc no newer than the build host's.
    pub binary: PathBuf,
    /// An image from a registry (`modal.Image.from_registry(REF)`, an SWE-bench per-instance
    /// image, say) instead of Modal's Debian image; it must have `bash`, `git` and whatever the
    /// tasks' tests need (`python_version` and `apt_packages` do not apply to it).
    pub image: Option<String>,
    /// The image's Python version (`modal.Image.debian_slim(python_version=...)`).
    pub python_version: String,
    /// Debian packages installed in the image (the Debian image only).
    pub apt_packages: Vec<String>,
    /// The port the server listens on inside the sandbox, tunnelled with TLS.
    pub port: u16,
    /// The backend the servers serve.
    pub server_backend: String,
    /// More arguments for `rollbox serve` (limits, `--max-slots`, ...).
    pub server_args: Vec<String>,
    /// Each sandbox's lifetime cap: Modal ends it after this long whatever happens, the
    /// backstop against a sandbox that nothing else terminated.
    pub sandbox_timeout: Duration,
    /// CPU cores requested per sandbox.
    pub cpu: Option<f64>,
    /// Memory requested per sandbox, in MiB.
    pub memory_mib: Option<u32>,
    /// How long a new sandbox's tunnel may take to appear.
    pub tunnel_timeout: Duration,
    /// How long a new sandbox's server may take to answer its first health check.
    pub ready_timeout: Duration,
    /// How long one create request may take; the first builds the image.
    pub create_timeout: Duration,
}

impl Default for ModalConfig {
    /// Sandboxes of the `rollbox` app running the `process` backend on port 8000, in a Debian
    /// image with Python 3.11, git and pytest; 2 hours' lifetime each. The binary is unset:
    /// see [`ModalConfig::new`].
    fn default() -> Self {
        ModalConfig {
            python: PathBuf::from("python3"),
            app_name: "rollbox".into(),
            binary: PathBuf::new(),
            image: None,
            python_version: "3.11".into(),
            apt_packages: vec!["git".into(), "python3".into(), "python3-pytest".into()],
            port: 8000,
            server_backend: "process".into(),
            server_args: Vec::new(),
            sandbox_timeout: Duration::from_secs(2 * 3600),
            cpu: None,
            memory_mib: None,
            tunnel_timeout: Duration::from_secs(60),
            ready_timeout: Duration::from_secs(180),
            create_timeout: Duration::from_secs(900),
        }
    }
}

impl ModalConfig {
    /// The defaults, with `binary` as the rollbox that goes into the image.
    pub fn new(binary: impl Into<PathBuf>) -> ModalConfig {
        ModalConfig {
            binary: binary.into(),
            ..ModalConfig::default()
        }
    }

    /// The server's command line inside the sandbox. It listens on every interface (the
    /// tunnel connects from outside the container) and so requires its token. With the
    /// `process` backend it runs without bubblewrap: inside Modal the isolation is Modal's
    /// sandbox itself.
    pub fn command(&self) -> Vec<String> {
        let mut command: Vec<String> = vec![
            REMOTE_BINARY.into(),
            "serve".into(),
            "--listen".into(),
            format!("0.0.0.0:{}", self.port),
            "--backend".into(),
            self.server_backend.clone(),
        ];
        if self.server_backend == "process" {
            command.push("--unsafe-no-isolation".into());
        }
        command.extend(self.server_args.iter().cloned());
        command
    }

    fn helper_config(&self) -> HelperConfig {
        HelperConfig {
            app_name: self.app_name.clone(),
            image: HelperImage {
                registry: self.image.clone(),
                python_version: self.python_version.clone(),
                apt_packages: self.apt_packages.clone(),
                binary: self.binary.display().to_string(),
                remote_binary: REMOTE_BINARY.into(),
            },
            command: self.command(),
            port: self.port,
            timeout_secs: self.sandbox_timeout.as_secs().max(1),
            cpu: self.cpu,
            memory_mib: self.memory_mib,
            tunnel_timeout_secs: self.tunnel_timeout.as_secs().max(1),
            token_env: env_vars::SERVER_TOKEN.into(),
        }
    }
}

/// The helper's `configure` payload.
#[derive(Serialize)]
struct HelperConfig {
    app_name: String,
    image: HelperImage,
    command: Vec<String>,
    port: u16,
    timeout_secs: u64,
    cpu: Option<f64>,
    memory_mib: Option<u32>,
    tunnel_timeout_secs: u64,
    token_env: String,
}

#[derive(Serialize)]
struct HelperImage {
    registry: Option<String>,
    python_version: String,
    apt_packages: Vec<String>,
    binary: String,
    remote_binary: String,
}

#[derive(Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum HelperRequest<'a> {
    Configure { config: &'a HelperConfig },
    Create { tokens: &'a [String] },
    Terminate { ids: Vec<String> },
    TerminateAll,
}

#[derive(Deserialize)]
struct HelperAnswer {
    ok: bool,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    plan: Option<Value>,
    #[serde(default)]
    sandboxes: Vec<CreatedSandbox>,
}

#[derive(Deserialize)]
struct CreatedSandbox {
    id: String,
    url: String,
}

/// The running helper process and its pipes.
struct Helper {
    child: Child,
    /// `None` once closed: the helper then terminates everything and exits.
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
    stderr: StderrTail,
}

impl Helper {
    fn spawn(python: &PathBuf, dry_run: bool) -> Result<Helper, ProvisionError> {
        let mut command = Command::new(python);
        command.arg("-c").arg(HELPER_SOURCE);
        if dry_run {
            command.arg("--dry-run");
        }
        // Its own process group: a terminal's Ctrl-C goes to rollbox, which shuts down in
        // order; the helper must live long enough to terminate what it made.
        command
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        let mut child = command.spawn().map_err(|source| ProvisionError::Spawn {
            command: python.display().to_string(),
            source,
        })?;
        let broken = |what: &str| ProvisionError::Helper {
            action: "start".into(),
            message: format!("its {what} was not captured"),
        };
        let stdin = child.stdin.take().ok_or_else(|| broken("stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| broken("stdout"))?;
        let stderr = child
            .stderr
            .take()
            .map(|s| StderrTail::follow(s, "modal-helper".into()))
            .unwrap_or_default();
        Ok(Helper {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout).lines(),
            stderr,
        })
    }

    /// Sends one request and reads its answer.
    async fn request(
        &mut self,
        action: &str,
        request: &HelperRequest<'_>,
        timeout: Duration,
    ) -> Result<HelperAnswer, ProvisionError> {
        let failed = |message: String| ProvisionError::Helper {
            action: action.to_string(),
            message,
        };
        let mut line = serde_json::to_string(request).map_err(|e| failed(e.to_string()))?;
        line.push('\n');
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| failed("the helper was already closed".into()))?;
        if let Err(error) = async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await
        }
        .await
        {
            return Err(failed(format!(
                "it stopped reading ({error}); its stderr:\n{}",
                self.stderr.text_after_exit().await
            )));
        }
        let answer = match tokio::time::timeout(timeout, self.stdout.next_line()).await {
            Ok(Ok(Some(answer))) => answer,
            Ok(Ok(None)) => {
                return Err(failed(format!(
                    "it exited; its stderr:\n{}",
                    self.stderr.text_after_exit().await
                )));
            }
            Ok(Err(error)) => return Err(failed(format!("its answer could not be read ({error})"))),
            Err(_) => {
                // Its state is unknown: close its stdin so it terminates everything once free.
                self.stdin = None;
                return Err(failed(format!(
                    "no answer within {} s; the helper was told to terminate everything and exit",
                    timeout.as_secs()
                )));
            }
        };
        let answer: HelperAnswer = serde_json::from_str(&answer)
            .map_err(|e| failed(format!("its answer is not the protocol's JSON ({e}): {answer}")))?;
        if !answer.ok {
            return Err(failed(
                answer
                    .error
                    .unwrap_or_else(|| "it answered ok: false without an error".into()),
            ));
        }
        Ok(answer)
    }

    /// Closes stdin (the helper terminates what is left and exits) and waits for it.
    async fn close(&mut self) {
        self.stdin = None;
        if tokio::time::timeout(HELPER_EXIT_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!("the Modal helper did not exit after its stdin closed");
        }
    }
}

/// Creates Modal sandboxes through the helper; see the [module docs](self).
pub struct ModalProvisioner {
    config: ModalConfig,
    helper: tokio::sync::Mutex<Helper>,
    /// Sandboxes created and not yet terminated.
    live: Mutex<HashSet<String>>,
    http: reqwest::Client,
}

impl ModalProvisioner {
    /// Starts the helper and has it look up the app and define the image (built by Modal on
    /// the first create).
    pub async fn start(config: ModalConfig) -> Result<ModalProvisioner, ProvisionError> {
        let mut helper = Helper::spawn(&config.python, false)?;
        let helper_config = config.helper_config();
        if let Err(error) = helper
            .request(
                "configure",
                &HelperRequest::Configure { config: &helper_config },
                config.create_timeout,
            )
            .await
        {
            helper.close().await;
            return Err(error);
        }
        let http = reqwest::Client::builder().build().map_err(|e| ProvisionError::Helper {
            action: "start".into(),
            message: format!("failed to build an HTTP client: {e}"),
        })?;
        Ok(ModalProvisioner {
            config,
            helper: tokio::sync::Mutex::new(helper),
            live: Mutex::new(HashSet::new()),
            http,
        })
    }

    /// The plan: every SDK call the helper would make, as JSON, from a dry-run helper that
    /// never imports modal.
    pub async fn plan(config: &ModalConfig) -> Result<Value, ProvisionError> {
        let mut helper = Helper::spawn(&config.python, true)?;
        let helper_config = config.helper_config();
        let answer = helper
            .request(
                "plan",
                &HelperRequest::Configure { config: &helper_config },
                TERMINATE_TIMEOUT,
            )
            .await;
        helper.close().await;
        answer?.plan.ok_or_else(|| ProvisionError::Helper {
            action: "plan".into(),
            message: "it answered without a plan".into(),
        })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn terminate_ids(&self, ids: Vec<String>) -> Result<(), ProvisionError> {
        let result = self
            .helper
            .lock()
            .await
            .request(
                "terminate sandboxes",
                &HelperRequest::Terminate { ids: ids.clone() },
                TERMINATE_TIMEOUT,
            )
            .await;
        let mut live = self.live();
        for id in &ids {
            live.remove(id);
        }
        result.map(drop)
    }
}

#[async_trait::async_trait]
impl Provisioner for ModalProvisioner {
    fn name(&self) -> &str {
        "modal"
    }

    async fn provision(&self, count: usize) -> Result<Vec<ServerEndpoint>, ProvisionError> {
        let tokens = (0..count).map(|_| random_token()).collect::<Result<Vec<_>, _>>()?;
        let answer = self
            .helper
            .lock()
            .await
            .request(
                "create sandboxes",
                &HelperRequest::Create { tokens: &tokens },
                self.config.create_timeout,
            )
            .await?;
        let endpoints: Vec<ServerEndpoint> = answer
            .sandboxes
            .into_iter()
            .zip(tokens)
            .map(|(sandbox, token)| ServerEndpoint {
                id: sandbox.id,
                url: sandbox.url,
                token: Some(token),
            })
            .collect();
        self.live().extend(endpoints.iter().map(|e| e.id.clone()));
        let request_timeout = self.config.tunnel_timeout;
        let clients: Vec<ServerClient> = endpoints
            .iter()
            .map(|e| ServerClient::new(e.clone(), self.http.clone()))
            .collect();
        let checks = join_all(
            clients
                .iter()
                .map(|c| c.wait_ready(self.config.ready_timeout, request_timeout)),
        )
        .await;
        if let Some((endpoint, Err(source))) = endpoints.iter().zip(checks).find(|(_, check)| check.is_err()) {
            let server = endpoint.to_string();
            let _ = self
                .terminate_ids(endpoints.iter().map(|e| e.id.clone()).collect())
                .await;
            return Err(ProvisionError::NotReady { server, source });
        }
        Ok(endpoints)
    }

    async fn terminate(&self, server: &ServerEndpoint) -> Result<(), ProvisionError> {
        if !self.live().contains(&server.id) {
            return Ok(());
        }
        self.terminate_ids(vec![server.id.clone()]).await
    }

    async fn shutdown(&self) -> Result<(), ProvisionError> {
        let mut helper = self.helper.lock().await;
        let result = match helper.stdin {
            Some(_) => helper
                .request(
                    "terminate every sandbox",
                    &HelperRequest::TerminateAll,
                    TERMINATE_TIMEOUT,
                )
                .await
                .map(drop),
            None => Ok(()),
        };
        self.live().clear();
        helper.close().await;
        result
    }
}

impl Drop for ModalProvisioner {
    fn drop(&mut self) {
        // Closing stdin is enough: the helper terminates what is left and exits on its own.
        self.helper.get_mut().stdin = None;
    }
}
