//! The `python` tool of a `process` slot: a persistent native CPython in the slot's sandbox,
//! driven over private pipes by `guest/rollbox_native.py`, which runs each cell with the same
//! guest code as the wasm backend (`guest/rollbox_guest.py`), so cells give the same
//! Jupyter-shaped result everywhere.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{ChildStdin, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::capture::{Captured, StreamCapture};
use super::sandbox::{Attempt, GroupLeader, Sandbox, SlotDirs, retry_sandbox_setup};
use crate::env_vars;
use crate::slot::cell::{
    GUEST_SOURCE, GuestReport, RESTART_ERROR, STARTUP_TIMEOUT, Streams, did_not_stop, finished_cell, interrupt_grace,
    kept_after_interrupt, render_for_model, report_budget,
};
use crate::slot::{CellError, CellOutput, ErrorKind, ExecutionError, ExecutionMetadata, ExecutionResult};
use crate::slot::{LimitKind, Limits};

/// The driver that speaks the framed protocol (see its docstring).
const DRIVER_SOURCE: &str = include_str!("../../guest/rollbox_native.py");
/// `python -c` code that runs the driver (argv[1]) as the module `rollbox_native`, leaving
/// `__main__`, the cells' namespace, untouched.
const LOADER: &str = "import sys as _s, types as _t\n\
     _m = _t.ModuleType('rollbox_native'); _m.__file__ = '/rollbox/rollbox_native.py'; _s.modules['rollbox_native'] = _m\n\
     exec(compile(_s.argv.pop(1), _m.__file__, 'exec'), _m.__dict__)\n\
     del _s, _t, _m\n\
     __import__('rollbox_native').main()\n";
/// How long to wait, after a cell's report, for the end of what it wrote straight to fd 1/2.
/// The driver writes the end marker before the report, so it is normally there already.
const STRAY_OUTPUT_GRACE: Duration = Duration::from_secs(2);

/// The cell a seeded native interpreter runs first (`_seed_native` in the guest).
fn seed_native_cell(seed: u64) -> String {
    format!("__import__('rollbox_guest')._seed_native({seed})")
}

/// Starting a native interpreter failed.
#[derive(Debug, thiserror::Error)]
pub enum NativeStartError {
    /// The interpreter (or bubblewrap) could not be started.
    #[error("failed to start {python}")]
    Spawn {
        /// The interpreter.
        python: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It started but did not load the guest code; `output` is what it printed.
    #[error("failed to load the guest code in the interpreter ({reason}); it printed: {output}")]
    Handshake {
        /// What went wrong.
        reason: String,
        /// Its stderr.
        output: String,
    },
}

/// A live native interpreter. Dropping it kills its whole process group.
pub(crate) struct NativeInterpreter {
    leader: GroupLeader,
    input: ChildStdin,
    reports: mpsc::Receiver<Vec<u8>>,
    /// What the process wrote to fd 1 and 2, one segment per cell.
    stray: Arc<StreamCapture>,
}

impl NativeInterpreter {
    /// Starts `python` in the slot's sandbox and waits until the guest code is loaded. With a
    /// `seed`, best effort (a native process reads host time and entropy): hash randomisation
    /// is fixed by `PYTHONHASHSEED` and `random` is seeded, see [`seed_native_cell`].
    pub(crate) fn start(
        sandbox: &Sandbox,
        dirs: &SlotDirs,
        python: &Path,
        limits: &Limits,
        seed: Option<u64>,
    ) -> Result<NativeInterpreter, NativeStartError> {
        let interpreter = retry_sandbox_setup("python", || {
            match Self::start_once(sandbox, dirs, python, limits, seed) {
                Ok(interpreter) => Attempt::Ran(Ok(interpreter)),
                Err((error, true)) => Attempt::SetupFailed(Err(error)),
                Err((error, false)) => Attempt::Ran(Err(error)),
            }
        });
        let mut interpreter = interpreter?;
        if let Some(seed) = seed {
            let result = interpreter.run_cell(&seed_native_cell(seed), limits, STARTUP_TIMEOUT);
            if !result.success {
                interpreter.leader.kill_and_reap();
                return Err(NativeStartError::Handshake {
                    reason: "the cell that seeds `random` failed".into(),
                    output: result.output,
                });
            }
        }
        Ok(interpreter)
    }

