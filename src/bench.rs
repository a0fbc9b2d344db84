//! Engine measurements behind `rollbox bench`: cell latency for four kinds of cell, acquire
//! latency (the call alone, and until a first cell's result), throughput across many live
//! slots, and memory per idle slot; and, for `rollbox bench --backend remote`, what a server
//! adds to a cell and the cells per second one server sustains. Returns numbers; printing is
//! the CLI's.
//!
//! Every call whose time is counted, and every setup call, is checked: a cell that did not give
//! the result its kind promises (a value, 1 KB of output, a `ValueError`, or nothing at all)
//! aborts the measurement with [`BenchError::UnexpectedResult`], so a failing slot can never
//! make a figure look better.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::slot::cell::cap_text;
use crate::slot::{Backend, BackendError, ErrorKind, ExecutionResult, Slot, ToolCall};

/// A benchmark could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The backend failed to acquire or release a slot.
    #[error("failed to run the benchmark")]
    Backend(#[from] BackendError),
    /// A call did not give the result the measurement relies on; nothing was measured.
    #[error("failed to measure {what}: call {index} of {calls} (`{code}`) {problem}; its output: {output:?}")]
    UnexpectedResult {
        /// The measurement.
        what: String,
        /// The call's 1-based position in its run.
        index: usize,
        /// Calls in the run.
        calls: usize,
        /// The cell's code.
        code: String,
        /// What was wrong with its result.
        problem: String,
        /// The start of the result's output, for people.
        output: String,
    },
}

/// How much of a failed call's output a [`BenchError`] quotes.
const ERROR_OUTPUT_BYTES: usize = 300;

