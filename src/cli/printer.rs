//! Where the binary writes for people. Stdout is for data (cell output, JSON); stderr is for
//! people, and carries nothing but errors under `--quiet`. Every command gets a [`Printer`]
//! rather than a `quiet` flag, so no command has to remember the rule.

use std::fmt::Display;
use std::io::IsTerminal;

use super::CliReporter;

/// Writes lines for people on stderr, unless `--quiet`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Printer {
    quiet: bool,
}

impl Printer {
    /// A printer that says nothing but errors when `quiet`.
    pub(crate) fn new(quiet: bool) -> Self {
        Printer { quiet }
    }

    /// Whether `--quiet` was given.
    pub(crate) fn is_quiet(self) -> bool {
        self.quiet
    }

    /// A line for people: a status, a summary, a notice about a cell.
    pub(crate) fn line(self, text: impl Display) {
        if !self.quiet {
            eprintln!("{text}");
        }
    }

    /// A warning: something was skipped or changed and the command goes on.
    pub(crate) fn warn(self, text: impl Display) {
        if !self.quiet {
            eprintln!("warning: {text}");
        }
    }

    /// Whether progress bars may draw: not quiet, and stderr is a terminal.
    pub(crate) fn draws_progress(self) -> bool {
        !self.quiet && std::io::stderr().is_terminal()
    }

    /// Whether progress goes out as plain lines: not quiet, and stderr is not a terminal (a
    /// pipe or a CI log, where a bar would print nothing until it ends).
    pub(crate) fn prints_progress_lines(self) -> bool {
        !self.quiet && !std::io::stderr().is_terminal()
    }

    /// A [`rollbox::Reporter`] for the library's long steps (installing the runtime).
    pub(crate) fn reporter(self) -> CliReporter {
        CliReporter::new(self.draws_progress(), self.prints_progress_lines())
    }
}
