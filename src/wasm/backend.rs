//! [`WasmBackend`]: slots that are CPython interpreters in wasmtime instances.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::engine::build_engine;
use super::factory::{InterpreterFactory, RollbackError, SlotDirs, StartOptions};
use super::interpreter::{Interpreter, StartError, rolled_back};
use crate::error_text::error_chain;
use crate::reporter::Reporter;
use crate::seed::{DEFAULT_VIRTUAL_EPOCH_SECS, derive_fork_seed, derive_slot_seed};
use crate::slot::batch::{self, LiveSlots, every_result, group_by_slot, lock_interpreter};
use crate::slot::tools::{ToolCallError, ToolName, ToolRequest};
use crate::slot::workspace::Workspace;
use crate::slot::{Backend, BackendError, ErrorKind, ExecutionResult, Slot, SlotId, ToolCall};
use crate::slot::{LimitKind, Limits};
use crate::wasm::runtime::{RuntimeError, RuntimeOptions, compiled, install};

/// The tools a wasm slot runs: everything but `bash`.
pub const TOOLS: [ToolName; 6] = [
    ToolName::Python,
    ToolName::ReadFile,
    ToolName::WriteFile,
    ToolName::EditFile,
    ToolName::ListDir,
    ToolName::Search,
];

/// How a [`WasmBackend`] is set up.
#[derive(Clone, Debug)]
pub struct WasmBackendConfig {
    /// The limits every call runs under.
    pub limits: Limits,
    /// Where the runtime comes from and where it is cached.
    pub runtime: RuntimeOptions,
    /// The folder slot workspaces are made in; `None` makes a private temporary folder that
    /// is removed with the backend.
    pub workspace_root: Option<PathBuf>,
    /// The most slots alive at once.
    pub max_slots: usize,
    /// Modules every slot starts with already imported (dotted names: `numpy`, `sympy`),
    /// as if a first cell had imported them, without binding any name in the cell namespace.
    /// With snapshots they are imported once, into the snapshot, and cost a slot nothing.
    pub preload: Vec<String>,
    /// Add [`DEFAULT_PROFILE`] (the scientific stack) to the preload. With snapshots it costs a
    /// slot nothing: every slot maps the same snapshot pages. It is left out (with an `info`
    /// log) when snapshots are off, where every slot would import it, or when the memory limit
    /// is under [`DEFAULT_PROFILE_MIN_MEMORY`].
    pub default_profile: bool,
    /// Start slots from a memory snapshot of one idle, bootstrapped (and preloaded)
    /// interpreter, taken when the backend starts if there is a preload, else when a second
    /// interpreter starts; `false` bootstraps every interpreter itself, which is slower (and
    /// pays the preload imports in every slot). See `docs/snapshots.md`.
    pub snapshots: bool,
    /// Makes every slot reproducible: a slot acquired for trajectory `T` gets the slot seed
    /// [`derive_slot_seed`]`(seed, T, 0)`, and sees only that seed's entropy stream and a
    /// virtual clock (docs/reproducibility.md). `None`: fresh host entropy and real time.
    /// [`Backend::acquire_seeded`] gives one slot a seed of its own either way.
    pub seed: Option<u64>,
    /// Where a seeded slot's wall clock starts (default 2025-01-01T00:00:00Z).
    pub virtual_epoch: SystemTime,
    /// Keep each slot's memory from before its running cell, so that a cell that has to be
    /// stopped rolls the slot back instead of losing its state (docs/snapshots.md). Every cell
    /// pays for it (BENCHMARKS.md). Slots restored from a snapshot or forked only.
    pub rollback: bool,
    /// Make a slot restored from the snapshot own, at once, the snapshot pages that at least
    /// half of the first 32 slots wrote in their first 3 cells (docs/snapshots.md, item 6
    /// of "How it works"). On by default: each first write to a shared page is a fault, and one
    /// to a page already read also interrupts every other CPU to flush its TLB, which took 46%
    /// of a `--group-size 8` rollout's CPU on a 2-core VM.
    pub copy_hot_pages: bool,
}

