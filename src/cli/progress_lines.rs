//! Progress as plain lines, for a stderr that is not a terminal (a pipe, a CI log): no bar to
//! redraw, so one line when a step starts, one every [`LINE_INTERVAL`] while it runs, and one
//! when it ends, each saying what, how far and how long, as cargo and uv do.

use std::time::{Duration, Instant};

/// The least time between two progress lines of one step.
pub(crate) const LINE_INTERVAL: Duration = Duration::from_secs(5);

/// When to print the next line of one step, and what it says.
pub(crate) struct ProgressLines {
    step: String,
    total: Option<u64>,
    started: Instant,
    last_line: Instant,
    done: Option<u64>,
}

impl ProgressLines {
    /// A step named `step` of `total` units (bytes, trajectories) when known, started `now`.
    pub(crate) fn start(step: &str, total: Option<u64>, now: Instant) -> Self {
        ProgressLines {
            step: step.to_owned(),
            total,
            started: now,
            last_line: now,
            done: None,
        }
    }

    /// When the step started.
    pub(crate) fn started(&self) -> Instant {
        self.started
    }

    /// The line to print when the step starts.
    pub(crate) fn first_line(&self, unit: Unit) -> String {
        match self.total {
            Some(total) => format!("{}: starting ({})", self.step, unit.amount(total)),
            None => format!("{}: starting", self.step),
        }
    }

    /// A line for `done` units at `now` (with `detail` after it), when the last was at least
    /// [`LINE_INTERVAL`] ago or the step reached its total.
    pub(crate) fn progress(&mut self, done: u64, now: Instant, unit: Unit, detail: &str) -> Option<String> {
        self.done = Some(done);
        let finished = self.total.is_some_and(|total| done >= total);
        if !finished && now.duration_since(self.last_line) < LINE_INTERVAL {
            return None;
        }
        self.last_line = now;
        let elapsed = now.duration_since(self.started).as_secs_f64();
        let how_far = match self.total {
            Some(total) if total > 0 => format!(
                "{} of {} ({:.0}%)",
                unit.amount(done),
                unit.amount(total),
                100.0 * done as f64 / total as f64
            ),
            _ => unit.amount(done),
        };
        let separator = if detail.is_empty() { "" } else { ", " };
        Some(format!("{}: {how_far}{separator}{detail}, {elapsed:.0} s", self.step))
    }

    /// A line at `now` for a step that reported nothing for [`LINE_INTERVAL`] (compiling the
    /// runtime reports no progress for a minute), so a log never goes quiet while it works.
    pub(crate) fn tick(&mut self, now: Instant, unit: Unit) -> Option<String> {
        if now.duration_since(self.last_line) < LINE_INTERVAL {
            return None;
        }
        match self.done {
            Some(done) => self.progress(done, now, unit, ""),
            None => {
                self.last_line = now;
                let elapsed = now.duration_since(self.started).as_secs_f64();
                Some(format!("{}: running, {elapsed:.0} s", self.step))
            }
        }
    }

    /// The line to print when the step ends at `now`.
    pub(crate) fn last_line(&self, now: Instant) -> String {
        format!(
            "{}: done in {:.1} s",
            self.step,
            now.duration_since(self.started).as_secs_f64()
        )
    }
}

/// What a step counts.
#[derive(Clone, Copy)]
pub(crate) enum Unit {
    /// Bytes, shown in MB.
    Bytes,
    /// Whole things, shown as a number.
    Count,
}

impl Unit {
    fn amount(self, n: u64) -> String {
        match self {
            Unit::Bytes => format!("{:.1} MB", n as f64 / 1e6),
            Unit::Count => n.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_come_at_most_every_interval_and_always_at_the_end() {
        let t0 = Instant::now();
        let mut lines = ProgressLines::start("downloading the runtime", Some(100_000_000), t0);
        assert_eq!(
            lines.first_line(Unit::Bytes),
            "downloading the runtime: starting (100.0 MB)"
        );
        assert_eq!(
            lines.progress(1_000_000, t0 + Duration::from_secs(1), Unit::Bytes, ""),
            None
        );
        assert_eq!(
            lines
                .progress(50_000_000, t0 + Duration::from_secs(6), Unit::Bytes, "")
                .as_deref(),
            Some("downloading the runtime: 50.0 MB of 100.0 MB (50%), 6 s")
        );
        assert_eq!(
            lines.progress(60_000_000, t0 + Duration::from_secs(7), Unit::Bytes, ""),
            None
        );
        assert!(
            lines
                .progress(100_000_000, t0 + Duration::from_secs(8), Unit::Bytes, "")
                .is_some()
        );
        assert_eq!(
            lines.last_line(t0 + Duration::from_secs(9)),
            "downloading the runtime: done in 9.0 s"
        );
    }

    #[test]
    fn a_step_of_unknown_size_says_how_much_so_far_with_its_detail() {
        let t0 = Instant::now();
        let mut lines = ProgressLines::start("rollout", None, t0);
        assert_eq!(lines.first_line(Unit::Count), "rollout: starting");
        let line = lines.progress(3, t0 + LINE_INTERVAL, Unit::Count, "mean reward 0.500");
        assert_eq!(line.as_deref(), Some("rollout: 3, mean reward 0.500, 5 s"));
    }

    #[test]
    fn a_silent_step_still_gets_a_line_every_interval() {
        let t0 = Instant::now();
        let mut lines = ProgressLines::start("compiling the Python runtime", None, t0);
        assert_eq!(lines.tick(t0 + Duration::from_secs(4), Unit::Bytes), None);
        assert_eq!(
            lines.tick(t0 + Duration::from_secs(5), Unit::Bytes).as_deref(),
            Some("compiling the Python runtime: running, 5 s")
        );
        assert_eq!(lines.tick(t0 + Duration::from_secs(9), Unit::Bytes), None);
    }
}
