//! Groups that share a prefix: a problem's `setup_code` and first K turns run once, in one slot,
//! and that slot is forked into the group's samples (`rollbox rollout --branch-after-turn K`).
//!
//! Tree-structured RL (TreeRL, ARPO) branches a trajectory after a tool result into several
//! continuations; with stateful tools the sandbox must branch too. Here a group runs as one
//! task:
//! 1. its prefix slot (`<instance_id>/prefix`) is acquired, the problem's `setup_code` runs in
//!    it, then the agent's first `after_turn` turns;
//! 2. the prefix slot is forked once per sample, in sample order (fork `i` is sample `i`, so a
//!    seeded fork's seed is `derive_fork_seed(prefix seed, i)`), and released;
//! 3. every continuation runs from the paused conversation in its own fork, at once, and is
//!    scored as any trajectory.
//!
//! Every continuation starts from the same messages and the same interpreter state; each records
//! the shared part in its `branch` ([`Branch`]). A prefix that ends before the branch point
//! (a final answer) leaves nothing to branch: every sample is then that one trajectory.
//! Resuming a partly written group runs its prefix again and forks only the missing samples'
//! continuations from it; with a model policy that new prefix may differ from the one the
//! written samples had.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::error_text::error_chain;
use crate::rollout::agent::{
    AgentContext, AgentState, Branch, SlotSeeds, StepCall, Turns, prefix_trajectory_id, run_turns,
};
use crate::rollout::dataset::Problem;
use crate::rollout::runner::{Job, JobOutcome, JobShared, SETUP_FAILED, release_slot, run_caught, run_setup};
use crate::slot::{Backend, BackendError, Slot};

/// One problem's group, run from one shared prefix.
pub(crate) struct GroupJob {
    /// The problem.
    pub(crate) problem: Problem,
    /// Samples in the group: the prefix slot is forked this many times.
    pub(crate) group_size: usize,
    /// Turns played once before the fork (0: only the setup is shared).
    pub(crate) after_turn: usize,
    /// The run seed, in a seeded rollout.
    pub(crate) run_seed: Option<u64>,
    /// The samples still to run (all of them, unless resumed), in sample order.
    pub(crate) jobs: Vec<Job>,
}

/// A group's prefix, played once: what every continuation starts from.
#[derive(Debug)]
pub(crate) struct SharedPrefix {
    /// Where the conversation paused (or ended, when it ended before the branch point).
    pub(crate) turns: Turns,
    /// The setup cell as it ran in the prefix slot.
    pub(crate) setup: Option<StepCall>,
    group_id: String,
    parent_trajectory_id: String,
    after_turn: usize,
    prefix_model_ms: f64,
    prefix_tool_ms: f64,
}

impl SharedPrefix {
    /// The `branch` record of sample `sample`.
    pub(crate) fn branch_for(&self, sample: usize) -> Branch {
        let (messages, steps) = match &self.turns {
            Turns::Ended(episode) => (episode.messages.len(), episode.steps.len()),
            Turns::Paused(state) => (state.messages.len(), state.steps.len()),
        };
        Branch {
            group_id: self.group_id.clone(),
            parent_trajectory_id: self.parent_trajectory_id.clone(),
            after_turn: self.after_turn,
            prefix_messages: messages,
            prefix_steps: steps,
            fork_index: sample,
            prefix_model_ms: self.prefix_model_ms,
            prefix_tool_ms: self.prefix_tool_ms,
        }
    }
}

/// The trajectory ids of the probe [`can_fork`] acquires and forks.
const PROBE_ID: &str = "rollout/fork-probe";

/// Whether `backend` can fork: one probe slot is acquired, forked once, and both released.
/// Asking is the only sure way: a remote backend forks if and only if its servers can.
pub(crate) async fn can_fork(backend: &dyn Backend) -> Result<(), BackendError> {
    let probe = backend.acquire(PROBE_ID).await?;
    let forked = backend.fork(&probe, &format!("{PROBE_ID}/fork")).await;
    if let Ok(fork) = &forked {
        let _ = backend.release(fork, true).await;
    }
    // Releasing is best effort: the answer is known either way.
    let _ = backend.release(&probe, true).await;
    forked.map(drop)
}

