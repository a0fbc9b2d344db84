//! `--backend wasm|process|remote` for every command that runs cells, with the process and
//! remote backends' flags, and the one place that starts the chosen backend.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use serde_json::json;

use rollbox::env_vars;
use rollbox::process::{ProcessBackend, ProcessBackendConfig};
use rollbox::remote::provision::{LocalProvisionerConfig, ModalConfig, ModalProvisioner};
use rollbox::remote::{ListedConfig, PoolConfig, ProvisionConfig, RemoteBackend, RemoteBackendConfig};
use rollbox::{Backend, Limits};

use super::{Printer, RuntimeArgs, start_wasm_backend};

/// Where cells run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum BackendChoice {
    /// In this process: CPython in wasm sandboxes.
    Wasm,
    /// In this process: bash, files and native Python in workspace folders, in bubblewrap.
    Process,
    /// On `rollbox serve` servers (see the remote flags).
    Remote,
}

/// Where the remote backend's servers come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ProvisionKind {
    /// `rollbox serve` child processes on loopback.
    Local,
    /// Servers already running, listed with --servers.
    Static,
    /// Modal sandboxes (needs a Python with the `modal` package, logged in).
    Modal,
}

/// The backends a server (`rollbox serve`, or a provisioned one) can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum ServedBackend {
    /// CPython notebook slots in wasm sandboxes.
    Wasm,
    /// bash, files and native Python in a workspace directory.
    Process,
}

impl ServedBackend {
    /// The name `--backend` takes for it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            ServedBackend::Wasm => "wasm",
            ServedBackend::Process => "process",
        }
    }
}

/// `--backend` and, for `--backend remote`, the remote flags.
#[derive(Args, Clone, Debug)]
pub(crate) struct BackendArgs {
    /// Where cells run: wasm sandboxes or native processes in this process, or rollbox servers.
    #[arg(long, value_enum, default_value_t = BackendChoice::Wasm)]
    pub(crate) backend: BackendChoice,
    #[command(flatten)]
    pub(crate) process: ProcessArgs,
    #[command(flatten)]
    pub(crate) remote: RemoteArgs,
}

/// The process backend's flags (also `rollbox serve --backend process`'s).
#[derive(Args, Clone, Debug, Default)]
#[command(next_help_heading = "Process backend (--backend process)")]
pub(crate) struct ProcessArgs {
    /// Run commands directly on this host, without bubblewrap: slots can then read and write
    /// whatever this user can, and reach the network. Only for hosts that are themselves a
    /// disposable sandbox (a Modal sandbox, a throwaway VM).
    #[arg(long)]
    unsafe_no_isolation: bool,
    /// The folder slot workspaces are made in [default: a private temporary folder, removed at exit].
    #[arg(long, value_name = "DIR")]
    workspace_root: Option<PathBuf>,
    /// A folder every slot can write, e.g. the SWE repository cache [default: shared-cache/ in
    /// the workspace root].
    #[arg(long, value_name = "DIR")]
    shared_cache: Option<PathBuf>,
    /// The Python that runs `python` cells [default: /usr/bin/python3].
    #[arg(long, value_name = "PATH")]
    native_python: Option<PathBuf>,
}

/// The refusal for process flags given to another backend.
pub(crate) const PROCESS_FLAGS_ONLY: &str =
    "--unsafe-no-isolation, --workspace-root, --shared-cache and --native-python apply to --backend process only";

impl ProcessArgs {
    /// Whether any process flag was given.
    pub(crate) fn given(&self) -> bool {
        self.unsafe_no_isolation
            || self.workspace_root.is_some()
            || self.shared_cache.is_some()
            || self.native_python.is_some()
    }

    /// `--shared-cache`, when given.
    pub(crate) fn shared_cache(&self) -> Option<&std::path::Path> {
        self.shared_cache.as_deref()
    }

    /// Sets the shared cache a command chose for the user (an SWE rollout's persistent one).
    pub(crate) fn set_shared_cache(&mut self, dir: PathBuf) {
        self.shared_cache = Some(dir);
    }

    /// The process backend's settings, with `limits` and at most `max_slots` slots.
    pub(crate) fn config(&self, limits: Limits, max_slots: usize) -> anyhow::Result<ProcessBackendConfig> {
        anyhow::ensure!(
            limits.fuel.is_none(),
            "--fuel applies to the wasm backend only: native processes have no instruction budget; use --timeout"
        );
        let defaults = ProcessBackendConfig::default();
        Ok(ProcessBackendConfig {
            limits,
            workspace_root: self.workspace_root.clone(),
            shared_cache: self.shared_cache.clone(),
            python: self.native_python.clone().unwrap_or(defaults.python),
            unsafe_no_isolation: self.unsafe_no_isolation,
            max_slots,
            ..defaults
        })
    }