impl WasmBackendConfig {
    /// Default limits, the runtime from the environment, a temporary workspace root, up to
    /// 10,000 slots, the default profile preloaded, snapshots on, and no seed (virtual clocks
    /// would start at 2025-01-01T00:00:00Z).
    pub fn from_env() -> Self {
        WasmBackendConfig {
            limits: Limits::default(),
            runtime: RuntimeOptions::from_env(),
            workspace_root: None,
            max_slots: 10_000,
            preload: Vec::new(),
            default_profile: true,
            snapshots: true,
            seed: None,
            virtual_epoch: UNIX_EPOCH + Duration::from_secs(DEFAULT_VIRTUAL_EPOCH_SECS),
            rollback: false,
            copy_hot_pages: true,
        }
    }

    /// The modules slots start with: [`DEFAULT_PROFILE`] when it applies, then
    /// [`WasmBackendConfig::preload`], each once.
    pub fn effective_preload(&self) -> Vec<String> {
        let profile = self.default_profile && self.snapshots && self.limits.memory_bytes >= DEFAULT_PROFILE_MIN_MEMORY;
        let mut modules: Vec<String> = Vec::new();
        let defaults = DEFAULT_PROFILE.iter().map(|m| m.to_string()).filter(|_| profile);
        for module in defaults.chain(self.preload.iter().cloned()) {
            if !modules.contains(&module) {
                modules.push(module);
            }
        }
        modules
    }
}

/// What every wasm slot starts with imported unless told otherwise: numpy, sympy with the
/// submodules its `solve` imports on first use, scipy with its most used submodules, and
/// pandas. Imported once into the snapshot (and kept on disk), so a slot pays nothing for
/// them; nothing is bound in the cell namespace, a cell still writes `import numpy`.
pub const DEFAULT_PROFILE: [&str; 12] = [
    "numpy",
    "sympy",
    "sympy.assumptions.wrapper",
    "sympy.combinatorics",
    "sympy.physics.units",
    "sympy.sets.setexpr",
    "scipy",
    "scipy.optimize",
    "scipy.integrate",
    "scipy.linalg",
    "scipy.special",
    "pandas",
];

/// The smallest memory limit the default profile is preloaded under: it takes about 95 MB of
/// each slot's linear memory (shared, but counted against the slot's limit).
pub const DEFAULT_PROFILE_MIN_MEMORY: u64 = 256 << 20;

