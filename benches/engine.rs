//! Engine benchmarks over the real runtime: four kinds of cell, acquire (alone, with its
//! release, and until a first cell's result; with the default profile and bare), fork of a slot
//! holding 10 MB, a trivial cell with rollback on, and one batch across 200 live slots.
//! `cargo bench --bench engine`; `rollbox bench` prints the same kinds of figure as a table.
//!
//! Every call's result is checked outside the clock (`rollbox::bench::check`): a cell that did
//! not give what its kind promises aborts the bench with the call's output.

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rollbox::bench::{
    CELL_KINDS, CROWD_CELL, CellKind, FIRST_CELL, FORK_CHILD, FORK_PARENT, acquire_crowd, check, check_all,
};
use rollbox::{Backend, ExecutionResult, Limits, SilentReporter, ToolCall, WasmBackend, WasmBackendConfig};

/// Live slots in the throughput bench.
const SLOTS: usize = 200;

fn setup() -> (tokio::runtime::Runtime, WasmBackend) {
    setup_with(WasmBackendConfig {
        limits: Limits::default(),
        ..WasmBackendConfig::from_env()
    })
}

fn setup_with(config: WasmBackendConfig) -> (tokio::runtime::Runtime, WasmBackend) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let backend = WasmBackend::new(config, &SilentReporter).expect("the wasm backend starts");
    (runtime, backend)
}

/// Times `acquire` alone, `iters` times; each slot is released outside the clock.
fn time_acquires(runtime: &tokio::runtime::Runtime, backend: &WasmBackend, iters: u64) -> Duration {
    let mut timed = Duration::ZERO;
    for _ in 0..iters {
        let started = Instant::now();
        let slot = runtime.block_on(backend.acquire("bench")).expect("acquire");
        timed += started.elapsed();
        runtime.block_on(backend.release(&slot, true)).expect("release");
    }
    timed
}

/// Aborts the bench unless `result` is what `kind` promises.
fn must_be(what: &str, kind: &CellKind, result: &ExecutionResult) {
    check(what, kind, 0, 1, result).unwrap_or_else(|error| panic!("{error}"));
}

/// A new slot with `kind`'s setup cell run in it (checked to print nothing and raise nothing).
fn acquire_set_up(runtime: &tokio::runtime::Runtime, backend: &WasmBackend, kind: &CellKind) -> rollbox::Slot {
    let slot = runtime.block_on(backend.acquire("bench")).expect("acquire");
    let setup = CellKind {
        code: kind.setup,
        expected: rollbox::bench::Expected::Silent,
        ..*kind
    };
    must_be(
        "cell setup",
        &setup,
        &runtime.block_on(backend.execute(&slot, ToolCall::python(kind.setup))),
    );
    slot
}

/// Times `iters` runs of `kind`'s cell in `slot`, each result checked outside the clock.
fn time_cells(
    runtime: &tokio::runtime::Runtime,
    backend: &WasmBackend,
    slot: &rollbox::Slot,
    kind: &CellKind,
    iters: u64,
) -> Duration {
    let mut timed = Duration::ZERO;
    for _ in 0..iters {
        let started = Instant::now();
        let result = runtime.block_on(backend.execute(slot, ToolCall::python(kind.code)));
        timed += started.elapsed();
        must_be(kind.label, kind, &result);
    }
    timed
}

/// Each cell kind through `Backend::execute` in one slot, caller's view (the `block_on` included).
fn cell(c: &mut Criterion) {
    let (runtime, backend) = setup();
    let mut group = c.benchmark_group("cell");
    for kind in &CELL_KINDS {
        let slot = acquire_set_up(&runtime, &backend, kind);
        group.bench_function(kind.id, |b| {
            b.iter_custom(|iters| time_cells(&runtime, &backend, &slot, kind, iters))
        });
        runtime.block_on(backend.release(&slot, true)).expect("release");
    }
    group.finish();
}