/// What a benchmarked cell must give back, checked on every call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Success, no value, no output: a statement.
    Silent,
    /// Success with this final value (`text/plain`) and no printed output.
    Value(&'static str),
    /// Success with exactly this many bytes on stdout, and no value.
    Stdout(usize),
    /// A cell error: the cell raised this exception, and the slot kept its state.
    Raises(&'static str),
}

impl Expected {
    /// Why `result` is not what this expectation promises, or `None` when it is.
    pub fn problem(self, result: &ExecutionResult) -> Option<String> {
        let cell = result.cell.as_ref();
        let value = cell.and_then(|c| c.result.as_ref()).and_then(|r| r.get("text/plain"));
        let stdout = cell.map_or(0, |c| c.stdout.len());
        let raised = cell.and_then(|c| c.error.as_ref()).map(|e| e.name.as_str());
        let problem = match self {
            Expected::Raises(name) if result.error.as_ref().map(|e| e.kind) != Some(ErrorKind::CellError) => {
                format!("did not fail with a cell error raising {name}")
            }
            Expected::Raises(name) if raised != Some(name) => format!("raised {raised:?}, not {name}"),
            Expected::Raises(_) if result.metadata.state_lost => "lost the slot's state".to_owned(),
            Expected::Raises(_) => return None,
            _ if !result.success => "failed".to_owned(),
            _ if result.metadata.truncated => "had its output cut off".to_owned(),
            Expected::Silent if value.is_some() || stdout > 0 => format!("showed a value or printed {stdout} bytes"),
            Expected::Value(want) if value.map(String::as_str) != Some(want) || stdout > 0 => {
                format!("showed {value:?} and printed {stdout} bytes, not the value {want} alone")
            }
            Expected::Stdout(bytes) if stdout != bytes || value.is_some() => {
                format!("printed {stdout} bytes, not {bytes}")
            }
            _ => return None,
        };
        Some(problem)
    }
}

/// A cell whose latency is measured: run `setup` once in the slot, then `code` again and again.
#[derive(Clone, Copy, Debug)]
pub struct CellKind {
    /// A short name for bench ids (`x_plus_1`).
    pub id: &'static str,
    /// What the cell does, for the report.
    pub label: &'static str,
    /// Run once before the timed cells.
    pub setup: &'static str,
    /// The timed cell.
    pub code: &'static str,
    /// What each timed cell must give back.
    pub expected: Expected,
}

/// The cells `rollbox bench` times: the guest's fast path (a statement) first, then a cell that
/// shows a value, one that prints 1 KB, and one that raises.
pub const CELL_KINDS: [CellKind; 4] = [
    CellKind {
        id: "x_plus_1",
        label: "statement `x += 1`",
        setup: "x = 0",
        code: "x += 1",
        expected: Expected::Silent,
    },
    CellKind {
        id: "value_x",
        label: "value `x`",
        setup: "x = 12345",
        code: "x",
        expected: Expected::Value("12345"),
    },
    CellKind {
        id: "print_1kb",
        label: "print 1 KB",
        setup: "line = 'x' * 1023",
        code: "print(line)",
        expected: Expected::Stdout(1024),
    },
    CellKind {
        id: "raise_value_error",
        label: "raise `ValueError`",
        setup: "x = 0",
        code: "raise ValueError('bench')",
        expected: Expected::Raises("ValueError"),
    },
];

/// How much to measure.
#[derive(Clone, Debug)]
pub struct EngineBenchOptions {
    /// Timed cells of each [`CELL_KINDS`] kind, one by one in one slot.
    pub cells: usize,
    /// Slots acquired (and released) one by one, twice: timing the call alone, then until a
    /// first cell's result.
    pub acquires: usize,
    /// Live slots for the throughput and memory runs.
    pub slots: usize,
    /// Batches of one trivial cell per live slot.
    pub rounds: usize,
    /// Forks of one slot that holds [`FORK_PARENT_DATA_MB`] of its own data, timed one by
    /// one (each released before the next). Skipped when the backend cannot fork.
    pub forks: usize,
    /// Forks and releases after the timed ones, untimed, with the process's PSS before and
    /// after: whether a fork gives all its memory back.
    pub fork_churn: usize,
}

/// The data the forked slot holds of its own, in MB (on top of the interpreter's).
pub const FORK_PARENT_DATA_MB: usize = 10;

impl Default for EngineBenchOptions {
    fn default() -> Self {
        EngineBenchOptions {
            cells: 2_000,
            acquires: 200,
            slots: 200,
            rounds: 25,
            forks: 200,
            fork_churn: 2_000,
        }
    }
}

/// One cell kind's latency.
#[derive(Clone, Debug, Serialize)]
pub struct CellTiming {
    /// What the cell does.
    pub label: String,
    /// The cell's code.
    pub code: String,
    /// Timed cells.
    pub samples: usize,
    /// Through `Backend::execute`, caller's view: median, in µs.
    pub median_us: f64,
    /// The same, 90th percentile.
    pub p90_us: f64,
    /// The cell's in-slot time (`metadata.duration_us`): median, in µs.
    pub in_slot_median_us: f64,
}

/// What [`run_engine_bench`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct EngineBenchReport {
    /// One entry per [`CELL_KINDS`] kind, in that order.
    pub cells: Vec<CellTiming>,
    /// The `acquire` call alone, until it returns the slot: median, in ms. A backend may start
    /// the slot's interpreter only at its first call (`process` does), so this is not "ready".
    pub acquire_median_ms: f64,
    /// The same, 90th percentile.
    pub acquire_p90_ms: f64,
    /// `acquire` and then a first cell `x = 1` in the new slot, until that cell's result
    /// (interpreter start included whatever the backend): median, in ms.
    pub acquire_to_first_result_median_ms: f64,
    /// The same, 90th percentile.
    pub acquire_to_first_result_p90_ms: f64,
    /// Trivial cells (`y += 1`) per second across [`EngineBenchOptions::slots`] live slots, one
    /// `execute_batch` of one cell per slot at a time.
    pub throughput_cells_per_s: f64,
    /// Live slots during the throughput run.
    pub throughput_slots: usize,
    /// Batches in the throughput run.
    pub throughput_rounds: usize,
    /// Resident memory added per idle live slot (each has run one cell), in MB (Linux only).
    pub idle_slot_rss_mb: Option<f64>,
    /// Proportional memory (PSS: a page shared by n processes or mappings counts 1/n) added
    /// per idle live slot, in MB, from `/proc/self/smaps_rollup` (Linux only).
    pub idle_slot_pss_mb: Option<f64>,
    /// The whole process's PSS with the live slots up, in MB.
    pub live_slots_process_pss_mb: Option<f64>,
    /// Forks, when the backend can fork.
    pub fork: Option<ForkReport>,
    /// Calls whose result was checked: every timed and every setup call.
    pub calls_checked: usize,
    /// CPUs available to the process.
    pub cpus: usize,
}