/// Setting up a [`WasmBackend`] failed.
#[derive(Debug, thiserror::Error)]
pub enum WasmBackendError {
    /// The runtime could not be installed or compiled.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The engine or the linker could not be set up.
    #[error("failed to set up the wasm engine")]
    Engine(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The interpreter factory could not be built.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A preload entry is not a module name.
    #[error("`{0}` is not a module name to preload; give dotted Python names such as `numpy` or `sympy.core`")]
    InvalidPreload(String),
    /// The workspace root could not be made.
    #[error("failed to create the workspace root {path}")]
    WorkspaceRoot {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The default backend: each slot is a live CPython 3.15 interpreter in its own wasmtime
/// store, with a private workspace preopened at `/workspace` and a private `/tmp`.
///
/// Secure defaults: the guest sees no host environment variable, no network, and no host
/// folder but its workspace, its `/tmp` and the read-only standard library. Every call runs
/// under [`Limits`]; a trap or timeout replaces the slot's interpreter with a fresh one and
/// says so in the result.
pub struct WasmBackend {
    factory: Arc<InterpreterFactory>,
    slots: LiveSlots<LiveSlot>,
    next_id: AtomicU64,
    /// Slots alive or starting; never more than `max_slots`.
    reserved: AtomicUsize,
    root: PathBuf,
    owns_root: bool,
    max_slots: usize,
    /// The run seed every slot's seed is derived from, if any.
    seed: Option<u64>,
}

struct LiveSlot {
    slot: Slot,
    dirs: SlotDirs,
    /// The slot's seed: a restart after a crash starts from the same world again.
    seed: Option<u64>,
    /// Forks made of it so far: a seeded fork's seed is derived from its number.
    forks: AtomicU64,
    workspace: Workspace,
    /// `None` when a restart after a crash failed; the next call tries again.
    interpreter: Mutex<Option<Interpreter>>,
}

impl WasmBackend {
    /// Installs the runtime if needed, loads (or compiles once) its native code, makes the
    /// workspace root, and prepares the template interpreter slots start from (preloading
    /// [`WasmBackendConfig::preload`]). Blocks: the first run on a machine downloads and
    /// compiles, and preloading takes as long as the imports do.
    pub fn new(config: WasmBackendConfig, reporter: &dyn Reporter) -> Result<WasmBackend, WasmBackendError> {
        if let Some(bad) = config.preload.iter().find(|name| !is_module_name(name)) {
            return Err(WasmBackendError::InvalidPreload(bad.clone()));
        }
        let preload = config.effective_preload();
        if config.default_profile && !preload.iter().any(|m| m == DEFAULT_PROFILE[0]) {
            tracing::info!(
                snapshots = config.snapshots,
                memory_limit = config.limits.memory_bytes,
                "slots start without the default profile (numpy, sympy, scipy, pandas): it needs snapshots and a memory limit of at least 256 MiB"
            );
        }
        let runtime = install::ensure_installed(&config.runtime, reporter)?;
        let engine = build_engine(config.limits.fuel.is_some())
            .map_err(|e| WasmBackendError::Engine(e.into_boxed_dyn_error()))?;
        let compiled = compiled::load_or_compile(&engine, &runtime, &config.runtime, reporter)?;
        let (root, owns_root) = match config.workspace_root {
            Some(root) => (root, false),
            None => (private_temp_dir(), true),
        };
        let options = StartOptions {
            preload,
            snapshots: config.snapshots,
            template_dir: root.join("template"),
            guest_code_cache: Some(compiled::guest_code_path(&config.runtime)),
            snapshot_cache: Some(config.runtime.cache_dir.join("snapshots")),
            virtual_epoch: config.virtual_epoch,
            rollback: config.rollback,
            copy_hot_pages: config.copy_hot_pages,
        };
        let factory = InterpreterFactory::new(
            engine,
            &compiled.module,
            compiled.initial_memory,
            runtime,
            config.limits,
            options,
        )?;
        std::fs::create_dir_all(&root).map_err(|source| WasmBackendError::WorkspaceRoot {
            path: root.clone(),
            source,
        })?;
        if let Err(error) = prepare_template(&factory, reporter) {
            if owns_root {
                let _ = std::fs::remove_dir_all(&root);
            }
            return Err(error.into());
        }
        Ok(WasmBackend {
            factory: Arc::new(factory),
            slots: LiveSlots::new(),
            next_id: AtomicU64::new(1),
            reserved: AtomicUsize::new(0),
            root,
            owns_root,
            max_slots: config.max_slots,
            seed: config.seed,
        })
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &Limits {
        self.factory.limits()
    }

    /// How many slots are alive.
    pub fn live_slots(&self) -> usize {
        self.slots.read().len()
    }

    /// Whether new slots' interpreters are restored from a memory snapshot. False while
    /// snapshots are off, when the snapshot was refused (a warning says why), and, without a
    /// preload, until a second interpreter starts: the first one bootstraps.
    pub fn restores_from_snapshot(&self) -> bool {
        self.factory.restores_from_snapshot()
    }

    /// The wasmtime engine the slots run on.
    pub fn engine(&self) -> &wasmtime::Engine {
        self.factory.engine()
    }
}

impl WasmBackend {
    /// Makes a new slot's folders and runs `start` for its interpreter on a blocking thread,
    /// within the backend's capacity: what `acquire` and `fork` share.
    async fn start_slot(
        &self,
        trajectory_id: &str,
        seed: Option<u64>,
        start: impl FnOnce(&SlotDirs) -> Result<Interpreter, BoxedError> + Send + 'static,
        failed: impl FnOnce(BoxedError) -> BackendError,
    ) -> Result<Slot, BackendError> {
        // Reserved before the interpreter starts, so concurrent starts cannot overshoot.
        let reservation = SlotReservation::take(&self.reserved, self.max_slots)?;
        let id = SlotId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let slot_root = self.root.join(id.to_string());
        let dirs = SlotDirs {
            workspace: slot_root.join("workspace"),
            tmp: slot_root.join("tmp"),
        };
        let workspace = Workspace::create(&dirs.workspace, &dirs.tmp)?;
        let start_dirs = dirs.clone();
        let started = tokio::task::spawn_blocking(move || start(&start_dirs)).await;
        let interpreter = match started {
            Ok(Ok(interpreter)) => interpreter,
            Ok(Err(error)) => {
                let _ = std::fs::remove_dir_all(&slot_root);
                return Err(failed(error));
            }
            Err(join) => {
                let _ = std::fs::remove_dir_all(&slot_root);
                return Err(failed(Box::new(join)));
            }
        };
        let slot = Slot {
            id,
            trajectory_id: trajectory_id.to_string(),
            backend: "wasm".into(),
            workspace: dirs.workspace.clone(),
        };
        let live = Arc::new(LiveSlot {
            slot: slot.clone(),
            dirs,
            seed,
            forks: AtomicU64::new(0),
            workspace,
            interpreter: Mutex::new(Some(interpreter)),
        });
        self.slots.write().insert(id, live);
        reservation.keep();
        Ok(slot)
    }
}

type BoxedError = Box<dyn std::error::Error + Send + Sync>;

/// Copies the folder `from` into the existing folder `to`: folders, regular files and
/// symbolic links (as links, never followed). A guest can make nothing else; anything else
/// found is an error rather than a silent gap in the copy.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let target = to.join(entry.file_name());
        if kind.is_dir() {
            std::fs::create_dir(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &target)?;
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path())?, &target)?;
        } else {
            return Err(std::io::Error::other(format!(
                "{} is neither a file, a folder nor a link",
                entry.path().display()
            )));
        }
    }
    Ok(())
}

