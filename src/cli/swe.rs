//! `rollbox swe prepare`: builds the environments of a dataset's SWE tasks ahead of time, and
//! the same step `rollbox rollout --backend process` takes before its first trajectory.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use rollbox::rollout::dataset::{Dataset, load_dataset};
use rollbox::rollout::swe::{EnvironmentReporter, ensure_environments};
use rollbox::wasm::runtime::RuntimeOptions;

use super::Printer;
use super::backend_args::{BackendArgs, BackendChoice};

/// The shared cache, under rollbox's cache folder, that `swe prepare` fills and that a process
/// rollout over tasks with environments uses when `--shared-cache` is not given: environments
/// take minutes to build, so they outlive one run.
const DEFAULT_SHARED_CACHE_SUBDIR: &str = "swe-shared-cache";

/// `rollbox swe ...`.
#[derive(Subcommand)]
pub(crate) enum SweCommand {
    /// Build the environments (`environment_setup`) of a dataset's SWE tasks in a shared cache,
    /// each distinct one once, so trajectories start with them ready.
    Prepare(PrepareArgs),
}

/// `rollbox swe prepare`'s flags.
#[derive(Args)]
pub(crate) struct PrepareArgs {
    /// A JSONL dataset of SWE tasks (repeat for several).
    #[arg(long, value_name = "FILE", required = true)]
    dataset: Vec<PathBuf>,
    /// The shared cache the slots will use (`rollbox rollout --backend process --shared-cache
    /// DIR`, or `rollbox serve --backend process --shared-cache DIR`) [default: swe-shared-cache/
    /// in rollbox's cache folder, which a process rollout uses too].
    #[arg(long, value_name = "DIR")]
    shared_cache: Option<PathBuf>,
}

/// Runs `rollbox swe ...`.
pub(crate) async fn run(command: SweCommand, printer: Printer) -> anyhow::Result<std::process::ExitCode> {
    let SweCommand::Prepare(args) = command;
    let mut merged = Dataset::default();
    for path in &args.dataset {
        let dataset = load_dataset(path)?;
        for error in &dataset.errors {
            printer.warn(format_args!("{}: skipped {error}", path.display()));
        }
        merged.problems.extend(dataset.problems);
    }
    let cache = args.shared_cache.unwrap_or_else(default_shared_cache);
    let swe_rows = merged.problems.iter().filter(|p| p.swe.is_some()).count();
    anyhow::ensure!(swe_rows > 0, "the dataset has no readable SWE tasks");
    build_environments(&merged, &cache, printer).await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// For a process rollout over tasks with environments: uses the default SWE shared cache
/// unless `--shared-cache` was given, and builds what is missing there before anything runs.
/// Other backends build nothing here: a server's environments are built where it runs, with
/// `rollbox swe prepare --shared-cache` pointing at the server's cache.
pub(crate) async fn prepare_for_rollout(
    backend: &mut BackendArgs,
    dataset: &Dataset,
    printer: Printer,
) -> anyhow::Result<()> {
    let needs_environments = dataset
        .problems
        .iter()
        .any(|p| p.swe.as_ref().is_some_and(|t| t.environment().is_some()));
    if backend.backend != BackendChoice::Process || !needs_environments {
        return Ok(());
    }
    let cache = match backend.process.shared_cache() {
        Some(cache) => cache.to_owned(),
        None => {
            let cache = default_shared_cache();
            printer.line(format_args!(
                "shared cache: {} (SWE environments are kept there across runs; --shared-cache overrides)",
                cache.display()
            ));
            backend.process.set_shared_cache(cache.clone());
            cache
        }
    };
    build_environments(dataset, &cache, printer).await
}

fn default_shared_cache() -> PathBuf {
    RuntimeOptions::from_env().cache_dir.join(DEFAULT_SHARED_CACHE_SUBDIR)
}

async fn build_environments(dataset: &Dataset, cache: &Path, printer: Printer) -> anyhow::Result<()> {
    let tasks: Vec<_> = dataset.problems.iter().filter_map(|p| p.swe.clone()).collect();
    let owned_cache = cache.to_owned();
    let prepared =
        tokio::task::spawn_blocking(move || ensure_environments(&owned_cache, &tasks, &LineReporter { printer }))
            .await?
            .with_context(|| format!("failed to prepare the SWE environments in {}", cache.display()))?;
    printer.line(format_args!(
        "environments: {} built, {} already in {}",
        prepared.built,
        prepared.reused,
        cache.display()
    ));
    Ok(())
}

/// Progress as one line per step: a build takes seconds to minutes, so a line per environment
/// is progress enough, in a terminal and in a log alike.
struct LineReporter {
    printer: Printer,
}

impl EnvironmentReporter for LineReporter {
    fn on_build_start(&self, key: &str, index: usize, total: usize) {
        self.printer
            .line(format_args!("environment {index}/{total} {key}: building"));
    }

    fn on_ready(&self, key: &str, index: usize, total: usize, built: bool, elapsed: Duration) {
        let how = if built { "built" } else { "cached" };
        self.printer.line(format_args!(
            "environment {index}/{total} {key}: ready ({how}, {:.1} s)",
            elapsed.as_secs_f64()
        ));
    }
}
