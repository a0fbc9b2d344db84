//! `rollbox exec`: run cells in order in one slot and print their results.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use rollbox::{Backend, ExecutionResult, ToolCall};

use super::backend_args::BackendArgs;
use super::interrupts::run_until_interrupted;
use super::{LimitArgs, Printer, RuntimeArgs, SeedArgs};

/// The marker that starts a new cell in a cells file (the Jupytext "percent" format).
const CELL_MARKER: &str = "# %%";

#[derive(Args)]
pub(crate) struct ExecArgs {
    /// A cell to run; repeat for more cells, which run in order in the same interpreter.
    #[arg(short = 'c', long = "code", value_name = "CODE")]
    code: Vec<String>,
    /// A file of cells separated by `# %%` lines (`-` reads stdin); its cells run after `-c`'s.
    #[arg(short, long, value_name = "PATH")]
    file: Option<PathBuf>,
    /// Print one JSON result per line on stdout instead of the cells' output.
    #[arg(long)]
    json: bool,
    /// Print each cell's duration on stderr.
    #[arg(long)]
    timings: bool,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    seed: SeedArgs,
}

pub(crate) async fn run(args: ExecArgs, printer: Printer) -> anyhow::Result<ExitCode> {
    let limits = args.limits.resolve()?;
    args.seed.check(&args.runtime)?;
    if args.backend.dry_run(&limits, &args.runtime).await? {
        return Ok(ExitCode::SUCCESS);
    }
    let mut cells = args.code.clone();
    if let Some(path) = &args.file {
        cells.extend(read_cells(path)?);
    }
    anyhow::ensure!(
        !cells.is_empty(),
        "no cells to run: pass -c CODE (repeatable) or --file PATH"
    );
    let runtime = args.seed.one_slot_runtime(&args.runtime, args.backend.backend);
    let backend = args.backend.start(limits, &runtime, printer).await?;
    run_until_interrupted(
        backend.as_ref(),
        printer,
        run_cells(backend.as_ref(), cells, &args, printer),
    )
    .await
}

/// Runs `cells` in order in one new slot, printing each result.
async fn run_cells(
    backend: &dyn Backend,
    cells: Vec<String>,
    args: &ExecArgs,
    printer: Printer,
) -> anyhow::Result<ExitCode> {
    let slot = args.seed.acquire(backend, "exec").await?;
    let mut failed = 0usize;
    let mut stdout = std::io::stdout().lock();
    for (number, code) in cells.into_iter().enumerate() {
        let result = backend.execute(&slot, ToolCall::python(code)).await;
        if !result.success {
            failed += 1;
        }
        if args.json {
            writeln!(stdout, "{}", serde_json::to_string(&result)?)?;
        } else {
            print_human(&mut stdout, number + 1, &result, args.timings, printer)?;
        }
    }
    stdout.flush()?;
    backend.release(&slot, true).await?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn print_human(
    stdout: &mut impl Write,
    number: usize,
    result: &ExecutionResult,
    timings: bool,
    printer: Printer,
) -> anyhow::Result<()> {
    stdout.write_all(result.output.as_bytes())?;
    if !result.output.is_empty() && !result.output.ends_with('\n') {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    if let Some(limit) = result.metadata.limit_hit {
        printer.line(format_args!("[cell {number}: {limit} limit reached]"));
    }
    if result.metadata.state_lost {
        printer.line(format_args!(
            "[cell {number}: the interpreter was restarted; earlier state is gone]"
        ));
    }
    if result.metadata.rolled_back {
        printer.line(format_args!(
            "[cell {number}: rolled back to the state before it; earlier state is kept]"
        ));
    }
    if timings {
        printer.line(format_args!("[cell {number}: {} µs]", result.metadata.duration_us));
    }
    Ok(())
}

/// Cells from a file (or stdin for `-`), split at `# %%` lines.
fn read_cells(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let mut bytes = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("failed to read cells from stdin")?;
    } else {
        bytes = std::fs::read(path).with_context(|| format!("failed to read cells from {}", path.display()))?;
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {}); save it as UTF-8",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok(split_cells(&text))
}

fn split_cells(text: &str) -> Vec<String> {
    let mut cells = vec![String::new()];
    for line in text.split_inclusive('\n') {
        if line.trim_end().starts_with(CELL_MARKER) {
            cells.push(String::new());
        } else if let Some(cell) = cells.last_mut() {
            cell.push_str(line);
        }
    }
    cells.into_iter().filter(|c| !c.trim().is_empty()).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn cells_split_at_percent_markers() {
        let cells = super::split_cells("x = 1\n# %%\nx += 1\n# %% second\nprint(x)\n");
        assert_eq!(cells, vec!["x = 1\n", "x += 1\n", "print(x)\n"]);
        assert_eq!(super::split_cells("only\n"), vec!["only\n"]);
    }
}