/// `acquire` alone; `acquire` with its `release` (what this bench timed before, under the
/// misleading name `acquire_until_first_cell_ready`); and `acquire` then a first cell until
/// its result. Releases outside a label are not timed.
fn acquire(c: &mut Criterion) {
    let (runtime, backend) = setup();
    let mut group = c.benchmark_group("acquire");
    group.bench_function("alone", |b| {
        b.iter_custom(|iters| time_acquires(&runtime, &backend, iters))
    });
    group.bench_function("and_release", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let slot = backend.acquire("bench").await.expect("acquire");
                backend.release(&slot, true).await.expect("release");
            })
        })
    });
    group.bench_function("to_first_result", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let (slot, result) = runtime.block_on(async {
                    let slot = backend.acquire("bench").await.expect("acquire");
                    let result = backend.execute(&slot, ToolCall::python(FIRST_CELL.code)).await;
                    (slot, result)
                });
                timed += started.elapsed();
                must_be("acquire to first result", &FIRST_CELL, &result);
                runtime.block_on(backend.release(&slot, true)).expect("release");
            }
            timed
        })
    });
    group.finish();
}

/// `acquire` alone of bare slots (`--preload none`): issue 12's "acquire, bare" row.
fn acquire_bare(c: &mut Criterion) {
    let (runtime, backend) = setup_with(WasmBackendConfig {
        default_profile: false,
        ..WasmBackendConfig::from_env()
    });
    let mut group = c.benchmark_group("acquire");
    group.bench_function("bare_alone", |b| {
        b.iter_custom(|iters| time_acquires(&runtime, &backend, iters))
    });
    group.finish();
}

/// `fork` of a slot that holds 10 MB of its own (`rollbox::bench::FORK_PARENT`), the call alone;
/// each fork's first cell checks it and it is released outside the clock.
fn fork(c: &mut Criterion) {
    let (runtime, backend) = setup();
    let parent = runtime.block_on(backend.acquire("bench-fork-parent")).expect("acquire");
    must_be(
        "fork parent",
        &FORK_PARENT,
        &runtime.block_on(backend.execute(&parent, ToolCall::python(FORK_PARENT.code))),
    );
    let mut group = c.benchmark_group("fork");
    group.bench_function("parent_holding_10_mb", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let started = Instant::now();
                let child = runtime.block_on(backend.fork(&parent, "bench-fork")).expect("fork");
                timed += started.elapsed();
                let seen = runtime.block_on(backend.execute(&child, ToolCall::python(FORK_CHILD.code)));
                must_be("fork child", &FORK_CHILD, &seen);
                runtime.block_on(backend.release(&child, true)).expect("release");
            }
            timed
        })
    });
    group.finish();
    runtime.block_on(backend.release(&parent, true)).expect("release");
}

/// The trivial cell (`x += 1`) in a slot with rollback on: what rollback readiness costs a cell
/// (compare `cell/statement`).
fn rollback(c: &mut Criterion) {
    let (runtime, backend) = setup_with(WasmBackendConfig {
        rollback: true,
        ..WasmBackendConfig::from_env()
    });
    let kind = &CELL_KINDS[0];
    let slot = acquire_set_up(&runtime, &backend, kind);
    let mut group = c.benchmark_group("rollback");
    group.bench_function(kind.id, |b| {
        b.iter_custom(|iters| time_cells(&runtime, &backend, &slot, kind, iters))
    });
    group.finish();
    runtime.block_on(backend.release(&slot, true)).expect("release");
}

/// One `execute_batch` of `y += 1` in each of 200 live slots.
fn throughput(c: &mut Criterion) {
    let (runtime, backend) = setup();
    let slots = runtime
        .block_on(acquire_crowd(&backend, SLOTS))
        .unwrap_or_else(|error| panic!("{error}"));
    let mut group = c.benchmark_group("throughput");
    group.throughput(Throughput::Elements(SLOTS as u64));
    group.bench_function("batch_of_200_slots", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let batch = slots
                    .iter()
                    .map(|s| (s.clone(), ToolCall::python(CROWD_CELL.code)))
                    .collect();
                let started = Instant::now();
                let results = runtime.block_on(backend.execute_batch(batch));
                timed += started.elapsed();
                check_all("batched throughput", &CROWD_CELL, &results, SLOTS).unwrap_or_else(|error| panic!("{error}"));
            }
            timed
        })
    });
    group.finish();
}

criterion_group! {
    name = engine;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = cell, acquire, acquire_bare, fork, rollback, throughput
}
criterion_main!(engine);
