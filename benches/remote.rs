//! The remote backend over loopback: a trivial cell through one local `rollbox serve` (wasm)
//! against the same backend in-process, and one server's cells/s from 200 concurrent slots.
//! `cargo bench --bench remote`; `rollbox bench --backend remote` prints the same figures.
//!
//! Every call's result is checked outside the clock (`rollbox::bench::check`): a call that did
//! not give what its cell promises aborts the bench with the call's output.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::future::join_all;
use rollbox::bench::{CELL_KINDS, CROWD_CELL, CellKind, Expected, acquire_crowd, check, check_all};
use rollbox::remote::provision::{LocalProvisioner, LocalProvisionerConfig};
use rollbox::remote::{PoolConfig, RemoteBackend};
use rollbox::{Backend, ExecutionResult, Limits, SilentReporter, ToolCall, WasmBackend, WasmBackendConfig};

/// Concurrent slots in the throughput bench.
const SLOTS: usize = 200;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// One local server serving wasm, with room for every slot of the benches.
fn remote_backend(runtime: &tokio::runtime::Runtime) -> RemoteBackend {
    let provisioner = Arc::new(LocalProvisioner::new(LocalProvisionerConfig {
        server_args: vec!["--max-slots".into(), (SLOTS + 1).to_string()],
        ..LocalProvisionerConfig::new(env!("CARGO_BIN_EXE_rollbox"))
    }));
    let pool = PoolConfig {
        slots_per_server: SLOTS + 1,
        min_servers: 1,
        max_servers: 1,
        ..PoolConfig::default()
    };
    runtime
        .block_on(RemoteBackend::with_provisioner(pool, provisioner))
        .expect("the remote backend starts")
}

fn in_process() -> WasmBackend {
    WasmBackend::new(
        WasmBackendConfig {
            limits: Limits::default(),
            ..WasmBackendConfig::from_env()
        },
        &SilentReporter,
    )
    .expect("the wasm backend starts")
}

/// Aborts the bench unless `results` are what `kind` promises, one per call of `calls`.
fn must_be(what: &str, kind: &CellKind, results: &[ExecutionResult], calls: usize) {
    check_all(what, kind, results, calls).unwrap_or_else(|error| panic!("{error}"));
}

/// `x += 1` through `Backend::execute`, caller's view (the `block_on` included), in-process and
/// through the server.
fn cell(c: &mut Criterion) {
    let runtime = runtime();
    let (local, remote) = (in_process(), remote_backend(&runtime));
    let statement = &CELL_KINDS[0];
    let setup = CellKind {
        code: statement.setup,
        expected: Expected::Silent,
        ..*statement
    };
    let mut group = c.benchmark_group("cell_x_plus_1");
    for (name, backend) in [
        ("in_process", &local as &dyn Backend),
        ("remote", &remote as &dyn Backend),
    ] {
        let slot = runtime.block_on(backend.acquire("bench")).expect("acquire");
        let first = runtime.block_on(backend.execute(&slot, ToolCall::python(setup.code)));
        check("cell setup", &setup, 0, 1, &first).unwrap_or_else(|error| panic!("{error}"));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let result = runtime.block_on(backend.execute(&slot, ToolCall::python(statement.code)));
                    timed += started.elapsed();
                    check(statement.label, statement, 0, 1, &result).unwrap_or_else(|error| panic!("{error}"));
                }
                timed
            })
        });
    }
    group.finish();
    runtime.block_on(remote.shutdown()).expect("shutdown");
}

/// One server's `y += 1` cells per second over 200 slots: one request per slot from as many
/// concurrent callers, and one batch request for them all.
fn throughput(c: &mut Criterion) {
    let runtime = runtime();
    let remote = Arc::new(remote_backend(&runtime));
    let slots = runtime
        .block_on(acquire_crowd(remote.as_ref(), SLOTS))
        .unwrap_or_else(|error| panic!("{error}"));
    let mut group = c.benchmark_group("one_server_200_slots");
    group.throughput(Throughput::Elements(SLOTS as u64));
    // Each slot's caller sends its own request, as independent agent loops do.
    group.bench_function("concurrent_callers", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let results = runtime.block_on(async {
                    let callers = slots.iter().map(|slot| {
                        let (remote, slot) = (remote.clone(), slot.clone());
                        tokio::spawn(async move { remote.execute(&slot, ToolCall::python(CROWD_CELL.code)).await })
                    });
                    join_all(callers).await
                });
                timed += started.elapsed();
                let results: Vec<ExecutionResult> = results
                    .into_iter()
                    .map(|joined| joined.unwrap_or_else(|error| panic!("a caller task failed: {error}")))
                    .collect();
                must_be("concurrent throughput", &CROWD_CELL, &results, SLOTS);
            }
            timed
        })
    });
    // One request carries a cell for every slot.
    group.bench_function("one_batch", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let batch = slots
                    .iter()
                    .map(|s| (s.clone(), ToolCall::python(CROWD_CELL.code)))
                    .collect();
                let started = Instant::now();
                let results = runtime.block_on(remote.execute_batch(batch));
                timed += started.elapsed();
                must_be("batched throughput", &CROWD_CELL, &results, SLOTS);
            }
            timed
        })
    });
    group.finish();
    runtime.block_on(remote.shutdown()).expect("shutdown");
}

criterion_group! {
    name = remote;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = cell, throughput
}
criterion_main!(remote);