    /// The flags that give a local server (or a child rollbox) this process's process-backend
    /// settings.
    pub(crate) fn server_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if self.unsafe_no_isolation {
            args.push("--unsafe-no-isolation".to_string());
        }
        if let Some(python) = &self.native_python {
            args.extend(["--native-python".to_string(), python.display().to_string()]);
        }
        args
    }
}

/// Starts a process backend; bubblewrap is checked here, so a missing one fails before any
/// work starts.
pub(crate) async fn start_process_backend(config: ProcessBackendConfig) -> anyhow::Result<ProcessBackend> {
    tokio::task::spawn_blocking(move || ProcessBackend::new(config))
        .await?
        .context("failed to start the process backend")
}

/// The remote backend's flags.
#[derive(Args, Clone, Debug)]
#[command(next_help_heading = "Remote backend (--backend remote)")]
pub(crate) struct RemoteArgs {
    /// Where the servers come from.
    #[arg(long, value_enum, default_value_t = ProvisionKind::Local)]
    provision: ProvisionKind,
    /// The servers' base URLs, for --provision static.
    #[arg(long, value_name = "URL,...", value_delimiter = ',')]
    servers: Vec<String>,
    /// The environment variable holding the listed servers' bearer token.
    #[arg(long, value_name = "VAR", default_value = env_vars::SERVER_TOKEN)]
    token_env: String,
    /// Slots per server (per sandbox).
    #[arg(long, value_name = "N", default_value_t = PoolConfig::default().slots_per_server)]
    pub(crate) slots_per_sandbox: usize,
    /// Servers kept warm, started up front.
    #[arg(long, value_name = "N", default_value_t = PoolConfig::default().min_servers)]
    pub(crate) min_sandboxes: usize,
    /// The most servers at once; more are started on demand up to this.
    #[arg(long, value_name = "N", default_value_t = PoolConfig::default().max_servers)]
    pub(crate) max_sandboxes: usize,
    /// The backend the servers run [default: wasm for local, process for modal].
    #[arg(long, value_enum)]
    server_backend: Option<ServedBackend>,
    /// The rollbox binary the local servers run, or that goes into the Modal image
    /// [default: this one].
    #[arg(long, value_name = "PATH")]
    server_binary: Option<PathBuf>,
    /// Print what would be started (for modal: every SDK call, image and command) and exit.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    modal: ModalArgs,
}

/// Flags for `--provision modal`.
#[derive(Args, Clone, Debug)]
struct ModalArgs {
    /// A Python that can `import modal` and is logged in (`modal setup`).
    #[arg(long, value_name = "PATH", default_value_os_t = ModalConfig::default().python)]
    modal_python: PathBuf,
    /// The Modal app the sandboxes belong to.
    #[arg(long, value_name = "NAME", default_value_t = ModalConfig::default().app_name)]
    modal_app: String,
    /// The image's Python version.
    #[arg(long, value_name = "VERSION", default_value_t = ModalConfig::default().python_version)]
    modal_python_version: String,
    /// Debian packages for the image.
    #[arg(long, value_name = "PKG,...", value_delimiter = ',', default_values_t = ModalConfig::default().apt_packages)]
    modal_apt: Vec<String>,
    /// A registry image the sandboxes start from (`modal.Image.from_registry`), instead of
    /// Modal's Debian image; a dataset row's `image_name` overrides it for that row. The image
    /// needs bash and git; --modal-python-version and --modal-apt do not apply to it.
    #[arg(long, value_name = "REF")]
    modal_image: Option<String>,
    /// The server's port inside the sandbox (tunnelled with TLS).
    #[arg(long, value_name = "PORT", default_value_t = ModalConfig::default().port)]
    modal_port: u16,
    /// Each sandbox's lifetime cap in seconds: Modal ends it then whatever happens.
    #[arg(long, value_name = "SECS", default_value_t = ModalConfig::default().sandbox_timeout.as_secs())]
    modal_lifetime: u64,
    /// CPU cores per sandbox.
    #[arg(long, value_name = "CORES")]
    modal_cpu: Option<f64>,
    /// Memory per sandbox, in MiB.
    #[arg(long, value_name = "MIB")]
    modal_memory: Option<u32>,
}