/// Runs the measurements on `backend`.
pub async fn run_engine_bench(
    backend: Arc<dyn Backend>,
    options: &EngineBenchOptions,
) -> Result<EngineBenchReport, BenchError> {
    let mut checked = 0;
    let mut cells = Vec::with_capacity(CELL_KINDS.len());
    for kind in &CELL_KINDS {
        let mut times = time_cells(backend.as_ref(), kind, options.cells).await?;
        checked += options.cells + 1;
        cells.push(CellTiming {
            label: kind.label.to_owned(),
            code: kind.code.to_owned(),
            samples: options.cells,
            median_us: percentile(&mut times.caller_us, 0.5),
            p90_us: percentile(&mut times.caller_us, 0.9),
            in_slot_median_us: percentile(&mut times.in_slot_us, 0.5),
        });
    }
    let mut acquires = time_acquires(backend.as_ref(), options.acquires).await?;
    checked += options.acquires;

    let (rss_before, pss_before) = (resident_bytes(), proportional_bytes());
    let slots = acquire_crowd(backend.as_ref(), options.slots).await?;
    let (rss_after, pss_after) = (resident_bytes(), proportional_bytes());
    let throughput = batched_throughput(backend.as_ref(), &slots, options.rounds).await?;
    checked += options.slots * (1 + options.rounds);
    release_all(backend.as_ref(), &slots).await?;
    let per_slot = |before: Option<u64>, after: Option<u64>| {
        before
            .zip(after)
            .map(|(before, after)| after.saturating_sub(before) as f64 / options.slots.max(1) as f64 / 1e6)
    };
    let fork = run_fork_bench(backend.as_ref(), options.forks, options.fork_churn).await?;
    checked += fork.as_ref().map_or(0, |f| 2 + f.forks + f.churn);
    Ok(EngineBenchReport {
        cells,
        acquire_median_ms: percentile(&mut acquires.alone_ms, 0.5),
        acquire_p90_ms: percentile(&mut acquires.alone_ms, 0.9),
        acquire_to_first_result_median_ms: percentile(&mut acquires.to_first_result_ms, 0.5),
        acquire_to_first_result_p90_ms: percentile(&mut acquires.to_first_result_ms, 0.9),
        throughput_cells_per_s: throughput,
        throughput_slots: options.slots,
        throughput_rounds: options.rounds,
        idle_slot_rss_mb: per_slot(rss_before, rss_after),
        idle_slot_pss_mb: per_slot(pss_before, pss_after),
        live_slots_process_pss_mb: pss_after.map(|bytes| bytes as f64 / 1e6),
        fork,
        calls_checked: checked,
        cpus: cpus(),
    })
}

/// Acquire latencies, in ms.
struct AcquireTimes {
    /// The `acquire` call alone.
    alone_ms: Vec<f64>,
    /// `acquire` and a first cell, until its result.
    to_first_result_ms: Vec<f64>,
}

