//! `rollbox repl`: an interactive, stateful session in one slot.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::Args;

use rollbox::{Backend, ToolCall};

use super::backend_args::BackendArgs;
use super::interrupts::run_until_interrupted;
use super::{LimitArgs, Printer, RuntimeArgs, SeedArgs};

#[derive(Args)]
pub(crate) struct ReplArgs {
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    seed: SeedArgs,
}

pub(crate) async fn run(args: ReplArgs, printer: Printer) -> anyhow::Result<ExitCode> {
    let limits = args.limits.resolve()?;
    args.seed.check(&args.runtime)?;
    if args.backend.dry_run(&limits, &args.runtime).await? {
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = args.seed.one_slot_runtime(&args.runtime, args.backend.backend);
    let started = args.backend.start(limits, &runtime, printer).await?;
    run_until_interrupted(started.as_ref(), printer, repl(started.as_ref(), args.seed, printer)).await
}

/// Reads cells from stdin and runs them in one slot until end of input.
async fn repl(backend: &dyn Backend, seed: SeedArgs, printer: Printer) -> anyhow::Result<ExitCode> {
    let slot = seed.acquire(backend, "repl").await?;
    let interactive = std::io::stdin().is_terminal();
    if interactive && !printer.is_quiet() {
        eprintln!(
            "rollbox repl: Python in a {} slot; state persists. A block ends at an empty line; Ctrl-D quits.",
            backend.name()
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    while let Some(cell) = read_cell(&mut lines, interactive)? {
        if cell.trim().is_empty() {
            continue;
        }
        let result = backend.execute(&slot, ToolCall::python(cell)).await;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(result.output.as_bytes())?;
        if !result.output.is_empty() && !result.output.ends_with('\n') {
            stdout.write_all(b"\n")?;
        }
        stdout.flush()?;
        if result.metadata.state_lost && !printer.is_quiet() {
            eprintln!("[the interpreter was restarted; earlier state is gone]");
        }
        if result.metadata.rolled_back && !printer.is_quiet() {
            eprintln!("[rolled back to the state before the cell; earlier state is kept]");
        }
    }
    backend.release(&slot, true).await?;
    Ok(ExitCode::SUCCESS)
}

/// One cell: a line, or a block that opens with a line ending in `:` (or with unclosed
/// brackets) and runs to the next empty line. `None` at end of input.
fn read_cell(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    interactive: bool,
) -> std::io::Result<Option<String>> {
    prompt(">>> ", interactive)?;
    let Some(first) = lines.next().transpose()? else {
        return Ok(None);
    };
    let mut cell = first.clone();
    let mut depth = bracket_depth(&first);
    if !(first.trim_end().ends_with(':') || depth > 0 || first.trim_end().ends_with('\\')) {
        return Ok(Some(cell));
    }
    loop {
        prompt("... ", interactive)?;
        let Some(line) = lines.next().transpose()? else { break };
        if line.trim().is_empty() && depth <= 0 {
            break;
        }
        depth += bracket_depth(&line);
        cell.push('\n');
        cell.push_str(&line);
    }
    Ok(Some(cell))
}

fn bracket_depth(line: &str) -> i32 {
    line.chars()
        .map(|c| match c {
            '(' | '[' | '{' => 1,
            ')' | ']' | '}' => -1,
            _ => 0,
        })
        .sum()
}

fn prompt(text: &str, interactive: bool) -> std::io::Result<()> {
    if interactive {
        let mut stderr = std::io::stderr();
        stderr.write_all(text.as_bytes())?;
        stderr.flush()?;
    }
    Ok(())
}
