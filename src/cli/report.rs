//! `rollbox report` and `rollbox notebook`: a rollout's folder as one HTML report, or its
//! trajectories as Jupyter notebooks. The work is in [`rollbox::report`].

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use rollbox::report::{RunFiles, html};

use super::Printer;

/// The file a report is written to when `--out` is not given, in the (first) run's folder.
const REPORT_FILE: &str = "report.html";
/// The folder notebooks go to when `--out` is not given, beside `trajectories.jsonl`.
pub(crate) const NOTEBOOKS_DIR: &str = "notebooks";

/// `rollbox report RUN [RUN]`.
#[derive(Args)]
pub(crate) struct ReportArgs {
    /// A rollout's output folder (or its trajectories.jsonl); give two to compare them.
    #[arg(value_name = "RUN", required = true, num_args = 1..=2)]
    runs: Vec<PathBuf>,
    /// The HTML file to write [default: report.html in the first run's folder].
    #[arg(long, value_name = "FILE.html")]
    out: Option<PathBuf>,
}

/// `rollbox notebook FILE [--id T]`.
#[derive(Args)]
pub(crate) struct NotebookArgs {
    /// A rollout's trajectories.jsonl (or its output folder).
    #[arg(value_name = "TRAJECTORIES")]
    trajectories: PathBuf,
    /// The trajectory to write, as `<instance_id>/<sample>` [default: every trajectory].
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// The folder for the .ipynb files [default: notebooks/ beside trajectories.jsonl].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// Writes the report; prints its path on stdout.
pub(crate) fn run_report(args: ReportArgs, printer: Printer) -> anyhow::Result<ExitCode> {
    let runs = args
        .runs
        .iter()
        .map(|path| RunFiles::load(path))
        .collect::<Result<Vec<_>, _>>()?;
    for run in runs.iter().filter(|r| r.unreadable_lines > 0) {
        printer.warn(format_args!(
            "{}: skipped {} unreadable lines",
            run.name, run.unreadable_lines
        ));
    }
    let out = args.out.unwrap_or_else(|| run_dir(&args.runs[0]).join(REPORT_FILE));
    std::fs::write(&out, html::report(&runs)).with_context(|| format!("failed to write {}", out.display()))?;
    println!("{}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// Writes the notebooks; prints each path on stdout.
pub(crate) fn run_notebook(args: NotebookArgs) -> anyhow::Result<ExitCode> {
    let run = RunFiles::load(&args.trajectories)?;
    let dir = args
        .out
        .unwrap_or_else(|| run_dir(&args.trajectories).join(NOTEBOOKS_DIR));
    for path in run.write_notebooks(&dir, args.id.as_deref())? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// The folder of a run given as its folder or as a file in it.
pub(crate) fn run_dir(path: &Path) -> PathBuf {
    match path.is_dir() {
        true => path.to_owned(),
        false => path.parent().unwrap_or(Path::new(".")).to_owned(),
    }
}
