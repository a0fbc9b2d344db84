//! Replaying one seeded trajectory (`rollbox rollout --replay FILE --id T`): its recorded tool
//! calls run again, in order, in a fresh slot with the seed the trajectory's slot had, and the
//! first result that differs from the recorded one is reported.
//!
//! What is compared is a call's result without its timing and slot numbering
//! ([`strip_timing`]): the same fields a seeded rerun must repeat byte for byte.
//!
//! A trajectory whose problem had a `setup_code` replays that cell first. A branched trajectory
//! (one with a `branch`, see [`crate::rollout::branching`]) replays as it ran: its group's
//! prefix in a slot seeded as the prefix slot was, then that slot forked `fork_index + 1`
//! times (each fork's seed comes from the parent's seed and the fork's number, so the last one
//! is this trajectory's), then its own calls in that fork. That needs a backend that can fork.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::rollout::agent::{StepCall, Trajectory};
use crate::slot::{Backend, BackendError, Slot};

/// The fields of a `trajectories.jsonl` line that measure time or depend on scheduling, and so
/// differ between two runs of the same seed: per trajectory, per step, and per call result.
const TRAJECTORY_TIMING: [&str; 4] = ["model_ms", "tool_ms", "reward_ms", "wall_ms"];
const STEP_TIMING: [&str; 3] = ["model_ms", "tool_ms", "overhead_ms"];
/// A call's duration, and its slot's number (slots are numbered in the order they are acquired,
/// which concurrency decides).
const RESULT_METADATA_TIMING: [&str; 2] = ["duration_us", "slot_id"];

/// Removes the timing and scheduling fields from one `trajectories.jsonl` line (or one call
/// result, which holds `metadata`), in place: what is left repeats byte for byte in a seeded
/// rerun on the wasm backend (docs/reproducibility.md).
pub fn strip_timing(line: &mut Value) {
    let Some(object) = line.as_object_mut() else {
        return;
    };
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        RESULT_METADATA_TIMING.iter().for_each(|k| drop(metadata.remove(*k)));
    }
    TRAJECTORY_TIMING.iter().for_each(|k| drop(object.remove(*k)));
    for step in object
        .get_mut("steps")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        let Some(step) = step.as_object_mut() else { continue };
        STEP_TIMING.iter().for_each(|k| drop(step.remove(*k)));
        for call in step
            .get_mut("calls")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(result) = call.get_mut("result") {
                strip_timing(result);
            }
        }
    }
}

/// What a replay found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReplayReport {
    /// The trajectory replayed.
    pub trajectory_id: String,
    /// The seed its fresh slot had (the recorded slot seed).
    pub slot_seed: u64,
    /// Calls run again and compared, the divergent one included.
    pub calls_compared: usize,
    /// The first call whose result differed, if any.
    pub divergence: Option<Divergence>,
}

/// The first call whose replayed result differs from the recorded one.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Divergence {
    /// The 0-based assistant turn.
    pub turn: usize,
    /// The 0-based call within the turn.
    pub call: usize,
    /// Whether it was the problem's setup cell (then `turn` and `call` are 0).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub in_setup: bool,
    /// The tool.
    pub tool: String,
    /// The recorded result, without timing.
    pub recorded: Value,
    /// The replayed result, without timing.
    pub replayed: Value,
}

/// Replaying failed before any call could be compared.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The trajectories file could not be read.
    #[error("failed to read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No line of the file has that trajectory id.
    #[error("failed to find trajectory `{id}` in {path}: no line has that trajectory_id")]
    NotFound {
        /// The id asked for.
        id: String,
        /// The file.
        path: PathBuf,
    },
    /// The trajectory's line is not a trajectory record.
    #[error("failed to read trajectory `{id}` in {path} (line {line})")]
    Parse {
        /// The id.
        id: String,
        /// The file.
        path: PathBuf,
        /// The 1-based line.
        line: usize,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The trajectory ran without a seed, so a rerun cannot be expected to repeat it.
    #[error("failed to replay trajectory `{0}`: it was not seeded; rerun the rollout with --seed N to record seeds")]
    NotSeeded(String),
    /// No slot could be acquired.
    #[error("failed to acquire a slot to replay trajectory `{id}`")]
    Acquire {
        /// The id.
        id: String,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// A branched trajectory's prefix slot could not be forked (the backend cannot fork:
    /// replay it with the backend flags of the original run).
    #[error("failed to fork the prefix slot to replay branched trajectory `{id}`")]
    Fork {
        /// The id.
        id: String,
        /// Why.
        #[source]
        source: BackendError,
    },
}

/// Reads trajectory `id` from the `trajectories.jsonl` at `path`.
pub fn read_trajectory(path: &Path, id: &str) -> Result<Trajectory, ReplayError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReplayError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    for (index, line) in text.lines().enumerate() {
        // A line that is not JSON (a torn last line) cannot be the one asked for.
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if value.get("trajectory_id").and_then(Value::as_str) != Some(id) {
            continue;
        }
        return serde_json::from_value(value).map_err(|source| ReplayError::Parse {
            id: id.to_string(),
            path: path.to_path_buf(),
            line: index + 1,
            source,
        });
    }
    Err(ReplayError::NotFound {
        id: id.to_string(),
        path: path.to_path_buf(),
    })
}