/// `count` pairs of acquires, interleaved so drift in the machine's speed hits both alike:
/// one timed until `acquire` returns, one until a first cell's result. Releases are not timed.
async fn time_acquires(backend: &dyn Backend, count: usize) -> Result<AcquireTimes, BenchError> {
    let first_cell = FIRST_CELL;
    let mut times = AcquireTimes {
        alone_ms: Vec::with_capacity(count),
        to_first_result_ms: Vec::with_capacity(count),
    };
    for i in 0..count {
        let started = Instant::now();
        let slot = backend.acquire(&format!("bench-acquire-{i}")).await?;
        times.alone_ms.push(millis(started.elapsed()));
        backend.release(&slot, true).await?;

        let started = Instant::now();
        let slot = backend.acquire(&format!("bench-acquire-first-{i}")).await?;
        let result = backend.execute(&slot, ToolCall::python(first_cell.code)).await;
        times.to_first_result_ms.push(millis(started.elapsed()));
        check("acquire to first result", &first_cell, i, count, &result)?;
        backend.release(&slot, true).await?;
    }
    Ok(times)
}

/// `kind`'s cell timed one at a time in one slot, in µs, each result checked.
struct CellTimes {
    /// Each call as its caller saw it.
    caller_us: Vec<f64>,
    /// Each call's time in its slot (`metadata.duration_us`).
    in_slot_us: Vec<f64>,
}

async fn time_cells(backend: &dyn Backend, kind: &CellKind, cells: usize) -> Result<CellTimes, BenchError> {
    let what = format!("the latency of {}", kind.label);
    let slot = backend.acquire("bench-cells").await?;
    let setup = CellKind {
        code: kind.setup,
        expected: Expected::Silent,
        ..*kind
    };
    check(
        &what,
        &setup,
        0,
        1,
        &backend.execute(&slot, ToolCall::python(kind.setup)).await,
    )?;
    let mut times = CellTimes {
        caller_us: Vec::with_capacity(cells),
        in_slot_us: Vec::with_capacity(cells),
    };
    for i in 0..cells {
        let started = Instant::now();
        let result = backend.execute(&slot, ToolCall::python(kind.code)).await;
        times.caller_us.push(micros(started.elapsed()));
        check(&what, kind, i, cells, &result)?;
        times.in_slot_us.push(result.metadata.duration_us as f64);
    }
    backend.release(&slot, true).await?;
    Ok(times)
}

/// An error unless `result`, call `index` (0-based) of `calls` running `kind`'s code, is what
/// `kind` promises. Public so the criterion benches check their calls the same way.
pub fn check(
    what: &str,
    kind: &CellKind,
    index: usize,
    calls: usize,
    result: &ExecutionResult,
) -> Result<(), BenchError> {
    match kind.expected.problem(result) {
        None => Ok(()),
        Some(problem) => Err(BenchError::UnexpectedResult {
            what: what.to_owned(),
            index: index + 1,
            calls,
            code: kind.code.to_owned(),
            problem,
            output: cap_text(&result.output, ERROR_OUTPUT_BYTES).0,
        }),
    }
}

/// Checks every result of one batch of `kind`'s cell, with `what` naming the measurement.
pub fn check_all(what: &str, kind: &CellKind, results: &[ExecutionResult], calls: usize) -> Result<(), BenchError> {
    if results.len() != calls {
        return Err(BenchError::UnexpectedResult {
            what: what.to_owned(),
            index: results.len(),
            calls,
            code: kind.code.to_owned(),
            problem: format!(
                "was the last: the batch of {calls} calls gave {} results",
                results.len()
            ),
            output: String::new(),
        });
    }
    for (i, result) in results.iter().enumerate() {
        check(what, kind, i, calls, result)?;
    }
    Ok(())
}

/// The first cell of a new slot in the acquire-to-first-result timing.
pub const FIRST_CELL: CellKind = CellKind {
    id: "first_cell",
    label: "first cell",
    setup: "",
    code: "x = 1",
    expected: Expected::Silent,
};

