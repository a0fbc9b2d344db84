//! The remote backend over loopback: a trivial cell through one local `rollbox serve` (wasm)
//! against the same backend in-process, and one server's cells/s from 200 concurrent slots.
//! `cargo bench --bench remote`; `rollbox bench --backend remote` prints the same figures.

use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures_util::future::join_all;
use rollbox::remote::provision::{LocalProvisioner, LocalProvisionerConfig};
use rollbox::remote::{PoolConfig, RemoteBackend};
use rollbox::{Backend, Limits, SilentReporter, Slot, ToolCall, WasmBackend, WasmBackendConfig};

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

fn cell(c: &mut Criterion) {
    let runtime = runtime();
    let (local, remote) = (in_process(), remote_backend(&runtime));
    let mut group = c.benchmark_group("cell_x_plus_1");
    for (name, backend) in [
        ("in_process", &local as &dyn Backend),
        ("remote", &remote as &dyn Backend),
    ] {
        let slot = runtime.block_on(backend.acquire("bench")).expect("acquire");
        runtime.block_on(backend.execute(&slot, ToolCall::python("x = 0")));
        group.bench_function(name, |b| {
            b.iter(|| runtime.block_on(backend.execute(&slot, ToolCall::python("x += 1"))))
        });
    }
    group.finish();
    runtime.block_on(remote.shutdown()).expect("shutdown");
}

fn throughput(c: &mut Criterion) {
    let runtime = runtime();
    let remote = Arc::new(remote_backend(&runtime));
    let slots: Vec<Slot> = (0..SLOTS)
        .map(|i| {
            runtime
                .block_on(remote.acquire(&format!("crowd-{i}")))
                .expect("acquire")
        })
        .collect();
    runtime.block_on(remote.execute_batch(slots.iter().map(|s| (s.clone(), ToolCall::python("y = 0"))).collect()));
    let mut group = c.benchmark_group("one_server_200_slots");
    group.throughput(Throughput::Elements(SLOTS as u64));
    // Each slot's caller sends its own request, as independent agent loops do.
    group.bench_function("concurrent_callers", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let callers = slots.iter().map(|slot| {
                    let (remote, slot) = (remote.clone(), slot.clone());
                    tokio::spawn(async move { remote.execute(&slot, ToolCall::python("y += 1")).await })
                });
                join_all(callers).await
            })
        })
    });
    // One request carries a cell for every slot.
    group.bench_function("one_batch", |b| {
        b.iter(|| {
            runtime
                .block_on(remote.execute_batch(slots.iter().map(|s| (s.clone(), ToolCall::python("y += 1"))).collect()))
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