impl RemoteArgs {
    /// The backend's settings: the pool from the flags, the servers' call limit from `limits`,
    /// and the provisioner's settings.
    pub(crate) fn resolve(
        &self,
        limits: &Limits,
        runtime: &RuntimeArgs,
        process: &ProcessArgs,
    ) -> anyhow::Result<RemoteBackendConfig> {
        let pool = PoolConfig {
            slots_per_server: self.slots_per_sandbox,
            min_servers: self.min_sandboxes,
            max_servers: self.max_sandboxes,
            call_timeout: limits.timeout,
            ..PoolConfig::default()
        };
        let binary = match &self.server_binary {
            Some(binary) => binary.clone(),
            None => std::env::current_exe()
                .context("failed to find this rollbox binary for the servers; pass --server-binary")?,
        };
        let server_args = serve_args(limits, self.slots_per_sandbox)?;
        let provision = match self.provision {
            ProvisionKind::Local => {
                let server_backend = self.server_backend.unwrap_or(ServedBackend::Wasm);
                let mut local = LocalProvisionerConfig::new(binary);
                local.server_backend = server_backend.name().into();
                local.server_args = server_args;
                local.server_args.extend(runtime.server_args());
                match server_backend {
                    ServedBackend::Wasm => local.server_args.extend(runtime.wasm_server_args()),
                    ServedBackend::Process => local.server_args.extend(process.server_args()),
                }
                ProvisionConfig::Local(local)
            }
            ProvisionKind::Static => {
                anyhow::ensure!(
                    !self.servers.is_empty(),
                    "--provision static needs the servers' URLs: --servers http://HOST:PORT,..."
                );
                anyhow::ensure!(
                    self.server_backend.is_none(),
                    "--server-backend does not apply to --provision static: a listed server runs the backend it was started with"
                );
                let token = std::env::var(&self.token_env).ok().filter(|t| !t.trim().is_empty());
                ProvisionConfig::Listed(ListedConfig {
                    urls: self.servers.clone(),
                    token,
                })
            }
            ProvisionKind::Modal => ProvisionConfig::Modal(self.modal_config(binary, server_args)),
        };
        Ok(RemoteBackendConfig { pool, provision })
    }

    fn modal_config(&self, binary: PathBuf, server_args: Vec<String>) -> ModalConfig {
        let modal = &self.modal;
        ModalConfig {
            python: modal.modal_python.clone(),
            app_name: modal.modal_app.clone(),
            python_version: modal.modal_python_version.clone(),
            apt_packages: modal.modal_apt.clone(),
            port: modal.modal_port,
            server_backend: self.server_backend.unwrap_or(ServedBackend::Process).name().into(),
            server_args,
            sandbox_timeout: Duration::from_secs(modal.modal_lifetime),
            cpu: modal.modal_cpu,
            memory_mib: modal.modal_memory,
            image: modal.modal_image.clone(),
            ..ModalConfig::new(binary)
        }
    }

    /// Whether `--dry-run` was given.
    pub(crate) fn dry_run_requested(&self) -> bool {
        self.dry_run
    }

    /// Whether the servers are Modal sandboxes.
    pub(crate) fn provisions_modal(&self) -> bool {
        self.provision == ProvisionKind::Modal
    }

    /// `--modal-image`, when given.
    pub(crate) fn modal_image(&self) -> Option<&str> {
        self.modal.modal_image.as_deref()
    }

    /// [`RemoteArgs::resolve`] for sandboxes of one image (`None`: Modal's Debian image).
    pub(crate) fn resolve_for_image(
        &self,
        limits: &Limits,
        runtime: &RuntimeArgs,
        process: &ProcessArgs,
        image: Option<&str>,
    ) -> anyhow::Result<RemoteBackendConfig> {
        let mut config = self.resolve(limits, runtime, process)?;
        if let ProvisionConfig::Modal(modal) = &mut config.provision {
            modal.image = image.map(str::to_owned);
        }
        Ok(config)
    }