/// The setup cell of each slot in the throughput runs.
pub const CROWD_SETUP: CellKind = CellKind {
    id: "y_equals_0",
    label: "throughput setup",
    setup: "",
    code: "y = 0",
    expected: Expected::Silent,
};
/// The trivial cell of the throughput runs.
pub const CROWD_CELL: CellKind = CellKind {
    id: "y_plus_1",
    label: "throughput cell",
    setup: "y = 0",
    code: "y += 1",
    expected: Expected::Silent,
};

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
    /// Rounds in each throughput run.
    pub throughput_rounds: usize,
    /// Calls whose result was checked: every timed and every setup call.
    pub calls_checked: usize,
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
) -> Result<RemoteBenchReport, BenchError> {
    let statement = &CELL_KINDS[0];
    let mut local = time_cells(in_process, statement, options.cells).await?.caller_us;
    let mut through_server = time_cells(remote.as_ref(), statement, options.cells).await?.caller_us;
    let (in_process_median, remote_median) = (percentile(&mut local, 0.5), percentile(&mut through_server, 0.5));
    let slots = acquire_crowd(remote.as_ref(), options.slots).await?;
    let batched = batched_throughput(remote.as_ref(), &slots, options.rounds).await?;
    let concurrent = concurrent_throughput(&remote, &slots, options.rounds).await?;
    release_all(remote.as_ref(), &slots).await?;
    Ok(RemoteBenchReport {
        in_process_cell_median_us: in_process_median,
        remote_cell_median_us: remote_median,
        remote_cell_p90_us: percentile(&mut through_server, 0.9),
        added_median_us: remote_median - in_process_median,
        batched_cells_per_s: batched,
        concurrent_cells_per_s: concurrent,
        throughput_slots: options.slots,
        throughput_rounds: options.rounds,
        calls_checked: 2 * (options.cells + 1) + options.slots * (1 + 2 * options.rounds),
        cpus: cpus(),
    })
}

/// `count` new slots, each with `y = 0` run in it (checked): the crowd every throughput
/// measurement runs over, in `rollbox bench` and in the criterion benches.
pub async fn acquire_crowd(backend: &dyn Backend, count: usize) -> Result<Vec<Slot>, BenchError> {
    let mut slots = Vec::with_capacity(count);
    for i in 0..count {
        slots.push(backend.acquire(&format!("bench-crowd-{i}")).await?);
    }
    let results = backend
        .execute_batch(
            slots
                .iter()
                .map(|s| (s.clone(), ToolCall::python(CROWD_SETUP.code)))
                .collect(),
        )
        .await;
    check_all("the throughput run's setup", &CROWD_SETUP, &results, count)?;
    Ok(slots)
}

async fn release_all(backend: &dyn Backend, slots: &[Slot]) -> Result<(), BackendError> {
    for slot in slots {
        backend.release(slot, true).await?;
    }
    Ok(())
}

/// Cells per second over `slots`, one `execute_batch` with a trivial cell per slot at a time.
/// Every result is checked after the clock stops; one failed cell fails the measurement.
async fn batched_throughput(backend: &dyn Backend, slots: &[Slot], rounds: usize) -> Result<f64, BenchError> {
    let mut batches = Vec::with_capacity(rounds);
    let started = Instant::now();
    for _ in 0..rounds {
        let batch = slots
            .iter()
            .map(|s| (s.clone(), ToolCall::python(CROWD_CELL.code)))
            .collect();
        batches.push(backend.execute_batch(batch).await);
    }
    let elapsed = started.elapsed().as_secs_f64();
    for results in &batches {
        check_all("batched throughput", &CROWD_CELL, results, slots.len())?;
    }
    Ok((slots.len() * rounds) as f64 / elapsed)
}

