//! The `process` backend: `bash`, the file tools and a persistent native Python in a per-slot
//! workspace on a real Linux host, each program inside bubblewrap. This is what runs inside a
//! remote sandbox (`rollbox serve --backend process`), and what SWE tasks need: the repository's
//! real Python with its C extensions, `git`, `pytest` and subprocesses.

mod capture;
mod cgroup;
mod disk;
mod python;
mod sandbox;
mod shell;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cgroup::BackendCgroup;
pub use cgroup::CgroupUnavailable;
use python::NativeInterpreter;
pub use python::NativeStartError;
use sandbox::{ChildLimits, Sandbox, SlotDirs};
pub use sandbox::{Isolation, SANDBOX_PATH, find_bubblewrap};

use crate::slot::Limits;
use crate::slot::batch::{LiveSlots, every_result, group_by_slot, lock_interpreter};
use crate::slot::tools::{ToolCallError, ToolName, ToolRequest};
use crate::slot::workspace::Workspace;
use crate::slot::{Backend, BackendError, ErrorKind, ExecutionResult, LimitKind, Slot, SlotId, ToolCall};

/// The tools a `process` slot runs: all of them.
pub const TOOLS: [ToolName; 7] = ToolName::ALL;

/// The interpreter `python` cells run in unless configured otherwise.
pub const DEFAULT_PYTHON: &str = "/usr/bin/python3";

/// The name of the folder, under the workspace root, that is shared by every slot unless
/// [`ProcessBackendConfig::shared_cache`] says otherwise.
const DEFAULT_SHARED_CACHE_DIR: &str = "shared-cache";

/// How long the start-up check of bubblewrap may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// How a [`ProcessBackend`] is set up.
#[derive(Clone, Debug)]
pub struct ProcessBackendConfig {
    /// The limits every call runs under; `fuel` must be `None` (it is a wasm-only limit).
    pub limits: Limits,
    /// The folder slot workspaces are made in; `None` makes a private temporary folder that is
    /// removed with the backend.
    pub workspace_root: Option<PathBuf>,
    /// A folder every slot can write, at the same path in each (the SWE hooks keep their
    /// bare-repository cache there); its path is in each slot's `ROLLBOX_SHARED_CACHE`. `None`
    /// uses `shared-cache/` under the workspace root.
    pub shared_cache: Option<PathBuf>,
    /// The Python that runs `python` cells, inside the sandbox.
    pub python: PathBuf,
    /// The `bwrap` to confine programs with; `None` looks for one on `PATH`.
    pub bubblewrap: Option<PathBuf>,
    /// Run programs directly on the host when bubblewrap is missing, instead of refusing to
    /// start. Slots can then read and write whatever the backend's user can, and reach the
    /// network.
    pub unsafe_no_isolation: bool,
    /// The most slots alive at once.
    pub max_slots: usize,
}

impl Default for ProcessBackendConfig {
    /// Default limits, a temporary workspace root, [`DEFAULT_PYTHON`], isolation required, and
    /// up to 1,000 slots.
    fn default() -> Self {
        ProcessBackendConfig {
            limits: Limits::default(),
            workspace_root: None,
            shared_cache: None,
            python: PathBuf::from(DEFAULT_PYTHON),
            bubblewrap: None,
            unsafe_no_isolation: false,
            max_slots: 1_000,
        }
    }
}