    /// One start of the interpreter, up to its handshake; a failure says too whether it was
    /// bubblewrap that failed, before Python started.
    fn start_once(
        sandbox: &Sandbox,
        dirs: &SlotDirs,
        python: &Path,
        limits: &Limits,
        seed: Option<u64>,
    ) -> Result<NativeInterpreter, (NativeStartError, bool)> {
        let marker = end_marker();
        let budget = report_budget(limits);
        let (output_cap, budget_arg) = (limits.output_bytes.to_string(), budget.to_string());
        let args = [
            "-c",
            LOADER,
            DRIVER_SOURCE,
            marker.as_str(),
            output_cap.as_str(),
            budget_arg.as_str(),
        ];
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let spawn_error = |source| {
            let error = NativeStartError::Spawn {
                python: python.display().to_string(),
                source,
            };
            (error, false)
        };
        let mut command = sandbox
            .command(dirs, &python.to_string_lossy(), &args)
            .map_err(spawn_error)?;
        command.command.stdin(Stdio::piped());
        if let Some(seed) = seed {
            // PYTHONHASHSEED takes 0 to 2**32 - 1.
            command
                .command
                .env(env_vars::PYTHONHASHSEED, (seed & 0xffff_ffff).to_string());
        }
        let mut leader = sandbox.spawn(command, dirs).map_err(spawn_error)?;
        let (Some(input), Some(output), Some(errors)) = leader.take_pipes() else {
            return Err(spawn_error(std::io::Error::other(
                "the interpreter's pipes are missing",
            )));
        };
        let started = StreamCapture::start(errors, limits.output_bytes, marker.into_bytes())
            .and_then(|stray| Ok((stray, read_reports(output, budget)?)));
        let (stray, reports) = match started {
            Ok(pair) => pair,
            Err(source) => return Err(spawn_error(source)),
        };
        let mut interpreter = NativeInterpreter {
            leader,
            input,
            reports,
            stray,
        };
        // Only an interpreter that ended by itself can have been bubblewrap dying while it set
        // up; one stopped for not answering in time is not started again.
        match interpreter.handshake() {
            Ok(()) => Ok(interpreter),
            Err((error, ended)) => Err((error, ended && interpreter.leader.sandbox_setup_failed())),
        }
    }

    /// Sends the guest code and waits for the interpreter to say it is ready. A failure says too
    /// whether the interpreter ended by itself (rather than being stopped for not answering).
    fn handshake(&mut self) -> Result<(), (NativeStartError, bool)> {
        let failed = |this: &mut Self, reason: String, ended: bool| {
            this.leader.kill_and_reap();
            let output = this.stray.drain(Instant::now() + STRAY_OUTPUT_GRACE).into_text();
            (NativeStartError::Handshake { reason, output }, ended)
        };
        if let Err(error) = write_frame(&mut self.input, GUEST_SOURCE.as_bytes()) {
            return Err(failed(self, format!("failed to send the guest code: {error}"), true));
        }
        match self.reports.recv_timeout(STARTUP_TIMEOUT) {
            Ok(frame) if frame == br#"{"ready": true}"# => {
                // Whatever the interpreter printed while starting is nobody's cell output.
                self.stray.next_segment(Instant::now() + STRAY_OUTPUT_GRACE);
                Ok(())
            }
            Ok(frame) => Err(failed(
                self,
                format!("unexpected answer {:?}", String::from_utf8_lossy(&frame)),
                false,
            )),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(failed(
                self,
                format!("no answer within {} s", STARTUP_TIMEOUT.as_secs()),
                false,
            )),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(failed(self, "it exited".into(), true)),
        }
    }

    /// Runs `code` as one cell. A result with `metadata.state_lost` means this interpreter is
    /// dead (timed out, crashed, exited) and must be dropped.
    ///
    /// At the time limit the cell is interrupted first, as Jupyter stops a cell: the interpreter
    /// is sent `SIGINT`, CPython raises `KeyboardInterrupt` in the cell and keeps its state. Only
    /// a cell that does not stop within [`interrupt_grace`] is killed with its interpreter.
    pub(crate) fn run_cell(&mut self, code: &str, limits: &Limits, timeout: Duration) -> ExecutionResult {
        if let Err(error) = write_frame(&mut self.input, code.as_bytes()) {
            return self.lost(None, format!("the interpreter stopped taking cells ({error})"));
        }
        match self.reports.recv_timeout(timeout) {
            Ok(frame) => self.reported(&frame, limits),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if !self.leader.signal_program(libc::SIGINT) {
                    let message = format!(
                        "the cell ran past its {:.3} s time limit and the interpreter was killed",
                        timeout.as_secs_f64()
                    );
                    return self.lost(Some(LimitKind::Time), message);
                }
                let mut result = match self.reports.recv_timeout(interrupt_grace(timeout)) {
                    Ok(frame) => match self.reported(&frame, limits) {
                        reported if reported.metadata.state_lost => reported,
                        reported => kept_after_interrupt(reported, timeout),
                    },
                    Err(mpsc::RecvTimeoutError::Timeout) => self.lost(
                        Some(LimitKind::Time),
                        format!("{} and the interpreter was killed", did_not_stop(timeout)),
                    ),
                    Err(mpsc::RecvTimeoutError::Disconnected) => self.exited(),
                };
                result.metadata.interrupted = true;
                result
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => self.exited(),
        }
    }

