//! The one place the wasmtime engine is configured, and its epoch ticker.

use std::sync::Arc;
use std::time::Duration;

use wasmtime::{Config, Engine, OptLevel};

use super::cow::ImageMemoryCreator;

/// How often the epoch advances. A call's deadline is checked at this granularity, so a
/// timeout ends at most one tick late; 10 ms keeps the ticker's cost negligible.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The most native stack a guest call may use. Compiled wasm runs on the calling thread's stack,
/// and guests run on tokio's blocking threads (2 MiB of stack unless the runtime is built with
/// more): 1 MiB covers the parser's 199 levels and leaves the other half for the host's frames
/// below and above it (the blocking pool, wasmtime's entry, the host calls a guest makes).
const WASM_STACK_BYTES: usize = 1 << 20;

/// The engine every slot of a backend shares. `fuel` turns on instruction metering, which
/// compiles different code (a separately cached module) and runs slower, so it is only on when
/// a [`crate::Limits::fuel`] is set.
pub(crate) fn build_engine(fuel: bool) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    // The runtime's CPython is built with wasm exception handling.
    config.wasm_exceptions(true);
    // Wall-clock limits: an epoch deadline per call, advanced by the ticker below.
    config.epoch_interruption(true);
    config.consume_fuel(fuel);
    config.cranelift_opt_level(OptLevel::Speed);
    // CPython's parser recurses once per nesting level, about 4 KiB of wasm stack each: at
    // wasmtime's default 512 KiB, 140 nested parentheses trapped (call stack exhausted) and
    // lost the slot, where native CPython parses up to 199 and raises SyntaxError beyond.
    config.max_wasm_stack(WASM_STACK_BYTES);
    // Every linear memory is a reservation of rollbox's own, into which a memory image (the
    // runtime's initial memory, or a snapshot) is mapped copy-on-write: slots share every page
    // they have not written (see `super::cow`).
    config.with_host_memory(Arc::new(ImageMemoryCreator));
    let engine = Engine::new(&config)?;
    // Without the ticker no deadline ever passes: a backend whose time limits cannot work must
    // not start.
    start_epoch_ticker(&engine).map_err(|e| wasmtime::Error::new(e).context("failed to start the epoch ticker"))?;
    Ok(engine)
}

/// Advances `engine`'s epoch every [`EPOCH_TICK`] on a thread that holds only a weak
/// reference, so it ends when the engine does.
fn start_epoch_ticker(engine: &Engine) -> std::io::Result<()> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("rollbox-epoch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(EPOCH_TICK);
                match weak.upgrade() {
                    Some(engine) => engine.increment_epoch(),
                    None => return,
                }
            }
        })?;
    Ok(())
}

/// The epoch ticks that cover `timeout`, plus one for the tick already under way.
pub(crate) fn ticks_for(timeout: Duration) -> u64 {
    (timeout.as_nanos() / EPOCH_TICK.as_nanos()) as u64 + 1
}
