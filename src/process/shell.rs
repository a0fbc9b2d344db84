//! The `bash` tool: one `bash -c COMMAND` per call, in the slot's workspace and sandbox, ended
//! with its whole process group when it runs out of time.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::capture::{Captured, StreamCapture};
use super::sandbox::{Attempt, GroupLeader, Sandbox, SlotDirs, retry_sandbox_setup, wait_exit_keeping_zombie};
use crate::slot::{CellOutput, ErrorKind, ExecutionError, ExecutionMetadata, ExecutionResult};
use crate::slot::{LimitKind, Limits};

/// How long to wait for a command's pipes to close after its process group was killed. Only a
/// process that left the group (`setsid`, possible without bubblewrap) keeps them open this
/// long; its output after that is not waited for, so the caller never hangs.
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// How a command ended.
enum Ending {
    Exited(ExitStatus),
    TimedOut,
}

/// Runs `command` with `bash -c` and returns its result; never fails as a whole.
pub(crate) fn run_bash(
    sandbox: &Sandbox,
    dirs: &SlotDirs,
    command: &str,
    timeout: Duration,
    limits: &Limits,
) -> ExecutionResult {
    let deadline = Instant::now() + timeout;
    retry_sandbox_setup("bash", || {
        let left = deadline.saturating_duration_since(Instant::now());
        run_bash_once(sandbox, dirs, command, left, timeout, limits)
    })
}

/// One start of `bash -c command`, given `left` of the call's `timeout`.
fn run_bash_once(
    sandbox: &Sandbox,
    dirs: &SlotDirs,
    command: &str,
    left: Duration,
    timeout: Duration,
    limits: &Limits,
) -> Attempt<ExecutionResult> {
    let failure = |message: String| {
        Attempt::Ran(ExecutionResult::failure(
            ErrorKind::Backend,
            message,
            Default::default(),
        ))
    };
    let spawned = sandbox
        .command(dirs, "bash", &["-c".as_ref(), command.as_ref()])
        .and_then(|bash| sandbox.spawn(bash, dirs));
    let mut leader = match spawned {
        Ok(leader) => leader,
        Err(error) => return failure(format!("failed to start bash: {error}")),
    };
    let (_, Some(stdout), Some(stderr)) = leader.take_pipes() else {
        return failure("failed to capture the command's output".to_owned());
    };
    let captures = StreamCapture::start(stdout, limits.output_bytes, Vec::new())
        .and_then(|out| Ok((out, StreamCapture::start(stderr, limits.output_bytes, Vec::new())?)));
    let (stdout, stderr) = match captures {
        Ok(pair) => pair,
        Err(error) => return failure(format!("failed to read the command's output: {error}")),
    };
    let ending = match wait_with_timeout(&mut leader, left) {
        Ok(ending) => ending,
        Err(error) => return failure(format!("failed to wait for the command: {error}")),
    };
    // Only bubblewrap exiting by itself can be a failed set-up; one stopped at the time limit
    // (perhaps still setting up on a loaded host) is not started again.
    let exited = matches!(ending, Ending::Exited(_));
    let grace = Instant::now() + PIPE_GRACE;
    let result = bash_result(ending, stdout.drain(grace), stderr.drain(grace), timeout);
    match exited && leader.sandbox_setup_failed() {
        true => Attempt::SetupFailed(result),
        false => Attempt::Ran(result),
    }
}

/// Waits for the command to exit or the time to run out, then kills its whole group (background
/// children too: a command's processes end with it) and reaps it.
fn wait_with_timeout(leader: &mut GroupLeader, timeout: Duration) -> std::io::Result<Ending> {
    let (exited, exit) = mpsc::channel();
    let pid = leader.id();
    let watcher = std::thread::Builder::new()
        .name("rollbox-bash-wait".into())
        .spawn(move || {
            wait_exit_keeping_zombie(pid);
            let _ = exited.send(());
        });
    watcher?;
    let timed_out = exit.recv_timeout(timeout).is_err();
    match (timed_out, leader.kill_and_reap()) {
        (false, Some(status)) => Ok(Ending::Exited(status)),
        _ => Ok(Ending::TimedOut),
    }
}

fn bash_result(ending: Ending, stdout: Captured, stderr: Captured, timeout: Duration) -> ExecutionResult {
    let truncated = stdout.truncated() || stderr.truncated();
    let cell = CellOutput {
        stdout: stdout.into_text(),
        stderr: stderr.into_text(),
        ..Default::default()
    };
    let mut metadata = ExecutionMetadata {
        truncated,
        limit_hit: truncated.then_some(LimitKind::Output),
        ..Default::default()
    };
    let error = match ending {
        Ending::Exited(status) if status.success() => None,
        Ending::Exited(status) => {
            metadata.exit_code = status.code();
            let message = match (status.code(), status.signal()) {
                (Some(code), _) => format!("the command exited with code {code}"),
                (None, Some(signal)) => format!("the command was killed by signal {signal}"),
                (None, None) => "the command failed without an exit code".to_string(),
            };
            Some(ExecutionError {
                kind: ErrorKind::NonZeroExit,
                message,
            })
        }
        Ending::TimedOut => {
            metadata.limit_hit = Some(LimitKind::Time);
            let message = format!(
                "the command ran past its {:.3} s time limit; it and every process it started were killed",
                timeout.as_secs_f64()
            );
            Some(ExecutionError {
                kind: ErrorKind::LimitExceeded,
                message,
            })
        }
    };
    if error.is_none() {
        metadata.exit_code = Some(0);
    }
    let output = render_command(&cell, error.as_ref());
    ExecutionResult {
        success: error.is_none(),
        output,
        error,
        cell: Some(cell),
        metadata,
    }
}

/// The text a model sees for a command: stdout, stderr, then why it failed.
fn render_command(cell: &CellOutput, error: Option<&ExecutionError>) -> String {
    let mut text = String::new();
    for part in [cell.stdout.as_str(), cell.stderr.as_str()] {
        if part.is_empty() {
            continue;
        }
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(part);
    }
    if let Some(error) = error {
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("[rollbox: {}]", error.message));
    }
    text
}
