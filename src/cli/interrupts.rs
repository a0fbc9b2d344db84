//! The binary's one handler for Ctrl-C and SIGTERM. The first signal asks the command to wind
//! down (stop new work, stop remote servers, drain requests); a second one exits at once with 130.
//!
//! Only commands that wind down listen: a command that does not is ended by the signal's default
//! action, as any program is.

use std::process::ExitCode;

use anyhow::Context;

use rollbox::Backend;

use super::printer::Printer;

/// The exit code of a command ended by Ctrl-C (128 + SIGINT), as shells report it.
pub(crate) const INTERRUPTED: u8 = 130;

/// Ctrl-C and SIGTERM, listened for from the start: a signal that arrives while nothing waits is
/// kept for the next wait, so a quick second Ctrl-C is never lost.
pub(crate) struct Interrupts {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Interrupts {
    /// Starts listening; from now on Ctrl-C and SIGTERM no longer end the process by themselves.
    pub(crate) fn listen() -> anyhow::Result<Interrupts> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let interrupt = signal(SignalKind::interrupt()).context("failed to listen for Ctrl-C")?;
            let terminate = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
            Ok(Interrupts { interrupt, terminate })
        }
        #[cfg(not(unix))]
        Ok(Interrupts {})
    }

    /// Completes on the next Ctrl-C or SIGTERM.
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    }

    /// Completes on the first Ctrl-C or SIGTERM, after telling people `winding_down`; from then
    /// on the next one exits the process at once.
    pub(crate) async fn first(mut self, printer: Printer, winding_down: &str) {
        self.next().await;
        printer.line(winding_down);
        tokio::spawn(async move {
            self.next().await;
            eprintln!("rollbox: forced exit");
            std::process::exit(INTERRUPTED.into());
        });
    }
}

/// Runs `work` until it ends or the first Ctrl-C or SIGTERM, then shuts `backend` down either
/// way, so remote servers (Modal sandboxes included) never outlive the command.
pub(crate) async fn run_until_interrupted(
    backend: &dyn Backend,
    printer: Printer,
    work: impl Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let interrupts = Interrupts::listen()?;
    let outcome = tokio::select! {
        outcome = work => outcome,
        () = interrupts.first(printer, "rollbox: interrupted; stopping the backend (Ctrl-C again to force)") => {
            Ok(ExitCode::from(INTERRUPTED))
        }
    };
    backend.shutdown().await.context("failed to shut the backend down")?;
    outcome
}
