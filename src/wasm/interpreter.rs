//! One live CPython interpreter in a wasmtime instance ([`Interpreter`]): running a cell, and
//! turning what happened (a report, a trap, a limit) into an [`ExecutionResult`].

use std::path::PathBuf;
use std::time::{Duration, Instant};

use wasmtime::{Memory, Store, Trap, TypedFunc};

use super::capture::{CapturedStream, take_streams};
use super::engine::ticks_for;
use super::host::{GuestState, InterruptPhase};
use super::poll::DeadlineExceeded;
use super::rollback::Checkpoint;
use crate::slot::cell::{
    GuestReport, RESTART_ERROR, STARTUP_TIMEOUT, Streams, did_not_stop, finished_cell, interrupt_grace,
    kept_after_interrupt, render_for_model,
};
use crate::slot::outputs::{Output, StreamLog, StreamName};
use crate::slot::{CellError, CellOutput, ErrorKind, ExecutionMetadata, ExecutionResult, LimitKind, Limits};

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

/// Restoring a snapshot into a new instance failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The instance's memory could not grow to the snapshot's size (the memory limit).
    #[error("failed to grow the new interpreter's memory to the snapshot's size")]
    Grow(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The instance starts with more memory than the snapshot holds: not the same module.
    #[error("the new interpreter has {current} bytes of memory, more than the snapshot's {snapshot}")]
    Larger {
        /// The instance's memory size.
        current: usize,
        /// The snapshot's.
        snapshot: usize,
    },
    /// The image could not be mapped into the instance's memory.
    #[error("failed to map the memory image into the new interpreter")]
    Map(#[source] std::io::Error),
    /// The stack probe moved: the restored stack pointer is not the template's.
    #[error("the restored interpreter's stack probe is at {restored:#x}, the template's at {template:#x}")]
    StackMoved {
        /// The template's probe address.
        template: u32,
        /// The restored instance's.
        restored: u32,
    },
}

/// A live interpreter. Dropping it frees everything it held.
pub(crate) struct Interpreter {
    /// The image its memory is a copy-on-write mapping of.
    pub(crate) image: std::sync::Arc<super::cow::MemoryImage>,
    pub(crate) store: Store<GuestState>,
    pub(crate) memory: Memory,
    pub(crate) host_alloc: TypedFunc<i32, i32>,
    pub(crate) turn: TypedFunc<(i32, i32), i32>,
    pub(crate) stdout: CapturedStream,
    pub(crate) stderr: CapturedStream,
    /// The slot's memory as it was before its running cell, when rollback is on.
    pub(crate) checkpoint: Option<Checkpoint>,
    /// Cells run so far (setup cells included).
    pub(crate) cells_run: u32,
    /// Whether this slot tells its image which pages it writes ([`super::cow::WriteHistory`]):
    /// only a slot restored without the hot pages copied. A fork or a rollback would report
    /// its parent's pages, a slot with the copies the copies.
    pub(crate) teaches_image: bool,
}

impl Drop for Interpreter {
    /// A slot that ends before its [`super::cow::LEARNED_CELLS`]th cell teaches the image what
    /// it wrote in all.
    fn drop(&mut self) {
        if self.cells_run < super::cow::LEARNED_CELLS {
            self.teach_image();
        }
    }
}

impl Interpreter {
    /// Runs `code` as one cell under `limits` (with `timeout` as its time limit). The result's
    /// `metadata.state_lost` says the interpreter must be replaced before the next call.
    pub(crate) fn run_cell(&mut self, code: &str, limits: &Limits, timeout: Duration) -> ExecutionResult {
        // The guest's turn handler runs the turn's source as the cell; an empty cell is sent
        // as a newline because a turn needs at least one byte.
        let chunk = if code.is_empty() { "\n" } else { code };
        self.update_checkpoint();
        let state = self.store.data_mut();
        state.limiter.refused = false;
        state.door_inbox = None;
        state.deadline = Some(Instant::now() + timeout);
        state.interrupt.phase = InterruptPhase::Armed;
        state.interrupt.grace = interrupt_grace(timeout);
        self.store.set_epoch_deadline(ticks_for(timeout));
        if let Some(fuel) = limits.fuel
            && let Err(error) = self.store.set_fuel(fuel)
        {
            return crashed(format!("failed to set the fuel limit: {error}"), None);
        }
        let outcome = self.turn_raw(chunk);
        let interrupted =
            std::mem::replace(&mut self.store.data_mut().interrupt.phase, InterruptPhase::Off) == InterruptPhase::Sent;
        let streams = take_streams(&self.stdout, &self.stderr, limits.output_bytes);
        let memory_refused = self.store.data().limiter.refused;
        let report = self.store.data_mut().door_inbox.take();
        let cell = CellOutput {
            stdout: streams.text(StreamName::Stdout),
            stderr: streams.text(StreamName::Stderr),
            outputs: streams.ordered(Vec::new(), None),
            ..Default::default()
        };
        let host_truncated = streams.dropped.iter().sum::<usize>() > 0;
        let mut result = match outcome {
            Ok(_) => match report.as_deref().map(serde_json::from_slice::<GuestReport>) {
                Some(Ok(report)) if interrupted => kept_after_interrupt(
                    cell_result(streams, report, host_truncated, memory_refused, limits),
                    timeout,
                ),
                Some(Ok(report)) => cell_result(streams, report, host_truncated, memory_refused, limits),
                Some(Err(error)) => crashed(format!("the guest sent an unreadable report ({error})"), Some(cell)),
                // Out of memory even for its report: the memory limit, not a mystery.
                None if memory_refused => stopped(cell, Some(LimitKind::Memory), String::new(), limits, timeout, false),
                None => crashed("the guest ended the cell without a report".into(), Some(cell)),
            },
            Err(error) => stopped(
                cell,
                trap_limit(&error, memory_refused),
                format!("the interpreter crashed: {}", trap_reason(&error)),
                limits,
                timeout,
                interrupted,
            ),
        };
        result.metadata.interrupted = interrupted;
        self.cells_run += 1;
        if self.cells_run == super::cow::LEARNED_CELLS {
            self.teach_image();
        }
        result
    }

    /// Tells the image which of its pages this slot has written so far, while the image still
    /// learns them ([`super::cow::WriteHistory`]).
    fn teach_image(&self) {
        if self.teaches_image
            && self.image.learns_writes()
            && let Ok(written) = super::cow::written_pages(self.memory_bytes(), self.image.size())
        {
            self.image.learn_writes(&written);
        }
    }

    /// Brings the rollback checkpoint up to the memory as it is before a cell. A checkpoint that
    /// cannot be updated is dropped (with a warning): the slot runs on without rollback rather
    /// than roll back to a wrong state.
    fn update_checkpoint(&mut self) {
        let Some(checkpoint) = self.checkpoint.as_mut() else {
            return;
        };
        let open = self.store.data().open_files.open();
        checkpoint.unavailable = (open > 0).then(|| {
            format!("the slot held {open} files open before the cell, which a rolled-back interpreter would not have")
        });
        if let Err(error) = checkpoint.update(self.memory.data(&self.store)) {
            tracing::warn!(%error, "failed to update a slot's rollback checkpoint; the slot runs without rollback from now on");
            self.checkpoint = None;
        }
    }

    /// Runs a setup cell (preload, snapshot probes) without fuel metering and under the
    /// startup time limit: its final value's text, or why it failed.
    pub(crate) fn setup_cell(&mut self, code: &str, limits: &Limits) -> Result<Option<String>, String> {
        Ok(self
            .setup_cell_output(code, limits)?
            .and_then(|c| c.result)
            .and_then(|r| r.get("text/plain").cloned()))
    }

    /// [`Interpreter::setup_cell`], returning the whole cell output.
    fn setup_cell_output(&mut self, code: &str, limits: &Limits) -> Result<Option<CellOutput>, String> {
        let limits = Limits {
            fuel: None,
            timeout: STARTUP_TIMEOUT,
            ..*limits
        };
        let result = self.run_cell(code, &limits, STARTUP_TIMEOUT);
        if !result.success {
            return Err(setup_failure(&result, &limits));
        }
        Ok(result.cell)
    }

    /// Runs a setup cell and returns where its last door call's out-pointer sat on the guest
    /// stack (see `snapshot.rs`).
    pub(crate) fn stack_probe(&mut self, code: &str, limits: &Limits) -> Result<u32, String> {
        self.stack_probe_with_stdout(code, limits).map(|(probe, _)| probe)
    }

    /// [`Interpreter::stack_probe`], with what the setup cell printed too.
    pub(crate) fn stack_probe_with_stdout(&mut self, code: &str, limits: &Limits) -> Result<(u32, String), String> {
        self.store.data_mut().door_frame = None;
        let stdout = self
            .setup_cell_output(code, limits)?
            .map(|c| c.stdout)
            .unwrap_or_default();
        let probe = self
            .store
            .data()
            .door_frame
            .ok_or_else(|| "the turn made no door call".to_string())?;
        Ok((probe, stdout))
    }

    /// Grows the memory (through the store's limiter) to at least `size` bytes, whole wasm pages;
    /// a memory that large already is left as it is.
    pub(crate) fn grow_to(&mut self, size: usize) -> Result<(), StartError> {
        let current = self.memory_bytes().len();
        if size > current {
            let pages = (size - current).div_ceil(64 << 10) as u64;
            self.memory
                .grow(&mut self.store, pages)
                .map_err(|e| StartError::Restore(RestoreError::Grow(e.into_boxed_dyn_error())))?;
        }
        Ok(())
    }

    /// The guest's linear memory.
    pub(crate) fn memory_bytes(&self) -> &[u8] {
        self.memory.data(&self.store)
    }

    /// Sends one chunk of code through the `turn` export: 0 when it ran, 1 on an uncaught
    /// exception, or the trap.
    pub(crate) fn turn_raw(&mut self, chunk: &str) -> wasmtime::Result<i32> {
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
    streams: StreamLog,
    report: GuestReport,
    host_truncated: bool,
    memory_refused: bool,
    limits: &Limits,
) -> ExecutionResult {
    let (cell, cut) = report.into_cell(Streams::HostCaptured(streams), limits);
    let truncated = host_truncated || cut;
    let out_of_memory = memory_refused && cell.error.as_ref().is_some_and(|e| e.name == "MemoryError");
    finished_cell(cell, truncated, out_of_memory, limits)
}

/// A result for a cell whose interpreter was stopped by `limit` (or crashed, as `crash` says)
/// and must be replaced; `interrupted` when it had been sent a `KeyboardInterrupt` first.
fn stopped(
    mut cell: CellOutput,
    limit: Option<LimitKind>,
    crash: String,
    limits: &Limits,
    timeout: Duration,
    interrupted: bool,
) -> ExecutionResult {
    let message = match limit {
        Some(LimitKind::Time) if interrupted => format!("{} and was stopped", did_not_stop(timeout)),
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
    let error = CellError {
        name: RESTART_ERROR.into(),
        value: message.clone(),
        traceback: Vec::new(),
    };
    cell.outputs.push(error.to_output());
    cell.error = Some(error);
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

/// How a crashed cell's message ends when the slot got a fresh interpreter.
const RESTARTED: &str = "; the interpreter was restarted, so variables and imports from earlier cells are gone";
/// How it ends instead when the slot was rolled back (see [`rolled_back`]).
const ROLLED_BACK: &str = "; the slot was rolled back to its state before this cell, so variables and imports from \
                           earlier cells are kept (files the cell wrote in the workspace stay)";

/// `result` (a crashed cell's) for a slot that was rolled back to its state before the cell
/// instead of restarted: its state is not lost, and its messages say so.
pub(crate) fn rolled_back(result: &mut ExecutionResult) {
    let say_rolled_back = |text: &mut String| *text = text.replace(RESTARTED, ROLLED_BACK);
    say_rolled_back(&mut result.output);
    if let Some(error) = result.error.as_mut() {
        say_rolled_back(&mut error.message);
    }
    if let Some(cell) = result.cell.as_mut() {
        if let Some(error) = cell.error.as_mut() {
            say_rolled_back(&mut error.value);
        }
        for output in &mut cell.outputs {
            if let Output::Error { evalue, .. } = output {
                say_rolled_back(evalue);
            }
        }
    }
    result.metadata.state_lost = false;
    result.metadata.rolled_back = true;
}

/// A result for a cell whose interpreter is gone.
fn crashed(message: String, cell: Option<CellOutput>) -> ExecutionResult {
    let message = format!("{message}{RESTARTED}");
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
            if let Some(Output::Error { evalue, .. }) = cell.outputs.last_mut() {
                evalue.clone_from(&message);
            }
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

/// Why the interpreter stopped, in one line: the trap's own reason (`wasm trap: call stack
/// exhausted`), not the context wasmtime wraps it in, whose first line is only
/// "error while executing at wasm backtrace:".
fn trap_reason(error: &wasmtime::Error) -> String {
    if let Some(trap) = error.downcast_ref::<Trap>() {
        return trap.to_string();
    }
    let reason = error.root_cause().to_string();
    let reason = reason
        .lines()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("unknown trap");
    reason.trim().to_string()
}
