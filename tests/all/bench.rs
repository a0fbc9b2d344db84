//! `rollbox bench`, run for real in a tiny configuration: its JSON must add up, and a bench
//! whose cells do not give their expected results must stop instead of reporting figures.

use std::process::Command;
use std::sync::Arc;

use rollbox::Limits;
use rollbox::bench::{BenchError, CELL_KINDS, EngineBenchOptions, run_engine_bench};
use serde_json::Value;

use crate::support::wasm_backend;

/// Runs `rollbox --quiet bench --json ARGS` and returns its report.
fn bench_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["--quiet", "bench", "--json"])
        .args(args)
        .output()
        .expect("run rollbox bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", String::from_utf8_lossy(&out.stdout)))
}

/// A positive number of this `field`.
#[track_caller]
fn positive(report: &Value, field: &str) -> f64 {
    let n = report[field]
        .as_f64()
        .unwrap_or_else(|| panic!("no number `{field}` in {report:#}"));
    assert!(n > 0.0, "`{field}` is {n}: {report:#}");
    n
}

/// The engine report's numbers agree with each other and with the options it was run with.
fn assert_engine_report_adds_up(
    report: &Value,
    backend: &str,
    cells: usize,
    acquires: usize,
    slots: usize,
    rounds: usize,
    forks: usize,
) {
    assert_eq!(report["backend"], backend, "{report:#}");
    let timings = report["cells"].as_array().expect("cells");
    let codes: Vec<&str> = timings.iter().filter_map(|c| c["code"].as_str()).collect();
    let expected: Vec<&str> = CELL_KINDS.iter().map(|k| k.code).collect();
    assert_eq!(codes, expected, "one timing per cell kind, in order");
    for timing in timings {
        assert_eq!(timing["samples"], cells, "{timing:#}");
        let median = positive(timing, "median_us");
        assert!(positive(timing, "p90_us") >= median, "{timing:#}");
        // Each call's in-slot time is part of the time its caller saw, so the medians keep
        // that order.
        assert!(positive(timing, "in_slot_median_us") <= median, "{timing:#}");
    }
    let acquire = positive(report, "acquire_median_ms");
    assert!(positive(report, "acquire_p90_ms") >= acquire);
    let first = positive(report, "acquire_to_first_result_median_ms");
    assert!(positive(report, "acquire_to_first_result_p90_ms") >= first);
    positive(report, "throughput_cells_per_s");
    assert_eq!(report["throughput_slots"], slots);
    assert_eq!(report["throughput_rounds"], rounds);
    // Every timed and setup call: each kind's setup and cells, one first cell per acquire,
    // and each crowd slot's setup and rounds.
    // With a fork report: the parent's setup and warm-up, each timed fork's check and each
    // churn fork's.
    let fork_calls = match report["fork"].as_object() {
        Some(fork) => {
            assert_eq!(fork["forks"], forks, "{report:#}");
            let median = positive(&report["fork"], "median_ms");
            assert!(positive(&report["fork"], "p90_ms") >= median, "{report:#}");
            2 + forks + fork["churn"].as_u64().expect("churn") as usize
        }
        None => 0,
    };
    let calls = CELL_KINDS.len() * (1 + cells) + acquires + slots * (1 + rounds) + fork_calls;
    assert_eq!(report["calls_checked"], calls, "{report:#}");
    positive(report, "process_start_to_first_result_median_ms");
    assert_eq!(report["process_starts"], 1);
    assert!(report["cpus"].as_u64().is_some_and(|n| n >= 1));
}

#[test]
fn bench_reports_consistent_json_for_the_wasm_backend() {
    let report = bench_json(&[
        "--cells",
        "20",
        "--acquires",
        "3",
        "--slots",
        "4",
        "--rounds",
        "2",
        "--starts",
        "1",
        "--forks",
        "2",
        "--fork-churn",
        "3",
    ]);
    assert_engine_report_adds_up(&report, "wasm", 20, 3, 4, 2, 2);
    assert!(
        report["idle_slot_rss_mb"].as_f64().is_some() && report["idle_slot_pss_mb"].as_f64().is_some(),
        "measured on Linux: {report:#}"
    );
    assert_eq!(report["fork"]["churn"], 3, "the wasm backend forks: {report:#}");
}

#[test]
fn bench_reports_consistent_json_for_the_process_backend() {
    let report = bench_json(&[
        "--backend",
        "process",
        "--cells",
        "10",
        "--acquires",
        "2",
        "--slots",
        "3",
        "--rounds",
        "2",
        "--starts",
        "1",
        "--forks",
        "2",
        "--fork-churn",
        "0",
    ]);
    assert_engine_report_adds_up(&report, "process", 10, 2, 3, 2, 2);
    assert!(report["fork"].is_null(), "the process backend cannot fork: {report:#}");
    assert!(
        report["idle_slot_rss_mb"].is_null(),
        "child processes are not in this process's RSS: {report:#}"
    );
}

#[test]
fn bench_reports_consistent_json_for_the_remote_backend() {
    let (cells, slots, rounds) = (10, 3, 2);
    let report = bench_json(&["--backend", "remote", "--cells", "10", "--slots", "3", "--rounds", "2"]);
    let local = positive(&report, "in_process_cell_median_us");
    let remote = positive(&report, "remote_cell_median_us");
    assert!(positive(&report, "remote_cell_p90_us") >= remote);
    let added = report["added_median_us"].as_f64().expect("added_median_us");
    assert!((added - (remote - local)).abs() < 1e-6, "{report:#}");
    positive(&report, "batched_cells_per_s");
    positive(&report, "concurrent_cells_per_s");
    assert_eq!(report["throughput_slots"], slots);
    assert_eq!(report["throughput_rounds"], rounds);
    // The latency cells and their setup in each backend, then each slot's setup, a batched
    // round and a concurrent round.
    assert_eq!(
        report["calls_checked"],
        2 * (cells + 1) + slots * (1 + 2 * rounds),
        "{report:#}"
    );
}

/// With an output limit under 1 KB the print cell cannot give its 1,024 bytes: the bench stops
/// with that cell's call and code, instead of timing cut-off output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bench_stops_at_the_first_cell_without_its_expected_result() {
    let backend = Arc::new(wasm_backend(Limits {
        output_bytes: 512,
        ..Limits::default()
    }));
    let options = EngineBenchOptions {
        cells: 5,
        acquires: 1,
        slots: 2,
        rounds: 1,
        forks: 0,
        fork_churn: 0,
    };
    let error = run_engine_bench(backend, &options)
        .await
        .expect_err("the print cell is cut");
    assert!(
        matches!(&error, BenchError::UnexpectedResult { index: 1, calls: 5, code, .. } if code == "print(line)"),
        "{error:?}"
    );
    assert!(error.to_string().contains("cut off"), "{error}");
}
