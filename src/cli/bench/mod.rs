//! `rollbox bench`: the engine's speed and memory numbers, as recorded in BENCHMARKS.md.

use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

mod measure;

use rollbox::{Backend, Limits};

use measure::{
    EngineBenchOptions, RemoteBenchOptions, RemoteBenchReport, percentile, run_engine_bench, run_remote_bench,
};

use super::backend_args::{BackendArgs, BackendChoice, start_remote_backend};
use super::interrupts::run_until_interrupted;
use super::{Printer, RuntimeArgs, start_wasm_backend};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Cells of `x += 1` timed one by one.
    #[arg(long, default_value_t = EngineBenchOptions::default().cells)]
    cells: usize,
    /// Slots acquired one by one.
    #[arg(long, default_value_t = EngineBenchOptions::default().acquires)]
    acquires: usize,
    /// Live slots for the throughput and memory runs.
    #[arg(long, default_value_t = EngineBenchOptions::default().slots)]
    slots: usize,
    /// Batches over the live slots.
    #[arg(long, default_value_t = EngineBenchOptions::default().rounds)]
    rounds: usize,
    /// Process starts of `rollbox exec -c 1` to time.
    #[arg(long, default_value_t = 10)]
    starts: usize,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// With `--backend remote`: a trivial cell in this process and through one server (the
    /// remote flags choose it; it gets room for every slot), and the cells per second that
    /// server sustains over `--slots` slots, batched and from as many concurrent callers.
    #[command(flatten)]
    backend: BackendArgs,
}

pub(crate) async fn run(args: BenchArgs, printer: Printer) -> anyhow::Result<ExitCode> {
    if args.backend.backend == BackendChoice::Remote {
        return run_remote(args, printer).await;
    }
    let backend = args.backend.start(Limits::default(), &args.runtime, printer).await?;
    let options = EngineBenchOptions {
        cells: args.cells,
        acquires: args.acquires,
        slots: args.slots,
        rounds: args.rounds,
    };
    let mut report = run_engine_bench(backend.clone(), &options).await?;
    let backend_name = backend.name().to_owned();
    if backend_name == "process" {
        // Its slots are child processes, which this process's RSS does not include.
        report.idle_slot_rss_mb = None;
    }
    let start_ms = process_start_ms(args.starts, &backend_name, &args.backend.process.server_args())?;
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["process_start_to_first_result_median_ms"] = serde_json::json!(start_ms);
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("rollbox bench, {backend_name} backend ({} CPUs)", report.cpus);
    println!(
        "  cell `x += 1`, caller's view      median {:8.1} µs   p90 {:8.1} µs",
        report.cell_median_us, report.cell_p90_us
    );
    println!(
        "  cell `x += 1`, in-slot time       median {:8.1} µs",
        report.cell_in_slot_median_us
    );
    println!(
        "  acquire to first cell ready       median {:8.2} ms   p90 {:8.2} ms",
        report.acquire_median_ms, report.acquire_p90_ms
    );
    println!(
        "  throughput, {} live slots        {:10.0} cells/s",
        report.throughput_slots, report.throughput_cells_per_s
    );
    match report.idle_slot_rss_mb {
        Some(mb) => println!("  memory per idle slot (RSS)        {mb:8.2} MB"),
        None => {
            println!("  memory per idle slot (RSS)        not measured (not on Linux, or slots are child processes)")
        }
    }
    println!(
        "  process start to first result     median {start_ms:8.1} ms ({} runs)",
        args.starts
    );
    Ok(ExitCode::SUCCESS)
}

/// Median wall-clock time of `rollbox --quiet exec --backend BACKEND [FLAGS] -c 1` as a new
/// process, runtime cached.
fn process_start_ms(runs: usize, backend: &str, flags: &[String]) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let status = Command::new(&exe)
            .args(["--quiet", "exec", "--backend", backend])
            .args(flags)
            .args(["-c", "1"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(
            status.success(),
            "`rollbox exec -c 1` failed while timing process start"
        );
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(percentile(&mut samples, 0.5))
}

/// `rollbox bench --backend remote`: what a server adds to a cell, and one server's throughput.
async fn run_remote(args: BenchArgs, printer: Printer) -> anyhow::Result<ExitCode> {
    let limits = Limits::default();
    if args.backend.dry_run(&limits, &args.runtime).await? {
        return Ok(ExitCode::SUCCESS);
    }
    let in_process = start_wasm_backend(limits, &args.runtime, printer).await?;
    let mut remote = args.backend.remote.clone();
    // One server, with a place for the latency run's slot and every caller's.
    remote.slots_per_sandbox = remote.slots_per_sandbox.max(args.slots + 1);
    remote.min_sandboxes = 1;
    remote.max_sandboxes = 1;
    let backend: Arc<dyn Backend> =
        Arc::new(start_remote_backend(remote.resolve(&limits, &args.runtime, &args.backend.process)?).await?);
    let options = RemoteBenchOptions {
        cells: args.cells,
        slots: args.slots,
        rounds: args.rounds,
    };
    let work = async {
        let report = run_remote_bench(&in_process, backend.clone(), &options).await?;
        print_remote_report(&report, args.json)?;
        Ok(ExitCode::SUCCESS)
    };
    run_until_interrupted(backend.as_ref(), printer, work).await
}

fn print_remote_report(report: &RemoteBenchReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!("rollbox bench --backend remote ({} CPUs, one server)", report.cpus);
    println!(
        "  cell `x += 1`, in-process         median {:8.1} µs",
        report.in_process_cell_median_us
    );
    println!(
        "  cell `x += 1`, through the server median {:8.1} µs   p90 {:8.1} µs   (adds {:.1} µs at the median)",
        report.remote_cell_median_us, report.remote_cell_p90_us, report.added_median_us
    );
    println!(
        "  throughput, {} slots, batched       {:10.0} cells/s",
        report.throughput_slots, report.batched_cells_per_s
    );
    println!(
        "  throughput, {} concurrent callers   {:10.0} cells/s",
        report.throughput_slots, report.concurrent_cells_per_s
    );
    Ok(())
}
