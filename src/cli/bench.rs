//! `rollbox bench`: the engine's speed and memory numbers, as recorded in BENCHMARKS.md.

use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;

use rollbox::bench::{
    EngineBenchOptions, EngineBenchReport, RemoteBenchOptions, RemoteBenchReport, percentile, run_engine_bench,
    run_remote_bench,
};
use rollbox::{Backend, Limits, WasmBackendConfig};

use super::backend_args::{BackendArgs, BackendChoice, start_remote_backend};
use super::interrupts::run_until_interrupted;
use super::{Printer, RuntimeArgs, SeedArgs, start_wasm_backend, start_wasm_backend_with};

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Cells of each kind (a statement, a value, a 1 KB print, a raise) timed one by one; with
    /// `--backend remote`, cells of `x += 1` in each of the two backends.
    #[arg(long, default_value_t = EngineBenchOptions::default().cells)]
    cells: usize,
    /// Slots acquired one by one, for each of the two acquire timings.
    #[arg(long, default_value_t = EngineBenchOptions::default().acquires)]
    acquires: usize,
    /// Live slots for the throughput and memory runs.
    #[arg(long, default_value_t = EngineBenchOptions::default().slots)]
    slots: usize,
    /// Batches over the live slots.
    #[arg(long, default_value_t = EngineBenchOptions::default().rounds)]
    rounds: usize,
    /// Forks of a slot holding 10 MB of its own data, timed (backends that can fork).
    #[arg(long, default_value_t = EngineBenchOptions::default().forks)]
    forks: usize,
    /// Untimed forks and releases after the timed ones, with the process's PSS around them.
    #[arg(long, default_value_t = EngineBenchOptions::default().fork_churn)]
    fork_churn: usize,
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
    /// Measure seeded wasm slots (every slot of the bench, and each timed process start): what
    /// `--seed` costs (BENCHMARKS.md).
    #[command(flatten)]
    seed: SeedArgs,
}

pub(crate) async fn run(args: BenchArgs, printer: Printer) -> anyhow::Result<ExitCode> {
    if args.backend.backend == BackendChoice::Remote {
        return run_remote(args, printer).await;
    }
    args.seed.check(&args.runtime)?;
    let backend: Arc<dyn Backend> = match args.seed.seed {
        Some(seed) => {
            anyhow::ensure!(
                args.backend.backend == BackendChoice::Wasm,
                "rollbox bench --seed measures the wasm backend only"
            );
            args.backend.check_flags_apply(&args.runtime)?;
            let config = WasmBackendConfig {
                seed: Some(seed),
                ..args.runtime.backend_config(Limits::default())
            };
            Arc::new(start_wasm_backend_with(config, printer).await?)
        }
        None => args.backend.start(Limits::default(), &args.runtime, printer).await?,
    };
    let options = EngineBenchOptions {
        cells: args.cells,
        acquires: args.acquires,
        slots: args.slots,
        rounds: args.rounds,
        forks: args.forks,
        fork_churn: args.fork_churn,
    };
    let mut report = run_engine_bench(backend.clone(), &options).await?;
    let backend_name = backend.name().to_owned();
    if backend_name == "process" {
        // Its slots are child processes, which this process's RSS does not include.
        report.idle_slot_rss_mb = None;
        report.idle_slot_pss_mb = None;
        report.live_slots_process_pss_mb = None;
    }
    let mut start_flags = args.backend.process.server_args();
    if let Some(seed) = args.seed.seed {
        start_flags.extend(["--seed".to_string(), seed.to_string()]);
    }
    let start_ms = process_start_ms(args.starts, &backend_name, &start_flags)?;
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["backend"] = serde_json::json!(backend_name);
        value["process_start_to_first_result_median_ms"] = serde_json::json!(start_ms);
        value["process_starts"] = serde_json::json!(args.starts);
        value["seed"] = serde_json::json!(args.seed.seed);
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    print_engine_report(&report, &backend_name, start_ms, args.starts);
    Ok(ExitCode::SUCCESS)
}

