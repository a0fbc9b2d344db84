//! Engine measurements behind `rollbox bench`: cell latency, acquire latency, throughput
//! across many live slots, and memory per idle slot; and, for `rollbox bench --backend remote`,
//! what a server adds to a cell and the cells per second one server sustains. Returns numbers;
//! printing is the CLI's.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use rollbox::{Backend, BackendError, Slot, ToolCall};

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
        EngineBenchOptions {
            cells: 2_000,
            acquires: 200,
            slots: 200,
            rounds: 25,
        }
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
pub async fn run_engine_bench(
    backend: Arc<dyn Backend>,
    options: &EngineBenchOptions,
) -> Result<EngineBenchReport, BackendError> {
    let CellTimes {
        mut caller_us,
        mut in_slot_us,
    } = time_cells(backend.as_ref(), options.cells).await?;

    let mut acquire_ms = Vec::with_capacity(options.acquires);
    for i in 0..options.acquires {
        let started = Instant::now();
        let slot = backend.acquire(&format!("bench-acquire-{i}")).await?;
        acquire_ms.push(micros(started.elapsed()) / 1000.0);
        backend.release(&slot, true).await?;
    }

    let rss_before = resident_bytes();
    let slots = acquire_crowd(backend.as_ref(), options.slots).await?;
    let rss_after = resident_bytes();
    let throughput = batched_throughput(backend.as_ref(), &slots, options.rounds).await;
    release_all(backend.as_ref(), &slots).await?;
    Ok(EngineBenchReport {
        cell_median_us: percentile(&mut caller_us, 0.5),
        cell_p90_us: percentile(&mut caller_us, 0.9),
        cell_in_slot_median_us: percentile(&mut in_slot_us, 0.5),
        acquire_median_ms: percentile(&mut acquire_ms, 0.5),
        acquire_p90_ms: percentile(&mut acquire_ms, 0.9),
        throughput_cells_per_s: throughput,
        throughput_slots: options.slots,
        idle_slot_rss_mb: rss_before
            .zip(rss_after)
            .map(|(before, after)| after.saturating_sub(before) as f64 / options.slots.max(1) as f64 / 1e6),
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}

/// `x += 1` timed one cell at a time in one slot, in µs.
struct CellTimes {
    /// Each call as its caller saw it.
    caller_us: Vec<f64>,
    /// Each call's time in its slot (`metadata.duration_us`).
    in_slot_us: Vec<f64>,
}

async fn time_cells(backend: &dyn Backend, cells: usize) -> Result<CellTimes, BackendError> {
    let slot = backend.acquire("bench-cells").await?;
    backend.execute(&slot, ToolCall::python("x = 0")).await;
    let mut times = CellTimes {
        caller_us: Vec::with_capacity(cells),
        in_slot_us: Vec::with_capacity(cells),
    };
    for _ in 0..cells {
        let started = Instant::now();
        let result = backend.execute(&slot, ToolCall::python("x += 1")).await;
        times.caller_us.push(micros(started.elapsed()));
        times.in_slot_us.push(result.metadata.duration_us as f64);
    }
    backend.release(&slot, true).await?;
    Ok(times)
}

/// How much [`run_remote_bench`] measures.
#[derive(Clone, Debug)]
pub struct RemoteBenchOptions {
    /// Cells of `x += 1` timed one by one, in each backend.
    pub cells: usize,
    /// Slots on the one server for the throughput runs, and as many concurrent callers.
    pub slots: usize,
    /// Rounds of one cell per slot: batches in the first run, cells per caller in the second.
    pub rounds: usize,
}

impl Default for RemoteBenchOptions {
    fn default() -> Self {
        RemoteBenchOptions {
            cells: 2_000,
            slots: 200,
            rounds: 25,
        }
    }
}

/// What [`run_remote_bench`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct RemoteBenchReport {
    /// `x += 1` in the in-process backend, caller's view: median, in µs.
    pub in_process_cell_median_us: f64,
    /// The same cell through the remote backend: median, in µs.
    pub remote_cell_median_us: f64,
    /// The same, 90th percentile.
    pub remote_cell_p90_us: f64,
    /// What the remote path adds at the median, in µs.
    pub added_median_us: f64,
    /// Trivial cells per second through the remote backend across
    /// [`RemoteBenchOptions::slots`] slots, one `execute_batch` of a cell per slot at a time
    /// (one request per round).
    pub batched_cells_per_s: f64,
    /// Trivial cells per second from as many concurrent callers, each with its own slot and
    /// running its cells one after another (one request per cell).
    pub concurrent_cells_per_s: f64,
    /// Slots (and callers) in the throughput runs.
    pub throughput_slots: usize,
    /// CPUs available to this process (the server shares them when it is local).
    pub cpus: usize,
}

/// Times a trivial cell in `in_process` and in `remote` (the same kind of backend behind a
/// server), then the cells per second `remote` sustains over many slots: batched (one request
/// per round), and from one concurrent caller per slot running its cells one after another,
/// as independent agent loops do.
pub async fn run_remote_bench(
    in_process: &dyn Backend,
    remote: Arc<dyn Backend>,
    options: &RemoteBenchOptions,
) -> Result<RemoteBenchReport, BackendError> {
    let mut local = time_cells(in_process, options.cells).await?.caller_us;
    let mut through_server = time_cells(remote.as_ref(), options.cells).await?.caller_us;
    let (in_process_median, remote_median) = (percentile(&mut local, 0.5), percentile(&mut through_server, 0.5));
    let slots = acquire_crowd(remote.as_ref(), options.slots).await?;
    let batched = batched_throughput(remote.as_ref(), &slots, options.rounds).await;
    let concurrent = concurrent_throughput(&remote, &slots, options.rounds).await;
    release_all(remote.as_ref(), &slots).await?;
    Ok(RemoteBenchReport {
        in_process_cell_median_us: in_process_median,
        remote_cell_median_us: remote_median,
        remote_cell_p90_us: percentile(&mut through_server, 0.9),
        added_median_us: remote_median - in_process_median,
        batched_cells_per_s: batched,
        concurrent_cells_per_s: concurrent?,
        throughput_slots: options.slots,
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}

/// `count` new slots, each with `y = 0` run in it.
async fn acquire_crowd(backend: &dyn Backend, count: usize) -> Result<Vec<Slot>, BackendError> {
    let mut slots = Vec::with_capacity(count);
    for i in 0..count {
        slots.push(backend.acquire(&format!("bench-crowd-{i}")).await?);
    }
    backend
        .execute_batch(slots.iter().map(|s| (s.clone(), ToolCall::python("y = 0"))).collect())
        .await;
    Ok(slots)
}

async fn release_all(backend: &dyn Backend, slots: &[Slot]) -> Result<(), BackendError> {
    for slot in slots {
        backend.release(slot, true).await?;
    }
    Ok(())
}

/// Cells per second over `slots`, one `execute_batch` with a trivial cell per slot at a time.
async fn batched_throughput(backend: &dyn Backend, slots: &[Slot], rounds: usize) -> f64 {
    let started = Instant::now();
    for _ in 0..rounds {
        backend
            .execute_batch(slots.iter().map(|s| (s.clone(), ToolCall::python("y += 1"))).collect())
            .await;
    }
    (slots.len() * rounds) as f64 / started.elapsed().as_secs_f64()
}

/// Cells per second from one concurrent caller per slot, each running `rounds` trivial cells
/// one after another. A failed cell fails the measurement.
async fn concurrent_throughput(backend: &Arc<dyn Backend>, slots: &[Slot], rounds: usize) -> Result<f64, BackendError> {
    let started = Instant::now();
    let callers: Vec<_> = slots
        .iter()
        .map(|slot| {
            let (backend, slot) = (backend.clone(), slot.clone());
            tokio::spawn(async move {
                let mut failures = 0usize;
                for _ in 0..rounds {
                    failures += usize::from(!backend.execute(&slot, ToolCall::python("y += 1")).await.success);
                }
                failures
            })
        })
        .collect();
    let mut failures = 0;
    for caller in callers {
        failures += caller.await.unwrap_or(rounds);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if failures > 0 {
        return Err(BackendError::Remote {
            what: format!(
                "{failures} of {} cells failed during the throughput run",
                slots.len() * rounds
            ),
            source: None,
        });
    }
    Ok((slots.len() * rounds) as f64 / elapsed)
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