    /// The result of a cell from the report `frame` it sent.
    fn reported(&mut self, frame: &[u8], limits: &Limits) -> ExecutionResult {
        let stray = self
            .stray
            .next_segment(Instant::now() + STRAY_OUTPUT_GRACE)
            .unwrap_or_default();
        match serde_json::from_slice::<GuestReport>(frame) {
            Ok(report) => cell_result(report, stray, limits),
            Err(error) => self.lost(None, format!("the interpreter sent an unreadable report ({error})")),
        }
    }

    /// The result of a cell during which the interpreter ended.
    fn exited(&mut self) -> ExecutionResult {
        let status = self.leader.kill_and_reap();
        let how = status.map_or("ended".to_string(), |s| s.to_string());
        self.lost(None, format!("the interpreter exited during the cell ({how})"))
    }

    /// Kills the interpreter and describes why its state is gone.
    fn lost(&mut self, limit: Option<LimitKind>, message: String) -> ExecutionResult {
        self.leader.kill_and_reap();
        let stray = self.stray.drain(Instant::now() + STRAY_OUTPUT_GRACE);
        let message = format!(
            "{message}; the next cell starts a fresh interpreter, so variables and imports from earlier cells are gone"
        );
        let truncated = stray.truncated();
        let mut cell = CellOutput {
            stderr: stray.into_text(),
            error: Some(CellError {
                name: RESTART_ERROR.into(),
                value: message.clone(),
                traceback: Vec::new(),
            }),
            ..Default::default()
        };
        cell.outputs = cell.outputs_or_fields();
        let kind = if limit.is_some() {
            ErrorKind::LimitExceeded
        } else {
            ErrorKind::GuestCrashed
        };
        ExecutionResult {
            success: false,
            output: render_for_model(&cell),
            error: Some(ExecutionError { kind, message }),
            cell: Some(cell),
            metadata: ExecutionMetadata {
                limit_hit: limit,
                state_lost: true,
                truncated,
                ..Default::default()
            },
        }
    }
}

/// A marker no cell writes by chance: unique per interpreter.
fn end_marker() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "\u{1e}rollbox-cell-end-{}-{nanos}-{}\u{1e}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn write_frame(input: &mut ChildStdin, payload: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| std::io::Error::other("the cell is larger than 4 GiB"))?;
    input.write_all(&len.to_be_bytes())?;
    input.write_all(payload)?;
    input.flush()
}

/// Reads frames on a thread; the channel closes when the interpreter's stdout does, or when a
/// frame is over `budget` (a broken driver: the cell then counts as crashed).
fn read_reports(mut output: impl Read + Send + 'static, budget: usize) -> std::io::Result<mpsc::Receiver<Vec<u8>>> {
    let (frames, reports) = mpsc::channel();
    std::thread::Builder::new()
        .name("rollbox-python-reports".into())
        .spawn(move || {
            loop {
                let mut header = [0u8; 4];
                if output.read_exact(&mut header).is_err() {
                    return;
                }
                let len = u32::from_be_bytes(header) as usize;
                if len > budget {
                    return;
                }
                let mut frame = vec![0u8; len];
                if output.read_exact(&mut frame).is_err() || frames.send(frame).is_err() {
                    return;
                }
            }
        })?;
    Ok(reports)
}

/// Builds a finished cell's result from its report and the stray output it wrote to fd 1/2.
fn cell_result(report: GuestReport, stray: Captured, limits: &Limits) -> ExecutionResult {
    let stray_cut = stray.truncated();
    let streams = Streams::Reported {
        fd_stdout: String::new(),
        fd_stderr: stray.into_text(),
    };
    let (cell, cut) = report.into_cell(streams, limits);
    let truncated = cut || stray_cut;
    // Under the address-space limit, a MemoryError means the cell reached it.
    let out_of_memory = cell.error.as_ref().is_some_and(|e| e.name == "MemoryError");
    finished_cell(cell, truncated, out_of_memory, limits)
}
