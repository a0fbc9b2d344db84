//! `rollbox swe prepare`: builds the environments of a dataset's SWE tasks ahead of time, and
//! the same step `rollbox rollout --backend process` takes before its first trajectory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};

use rollbox::remote::ProvisionConfig;
use rollbox::remote::provision::{ModalProvisioner, PerImageBackend};
use rollbox::rollout::dataset::Dataset;
use rollbox::rollout::swe::{EnvironmentReporter, ensure_environments};
use rollbox::wasm::runtime::RuntimeOptions;
use rollbox::{Backend, Limits};
use serde_json::json;

use super::backend_args::{BackendArgs, BackendChoice, start_remote_backend};
use super::{Printer, RuntimeArgs};

/// The name of the default image's group when `--modal-image` is not given.
const DEBIAN_IMAGE: &str = "modal debian_slim (--modal-python-version, --modal-apt)";

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
        let dataset = super::rollout::load_dataset_with_sidecar(path)?;
        for error in &dataset.errors {
            printer.warn(format_args!("{}: skipped {error}", path.display()));
        }
        merged.problems.extend(dataset.problems);
    }
    let cache = absolute(args.shared_cache.unwrap_or_else(default_shared_cache))?;
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
        Some(cache) => {
            // The sandbox binds it by path: make it absolute, as the environments' paths are.
            let cache = absolute(cache.to_owned())?;
            backend.process.set_shared_cache(cache.clone());
            cache
        }
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

fn absolute(path: PathBuf) -> anyhow::Result<PathBuf> {
    std::path::absolute(&path).with_context(|| format!("failed to resolve the folder {}", path.display()))
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

/// The image of each SWE row that names one (`image_name`), by instance id.
fn image_routes(dataset: &Dataset) -> HashMap<String, String> {
    dataset
        .problems
        .iter()
        .filter_map(|p| Some((p.instance_id.clone(), p.swe.as_ref()?.image_name.clone()?)))
        .collect()
}

/// Whether the rows' images apply: Modal sandboxes, and at least one row names an image. Rows
/// with images on another backend are run there as they are, with a warning, never silently.
fn images_apply(backend: &BackendArgs, routes: &HashMap<String, String>, printer: Printer) -> bool {
    if routes.is_empty() {
        return false;
    }
    let modal = backend.backend == BackendChoice::Remote && backend.remote.provisions_modal();
    if !modal {
        printer.warn(format_args!(
            "{} SWE row(s) name an image_name, which only --backend remote --provision modal uses; \
             they run on this backend's own environment",
            routes.len()
        ));
    }
    modal
}

/// The images of a run, each with its instances: every routed image, and the default one
/// (`--modal-image`, or Modal's Debian image) with every instance that names none.
fn image_groups(
    backend: &BackendArgs,
    dataset: &Dataset,
    routes: &HashMap<String, String>,
) -> BTreeMap<Option<String>, Vec<String>> {
    let default = backend.remote.modal_image().map(str::to_owned);
    let mut groups: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
    for problem in &dataset.problems {
        let image = routes.get(&problem.instance_id).cloned().or_else(|| default.clone());
        groups.entry(image).or_default().push(problem.instance_id.clone());
    }
    groups
}

/// `--dry-run` for a rollout: with per-row images on Modal, what would be created for each
/// image (its instances and every SDK call of its sandboxes); else the backend's usual plan.
pub(crate) async fn dry_run(
    backend: &BackendArgs,
    dataset: &Dataset,
    limits: &Limits,
    runtime: &RuntimeArgs,
    printer: Printer,
) -> anyhow::Result<bool> {
    let routes = image_routes(dataset);
    if !backend.remote.dry_run_requested() || !images_apply(backend, &routes, printer) {
        return backend.dry_run(limits, runtime).await;
    }
    let mut per_image = Vec::new();
    for (image, instances) in image_groups(backend, dataset, &routes) {
        let config = backend
            .remote
            .resolve_for_image(limits, runtime, &backend.process, image.as_deref())?;
        let ProvisionConfig::Modal(modal) = &config.provision else {
            anyhow::bail!("per-image sandboxes need --provision modal");
        };
        let plan = ModalProvisioner::plan(modal)
            .await
            .context("failed to plan the Modal sandboxes")?;
        per_image.push(json!({
            "image": image.as_deref().unwrap_or(DEBIAN_IMAGE),
            "instances": instances,
            "pool": {
                "slots_per_sandbox": config.pool.slots_per_server,
                "min_sandboxes": config.pool.min_servers,
                "max_sandboxes": config.pool.max_servers,
            },
            "servers": plan,
        }));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({ "provision": "modal", "per_image": per_image }))?
    );
    Ok(true)
}

/// Starts the rollout's backend: with per-row images on Modal, one remote backend (its own pool
/// and sandboxes) per image behind a [`PerImageBackend`]; else the backend the flags name.
pub(crate) async fn start_backend(
    backend: &BackendArgs,
    dataset: &Dataset,
    limits: Limits,
    runtime: &RuntimeArgs,
    printer: Printer,
) -> anyhow::Result<Arc<dyn Backend>> {
    let routes = image_routes(dataset);
    if !images_apply(backend, &routes, printer) {
        return backend.start(limits, runtime, printer).await;
    }
    backend.check_flags_apply(runtime)?;
    let groups = image_groups(backend, dataset, &routes);
    let name_of = |image: &Option<String>| image.clone().unwrap_or_else(|| DEBIAN_IMAGE.to_owned());
    // Unrouted trajectories go to the default image; when every row names its image, one of
    // theirs serves as the default, so no sandbox starts for an image nothing uses.
    let default_image = groups
        .get(&backend.remote.modal_image().map(str::to_owned))
        .map(|_| name_of(&backend.remote.modal_image().map(str::to_owned)))
        .or_else(|| groups.keys().next().map(name_of))
        .unwrap_or_else(|| DEBIAN_IMAGE.to_owned());
    let mut backends: HashMap<String, Arc<dyn Backend>> = HashMap::new();
    for image in groups.keys() {
        let name = name_of(image);
        printer.line(format_args!("image {name}: its own Modal sandboxes"));
        let config = backend
            .remote
            .resolve_for_image(&limits, runtime, &backend.process, image.as_deref())?;
        match start_remote_backend(config).await {
            Ok(started) => backends.insert(name, Arc::new(started)),
            Err(error) => {
                // Sandboxes of the images started so far must not outlive the failure.
                for started in backends.values() {
                    let _ = started.shutdown().await;
                }
                return Err(error);
            }
        };
    }
    Ok(Arc::new(PerImageBackend::new(routes, backends, default_image)?))
}
