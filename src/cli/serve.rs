//! `rollbox serve`: a backend's slots over HTTP until Ctrl-C or SIGTERM.
//!
//! Once listening it prints exactly one line on stdout, for the programs that start it:
//! `{"event":"listening","url":"http://IP:PORT","api_version":"v1"}`. Everything else goes to
//! stderr.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use rollbox::Backend;
use rollbox::env_vars;
use rollbox::server::api::API_VERSION;
use rollbox::server::{BearerToken, ServerConfig, ServerState};

use rollbox::WasmBackendConfig;

use super::backend_args::{PROCESS_FLAGS_ONLY, ProcessArgs, ServedBackend, start_process_backend};
use super::interrupts::Interrupts;
use super::{LimitArgs, Printer, RuntimeArgs, SeedArgs, start_wasm_backend_with};

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// The address to listen on; port 0 picks a free port (the listening line says which).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The backend whose slots to serve.
    #[arg(long, value_enum, default_value_t = ServedBackend::Wasm)]
    backend: ServedBackend,
    /// The most slots alive at once.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().max_slots)]
    max_slots: usize,
    /// Seconds a slot may sit idle before it is released with its workspace.
    #[arg(long, value_name = "SECS", default_value_t = ServerConfig::default().idle_timeout.as_secs_f64())]
    idle_timeout: f64,
    /// The largest request body accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = ServerConfig::default().max_body_bytes)]
    max_body_bytes: usize,
    /// The most requests running at once; more wait in line.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().max_concurrent_requests)]
    max_concurrent_requests: usize,
    /// The most requests waiting in line; more get 503 at once.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().max_queued_requests)]
    max_queued_requests: usize,
    /// Seconds a request may take, waiting in line included; longer ones get 504.
    #[arg(long, value_name = "SECS", default_value_t = ServerConfig::default().request_timeout.as_secs_f64())]
    request_timeout: f64,
    /// The most connections open at once; more wait until one closes. Lowered to half of the
    /// process's open-file limit (ulimit -n) when that is smaller.
    #[arg(long, value_name = "N", default_value_t = ServerConfig::default().max_connections)]
    max_connections: usize,
    /// Seconds a request's headers may take to arrive; a connection past it is closed.
    #[arg(long, value_name = "SECS", default_value_t = ServerConfig::default().header_read_timeout.as_secs_f64())]
    header_read_timeout: f64,
    /// Seconds a connection may sit with no request running and no byte moving before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = ServerConfig::default().connection_idle_timeout.as_secs_f64())]
    connection_idle_timeout: f64,
    /// The sum of the live slots' memory limits (--memory each) the server admits, in MiB; an
    /// acquire past it gets 503. None by default: slots are admitted up to --max-slots.
    #[arg(long, value_name = "MB")]
    memory_budget: Option<u64>,
    /// The most bytes `/run_code` returns of each stream, cut silently as SandboxFusion does
    /// (its default is SandboxFusion's 1 MiB). The backend keeps the larger of this and
    /// --max-output per stream, so /v1 calls see that larger cap too.
    #[arg(long, value_name = "BYTES", default_value_t = ServerConfig::default().run_code_output_bytes)]
    run_code_max_output: usize,
    /// Stop, as on SIGTERM, when standard input reaches its end: how a parent rollbox makes the
    /// servers it starts end with it, even when it is killed (its end of the pipe closes).
    #[arg(long, hide = true)]
    exit_on_stdin_eof: bool,
    /// A file holding the bearer token clients must send (instead of $ROLLBOX_SERVER_TOKEN).
    /// Required to listen beyond loopback.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(flatten)]
    process: ProcessArgs,
    /// Also per acquire: `{"seed": N}` in the acquire body seeds that slot with N as its slot
    /// seed, with or without --seed.
    #[command(flatten)]
    seed: SeedArgs,
}

/// Starts the backend `args` choose, with room for the server's `--max-slots`.
async fn start_backend(args: &ServeArgs, printer: Printer) -> anyhow::Result<Arc<dyn Backend>> {
    let mut limits = args.limits.resolve()?;
    // /run_code's streams are cut on the host, so the backend must keep at least that much.
    limits.output_bytes = limits.output_bytes.max(args.run_code_max_output);
    match args.backend {
        ServedBackend::Wasm => {
            anyhow::ensure!(!args.process.given(), "{PROCESS_FLAGS_ONLY}");
            let config = WasmBackendConfig {
                max_slots: args.max_slots,
                ..args.runtime.backend_config(limits)
            };
            Ok(Arc::new(start_wasm_backend_with(config, printer).await?))
        }
        ServedBackend::Process => {
            args.runtime.ensure_no_wasm_flags("process")?;
            Ok(Arc::new(
                start_process_backend(args.process.config(limits, args.max_slots)?).await?,
            ))
        }
    }
}