fn print_engine_report(report: &EngineBenchReport, backend_name: &str, start_ms: f64, starts: usize) {
    println!("rollbox bench, {backend_name} backend ({} CPUs)", report.cpus);
    for cell in &report.cells {
        println!(
            "  cell {:<22} caller's view  median {:8.1} µs   p90 {:8.1} µs   in-slot median {:8.1} µs",
            cell.label, cell.median_us, cell.p90_us, cell.in_slot_median_us
        );
    }
    println!(
        "  acquire call alone                         median {:8.2} ms   p90 {:8.2} ms",
        report.acquire_median_ms, report.acquire_p90_ms
    );
    println!(
        "  acquire + first cell `x = 1`, to result    median {:8.2} ms   p90 {:8.2} ms",
        report.acquire_to_first_result_median_ms, report.acquire_to_first_result_p90_ms
    );
    println!(
        "  throughput `y += 1`, {} live slots, {} batches  {:10.0} cells/s",
        report.throughput_slots, report.throughput_rounds, report.throughput_cells_per_s
    );
    match report.idle_slot_rss_mb {
        Some(mb) => println!("  memory per idle slot (RSS)                 {mb:8.2} MB"),
        None => {
            println!(
                "  memory per idle slot (RSS)                 not measured (not on Linux, or slots are child processes)"
            )
        }
    }
    if let (Some(pss), Some(whole)) = (report.idle_slot_pss_mb, report.live_slots_process_pss_mb) {
        println!(
            "  memory per idle slot (PSS)                 {pss:8.2} MB   (whole process {whole:.0} MB with {} slots)",
            report.throughput_slots
        );
    }
    match &report.fork {
        Some(fork) => {
            println!(
                "  fork of a slot holding {} MB of its own      median {:8.2} ms   p90 {:8.2} ms ({} forks)",
                fork.parent_data_mb, fork.median_ms, fork.p90_ms, fork.forks
            );
            if let (Some(before), Some(after)) = (fork.churn_pss_before_mb, fork.churn_pss_after_mb) {
                println!(
                    "  {} more forks and releases: process PSS {before:.0} MB before, {after:.0} MB after",
                    fork.churn
                );
            }
        }
        None => println!(
            "  fork                                       not measured (the backend cannot fork, or --forks 0)"
        ),
    }
    if starts > 0 {
        println!("  process start to first result (`exec -c 1`) median {start_ms:8.1} ms ({starts} runs)");
    }
    println!(
        "  every one of the {} calls gave the result expected of it",
        report.calls_checked
    );
}

/// Median wall-clock time of `rollbox --quiet exec --backend BACKEND [FLAGS] -c 1` as a new
/// process, runtime cached, until it has printed the cell's value. A run that fails or prints
/// anything but `1` aborts the measurement.
fn process_start_ms(runs: usize, backend: &str, flags: &[String]) -> anyhow::Result<f64> {
    let exe = std::env::current_exe()?;
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let output = Command::new(&exe)
            .args(["--quiet", "exec", "--backend", backend])
            .args(flags)
            .args(["-c", "1"])
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            output.status.success() && output.stdout == b"1\n",
            "failed to time process start: `rollbox exec -c 1` exited with {} and printed {:?}, not \"1\"",
            output.status,
            String::from_utf8_lossy(&output.stdout)
        );
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
        "  throughput `y += 1`, {} slots, {} batches          {:10.0} cells/s",
        report.throughput_slots, report.throughput_rounds, report.batched_cells_per_s
    );
    println!(
        "  throughput `y += 1`, {} concurrent callers x {} cells {:10.0} cells/s",
        report.throughput_slots, report.throughput_rounds, report.concurrent_cells_per_s
    );
    println!(
        "  every one of the {} calls gave the result expected of it",
        report.calls_checked
    );
    Ok(())
}