    /// The plan `--dry-run` prints: the pool, and what the provisioner would start.
    pub(crate) async fn plan(
        &self,
        limits: &Limits,
        runtime: &RuntimeArgs,
        process: &ProcessArgs,
    ) -> anyhow::Result<serde_json::Value> {
        let config = self.resolve(limits, runtime, process)?;
        let pool = &config.pool;
        let servers = match &config.provision {
            ProvisionConfig::Local(local) => json!({
                "command": [local.binary.display().to_string(), "serve", "--listen", "127.0.0.1:0", "--backend", local.server_backend],
                "more_args": local.server_args,
                "token": format!("a fresh random token per server, in ${}", env_vars::SERVER_TOKEN),
            }),
            ProvisionConfig::Listed(listed) => {
                json!({ "urls": listed.urls, "token_from": self.token_env, "token_set": listed.token.is_some() })
            }
            ProvisionConfig::Modal(modal) => ModalProvisioner::plan(modal)
                .await
                .context("failed to plan the Modal sandboxes")?,
        };
        Ok(json!({
            "provision": self.provision.to_possible_value().map(|v| v.get_name().to_string()),
            "slots_per_sandbox": pool.slots_per_server,
            "min_sandboxes": pool.min_servers,
            "max_sandboxes": pool.max_servers,
            "started_up_front": pool.min_servers,
            "servers": servers,
        }))
    }
}

/// `rollbox serve` flags that give a server the same limits as this process, and exactly the
/// slots the pool will place on it.
fn serve_args(limits: &Limits, slots_per_server: usize) -> anyhow::Result<Vec<String>> {
    Ok(vec![
        "--limits-json".to_string(),
        serde_json::to_string(limits).context("failed to write the limits for the servers")?,
        // Else the server's backend would keep /run_code's larger cap for these calls too.
        "--run-code-max-output".into(),
        limits.output_bytes.to_string(),
        "--max-slots".into(),
        slots_per_server.to_string(),
    ])
}

impl BackendArgs {
    /// With `--dry-run`, prints the remote plan as JSON on stdout and returns true: the
    /// command should end there.
    pub(crate) async fn dry_run(&self, limits: &Limits, runtime: &RuntimeArgs) -> anyhow::Result<bool> {
        if !self.remote.dry_run {
            return Ok(false);
        }
        anyhow::ensure!(
            self.backend == BackendChoice::Remote,
            "--dry-run applies to --backend remote"
        );
        println!(
            "{}",
            serde_json::to_string_pretty(&self.remote.plan(limits, runtime, &self.process).await?)?
        );
        Ok(true)
    }

    /// Refuses flags that the chosen backend would ignore, so nothing is silently dropped.
    pub(crate) fn check_flags_apply(&self, runtime: &RuntimeArgs) -> anyhow::Result<()> {
        let backend = self
            .backend
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default();
        let process = &self.process;
        match self.backend {
            BackendChoice::Wasm => anyhow::ensure!(!process.given(), "{PROCESS_FLAGS_ONLY}"),
            BackendChoice::Process => runtime.ensure_no_wasm_flags("process")?,
            BackendChoice::Remote => {
                anyhow::ensure!(
                    process.workspace_root.is_none() && process.shared_cache.is_none(),
                    "--workspace-root and --shared-cache apply to --backend process: each remote server keeps its own"
                );
                let local_process_servers = self.remote.provision == ProvisionKind::Local
                    && self.remote.server_backend == Some(ServedBackend::Process);
                anyhow::ensure!(
                    local_process_servers || !process.given(),
                    "--unsafe-no-isolation and --native-python reach remote servers only with --provision local --server-backend process"
                );
            }
        }
        anyhow::ensure!(
            self.backend == BackendChoice::Remote || self.remote.servers.is_empty(),
            "--servers applies to --backend remote --provision static, not to --backend {backend}"
        );
        Ok(())
    }

    /// Starts the chosen backend. Call [`Backend::shutdown`] before the command ends: a remote
    /// backend's servers live outside this process.
    pub(crate) async fn start(
        &self,
        limits: Limits,
        runtime: &RuntimeArgs,
        printer: Printer,
    ) -> anyhow::Result<Arc<dyn Backend>> {
        self.check_flags_apply(runtime)?;
        Ok(match self.backend {
            BackendChoice::Wasm => Arc::new(start_wasm_backend(limits, runtime, printer).await?),
            BackendChoice::Process => {
                let config = self.process.config(limits, ProcessBackendConfig::default().max_slots)?;
                Arc::new(start_process_backend(config).await?)
            }
            BackendChoice::Remote => {
                Arc::new(start_remote_backend(self.remote.resolve(&limits, runtime, &self.process)?).await?)
            }
        })
    }
}

/// Starts a remote backend, its warm servers included.
pub(crate) async fn start_remote_backend(config: RemoteBackendConfig) -> anyhow::Result<RemoteBackend> {
    RemoteBackend::start(config)
        .await
        .context("failed to start the remote backend")
}