/// Runs a group: its prefix once, then every sample's continuation in a fork of the prefix
/// slot; one outcome per sample of `group.jobs`. See the module docs.
pub(crate) async fn run_group(shared: Arc<JobShared>, stop: watch::Receiver<bool>, group: GroupJob) -> Vec<JobOutcome> {
    let backend = shared.backend.as_ref();
    let parent_id = prefix_trajectory_id(&group.problem.instance_id);
    let prefix_seed = group
        .run_seed
        .map(|run| SlotSeeds::prefix(run, &group.problem.instance_id));
    let acquired = match prefix_seed {
        Some(seed) => backend.acquire_seeded(&parent_id, seed).await,
        None => backend.acquire(&parent_id).await,
    };
    let parent = match acquired {
        Ok(slot) => slot,
        Err(error) => {
            return fail_all(
                group.jobs,
                "slot_acquire",
                &format!("failed to acquire a slot: {error}"),
            );
        }
    };
    let prefix = match play_prefix(&shared, stop.clone(), &group, &parent, prefix_seed, &parent_id).await {
        Ok(prefix) => Arc::new(prefix),
        Err(outcome) => {
            release_slot(backend, &parent, &group.problem).await;
            return match outcome {
                PrefixFailed::Abandoned => group.jobs.iter().map(|_| JobOutcome::Abandoned).collect(),
                PrefixFailed::Setup(message) => fail_all(group.jobs, SETUP_FAILED, &message),
            };
        }
    };
    let forks = fork_samples(backend, &parent, &group).await;
    release_slot(backend, &parent, &group.problem).await;
    let mut outcomes = Vec::with_capacity(group.jobs.len());
    let mut running = JoinSet::new();
    let mut running_ids = std::collections::HashMap::new();
    for (mut job, fork) in group.jobs.into_iter().zip(forks) {
        let slot = match fork {
            Ok(slot) => slot,
            Err(error) => {
                outcomes.push(JobOutcome::Failed {
                    trajectory_id: job.trajectory_id,
                    kind: "slot_fork".to_owned(),
                    message: format!("failed to fork the group's prefix slot: {}", error_chain(&error)),
                });
                continue;
            }
        };
        if let (Some(run), Some(prefix_slot)) = (group.run_seed, prefix_seed) {
            job.seeds = Some(SlotSeeds::forked(run, prefix_slot, job.sample));
        }
        let (shared, stop, prefix) = (shared.clone(), stop.clone(), prefix.clone());
        let trajectory_id = job.trajectory_id.clone();
        let handle =
            running.spawn(async move { run_caught(&shared, stop, job, slot, Some(prefix), Instant::now()).await });
        running_ids.insert(handle.id(), trajectory_id);
    }
    while let Some(joined) = running.join_next_with_id().await {
        // A continuation's panic is caught inside `run_caught`; only a cancelled task lands here.
        outcomes.push(match joined {
            Ok((_, outcome)) => outcome,
            Err(error) => JobOutcome::Failed {
                trajectory_id: running_ids.remove(&error.id()).unwrap_or_default(),
                kind: "task_cancelled".to_owned(),
                message: error.to_string(),
            },
        });
    }
    outcomes
}

/// Why a group's prefix gave nothing to fork.
enum PrefixFailed {
    /// The rollout was interrupted.
    Abandoned,
    /// The problem's `setup_code` failed; the message says how.
    Setup(String),
}

/// Runs the setup and the first `after_turn` turns in the prefix slot.
async fn play_prefix(
    shared: &JobShared,
    stop: watch::Receiver<bool>,
    group: &GroupJob,
    parent: &Slot,
    seed: Option<u64>,
    parent_id: &str,
) -> Result<SharedPrefix, PrefixFailed> {
    let backend = shared.backend.as_ref();
    let setup = run_setup(backend, parent, &group.problem)
        .await
        .map_err(PrefixFailed::Setup)?;
    let mut context = AgentContext {
        backend,
        slot: parent,
        policy: shared.policy.as_ref(),
        config: &shared.agent,
        tools: &shared.tools,
        stop,
        seed,
    };
    let start = AgentState::start(&shared.agent, &group.problem);
    let turns = run_turns(&mut context, &group.problem, start, group.after_turn)
        .await
        .ok_or(PrefixFailed::Abandoned)?;
    let steps = match &turns {
        Turns::Ended(episode) => &episode.steps,
        Turns::Paused(state) => &state.steps,
    };
    let setup_ms = setup
        .as_ref()
        .map_or(0.0, |s| s.result.metadata.duration_us as f64 / 1e3);
    Ok(SharedPrefix {
        prefix_model_ms: steps.iter().map(|s| s.model_ms).sum(),
        prefix_tool_ms: setup_ms + steps.iter().map(|s| s.tool_ms).sum::<f64>(),
        turns,
        setup,
        group_id: group.problem.instance_id.clone(),
        parent_trajectory_id: parent_id.to_owned(),
        after_turn: group.after_turn,
    })
}

/// Forks the prefix slot once per sample of the whole group, in sample order, so fork `i` is
/// sample `i` (and a seeded fork's seed repeats); the forks of samples already written (a
/// resumed group) are released at once. One result per job, in order.
async fn fork_samples(backend: &dyn Backend, parent: &Slot, group: &GroupJob) -> Vec<Result<Slot, BackendError>> {
    let mut forks = Vec::with_capacity(group.jobs.len());
    let mut jobs = group.jobs.iter().peekable();
    for sample in 0..group.group_size {
        let Some(job) = jobs.peek() else { break };
        let fork = backend
            .fork(parent, &format!("{}/{sample}", group.problem.instance_id))
            .await;
        if job.sample == sample {
            forks.push(fork);
            jobs.next();
        } else if let Ok(unused) = fork {
            let _ = backend.release(&unused, true).await;
        }
    }
    forks
}

/// The same failure for every job of a group.
fn fail_all(jobs: Vec<Job>, kind: &str, message: &str) -> Vec<JobOutcome> {
    jobs.into_iter()
        .map(|job| JobOutcome::Failed {
            trajectory_id: job.trajectory_id,
            kind: kind.to_owned(),
            message: message.to_owned(),
        })
        .collect()
}