/// Setting up a [`ProcessBackend`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessBackendError {
    /// The limits ask for fuel, which only the wasm backend can meter.
    #[error(
        "the process backend cannot meter fuel (an instruction budget of wasm code); remove the fuel limit, or use the wasm backend"
    )]
    FuelUnsupported,
    /// Bubblewrap is not installed (or not at the configured path) and isolation was not waived.
    #[error(
        "failed to find bubblewrap (`bwrap`), and the process backend will not run commands unconfined; \
         install bubblewrap (scripts/setup-host.sh, or the `bubblewrap` package), or pass --unsafe-no-isolation \
         to run them directly on this host"
    )]
    NoIsolation,
    /// Bubblewrap is installed but cannot make a sandbox here (no user namespaces, say).
    #[error(
        "failed to start a bubblewrap sandbox with {bwrap}: {output}; fix bubblewrap on this host, or pass \
         --unsafe-no-isolation if the host itself is a disposable sandbox"
    )]
    BubblewrapFailed {
        /// The `bwrap` that was tried.
        bwrap: PathBuf,
        /// What the test command printed.
        output: String,
    },
    /// The configured Python is not an executable file.
    #[error("the Python for `python` cells, {0}, is not an executable file; install it or configure another")]
    PythonMissing(PathBuf),
    /// A folder could not be made.
    #[error("failed to create the folder {path}")]
    Folder {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The thread that starts programs could not be started.
    #[error("failed to start the process backend's spawner thread")]
    Spawner(#[source] std::io::Error),
}

/// A backend whose slots are folders on this host, with programs run in bubblewrap.
///
/// Secure defaults: every program sees a fixed `PATH`, `HOME`/`TMPDIR` in the slot's private
/// `/tmp`, `LANG=C.UTF-8`, and `ROLLBOX_SHARED_CACHE`, and nothing else from the host's
/// environment; inside bubblewrap it has no network, a read-only view of the host, and can
/// write only its slot's folders and the shared cache. Every call runs under [`Limits`]
/// (memory as an address-space limit, time by killing the whole process group).
///
/// A slot's Python interpreter starts with its first `python` call, so slots that only run
/// `bash` never pay for one; after a timeout or crash the next call starts a fresh one.
pub struct ProcessBackend {
    shared: Arc<Shared>,
    slots: LiveSlots<LiveSlot>,
    next_id: AtomicU64,
    root: PathBuf,
    owns_root: bool,
    max_slots: usize,
}

/// What every call of a backend needs.
struct Shared {
    sandbox: Sandbox,
    limits: Limits,
    python: PathBuf,
    shared_cache: PathBuf,
    /// The parent of every slot's cgroup; `None` when this host cannot cap processes (see
    /// [`ProcessBackend::process_cap`]).
    cgroups: Option<Arc<BackendCgroup>>,
    /// Why slots run without a process cap, when they do.
    uncapped_because: Option<String>,
}

/// Warns that a process slot has no disk cap, and why.
fn warn_no_disk_cap(slot: Option<SlotId>, error: &std::io::Error) {
    tracing::warn!(
        slot = slot.map(|s| s.to_string()).unwrap_or_default(),
        %error,
        "failed to mount a process slot's own tmpfs: it has NO disk cap (--max-disk-bytes, --max-disk-files), and can fill this host's disk (only each file is capped, by --max-file-bytes). Run rollbox as root to cap it"
    );
}

struct LiveSlot {
    slot: Slot,
    dirs: SlotDirs,
    workspace: Workspace,
    /// `None` until the first `python` call, and again after the interpreter was lost.
    interpreter: Mutex<Option<NativeInterpreter>>,
    /// The slot's seed: its Python starts (and restarts) with it.
    seed: Option<u64>,
}

impl ProcessBackend {
    /// Checks the configuration, makes the workspace root and the shared cache, and, with
    /// isolation, starts one sandbox to make sure bubblewrap works on this host. Blocks.
    pub fn new(config: ProcessBackendConfig) -> Result<ProcessBackend, ProcessBackendError> {
        if config.limits.fuel.is_some() {
            return Err(ProcessBackendError::FuelUnsupported);
        }
        let bubblewrap = match &config.bubblewrap {
            Some(path) => sandbox::is_executable(path).then(|| path.clone()),
            None => find_bubblewrap(),
        };
        let isolation = match (bubblewrap, config.unsafe_no_isolation) {
            (_, true) => Isolation::None,
            (Some(bwrap), false) => Isolation::Bubblewrap(bwrap),
            (None, false) => return Err(ProcessBackendError::NoIsolation),
        };
        if !sandbox::is_executable(&config.python) {
            return Err(ProcessBackendError::PythonMissing(config.python));
        }
        let (root, owns_root) = match config.workspace_root {
            Some(root) => (root, false),
            None => (private_root(), true),
        };
        let shared_cache = config
            .shared_cache
            .unwrap_or_else(|| root.join(DEFAULT_SHARED_CACHE_DIR));
        for dir in [&root, &shared_cache] {
            std::fs::create_dir_all(dir).map_err(|source| ProcessBackendError::Folder {
                path: dir.clone(),
                source,
            })?;
        }
        let sandbox = Sandbox::new(
            isolation,
            ChildLimits {
                memory_bytes: config.limits.memory_bytes,
                open_files: config.limits.open_files,
                file_bytes: config.limits.file_bytes,
            },
            root.clone(),
            shared_cache.clone(),
        )
        .map_err(ProcessBackendError::Spawner)?;
        let orphans = disk::unmount_orphans();
        if orphans > 0 {
            tracing::info!(
                orphans,
                "unmounted slot folders that killed rollbox processes left mounted"
            );
        }
        let (cgroups, uncapped_because) = match BackendCgroup::create(config.limits.processes) {
            Ok(cgroups) => (Some(cgroups), None),
            Err(error) => {
                let why = crate::error_text::error_chain(&error);
                tracing::warn!(
                    reason = %why,
                    "process slots will run WITHOUT a process cap (--max-processes): a fork bomb can fill this host's process table, and a detached one runs until release. Run rollbox as root on a host with a `pids` cgroup controller to cap them"
                );
                (None, Some(why))
            }
        };
        let shared = Arc::new(Shared {
            sandbox,
            limits: config.limits,
            python: config.python,
            shared_cache,
            cgroups,
            uncapped_because,
        });
        let backend = ProcessBackend {
            shared,
            slots: LiveSlots::new(),
            next_id: AtomicU64::new(1),
            root,
            owns_root,
            max_slots: config.max_slots,
        };
        backend.probe_sandbox()?;
        Ok(backend)
    }

    /// Runs `true` in a throwaway slot, so a host where bubblewrap cannot work fails here, with
    /// bubblewrap's own words, rather than on every call.
    fn probe_sandbox(&self) -> Result<(), ProcessBackendError> {
        let Isolation::Bubblewrap(bwrap) = self.shared.sandbox.isolation() else {
            return Ok(());
        };
        let dirs = SlotDirs::under(self.root.join("probe"));
        for dir in [&dirs.workspace, &dirs.tmp] {
            std::fs::create_dir_all(dir).map_err(|source| ProcessBackendError::Folder {
                path: dir.clone(),
                source,
            })?;
        }
        let result = shell::run_bash(&self.shared.sandbox, &dirs, "true", PROBE_TIMEOUT, &self.shared.limits);
        let _ = std::fs::remove_dir_all(&dirs.root);
        match result.success {
            true => Ok(()),
            false => Err(ProcessBackendError::BubblewrapFailed {
                bwrap: bwrap.clone(),
                output: result.output,
            }),
        }
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// Whether and how programs are confined.
    pub fn isolation(&self) -> &Isolation {
        self.shared.sandbox.isolation()
    }

    /// The most processes and threads each slot may run at once, or why there is no cap on this
    /// host (no `pids` cgroup controller, or no permission to make a cgroup).
    pub fn process_cap(&self) -> Result<u32, &str> {
        match (&self.shared.cgroups, &self.shared.uncapped_because) {
            (Some(cgroups), _) => Ok(cgroups.max_processes()),
            (None, why) => Err(why.as_deref().unwrap_or("unknown")),
        }
    }

    /// How many processes and threads `slot` runs now, by its cgroup (`pids.current`); `None`
    /// for an unknown slot or one without a cgroup.
    pub fn slot_processes(&self, slot: &Slot) -> Option<u64> {
        let live = self.slots.get(slot.id)?;
        live.dirs.cgroup.as_ref().map(|cgroup| cgroup.current())
    }

    /// The cgroup folder of `slot`, for tests that count its processes from outside.
    pub fn slot_cgroup_dir(&self, slot: &Slot) -> Option<PathBuf> {
        let live = self.slots.get(slot.id)?;
        live.dirs.cgroup.as_ref().map(|cgroup| cgroup.dir().to_path_buf())
    }

    /// The folder every slot can write (see [`ProcessBackendConfig::shared_cache`]).
    pub fn shared_cache(&self) -> &Path {
        &self.shared.shared_cache
    }

    /// The most slots alive at once.
    pub fn max_slots(&self) -> usize {
        self.max_slots
    }

    /// How many slots are alive.
    pub fn live_slots(&self) -> usize {
        self.slots.read().len()
    }
}

impl Drop for ProcessBackend {
    fn drop(&mut self) {
        // Interpreters die with their slots; then their folders can go.
        self.slots.write().clear();
        if self.owns_root {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// A fresh folder for a backend that was given no workspace root.
fn private_root() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = format!(
        "rollbox-process-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    std::env::temp_dir().join(name)
}

#[async_trait::async_trait]
impl Backend for ProcessBackend {
    fn name(&self) -> &str {
        "process"
    }

    /// Each program's address-space limit; a slot runs one interpreter at a time, plus its
    /// commands while they run.
    fn slot_memory_bytes(&self) -> Option<u64> {
        Some(self.limits().memory_bytes)
    }

    fn tools(&self) -> Vec<ToolName> {
        TOOLS.to_vec()
    }

    async fn acquire(&self, trajectory_id: &str) -> Result<Slot, BackendError> {
        self.add_slot(trajectory_id, None)
    }

    /// Best effort: the slot's Python gets `PYTHONHASHSEED` and a seeded `random`, but reads
    /// host time and entropy like any native process (docs/reproducibility.md).
    async fn acquire_seeded(&self, trajectory_id: &str, seed: u64) -> Result<Slot, BackendError> {
        self.add_slot(trajectory_id, Some(seed))
    }
    async fn execute_batch(&self, calls: Vec<(Slot, ToolCall)>) -> Vec<ExecutionResult> {
        let mut results: Vec<Option<ExecutionResult>> = (0..calls.len()).map(|_| None).collect();
        // Each slot's calls run in order on one blocking thread; slots run in parallel.
        let groups = group_by_slot(calls, &mut results, |id| self.slots.get(id));
        let tasks: Vec<_> = groups
            .into_iter()
            .map(|(live, calls)| {
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || {
                    calls
                        .into_iter()
                        .map(|(index, call)| (index, run_call(&shared, &live, &call)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for task in tasks {
            match task.await {
                Ok(done) => done
                    .into_iter()
                    .for_each(|(index, result)| results[index] = Some(result)),
                // A panic loses that slot's results; every_result fills each missing one in.
                Err(join) => tracing::error!(error = %join, "a process-backend worker panicked in the host"),
            }
        }
        every_result(results)
    }

    async fn release(&self, slot: &Slot, reset_workspace: bool) -> Result<(), BackendError> {
        let live = self
            .slots
            .write()
            .remove(&slot.id)
            .ok_or(BackendError::UnknownSlot(slot.id))?;
        // Killing the interpreter and deleting folders block; keep them off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            drop(lock_interpreter(&live.interpreter).take());
            // Whatever the slot left running (a detached server, a fork bomb) dies here.
            if let Some(cgroup) = &live.dirs.cgroup {
                cgroup.kill_all();
            }
            match (&live.dirs.disk, reset_workspace) {
                (Some(disk), true) => disk.unmount(),
                // The workspace leaves the slot's tmpfs for the host's disk; its /tmp goes.
                (Some(disk), false) => {
                    if let Err(error) = disk.keep_workspace(&live.dirs.workspace) {
                        tracing::warn!(slot = %live.slot.id, %error, "failed to keep a released slot's workspace");
                    }
                    return;
                }
                (None, _) => {}
            }
            let doomed = if reset_workspace {
                &live.dirs.root
            } else {
                &live.dirs.tmp
            };
            let _ = std::fs::remove_dir_all(doomed);
        })
        .await;
        Ok(())
    }
}

impl ProcessBackend {
    /// The new slot's cgroup, or `None` with a warning: slots without one run uncapped.
    fn slot_cgroup(&self, id: SlotId) -> Option<Arc<cgroup::SlotCgroup>> {
        let Some(cgroups) = &self.shared.cgroups else {
            tracing::warn!(slot = %id, reason = self.shared.uncapped_because.as_deref().unwrap_or(""), "this process slot has NO process cap (--max-processes)");
            return None;
        };
        match cgroups.slot(&id.to_string()) {
            Ok(cgroup) => Some(Arc::new(cgroup)),
            Err(error) => {
                let error = crate::error_text::error_chain(&error);
                tracing::warn!(slot = %id, %error, "failed to make this process slot's cgroup; it has NO process cap (--max-processes)");
                None
            }
        }
    }

    /// Adds a slot for `trajectory_id`; its Python starts with `seed` at its first call.
    fn add_slot(&self, trajectory_id: &str, seed: Option<u64>) -> Result<Slot, BackendError> {
        let id = SlotId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut dirs = SlotDirs::under(self.root.join(id.to_string()));
        dirs.cgroup = self.slot_cgroup(id);
        dirs.disk = match disk::SlotDisk::mount(&dirs.root, &self.shared.limits) {
            Ok(disk) => Some(Arc::new(disk)),
            Err(error) => {
                warn_no_disk_cap(Some(id), &error);
                None
            }
        };
        let workspace = Workspace::create(&dirs.workspace, &dirs.tmp)?;
        let slot = Slot {
            id,
            trajectory_id: trajectory_id.to_string(),
            backend: "process".into(),
            workspace: dirs.workspace.clone(),
        };
        let live = Arc::new(LiveSlot {
            slot: slot.clone(),
            dirs,
            workspace,
            interpreter: Mutex::new(None),
            seed,
        });
        let mut slots = self.slots.write();
        if slots.len() >= self.max_slots {
            drop(slots);
            let root = live.dirs.root.clone();
            drop(live);
            let _ = std::fs::remove_dir_all(&root);
            return Err(BackendError::Exhausted {
                capacity: self.max_slots,
            });
        }
        slots.insert(id, live);
        Ok(slot)
    }
}

/// Runs one call in its slot, on a blocking thread.
fn run_call(shared: &Shared, live: &LiveSlot, call: &ToolCall) -> ExecutionResult {
    let started = Instant::now();
    let limits = &shared.limits;
    let timeout = call.timeout.map_or(limits.timeout, |t| t.min(limits.timeout));
    let refused_before = live.dirs.cgroup.as_ref().map(|c| c.forks_refused());
    let mut result = match ToolRequest::parse(&call.name, &call.arguments) {
        Err(error @ ToolCallError::UnknownTool(_)) => {
            ExecutionResult::failure(ErrorKind::UnknownTool, error.to_string(), Default::default())
        }
        Err(error) => ExecutionResult::failure(ErrorKind::InvalidArguments, error.to_string(), Default::default()),
        Ok(ToolRequest::Python(args)) => run_python(shared, live, &args.code, timeout),
        Ok(ToolRequest::Bash(args)) => match bash_timeout(args.timeout, timeout) {
            Ok(timeout) => shell::run_bash(&shared.sandbox, &live.dirs, &args.command, timeout, limits),
            Err(message) => ExecutionResult::failure(ErrorKind::InvalidArguments, message, Default::default()),
        },
        Ok(mut request) => {
            relative_to_workspace(&mut request, &live.dirs.workspace);
            live.workspace.run_file_tool(&request, limits.output_bytes)
        }
    };
    // Only a call that can write is said to have filled the slot; reading a full slot is fine.
    let may_write = ![ToolName::ReadFile, ToolName::ListDir, ToolName::Search]
        .iter()
        .any(|tool| tool.as_str() == call.name);
    if may_write
        && let Some(disk) = &live.dirs.disk
        && let Some(limit) = disk.full()
    {
        crate::slot::limits::report_limit(&mut result, limit, disk::full_message(limit, limits));
    }
    if let (Some(cgroup), Some(before)) = (&live.dirs.cgroup, refused_before)
        && cgroup.forks_refused() > before
    {
        crate::slot::limits::report_limit(
            &mut result,
            LimitKind::Processes,
            format!(
                "the slot reached its limit of {} processes and threads (--max-processes), so some forks failed",
                cgroup.max_processes()
            ),
        );
    }
    result.metadata.tool = call.name.clone();
    result.metadata.slot_id = Some(live.slot.id);
    result.metadata.duration_us = started.elapsed().as_micros() as u64;
    result
}

/// Commands and the interpreter see the workspace at its real path (`pwd`, tracebacks), so a
/// model will name files by it: such a path becomes relative before the file tool confines it.
fn relative_to_workspace(request: &mut ToolRequest, workspace: &Path) {
    let path = match request {
        ToolRequest::ReadFile(args) => &mut args.path,
        ToolRequest::WriteFile(args) => &mut args.path,
        ToolRequest::EditFile(args) => &mut args.path,
        ToolRequest::ListDir(args) => &mut args.path,
        ToolRequest::Search(args) => &mut args.path,
        ToolRequest::Python(_) | ToolRequest::Bash(_) => return,
    };
    if let Ok(inside) = Path::new(path.as_str()).strip_prefix(workspace) {
        let relative = inside.to_string_lossy();
        *path = if relative.is_empty() {
            ".".to_string()
        } else {
            relative.into_owned()
        };
    }
}

/// The `bash` tool's own `timeout` argument, when it is shorter than the call's limit.
fn bash_timeout(requested: Option<f64>, limit: Duration) -> Result<Duration, String> {
    let Some(seconds) = requested else { return Ok(limit) };
    match Duration::try_from_secs_f64(seconds) {
        Ok(asked) => Ok(asked.min(limit)),
        Err(_) => Err(format!(
            "invalid arguments for `bash`: `timeout` must be a number of seconds of at least 0, not {seconds}"
        )),
    }
}

fn run_python(shared: &Shared, live: &LiveSlot, code: &str, timeout: Duration) -> ExecutionResult {
    let mut guard = lock_interpreter(&live.interpreter);
    if guard.is_none() {
        match NativeInterpreter::start(&shared.sandbox, &live.dirs, &shared.python, &shared.limits, live.seed) {
            Ok(fresh) => *guard = Some(fresh),
            Err(error) => {
                let message = crate::error_text::error_chain(&error);
                return ExecutionResult::failure(
                    ErrorKind::Backend,
                    format!("failed to start the slot's Python: {message}"),
                    Default::default(),
                );
            }
        }
    }
    let Some(interpreter) = guard.as_mut() else {
        unreachable!("an interpreter was just put in place")
    };
    let result = interpreter.run_cell(code, &shared.limits, timeout);
    if result.metadata.state_lost {
        *guard = None;
    }
    result
}