/// Cells per second from one concurrent caller per slot, each running `rounds` trivial cells
/// one after another. Every result is checked; one failed cell fails the measurement.
async fn concurrent_throughput(backend: &Arc<dyn Backend>, slots: &[Slot], rounds: usize) -> Result<f64, BenchError> {
    let what = "concurrent throughput";
    let started = Instant::now();
    let callers: Vec<_> = slots
        .iter()
        .map(|slot| {
            let (backend, slot) = (backend.clone(), slot.clone());
            tokio::spawn(async move {
                let mut results = Vec::with_capacity(rounds);
                for _ in 0..rounds {
                    results.push(backend.execute(&slot, ToolCall::python(CROWD_CELL.code)).await);
                }
                results
            })
        })
        .collect();
    let mut per_caller = Vec::with_capacity(callers.len());
    for caller in callers {
        per_caller.push(caller.await);
    }
    let elapsed = started.elapsed().as_secs_f64();
    for results in per_caller {
        let results = results.map_err(|error| BenchError::UnexpectedResult {
            what: what.to_owned(),
            index: 1,
            calls: rounds,
            code: CROWD_CELL.code.to_owned(),
            problem: "never returned: its caller task ended abnormally".to_owned(),
            output: error.to_string(),
        })?;
        check_all(what, &CROWD_CELL, &results, rounds)?;
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

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// What [`run_fork_bench`] measured.
#[derive(Clone, Debug, Serialize)]
pub struct ForkReport {
    /// Timed forks.
    pub forks: usize,
    /// The parent's own data, in MB.
    pub parent_data_mb: usize,
    /// `fork` until it returns the new slot, median, in ms.
    pub median_ms: f64,
    /// The same, 90th percentile.
    pub p90_ms: f64,
    /// Untimed forks and releases after the timed ones.
    pub churn: usize,
    /// The process's PSS before the churn, in MB.
    pub churn_pss_before_mb: Option<f64>,
    /// And after it, every fork released.
    pub churn_pss_after_mb: Option<f64>,
}

/// The parent's data for the fork bench: [`FORK_PARENT_DATA_MB`] of bytes that are not zero.
pub const FORK_PARENT: CellKind = CellKind {
    id: "fork_parent",
    label: "fork parent",
    setup: "",
    code: "data = bytes(range(256)) * (10 * 4096)
len(data)",
    expected: Expected::Value("10485760"),
};
/// Maps the parent's pages before the churn is measured (see [`run_fork_bench`]).
const WARM_PARENT: CellKind = CellKind {
    id: "fork_parent_warm",
    label: "fork parent warm-up",
    setup: "",
    code: "import gc\ngc.collect()\nlen(data)",
    expected: Expected::Value("10485760"),
};
/// What each fork must see of its parent.
pub const FORK_CHILD: CellKind = CellKind {
    id: "fork_child",
    label: "fork child",
    setup: "",
    code: "len(data), data[-1]",
    expected: Expected::Value("(10485760, 255)"),
};

/// `forks` timed forks of a slot holding [`FORK_PARENT_DATA_MB`] of data, each checked (its
/// first cell sees the data) and released; then `churn` more, with the process's PSS around
/// them. `None` when the backend cannot fork.
pub async fn run_fork_bench(
    backend: &dyn Backend,
    forks: usize,
    churn: usize,
) -> Result<Option<ForkReport>, BenchError> {
    if forks + churn == 0 {
        return Ok(None);
    }
    let parent = backend.acquire("bench-fork-parent").await?;
    let filled = backend.execute(&parent, ToolCall::python(FORK_PARENT.code)).await;
    check("the fork bench's parent", &FORK_PARENT, 0, 1, &filled)?;
    let mut times = Vec::with_capacity(forks);
    let mut fork_once = async |index: usize, total: usize, timed: bool| -> Result<bool, BenchError> {
        let started = Instant::now();
        let child = match backend.fork(&parent, &format!("bench-fork-{index}")).await {
            Ok(child) => child,
            Err(BackendError::Unsupported { .. }) => return Ok(false),
            Err(error) => return Err(error.into()),
        };
        if timed {
            times.push(millis(started.elapsed()));
        }
        let seen = backend.execute(&child, ToolCall::python(FORK_CHILD.code)).await;
        check("a fork", &FORK_CHILD, index, total, &seen)?;
        backend.release(&child, true).await?;
        Ok(true)
    };
    for index in 0..forks {
        if !fork_once(index, forks, true).await? {
            backend.release(&parent, true).await?;
            return Ok(None);
        }
    }
    // A full collection in the parent first: it reads every object the interpreter tracks,
    // which maps those pages of the parent's image for good. Without it the parent's own
    // first full collection, whenever it comes during the churn, would count as growth.
    let warmed = backend.execute(&parent, ToolCall::python(WARM_PARENT.code)).await;
    check("the fork bench's parent", &WARM_PARENT, 0, 1, &warmed)?;
    let pss_before = proportional_bytes();
    for index in 0..churn {
        if !fork_once(index, churn, false).await? {
            backend.release(&parent, true).await?;
            return Ok(None);
        }
    }
    let pss_after = proportional_bytes();
    backend.release(&parent, true).await?;
    Ok(Some(ForkReport {
        forks,
        parent_data_mb: FORK_PARENT_DATA_MB,
        median_ms: percentile(&mut times, 0.5),
        p90_ms: percentile(&mut times, 0.9),
        churn,
        churn_pss_before_mb: pss_before.map(|b| b as f64 / 1e6),
        churn_pss_after_mb: pss_after.map(|b| b as f64 / 1e6),
    }))
}

/// This process's proportional set size (PSS), from `/proc/self/smaps_rollup` (Linux): a
/// page shared with other mappings or processes counts its share.
pub fn proportional_bytes() -> Option<u64> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let line = rollup.lines().find(|line| line.starts_with("Pss:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// This process's resident set size, from `/proc/self/statm` (Linux).
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096) // the page size on the x86_64 and aarch64 Linux this runs on
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slot::{CellError, CellOutput, ExecutionMetadata};

    fn cell(success: bool, stdout: &str, value: Option<&str>, raised: Option<&str>) -> ExecutionResult {
        let mut result = if success {
            ExecutionResult::ok(stdout, ExecutionMetadata::default())
        } else {
            ExecutionResult::failure(ErrorKind::CellError, "raised", ExecutionMetadata::default())
        };
        result.cell = Some(CellOutput {
            stdout: stdout.to_owned(),
            result: value.map(|v| [("text/plain".to_owned(), v.to_owned())].into()),
            error: raised.map(|name| CellError {
                name: name.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        });
        result
    }

    #[test]
    fn each_expectation_accepts_its_result_and_nothing_else() {
        let silent = cell(true, "", None, None);
        let value = cell(true, "", Some("12345"), None);
        let printed = cell(true, &"x".repeat(1024), None, None);
        let raised = cell(false, "", None, Some("ValueError"));
        let other_error = cell(false, "", None, Some("NameError"));
        let crashed = ExecutionResult::failure(ErrorKind::GuestCrashed, "gone", ExecutionMetadata::default());
        let cases = [
            (Expected::Silent, &silent),
            (Expected::Value("12345"), &value),
            (Expected::Stdout(1024), &printed),
            (Expected::Raises("ValueError"), &raised),
        ];
        for (expected, good) in cases {
            assert_eq!(expected.problem(good), None, "{expected:?}");
            for bad in [&silent, &value, &printed, &raised, &other_error, &crashed] {
                if !std::ptr::eq(bad, good) {
                    assert!(expected.problem(bad).is_some(), "{expected:?} accepted {bad:?}");
                }
            }
        }
    }

    #[test]
    fn a_short_batch_is_an_error() {
        let results = vec![cell(true, "", None, None)];
        assert!(check_all("test", &CROWD_CELL, &results, 1).is_ok());
        let error = check_all("test", &CROWD_CELL, &results, 2).expect_err("one result for two calls");
        assert!(error.to_string().contains("gave 1 results"), "{error}");
    }
}