/// Runs `trajectory`'s recorded calls again, in order, in a fresh slot of `backend` seeded with
/// the trajectory's recorded slot seed, and stops at the first result that differs. The slot is
/// released (with its workspace) at the end. An SWE task's setup is not replayed.
pub async fn replay(backend: &dyn Backend, trajectory: &Trajectory) -> Result<ReplayReport, ReplayError> {
    let id = &trajectory.trajectory_id;
    let seeds = trajectory.seeds.ok_or_else(|| ReplayError::NotSeeded(id.clone()))?;
    // A branched trajectory starts in its group's prefix slot, forked at the branch point.
    let branch = trajectory.branch.as_ref().zip(seeds.prefix_slot);
    let (start_id, start_seed) = match branch {
        Some((branch, prefix_seed)) => (branch.parent_trajectory_id.as_str(), prefix_seed),
        None => (id.as_str(), seeds.slot),
    };
    let mut slot = backend
        .acquire_seeded(start_id, start_seed)
        .await
        .map_err(|source| ReplayError::Acquire { id: id.clone(), source })?;
    let mut report = ReplayReport {
        trajectory_id: id.clone(),
        slot_seed: seeds.slot,
        calls_compared: 0,
        divergence: None,
    };
    if let Some(setup) = &trajectory.setup {
        report.divergence = compare(backend, &slot, setup, &mut report.calls_compared)
            .await
            .map(|divergence| Divergence {
                in_setup: true,
                ..divergence
            });
    }
    for (index, step) in trajectory.steps.iter().enumerate() {
        if report.divergence.is_some() {
            break;
        }
        if let Some((branch, _)) = branch
            && index == branch.prefix_steps
        {
            let forked = fork_nth(backend, &slot, id, branch.fork_index).await;
            let _ = backend.release(&slot, true).await;
            slot = forked?;
        }
        for (call, recorded) in step.calls.iter().enumerate() {
            if let Some(divergence) = compare(backend, &slot, recorded, &mut report.calls_compared).await {
                report.divergence = Some(Divergence {
                    turn: step.turn,
                    call,
                    ..divergence
                });
                break;
            }
        }
    }
    // The comparison is done; a slot that fails to release does not change it.
    let _ = backend.release(&slot, true).await;
    Ok(report)
}

/// Runs `recorded`'s call again in `slot` and compares the results without timing; the
/// divergence (at turn 0, call 0: the caller places it) when they differ.
async fn compare(backend: &dyn Backend, slot: &Slot, recorded: &StepCall, compared: &mut usize) -> Option<Divergence> {
    let replayed = backend.execute(slot, recorded.call.clone()).await;
    *compared += 1;
    let comparable = |result| {
        let mut value = serde_json::to_value(result).unwrap_or(Value::Null);
        strip_timing(&mut value);
        value
    };
    let (recorded_value, replayed_value) = (comparable(&recorded.result), comparable(&replayed));
    (recorded_value != replayed_value).then(|| Divergence {
        turn: 0,
        call: 0,
        in_setup: false,
        tool: recorded.call.name.clone(),
        recorded: recorded_value,
        replayed: replayed_value,
    })
}

/// The `fork_index`-th fork of `parent` (0-based), made as the rollout made it: the forks
/// before it are made and released, so the backend derives the same seed for it.
async fn fork_nth(backend: &dyn Backend, parent: &Slot, id: &str, fork_index: usize) -> Result<Slot, ReplayError> {
    let failed = |source| ReplayError::Fork {
        id: id.to_owned(),
        source,
    };
    for _ in 0..fork_index {
        let earlier = backend.fork(parent, id).await.map_err(failed)?;
        let _ = backend.release(&earlier, true).await;
    }
    backend.fork(parent, id).await.map_err(failed)
}
