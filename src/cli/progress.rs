//! Progress bars for library steps, drawn only on a terminal and never with `--quiet`.

use std::sync::Mutex;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use rollbox::Reporter;

/// A [`Reporter`] that draws one bar or spinner per step on stderr.
pub(crate) struct CliReporter {
    visible: bool,
    bar: Mutex<Option<ProgressBar>>,
}

impl CliReporter {
    /// Draws only when `visible` (see [`super::printer::Printer::draws_progress`]).
    pub(crate) fn new(visible: bool) -> Self {
        CliReporter {
            visible,
            bar: Mutex::new(None),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.bar.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Reporter for CliReporter {
    fn on_step_start(&self, step: &str, total: Option<u64>) {
        if !self.visible {
            return;
        }
        let bar = match total {
            Some(total) => ProgressBar::new(total).with_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
            None => {
                let spinner = ProgressBar::new_spinner();
                spinner.enable_steady_tick(Duration::from_millis(120));
                spinner
            }
        };
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.set_message(step.to_string());
        if let Some(old) = self.slot().replace(bar) {
            old.finish_and_clear();
        }
    }

    fn on_step_progress(&self, done: u64) {
        if let Some(bar) = self.slot().as_ref() {
            bar.set_position(done);
        }
    }

    fn on_step_end(&self) {
        if let Some(bar) = self.slot().take() {
            bar.finish_and_clear();
        }
    }
}
