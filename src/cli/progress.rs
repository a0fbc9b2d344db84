//! Progress bars for library steps, drawn only on a terminal and never with `--quiet`; on any
//! other stderr, plain progress lines ([`super::progress_lines`]).

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use rollbox::Reporter;

use super::progress_lines::{ProgressLines, Unit};

/// A [`Reporter`] that draws one bar or spinner per step on stderr, or prints progress lines.
pub(crate) struct CliReporter {
    visible: bool,
    lines: bool,
    bar: Mutex<Option<ProgressBar>>,
    /// The current step, shared with the ticker thread, which holds only a `Weak` and so ends
    /// with the reporter.
    step: Arc<Mutex<Option<ProgressLines>>>,
    ticker: std::sync::Once,
}

impl CliReporter {
    /// Draws only when `visible` (see [`super::printer::Printer::draws_progress`]); prints
    /// lines instead with `lines` (see [`super::printer::Printer::prints_progress_lines`]).
    pub(crate) fn new(visible: bool, lines: bool) -> Self {
        CliReporter {
            visible,
            lines,
            bar: Mutex::new(None),
            step: Arc::new(Mutex::new(None)),
            ticker: std::sync::Once::new(),
        }
    }

    /// Starts the thread that prints a line for a step that has been silent too long.
    fn start_ticker(&self) {
        let step = Arc::downgrade(&self.step);
        self.ticker.call_once(|| {
            // Without the thread a silent step only prints at its start and end; not fatal.
            let _ = std::thread::Builder::new()
                .name("rollbox-progress-lines".into())
                .spawn(move || tick_until_dropped(step));
        });
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<ProgressBar>> {
        self.bar.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step(&self) -> std::sync::MutexGuard<'_, Option<ProgressLines>> {
        self.step.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn tick_until_dropped(step: Weak<Mutex<Option<ProgressLines>>>) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let Some(step) = step.upgrade() else { return };
        let mut step = step.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(line) = step.as_mut().and_then(|lines| lines.tick(Instant::now(), Unit::Bytes)) {
            eprintln!("{line}");
        }
    }
}

impl Reporter for CliReporter {
    fn on_step_start(&self, step: &str, total: Option<u64>) {
        if self.lines {
            let lines = ProgressLines::start(step, total, Instant::now());
            eprintln!("{}", lines.first_line(Unit::Bytes));
            if let Some(previous) = self.step().replace(lines) {
                eprintln!("{}", previous.last_line(Instant::now()));
            }
            self.start_ticker();
            return;
        }
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
        if let Some(lines) = self.step().as_mut()
            && let Some(line) = lines.progress(done, Instant::now(), Unit::Bytes, "")
        {
            eprintln!("{line}");
        }
        if let Some(bar) = self.slot().as_ref() {
            bar.set_position(done);
        }
    }

    fn on_step_end(&self) {
        if let Some(lines) = self.step().take() {
            eprintln!("{}", lines.last_line(Instant::now()));
        }
        if let Some(bar) = self.slot().take() {
            bar.finish_and_clear();
        }
    }
}
