//! Progress reporting from library code, which never prints: the CLI implements [`Reporter`]
//! with progress bars, tests and servers use [`SilentReporter`].

/// Told of long-running steps (downloading, extracting, compiling) as they happen.
pub trait Reporter: Send + Sync {
    /// A step starts; `total` is its size in bytes when known.
    fn on_step_start(&self, step: &str, total: Option<u64>) {
        let _ = (step, total);
    }
    /// `done` bytes of the current step are finished.
    fn on_step_progress(&self, done: u64) {
        let _ = done;
    }
    /// The current step is finished.
    fn on_step_end(&self) {}
}

/// A [`Reporter`] that reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct SilentReporter;

impl Reporter for SilentReporter {}
