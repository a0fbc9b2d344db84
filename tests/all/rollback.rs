//! Interrupt first, then rollback: a cell past its time limit gets a `KeyboardInterrupt` and
//! the slot keeps its state; a cell the host has to stop anyway (a trap) leaves the slot as it
//! was before that cell when rollback is on (`WasmBackendConfig::rollback`), and loses it
//! otherwise, as the result says. All over the real runtime.

use std::sync::OnceLock;
use std::time::Duration;

use rollbox::{Backend, LimitKind, Limits, SilentReporter, ToolCall, WasmBackend, WasmBackendConfig};

use crate::conformance;
use crate::support::{ok, pretty, shared_wasm, value};

/// A backend whose slots roll back.
fn rollback_wasm() -> &'static WasmBackend {
    static BACKEND: OnceLock<WasmBackend> = OnceLock::new();
    BACKEND.get_or_init(|| {
        WasmBackend::new(
            WasmBackendConfig {
                rollback: true,
                ..WasmBackendConfig::from_env()
            },
            &SilentReporter,
        )
        .unwrap_or_else(|e| panic!("failed to start the wasm backend: {e:?}"))
    })
}

fn python(code: &str, timeout_ms: u64) -> ToolCall {
    ToolCall::python(code).with_timeout(Duration::from_millis(timeout_ms))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_and_sleeping_cells_past_their_time_limit_are_interrupted_and_keep_the_state() {
    conformance::a_cell_past_its_time_limit_is_interrupted_and_keeps_the_state(shared_wasm()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_that_catches_the_interrupt_and_finishes_is_still_past_its_limit() {
    let backend = shared_wasm();
    let slot = backend.acquire("caught").await.unwrap();
    let r = backend
        .execute(
            &slot,
            python(
                "try:\n    while True: pass\nexcept KeyboardInterrupt:\n    print('caught')\nx = 5",
                300,
            ),
        )
        .await;
    assert!(
        !r.success && r.metadata.interrupted && !r.metadata.state_lost,
        "{}",
        pretty(&r)
    );
    assert_eq!(r.metadata.limit_hit, Some(LimitKind::Time));
    assert!(r.output.starts_with("caught\n"), "{}", r.output);
    assert_eq!(value(&ok(backend.execute(&slot, ToolCall::python("x")).await)), "5");
    backend.release(&slot, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rollback_a_cell_that_will_not_stop_loses_the_state_and_says_why() {
    let backend = shared_wasm();
    let slot = backend.acquire("no-rollback").await.unwrap();
    ok(backend.execute(&slot, ToolCall::python("kept = 1")).await);
    let r = backend
        .execute(
            &slot,
            python(
                "try:\n    while True: pass\nexcept BaseException:\n    while True: pass",
                300,
            ),
        )
        .await;
    assert_eq!(r.metadata.limit_hit, Some(LimitKind::Time), "{}", pretty(&r));
    assert!(
        r.metadata.interrupted && r.metadata.state_lost && !r.metadata.rolled_back,
        "{}",
        pretty(&r)
    );
    assert!(
        r.output.contains("did not stop within") && r.output.contains("restarted"),
        "{}",
        r.output
    );
    assert_eq!(
        value(&ok(backend
            .execute(&slot, ToolCall::python("'kept' in globals()"))
            .await)),
        "False"
    );
    backend.release(&slot, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wasm_rolls_back_after_each_way_a_cell_is_stopped() {
    conformance::a_stopped_cell_rolls_the_slot_back(rollback_wasm()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fuel_limit_rolls_back_too() {
    let backend = WasmBackend::new(
        WasmBackendConfig {
            rollback: true,
            limits: Limits {
                fuel: Some(50_000_000),
                ..Limits::default()
            },
            ..WasmBackendConfig::from_env()
        },
        &SilentReporter,
    )
    .expect("the backend starts");
    let slot = backend.acquire("fuel-rollback").await.unwrap();
    ok(backend.execute(&slot, ToolCall::python("n = 7")).await);
    let r = backend
        .execute(&slot, ToolCall::python("while True:\n    n += 1"))
        .await;
    assert_eq!(r.metadata.limit_hit, Some(LimitKind::Fuel), "{}", pretty(&r));
    assert!(r.metadata.rolled_back && !r.metadata.state_lost, "{}", pretty(&r));
    assert_eq!(value(&ok(backend.execute(&slot, ToolCall::python("n")).await)), "7");
    backend.release(&slot, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_rolls_back_again_and_again_and_its_forks_roll_back_on_their_own() {
    let backend = rollback_wasm();
    let slot = backend.acquire("again").await.unwrap();
    ok(backend
        .execute(
            &slot,
            ToolCall::python("import numpy as np\na = np.arange(100_000)\nsteps = []"),
        )
        .await);
    for step in 0..5 {
        ok(backend
            .execute(&slot, ToolCall::python(format!("steps.append({step})\na += 1")))
            .await);
        let r = backend
            .execute(
                &slot,
                ToolCall::python("a[:] = -1\nsteps.clear()\nimport os; os.abort()"),
            )
            .await;
        assert!(r.metadata.rolled_back, "rollback {step}: {}", pretty(&r));
    }
    let fork = backend
        .fork(&slot, "again-fork")
        .await
        .expect("a rolled-back slot forks");
    let crash = backend
        .execute(&fork, ToolCall::python("steps.append('fork')\nimport os; os.abort()"))
        .await;
    assert!(crash.metadata.rolled_back, "{}", pretty(&crash));
    ok(backend.execute(&fork, ToolCall::python("steps.append('fork')")).await);
    let state = "(steps, int(a.sum()), int(a[0]))";
    assert_eq!(
        value(&ok(backend.execute(&slot, ToolCall::python(state)).await)),
        "([0, 1, 2, 3, 4], 5000450000, 5)",
        "each rollback undid only its own cell"
    );
    assert_eq!(
        value(&ok(backend.execute(&fork, ToolCall::python(state)).await)),
        "([0, 1, 2, 3, 4, 'fork'], 5000450000, 5)"
    );
    backend.release(&fork, true).await.unwrap();
    backend.release(&slot, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_holding_files_open_is_not_rolled_back_and_says_why() {
    let backend = rollback_wasm();
    let slot = backend.acquire("open-files").await.unwrap();
    ok(backend
        .execute(&slot, ToolCall::python("kept = 1\nf = open('held.txt', 'w')"))
        .await);
    let r = backend.execute(&slot, ToolCall::python("import os; os.abort()")).await;
    assert!(r.metadata.state_lost && !r.metadata.rolled_back, "{}", pretty(&r));
    assert!(
        r.output.contains("files open before the cell"),
        "the result says why: {}",
        r.output
    );
    backend.release(&slot, true).await.unwrap();
}