impl Drop for WasmBackend {
    fn drop(&mut self) {
        if self.owns_root {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// One place in a backend's capacity, given back on drop unless the slot it was for went live.
struct SlotReservation<'a> {
    reserved: &'a AtomicUsize,
    kept: bool,
}

impl<'a> SlotReservation<'a> {
    fn take(reserved: &'a AtomicUsize, capacity: usize) -> Result<Self, BackendError> {
        if reserved.fetch_add(1, Ordering::SeqCst) >= capacity {
            reserved.fetch_sub(1, Ordering::SeqCst);
            return Err(BackendError::Exhausted { capacity });
        }
        Ok(SlotReservation { reserved, kept: false })
    }

    /// The slot went live: its place stays taken until `release`.
    fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for SlotReservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.reserved.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Runs [`InterpreterFactory::prepare`], with progress when there are modules to preload.
fn prepare_template(factory: &InterpreterFactory, reporter: &dyn Reporter) -> Result<(), StartError> {
    let preloading = factory.preload_list();
    if let Some(modules) = preloading {
        reporter.on_step_start(&format!("preloading {modules} into the slot snapshot"), None);
    }
    // The template runs guest code, whose WASI calls block on a Tokio runtime of wasmtime-wasi's
    // own; that panics on a thread already inside a runtime, and `new` may be called from async
    // code. A scoped thread of its own has no runtime.
    let prepared = std::thread::scope(|scope| {
        scope
            .spawn(|| factory.prepare())
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    if preloading.is_some() {
        reporter.on_step_end();
    }
    prepared
}

/// A dotted Python module name: identifiers (ASCII here) joined by dots.
fn is_module_name(name: &str) -> bool {
    let identifier = |part: &str| {
        let mut chars = part.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    name.split('.').all(identifier)
}

fn private_temp_dir() -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::env::temp_dir().join(format!(
        "rollbox-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

#[async_trait::async_trait]
impl Backend for WasmBackend {
    fn name(&self) -> &str {
        "wasm"
    }

    fn slot_memory_bytes(&self) -> Option<u64> {
        Some(self.limits().memory_bytes)
    }

    fn tools(&self) -> Vec<ToolName> {
        TOOLS.to_vec()
    }

    async fn acquire(&self, trajectory_id: &str) -> Result<Slot, BackendError> {
        let factory = self.factory.clone();
        let seed = self.seed.map(|seed| derive_slot_seed(seed, trajectory_id, 0));
        let failed = |source| BackendError::StartInterpreter {
            trajectory_id: trajectory_id.into(),
            source,
        };
        let start = move |dirs: &SlotDirs| factory.start(dirs, seed).map_err(Into::into);
        self.start_slot(trajectory_id, seed, start, failed).await
    }

    async fn acquire_seeded(&self, trajectory_id: &str, seed: u64) -> Result<Slot, BackendError> {
        let factory = self.factory.clone();
        let failed = |source| BackendError::StartInterpreter {
            trajectory_id: trajectory_id.into(),
            source,
        };
        let start = move |dirs: &SlotDirs| factory.start(dirs, Some(seed)).map_err(Into::into);
        self.start_slot(trajectory_id, Some(seed), start, failed).await
    }

    async fn fork(&self, slot: &Slot, trajectory_id: &str) -> Result<Slot, BackendError> {
        let parent = self.slots.get(slot.id).ok_or(BackendError::UnknownSlot(slot.id))?;
        let factory = self.factory.clone();
        let failed = |source| BackendError::Fork {
            slot: slot.id,
            trajectory_id: trajectory_id.into(),
            source,
        };
        // A seeded parent's forks each get a stream of their own, derived from the parent's
        // seed and the fork's number (docs/reproducibility.md).
        let seed = parent
            .seed
            .map(|seed| derive_fork_seed(seed, parent.forks.fetch_add(1, Ordering::Relaxed)));
        let fork = move |dirs: &SlotDirs| -> Result<Interpreter, BoxedError> {
            // Held for the whole fork: the parent's memory and files are copied between two of
            // its calls, never during one.
            let mut guard = lock_interpreter(&parent.interpreter);
            let interpreter = guard
                .as_mut()
                .ok_or("the slot's interpreter is not running (its restart after a crash failed); run a cell first")?;
            for (from, to) in [(&parent.dirs.workspace, &dirs.workspace), (&parent.dirs.tmp, &dirs.tmp)] {
                copy_tree(from, to).map_err(|source| BackendError::Workspace {
                    path: from.clone(),
                    source,
                })?;
            }
            let world = seed.map(|seed| factory.seeded_world(seed));
            Ok(factory.fork(interpreter, dirs, world.as_ref())?)
        };
        self.start_slot(trajectory_id, seed, fork, failed).await
    }

    async fn execute_batch(&self, calls: Vec<(Slot, ToolCall)>) -> Vec<ExecutionResult> {
        let mut results: Vec<Option<ExecutionResult>> = (0..calls.len()).map(|_| None).collect();
        let runnable = group_by_slot(calls, &mut results, |id| self.slots.get(id));
        for (index, result) in run_groups(&self.factory, runnable).await {
            results[index] = Some(result);
        }
        every_result(results)
    }

    async fn release(&self, slot: &Slot, reset_workspace: bool) -> Result<(), BackendError> {
        let live = self
            .slots
            .write()
            .remove(&slot.id)
            .ok_or(BackendError::UnknownSlot(slot.id))?;
        self.reserved.fetch_sub(1, Ordering::SeqCst);
        let slot_root = live.dirs.workspace.parent().map(Path::to_path_buf);
        // Dropping a store unmaps its memory; keep that off the async threads.
        let _ = tokio::task::spawn_blocking(move || {
            drop(live);
            if let Some(root) = slot_root {
                if reset_workspace {
                    let _ = std::fs::remove_dir_all(&root);
                } else {
                    let _ = std::fs::remove_dir_all(root.join("tmp"));
                }
            }
        })
        .await;
        Ok(())
    }
}

/// One live slot's calls in a batch, each with its index in the batch.
type SlotCalls = batch::SlotCalls<LiveSlot>;

/// The most threads one batch runs on, per CPU. Guest work is CPU-bound, so more threads
/// than this only add switching; a few per CPU keep a sleeping cell from holding up the rest.
const BATCH_THREADS_PER_CPU: usize = 8;

/// Runs each slot's calls in order, different slots in parallel, and returns every result
/// with its index in the batch.
///
/// One slot's calls run inline on this worker thread (`block_in_place`): no hand-off to
/// another thread, which is most of a trivial cell's cost otherwise. Several slots are shared
/// out to a bounded set of blocking workers that each take the next slot's calls until none
/// are left, so a batch over hundreds of slots wakes a handful of threads, not hundreds.
async fn run_groups(factory: &Arc<InterpreterFactory>, groups: Vec<SlotCalls>) -> Vec<(usize, ExecutionResult)> {
    let inline = groups.len() == 1
        && tokio::runtime::Handle::current().runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread;
    if inline {
        return tokio::task::block_in_place(|| {
            groups
                .iter()
                .flat_map(|(live, calls)| run_group(factory, live, calls))
                .collect()
        });
    }
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let workers = groups.len().min(cpus * BATCH_THREADS_PER_CPU).max(1);
    let queue = Arc::new((AtomicUsize::new(0), groups));
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (factory, queue) = (factory.clone(), queue.clone());
        handles.push(tokio::task::spawn_blocking(move || {
            let (next, groups) = &*queue;
            let mut done = Vec::new();
            while let Some((live, calls)) = groups.get(next.fetch_add(1, Ordering::Relaxed)) {
                done.extend(run_group(&factory, live, calls));
            }
            done
        }));
    }
    let mut results = Vec::new();
    for handle in handles {
        match handle.await {
            Ok(done) => results.extend(done),
            // A panic loses that worker's finished results; the caller fills every missing
            // index with a failure, so nothing is silently dropped.
            Err(join) => tracing::error!(error = %join, "a batch worker panicked in the host"),
        }
    }
    results
}

fn run_group(
    factory: &InterpreterFactory,
    live: &LiveSlot,
    calls: &[(usize, ToolCall)],
) -> Vec<(usize, ExecutionResult)> {
    calls
        .iter()
        .map(|(index, call)| (*index, run_call(factory, live, call)))
        .collect()
}

/// Runs one call in its slot, on a blocking thread.
fn run_call(factory: &InterpreterFactory, live: &LiveSlot, call: &ToolCall) -> ExecutionResult {
    let started = Instant::now();
    let limits = factory.limits();
    let mut result = match ToolRequest::parse(&call.name, &call.arguments) {
        Err(error @ ToolCallError::UnknownTool(_)) => {
            ExecutionResult::failure(ErrorKind::UnknownTool, error.to_string(), Default::default())
        }
        Err(error) => ExecutionResult::failure(ErrorKind::InvalidArguments, error.to_string(), Default::default()),
        Ok(ToolRequest::Python(args)) => {
            let timeout = call.timeout.map_or(limits.timeout, |t| t.min(limits.timeout));
            run_python(factory, live, &args.code, timeout)
        }
        Ok(ToolRequest::Bash(_)) => ExecutionResult::failure(
            ErrorKind::ToolUnavailable,
            "`bash` is not available in the wasm backend, which has no shell; it runs on the `process` and `remote` \
             backends. Use the `python` tool here (subprocess is unavailable too).",
            Default::default(),
        ),
        Ok(request) => run_file_tool(live, &request, limits),
    };
    result.metadata.tool = call.name.clone();
    result.metadata.slot_id = Some(live.slot.id);
    result.metadata.duration_us = started.elapsed().as_micros() as u64;
    result
}

/// Runs a file tool on the slot's workspace. The host's own writes are not seen by the
/// slot's disk count (`disk.rs`), so after one it is measured again; a `write_file` whose
/// content alone does not fit in what is left is refused first.
fn run_file_tool(live: &LiveSlot, request: &ToolRequest, limits: &Limits) -> ExecutionResult {
    if !matches!(request, ToolRequest::WriteFile(_) | ToolRequest::EditFile(_)) {
        return live.workspace.run_file_tool(request, limits.output_bytes);
    }
    let mut guard = lock_interpreter(&live.interpreter);
    if let (ToolRequest::WriteFile(args), Some(interpreter)) = (request, guard.as_mut()) {
        let disk = &mut interpreter.store.data_mut().disk;
        disk.forget();
        if !disk.grow(args.content.len() as u64) {
            let limit = disk.take_refusal().unwrap_or(LimitKind::Disk);
            let mut result = ExecutionResult::failure(
                ErrorKind::LimitExceeded,
                format!(
                    "failed to write {}: {}",
                    args.path,
                    super::disk::refusal_message(limit, limits)
                ),
                Default::default(),
            );
            result.metadata.limit_hit = Some(limit);
            return result;
        }
    }
    let result = live.workspace.run_file_tool(request, limits.output_bytes);
    if let Some(interpreter) = guard.as_mut() {
        interpreter.store.data_mut().disk.forget();
    }
    result
}

fn run_python(
    factory: &InterpreterFactory,
    live: &LiveSlot,
    code: &str,
    timeout: std::time::Duration,
) -> ExecutionResult {
    let mut guard = lock_interpreter(&live.interpreter);
    if guard.is_none() {
        // An earlier restart failed; try again before giving up on this call.
        match factory.start(&live.dirs, live.seed) {
            Ok(fresh) => *guard = Some(fresh),
            Err(error) => {
                let mut result = ExecutionResult::failure(
                    ErrorKind::GuestCrashed,
                    format!(
                        "the slot has no interpreter and a restart failed: {}",
                        error_chain(&error)
                    ),
                    Default::default(),
                );
                result.metadata.state_lost = true;
                return result;
            }
        }
    }
    let Some(interpreter) = guard.as_mut() else {
        unreachable!("an interpreter was just put in place")
    };
    interpreter.store.data_mut().disk.take_refusal();
    let mut result = interpreter.run_cell(code, factory.limits(), timeout);
    if let Some(limit) = interpreter.store.data_mut().disk.take_refusal() {
        let message = super::disk::refusal_message(limit, factory.limits());
        crate::slot::limits::report_limit(&mut result, limit, message);
    }
    if result.metadata.state_lost {
        // A trapped instance may be corrupt: never reuse it. Roll back to the state before the
        // cell when the slot kept it, else start afresh.
        let Some(mut failed) = guard.take() else {
            unreachable!("the interpreter just ran the cell")
        };
        match factory.roll_back(&mut failed, &live.dirs, live.seed) {
            Ok(rolled) => {
                *guard = Some(rolled);
                rolled_back(&mut result);
                return result;
            }
            Err(RollbackError::NotWatched) => {}
            Err(error) => {
                let error = error_chain(&error);
                tracing::warn!(slot = %live.slot.id, %error, "failed to roll a slot back");
                result.output.push_str(&format!("\n[rollbox: {error}]"));
            }
        }
        drop(failed);
        match factory.start(&live.dirs, live.seed) {
            Ok(fresh) => *guard = Some(fresh),
            Err(error) => {
                let error = error_chain(&error);
                tracing::warn!(slot = %live.slot.id, %error, "failed to restart an interpreter");
                result.output.push_str(&format!(
                    "\n[rollbox: the restart failed ({error}); the next call will try again]"
                ));
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_entries_must_be_dotted_module_names() {
        for good in ["numpy", "sympy.physics.units", "_private", "mod2"] {
            assert!(is_module_name(good), "{good}");
        }
        for bad in ["", "2fast", "a..b", "trailing.", "os; import socket", "numpy ", "é"] {
            assert!(!is_module_name(bad), "{bad:?}");
        }
    }

    /// Over the real runtime: a restored interpreter whose stack probe does not match the
    /// template's is not used; the slot bootstraps and later slots do too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stack_probe_that_moved_turns_snapshots_off_and_slots_still_start() {
        let config = WasmBackendConfig {
            preload: vec!["json".into()],
            ..WasmBackendConfig::from_env()
        };
        let mut backend = WasmBackend::new(config, &crate::SilentReporter).expect("the backend starts");
        assert!(backend.restores_from_snapshot());
        Arc::get_mut(&mut backend.factory)
            .expect("no slot shares the factory yet")
            .shift_stack_probe(16);
        let slot = backend
            .acquire("moved-probe")
            .await
            .expect("the slot bootstraps instead");
        assert!(
            !backend.restores_from_snapshot(),
            "snapshots are off after a failed probe"
        );
        let seen = backend
            .execute(&slot, ToolCall::python("'json' in __import__('sys').modules"))
            .await;
        assert_eq!(
            seen.output, "True",
            "the bootstrapped slot still has the preload: {seen:?}"
        );
        backend.release(&slot, true).await.expect("release");
    }
}
