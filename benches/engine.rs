//! Engine benchmarks over the real runtime: one cell, one acquire, one batch across 200 live
//! slots. `cargo bench --bench engine`; `rollbox bench` prints the same numbers as a table.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rollbox::{Backend, Limits, SilentReporter, ToolCall, WasmBackend, WasmBackendConfig};

fn setup() -> (tokio::runtime::Runtime, WasmBackend) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let config = WasmBackendConfig {
        limits: Limits::default(),
        ..WasmBackendConfig::from_env()
    };
    let backend = WasmBackend::new(config, &SilentReporter).expect("the wasm backend starts");
    (runtime, backend)
}

fn cell(c: &mut Criterion) {
    let (runtime, backend) = setup();
    let slot = runtime.block_on(backend.acquire("bench")).expect("acquire");
    runtime.block_on(backend.execute(&slot, ToolCall::python("x = 0")));
    c.bench_function("cell_x_plus_1", |b| {
        b.iter(|| runtime.block_on(backend.execute(&slot, ToolCall::python("x += 1"))))
    });
}

fn acquire(c: &mut Criterion) {
    let (runtime, backend) = setup();
    c.bench_function("acquire_until_first_cell_ready", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let slot = backend.acquire("bench").await.expect("acquire");
                backend.release(&slot, true).await.expect("release");
            })
        })
    });
}

fn throughput(c: &mut Criterion) {
    let (runtime, backend) = setup();
    let slots: Vec<_> = (0..200)
        .map(|i| {
            runtime
                .block_on(backend.acquire(&format!("crowd-{i}")))
                .expect("acquire")
        })
        .collect();
    runtime.block_on(backend.execute_batch(slots.iter().map(|s| (s.clone(), ToolCall::python("y = 0"))).collect()));
    let mut group = c.benchmark_group("throughput");
    group.throughput(Throughput::Elements(slots.len() as u64));
    group.bench_function("batch_of_200_slots", |b| {
        b.iter(|| {
            runtime.block_on(
                backend.execute_batch(slots.iter().map(|s| (s.clone(), ToolCall::python("y += 1"))).collect()),
            )
        })
    });
    group.finish();
}

criterion_group! {
    name = engine;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = cell, acquire, throughput
}
criterion_main!(engine);