/// The one line printed on stdout once the server listens.
#[derive(Serialize)]
struct ListeningLine<'a> {
    event: &'a str,
    url: String,
    api_version: &'a str,
}

pub(crate) async fn run(args: ServeArgs, printer: Printer) -> anyhow::Result<ExitCode> {
    let config = resolve_config(&args)?;
    // Before the slow backend start, so a refused setting fails fast.
    config.validate()?;
    config.check_exposure(args.listen.ip())?;
    let backend = start_backend(&args, printer).await?;
    let backend_name = backend.name().to_owned();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("failed to listen on {}", args.listen))?;
    let address = listener.local_addr().context("failed to read the listening address")?;
    let state = ServerState::new(backend, config)?;
    let interrupts = Interrupts::listen()?;
    print_listening_line(address)?;
    printer.line(format_args!(
        "rollbox serve: {backend_name} slots on http://{address} (Ctrl-C to stop)"
    ));
    let winding_down = "rollbox serve: shutting down, finishing the requests in flight (Ctrl-C again to force)";
    let exit_on_stdin_eof = args.exit_on_stdin_eof;
    let draining = async move {
        if exit_on_stdin_eof {
            tokio::select! {
                () = interrupts.first(printer, winding_down) => {}
                () = stdin_closed() => printer.line("rollbox serve: standard input closed; shutting down"),
            }
        } else {
            interrupts.first(printer, winding_down).await;
        }
    };
    let summary = rollbox::server::serve(listener, state, draining).await?;
    printer.line(format_args!(
        "rollbox serve: stopped; released {} slots",
        summary.released_slots
    ));
    Ok(ExitCode::SUCCESS)
}

fn resolve_config(args: &ServeArgs) -> anyhow::Result<ServerConfig> {
    args.seed.check(&args.runtime)?;
    Ok(ServerConfig {
        max_slots: args.max_slots,
        idle_timeout: positive_secs("--idle-timeout", args.idle_timeout)?,
        max_body_bytes: args.max_body_bytes,
        max_concurrent_requests: args.max_concurrent_requests,
        max_queued_requests: args.max_queued_requests,
        request_timeout: positive_secs("--request-timeout", args.request_timeout)?,
        max_connections: args.max_connections,
        memory_budget_bytes: args.memory_budget.map(|mib| mib.saturating_mul(1 << 20)),
        header_read_timeout: positive_secs("--header-read-timeout", args.header_read_timeout)?,
        connection_idle_timeout: positive_secs("--connection-idle-timeout", args.connection_idle_timeout)?,
        token: resolve_token(args.token_file.as_deref())?,
        run_code_output_bytes: args.run_code_max_output,
        seed: args.seed.seed,
    })
}

fn positive_secs(flag: &str, secs: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("{flag} must be a positive number of seconds, not {secs}"))
}

/// The token from `--token-file`, else from `$ROLLBOX_SERVER_TOKEN`, else none. It is never a
/// flag's value, which other users could read in the process list.
fn resolve_token(file: Option<&Path>) -> anyhow::Result<Option<BearerToken>> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("failed to read the token file {}", path.display()))?,
        None => match std::env::var(env_vars::SERVER_TOKEN) {
            Ok(text) if !text.trim().is_empty() => text,
            _ => return Ok(None),
        },
    };
    Ok(Some(BearerToken::new(&text)?))
}

fn print_listening_line(address: SocketAddr) -> anyhow::Result<()> {
    let line = ListeningLine {
        event: "listening",
        url: format!("http://{address}"),
        api_version: API_VERSION,
    };
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", serde_json::to_string(&line)?)?;
    stdout.flush()?;
    Ok(())
}

/// Completes when standard input reaches its end (or fails). Read on a blocking thread; anything
/// read is ignored.
async fn stdin_closed() {
    let reader = tokio::task::spawn_blocking(|| {
        use std::io::Read;
        let mut buffer = [0u8; 512];
        let mut stdin = std::io::stdin().lock();
        while matches!(stdin.read(&mut buffer), Ok(n) if n > 0) {}
    });
    let _ = reader.await;
}
