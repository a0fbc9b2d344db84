//! Engine measurements behind `rollbox bench`: cell latency, acquire latency, throughput
//! across many live slots, and memory per idle slot. Returns numbers; printing is the CLI's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::slot::{Backend, ToolCall};

/// How much to measure.
#[derive(Clone, Debug)]
pub struct EngineBenchOptions {
    /// Cells of `x += 1` timed one by one in one slot.
    pub cells: usize,
    /// Slots acquired (and released) one by one.
    pub acquires: usize,
    /// Live slots for the throughput and memory runs.
    pub slots: usize,
    /// Batches of one trivial cell per live slot.
    pub rounds: usize,
}

impl Default for EngineBenchOptions {
    fn default() -> Self {
        EngineBenchOptions { cells: 2_000, acquires: 200, slots: 200, rounds: 25 }
    }
}

/// What [`run_engine_bench`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct EngineBenchReport {
    /// `x += 1` through `Backend::execute`, caller's view: median, in µs.
    pub cell_median_us: f64,
    /// The same, 90th percentile.
    pub cell_p90_us: f64,
    /// The same cell's in-slot time (`metadata.duration_us`): median, in µs.
    pub cell_in_slot_median_us: f64,
    /// `acquire` until the slot's first cell can run: median, in ms.
    pub acquire_median_ms: f64,
    /// The same, 90th percentile.
    pub acquire_p90_ms: f64,
    /// Trivial cells per second across [`EngineBenchOptions::slots`] live slots, one
    /// `execute_batch` of one cell per slot at a time.
    pub throughput_cells_per_s: f64,
    /// Live slots during the throughput run.
    pub throughput_slots: usize,
    /// Resident memory added per idle live slot, in MB (Linux only).
    pub idle_slot_rss_mb: Option<f64>,
    /// CPUs available to the process.
    pub cpus: usize,
}

/// Runs the measurements on `backend`.
pub async fn run_engine_bench(backend: Arc<dyn Backend>, options: &EngineBenchOptions) -> Result<EngineBenchReport, crate::BackendError> {
    let slot = backend.acquire("bench-cells").await?;
    backend.execute(&slot, ToolCall::python("x = 0")).await;
    let mut caller_us = Vec::with_capacity(options.cells);
    let mut in_slot_us = Vec::with_capacity(options.cells);
    for _ in 0..options.cells {
        let started = Instant::now();
        let result = backend.execute(&slot, ToolCall::python("x += 1")).await;
        caller_us.push(micros(started.elapsed()));
        in_slot_us.push(result.metadata.duration_us as f64);
    }
    backend.release(&slot, true).await?;

    let mut acquire_ms = Vec::with_capacity(options.acquires);
    for i in 0..options.acquires {
        let started = Instant::now();
        let slot = backend.acquire(&format!("bench-acquire-{i}")).await?;
        acquire_ms.push(micros(started.elapsed()) / 1000.0);
        backend.release(&slot, true).await?;
    }

    let rss_before = resident_bytes();
    let mut slots = Vec::with_capacity(options.slots);
    for i in 0..options.slots {
        slots.push(backend.acquire(&format!("bench-crowd-{i}")).await?);
    }
    let warm: Vec<_> = slots.iter().map(|s| (s.clone(), ToolCall::python("y = 0"))).collect();
    backend.execute_batch(warm).await;
    let rss_after = resident_bytes();
    let started = Instant::now();
    for _ in 0..options.rounds {
        let batch: Vec<_> = slots.iter().map(|s| (s.clone(), ToolCall::python("y += 1"))).collect();
        backend.execute_batch(batch).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    for slot in &slots {
        backend.release(slot, true).await?;
    }
    Ok(EngineBenchReport {
        cell_median_us: percentile(&mut caller_us, 0.5),
        cell_p90_us: percentile(&mut caller_us, 0.9),
        cell_in_slot_median_us: percentile(&mut in_slot_us, 0.5),
        acquire_median_ms: percentile(&mut acquire_ms, 0.5),
        acquire_p90_ms: percentile(&mut acquire_ms, 0.9),
        throughput_cells_per_s: (options.slots * options.rounds) as f64 / elapsed,
        throughput_slots: options.slots,
        idle_slot_rss_mb: rss_before
            .zip(rss_after)
            .map(|(before, after)| after.saturating_sub(before) as f64 / options.slots.max(1) as f64 / 1e6),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}

/// The `q` quantile of `samples` (sorted in place); 0 when empty.
pub fn percentile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let index = ((samples.len() - 1) as f64 * q).round() as usize;
    samples[index]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// This process's resident set size, from `/proc/self/statm` (Linux).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096) // the page size on the x86_64 and aarch64 Linux this runs on
}
