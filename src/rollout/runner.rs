//! The rollout runner: G trajectories per problem, each in its own slot, at most N at a time,
//! appended to `trajectories.jsonl` and flushed as each finishes, then `summary.json`.
//!
//! Interruption ([`StopSignal::stop`]) starts no new trajectory; running ones are abandoned at
//! their next model call or turn boundary, their slots released, and nothing of them written,
//! so a rerun with `resume` runs them again and skips every one already on disk.
//!
//! A group whose samples share a prefix (`branch_after_turn`, or a problem's `setup_code` on a
//! backend that can fork) runs as one task; see [`crate::rollout::branching`].

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::rollout::agent::{
    AgentContext, AgentState, Branch, Episode, SlotSeeds, StepCall, TokenCounts, Trajectory, TrajectoryError, Turns,
    run_agent_from,
};
use crate::rollout::branching::{GroupJob, SharedPrefix, can_fork, run_group};
use crate::rollout::config::{AgentConfig, RolloutConfig};
use crate::rollout::dataset::{Dataset, Problem};
use crate::rollout::fresh_slot::{Scored, reward_in_fresh_slot};
use crate::rollout::policy::Policy;
use crate::rollout::reward::{Reward, score};
use crate::rollout::summary::{RunStats, Summary};
use crate::slot::tools::ToolName;
use crate::slot::{Backend, BackendError, Slot, ToolCall};

/// The trajectories file in the output folder.
pub const TRAJECTORIES_FILE: &str = "trajectories.jsonl";
/// The summary file in the output folder.
pub const SUMMARY_FILE: &str = "summary.json";

/// Told of a rollout's progress. Every method does nothing by default.
pub trait RolloutReporter: Send + Sync {
    /// The rollout starts `to_run` trajectories; `skipped` were already on disk.
    fn on_start(&self, to_run: usize, skipped: usize) {
        let _ = (to_run, skipped);
    }
    /// A trajectory was scored and written.
    fn on_trajectory(&self, trajectory: &Trajectory) {
        let _ = trajectory;
    }
    /// A trajectory could not start (no slot) or its task failed; nothing was written for it.
    fn on_trajectory_failed(&self, trajectory_id: &str, message: &str) {
        let _ = (trajectory_id, message);
    }
}

/// A [`RolloutReporter`] that reports nothing.
#[derive(Clone, Copy, Debug, Default)]
pub struct SilentRolloutReporter;

impl RolloutReporter for SilentRolloutReporter {}

/// Interrupts a rollout from another task (a Ctrl-C handler). Cheap to clone.
#[derive(Clone, Debug)]
pub struct StopSignal {
    sender: Arc<watch::Sender<bool>>,
}

impl Default for StopSignal {
    fn default() -> Self {
        StopSignal {
            sender: Arc::new(watch::channel(false).0),
        }
    }
}

impl StopSignal {
    /// A signal that has not fired.
    pub fn new() -> Self {
        StopSignal::default()
    }

    /// Fires: no new trajectory starts, running ones are abandoned.
    pub fn stop(&self) {
        self.sender.send_replace(true);
    }

    /// Whether it has fired.
    pub fn is_stopped(&self) -> bool {
        *self.sender.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<bool> {
        self.sender.subscribe()
    }
}

/// What a rollout did.
#[derive(Clone, Debug)]
pub struct RolloutRun {
    /// The summary over every trajectory in the file, as written to `summary.json`.
    pub summary: Summary,
    /// The trajectories file.
    pub trajectories_path: PathBuf,
    /// The summary file.
    pub summary_path: PathBuf,
}

/// The host failed to read or write the rollout's files.
#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    /// The output folder could not be made.
    #[error("failed to create the output folder {path}")]
    CreateDir {
        /// The folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The output folder already holds trajectories and `resume` is off.
    #[error("{path} already holds trajectories; pass --resume to continue that rollout or choose another --out")]
    AlreadyStarted {
        /// The trajectories file.
        path: PathBuf,
    },
    /// A file could not be read or written.
    #[error("failed to {action} {path}")]
    Io {
        /// What was being done (`read`, `append to`, `write`).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The dataset has SWE tasks and the backend has no `bash` to set them up and test them.
    #[error(
        "{count} SWE task(s) (e.g. `{example}`) need bash, git and a shared cache, which the {backend} backend does not have; \
         run them with --backend process, or --backend remote with process servers"
    )]
    SweNeedsBash {
        /// How many SWE tasks the dataset has.
        count: usize,
        /// One of them.
        example: String,
        /// The backend's name.
        backend: String,
    },
    /// `branch_after_turn` was asked of a backend that cannot fork slots.
    #[error(
        "--branch-after-turn forks each group's slot after its shared turns, and the {backend} backend cannot fork slots; \
         use --backend wasm (the default) or --backend remote with wasm servers, or run without --branch-after-turn \
         (every sample then plays all its turns in its own slot)"
    )]
    CannotBranch {
        /// The backend's name.
        backend: String,
        /// What the backend answered when asked to fork.
        #[source]
        source: BackendError,
    },
    /// Checking whether the backend can fork (one probe slot, forked and released) failed.
    #[error("failed to check whether the {backend} backend can fork slots (one probe slot, forked once)")]
    ForkProbe {
        /// The backend's name.
        backend: String,
        /// Why.
        #[source]
        source: BackendError,
    },
}

/// One trajectory to run in a slot of its own.
pub(crate) struct Job {
    pub(crate) trajectory_id: String,
    pub(crate) sample: usize,
    pub(crate) problem: Problem,
    /// Its slots' seeds, in a seeded rollout.
    pub(crate) seeds: Option<SlotSeeds>,
}

/// What the scheduler runs: one trajectory, or a whole group that shares a prefix.
enum Task {
    One(Job),
    Group(GroupJob),
}

impl Task {
    /// The trajectories it runs at once, which count against the concurrency.
    fn ids(&self) -> Vec<String> {
        match self {
            Task::One(job) => vec![job.trajectory_id.clone()],
            Task::Group(group) => group.jobs.iter().map(|j| j.trajectory_id.clone()).collect(),
        }
    }
}

pub(crate) enum JobOutcome {
    Done(Box<Trajectory>),
    Abandoned,
    Failed {
        trajectory_id: String,
        kind: String,
        message: String,
    },
}

/// Runs the rollout of `dataset` and writes its files; see the module docs.
pub async fn run_rollout(
    backend: Arc<dyn Backend>,
    policy: Arc<dyn Policy>,
    dataset: &Dataset,
    config: &RolloutConfig,
    reporter: &dyn RolloutReporter,
    stop: &StopSignal,
) -> Result<RolloutRun, RolloutError> {
    let started = Instant::now();
    check_backend_runs_swe(backend.as_ref(), dataset)?;
    let out = &config.out_dir;
    std::fs::create_dir_all(out).map_err(|source| RolloutError::CreateDir {
        path: out.clone(),
        source,
    })?;
    let trajectories_path = out.join(TRAJECTORIES_FILE);
    let existing = read_existing(&trajectories_path)?;
    if !existing.lines.is_empty() && !config.resume {
        return Err(RolloutError::AlreadyStarted {
            path: trajectories_path,
        });
    }
    let done: HashSet<&str> = existing
        .lines
        .iter()
        .filter_map(|v| v.get("trajectory_id")?.as_str())
        .collect();
    let forks = forks_groups(backend.as_ref(), dataset, config).await?;
    let mut tasks = Vec::new();
    let mut skipped = 0;
    for problem in &dataset.problems {
        let mut jobs = Vec::new();
        for sample in 0..config.group_size.max(1) {
            let trajectory_id = format!("{}/{sample}", problem.instance_id);
            if done.contains(trajectory_id.as_str()) {
                skipped += 1;
            } else {
                jobs.push(Job {
                    trajectory_id,
                    sample,
                    problem: problem.clone(),
                    seeds: config
                        .seed
                        .map(|seed| SlotSeeds::derive(seed, &problem.instance_id, sample)),
                });
            }
        }
        let shares_prefix = config.branch_after_turn.is_some() || problem.setup_code.is_some();
        if forks && shares_prefix && !jobs.is_empty() {
            tasks.push(Task::Group(GroupJob {
                problem: problem.clone(),
                group_size: config.group_size,
                after_turn: config.branch_after_turn.unwrap_or(0),
                run_seed: config.seed,
                jobs,
            }));
        } else {
            tasks.extend(jobs.into_iter().map(Task::One));
        }
    }
    let to_run = tasks.iter().map(|t| t.ids().len()).sum();
    reporter.on_start(to_run, skipped);
    let mut writer = TrajectoryWriter::open(&trajectories_path, existing.needs_newline)?;
    let mut stats = RunStats {
        skipped,
        ..RunStats::default()
    };
    let mut tools = crate::slot::tools::schemas(&backend.tools());
    tools.extend(config.agent.user_tools.schemas());
    let shared = Arc::new(JobShared {
        backend,
        policy: policy.clone(),
        agent: config.agent.clone(),
        tools,
        custom_reward: config.custom_reward.clone(),
        score_in_fresh_slot: config.score_in_fresh_slot,
    });
    let mut pending = tasks.into_iter().peekable();
    let mut running = JoinSet::new();
    // Which trajectories each task runs: to name them should the task fail outside its own
    // panic catching, and to count them against the concurrency. A group runs all its samples
    // at once, so it starts when they fit, or alone when the group is larger than the limit.
    let mut running_ids: HashMap<tokio::task::Id, Vec<String>> = HashMap::new();
    let mut running_count = 0;
    loop {
        while !stop.is_stopped() {
            let Some(next) = pending.peek() else { break };
            let ids = next.ids();
            if running_count > 0 && running_count + ids.len() > config.concurrency.max(1) {
                break;
            }
            let Some(task) = pending.next() else { break };
            let handle = match task {
                Task::One(job) => running.spawn(run_job_alone(shared.clone(), stop.subscribe(), job)),
                Task::Group(group) => {
                    stats.groups_forked += 1;
                    running.spawn(run_group(shared.clone(), stop.subscribe(), group))
                }
            };
            running_count += ids.len();
            running_ids.insert(handle.id(), ids);
        }
        let Some(joined) = running.join_next_with_id().await else {
            break;
        };
        let task = match &joined {
            Ok((task, _)) => *task,
            Err(join_error) => join_error.id(),
        };
        let ids = running_ids.remove(&task).unwrap_or_default();
        running_count -= ids.len();
        match joined.map(|(_, outcomes)| outcomes) {
            Ok(outcomes) => {
                for outcome in outcomes {
                    record(outcome, &mut writer, &mut stats, reporter)?;
                }
            }
            Err(join_error) => {
                let kind = if join_error.is_panic() {
                    PANICKED
                } else {
                    "task_cancelled"
                };
                for trajectory_id in ids {
                    reporter.on_trajectory_failed(&trajectory_id, &join_error.to_string());
                    *stats.failed_by_kind.entry(kind.to_owned()).or_default() += 1;
                }
            }
        }
    }
    stats.not_started = pending.map(|t| t.ids().len()).sum();
    stats.interrupted = stop.is_stopped();
    stats.wall_seconds = started.elapsed().as_secs_f64();
    let all = read_existing(&trajectories_path)?;
    let trajectories: Vec<Trajectory> = all
        .lines
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .collect();
    stats.unreadable_lines = all.unreadable;
    let summary = Summary::new(&trajectories, policy.as_ref(), config, dataset, stats);
    let summary_path = out.join(SUMMARY_FILE);
    let json = serde_json::to_string_pretty(&summary).unwrap_or_default();
    std::fs::write(&summary_path, json + "\n").map_err(|source| RolloutError::Io {
        action: "write",
        path: summary_path.clone(),
        source,
    })?;
    Ok(RolloutRun {
        summary,
        trajectories_path,
        summary_path,
    })
}

/// Writes or counts one trajectory's outcome.
fn record(
    outcome: JobOutcome,
    writer: &mut TrajectoryWriter,
    stats: &mut RunStats,
    reporter: &dyn RolloutReporter,
) -> Result<(), RolloutError> {
    match outcome {
        JobOutcome::Done(trajectory) => {
            writer.append(&trajectory)?;
            stats.written += 1;
            reporter.on_trajectory(&trajectory);
        }
        JobOutcome::Abandoned => stats.abandoned += 1,
        JobOutcome::Failed {
            trajectory_id,
            kind,
            message,
        } => {
            reporter.on_trajectory_failed(&trajectory_id, &message);
            *stats.failed_by_kind.entry(kind).or_default() += 1;
        }
    }
    Ok(())
}

/// Whether groups that share a prefix run it once and fork: only when something is shared
/// (`branch_after_turn`, or a problem with `setup_code` in groups of two or more) and the
/// backend can fork. `branch_after_turn` on a backend that cannot fork is refused here, before
/// anything runs; a `setup_code` then runs in every sample's slot instead.
async fn forks_groups(backend: &dyn Backend, dataset: &Dataset, config: &RolloutConfig) -> Result<bool, RolloutError> {
    let shares_setup = config.group_size > 1 && dataset.problems.iter().any(|p| p.setup_code.is_some());
    if config.branch_after_turn.is_none() && !shares_setup {
        return Ok(false);
    }
    match can_fork(backend).await {
        Ok(()) => Ok(true),
        Err(BackendError::Unsupported { .. }) if config.branch_after_turn.is_none() => Ok(false),
        Err(source @ BackendError::Unsupported { .. }) => Err(RolloutError::CannotBranch {
            backend: backend.name().to_owned(),
            source,
        }),
        Err(source) => Err(RolloutError::ForkProbe {
            backend: backend.name().to_owned(),
            source,
        }),
    }
}

/// Refuses a backend without `bash` for a dataset with SWE tasks, before anything runs.
fn check_backend_runs_swe(backend: &dyn Backend, dataset: &Dataset) -> Result<(), RolloutError> {
    let swe: Vec<&Problem> = dataset.problems.iter().filter(|p| p.swe.is_some()).collect();
    match swe.first() {
        Some(first) if !backend.tools().contains(&ToolName::Bash) => Err(RolloutError::SweNeedsBash {
            count: swe.len(),
            example: first.instance_id.clone(),
            backend: backend.name().to_owned(),
        }),
        _ => Ok(()),
    }
}

/// What every trajectory of a rollout shares.
pub(crate) struct JobShared {
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) policy: Arc<dyn Policy>,
    pub(crate) agent: AgentConfig,
    /// The function schemas offered to the tools agent: the backend's, then the user tools.
    pub(crate) tools: Vec<Value>,
    custom_reward: Option<Arc<str>>,
    score_in_fresh_slot: bool,
}

async fn run_job_alone(shared: Arc<JobShared>, stop: watch::Receiver<bool>, job: Job) -> Vec<JobOutcome> {
    vec![run_job(shared, stop, job).await]
}

/// Runs one trajectory start to finish in its own slot.
///
/// A panic anywhere in the trajectory (the agent loop, the policy, the backend's calls, the
/// reward) is caught here: the slot is released and the trajectory fails with the kind
/// [`PANICKED`], so the other trajectories, `trajectories.jsonl` and `summary.json` carry on.
async fn run_job(shared: Arc<JobShared>, stop: watch::Receiver<bool>, job: Job) -> JobOutcome {
    let started = Instant::now();
    let backend = shared.backend.as_ref();
    let acquired = match job.seeds {
        Some(seeds) => backend.acquire_seeded(&job.trajectory_id, seeds.slot).await,
        None => backend.acquire(&job.trajectory_id).await,
    };
    let slot = match acquired {
        Ok(slot) => slot,
        Err(error) => {
            let message = format!("failed to acquire a slot: {error}");
            return JobOutcome::Failed {
                trajectory_id: job.trajectory_id,
                kind: "slot_acquire".to_owned(),
                message,
            };
        }
    };
    run_caught(&shared, stop, job, slot, None, started).await
}

/// Runs a trajectory in `slot` (its own, or forked from its group's `prefix`), catching a
/// panic: the slot is then released and the trajectory fails with the kind [`PANICKED`].
pub(crate) async fn run_caught(
    shared: &JobShared,
    stop: watch::Receiver<bool>,
    job: Job,
    slot: Slot,
    prefix: Option<Arc<SharedPrefix>>,
    started: Instant,
) -> JobOutcome {
    match CatchPanic::new(run_in_slot(shared, stop, &job, &slot, prefix.as_deref(), started)).await {
        Ok(outcome) => outcome,
        Err(panic) => {
            // Best effort, as everywhere: the slot may already be released (fresh-slot scoring).
            release_slot(shared.backend.as_ref(), &slot, &job.problem).await;
            JobOutcome::Failed {
                trajectory_id: job.trajectory_id,
                kind: PANICKED.to_owned(),
                message: format!("the trajectory panicked: {panic}"),
            }
        }
    }
}

/// The error kind of trajectories whose problem's `setup_code` failed.
pub const SETUP_FAILED: &str = "setup_failed";

/// Runs a problem's `setup_code` in `slot`: `Ok(None)` without one, `Ok(Some(call))` when it
/// ran without raising, and the error message (with its output) when it did not.
pub(crate) async fn run_setup(
    backend: &dyn Backend,
    slot: &Slot,
    problem: &Problem,
) -> Result<Option<StepCall>, String> {
    let Some(code) = &problem.setup_code else {
        return Ok(None);
    };
    let call = ToolCall::python(code.clone());
    let result = backend.execute(slot, call.clone()).await;
    if !result.success {
        return Err(format!(
            "the setup_code of `{}` failed, so none of its turns ran; fix it in the dataset: {}",
            problem.instance_id,
            result.output.trim()
        ));
    }
    Ok(Some(StepCall {
        tool_call_id: None,
        call,
        result,
    }))
}

/// The error kind of a trajectory that panicked.
pub const PANICKED: &str = "trajectory_panicked";

/// The part of a trajectory that runs in its slot, from the SWE setup to the reward. A slot
/// forked from its group's `prefix` starts where the prefix paused (its setup already ran).
async fn run_in_slot(
    shared: &JobShared,
    stop: watch::Receiver<bool>,
    job: &Job,
    slot: &Slot,
    prefix: Option<&SharedPrefix>,
    started: Instant,
) -> JobOutcome {
    let backend = shared.backend.as_ref();
    if prefix.is_none()
        && let Some(task) = &job.problem.swe
        && let Err(error) = crate::rollout::swe::prepare(backend, slot, task).await
    {
        release_slot(backend, slot, &job.problem).await;
        return JobOutcome::Failed {
            trajectory_id: job.trajectory_id.clone(),
            kind: "swe_prepare".to_owned(),
            message: crate::error_text::error_chain(&error),
        };
    }
    let setup = match prefix {
        Some(prefix) => prefix.setup.clone(),
        None => match run_setup(backend, slot, &job.problem).await {
            Ok(setup) => setup,
            Err(message) => {
                release_slot(backend, slot, &job.problem).await;
                return JobOutcome::Failed {
                    trajectory_id: job.trajectory_id.clone(),
                    kind: SETUP_FAILED.to_owned(),
                    message,
                };
            }
        },
    };
    let mut context = AgentContext {
        backend,
        slot,
        policy: shared.policy.as_ref(),
        config: &shared.agent,
        tools: &shared.tools,
        stop,
        seed: job.seeds.map(|s| s.slot),
    };
    let played = match prefix.map(|p| &p.turns) {
        // The prefix ended before the branch point: every sample is that one trajectory.
        Some(Turns::Ended(episode)) => Some(episode.clone()),
        Some(Turns::Paused(state)) => run_agent_from(&mut context, &job.problem, state.clone()).await,
        None => {
            run_agent_from(
                &mut context,
                &job.problem,
                AgentState::start(&shared.agent, &job.problem),
            )
            .await
        }
    };
    let Some(episode) = played else {
        // Releasing is best effort: the trajectory is abandoned either way.
        release_slot(backend, slot, &job.problem).await;
        return JobOutcome::Abandoned;
    };
    let reward_started = Instant::now();
    let answer = episode.final_answer.as_deref();
    let custom = shared.custom_reward.as_deref();
    // An SWE task's reward needs the trajectory's worktree, so it is always scored in place; its
    // test files are restored from the base commit first, which is what keeps it honest.
    let reward = if shared.score_in_fresh_slot && job.problem.swe.is_none() {
        // Released first, so scoring never needs two slots at once.
        let _ = backend.release(slot, true).await;
        let scored = Scored {
            trajectory_id: &job.trajectory_id,
            problem: &job.problem,
            answer,
            messages: &episode.messages,
            steps: &episode.steps,
            custom,
            seed: job.seeds.and_then(|s| s.reward_slot),
        };
        match reward_in_fresh_slot(backend, scored).await {
            Ok(reward) => reward,
            Err(error) => {
                return JobOutcome::Failed {
                    trajectory_id: job.trajectory_id.clone(),
                    kind: error.kind().to_owned(),
                    message: crate::error_text::error_chain(&error),
                };
            }
        }
    } else {
        let reward = score(backend, slot, &job.problem, answer, &episode.messages, custom).await;
        release_slot(backend, slot, &job.problem).await;
        reward
    };
    let reward_ms = reward_started.elapsed().as_secs_f64() * 1e3;
    let ran = Ran {
        episode,
        setup,
        branch: prefix.map(|p| p.branch_for(job.sample)),
        reward,
        reward_ms,
        wall_ms: started.elapsed().as_secs_f64() * 1e3,
    };
    JobOutcome::Done(Box::new(trajectory(shared, job, ran)))
}

/// What a trajectory's run produced, before it becomes a line of `trajectories.jsonl`.
struct Ran {
    episode: Episode,
    setup: Option<StepCall>,
    branch: Option<Branch>,
    reward: Reward,
    reward_ms: f64,
    wall_ms: f64,
}

/// A future that turns a panic while it is polled into an error holding the panic's message.
/// (What `futures`' `catch_unwind` does, without the crate's `std` feature.)
struct CatchPanic<F> {
    inner: Pin<Box<F>>,
}

impl<F: Future> CatchPanic<F> {
    fn new(inner: F) -> Self {
        CatchPanic { inner: Box::pin(inner) }
    }
}

impl<F: Future> Future for CatchPanic<F> {
    type Output = Result<F::Output, String>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // Unwind safety: after a panic the inner future is never polled again, and what it
        // borrowed (the slot, the shared config) holds no state a panic could leave half-made.
        let inner = &mut self.inner;
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.as_mut().poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(payload) => Poll::Ready(Err(panic_message(payload.as_ref()))),
        }
    }
}

/// A panic's message, when it has one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Releases a trajectory's slot with its workspace, removing an SWE task's worktree from the
/// shared repository cache first. Best effort: a slot that fails to clean up or release does
/// not change the trajectory's outcome (the server side expires what is left).
pub(crate) async fn release_slot(backend: &dyn Backend, slot: &Slot, problem: &Problem) {
    if let Some(task) = &problem.swe {
        let _ = crate::rollout::swe::cleanup(backend, slot, task).await;
    }
    let _ = backend.release(slot, true).await;
}

/// The line of `trajectories.jsonl` for a scored episode. A branched trajectory's times and
/// tokens cover its own steps, after the shared prefix (whose times are in its `branch`); the
/// setup cell's time counts as tool time.
fn trajectory(shared: &JobShared, job: &Job, ran: Ran) -> Trajectory {
    let Ran {
        episode,
        setup,
        branch,
        reward,
        reward_ms,
        wall_ms,
    } = ran;
    let scored_in_fresh_slot = reward.fresh_slot;
    let own_steps = &episode.steps[branch.as_ref().map_or(0, |b| b.prefix_steps.min(episode.steps.len()))..];
    let own_setup_ms = match (&setup, &branch) {
        (Some(setup), None) => setup.result.metadata.duration_us as f64 / 1e3,
        _ => 0.0,
    };
    let mut anomalies = Vec::new();
    let mut tokens: Option<TokenCounts> = None;
    for usage in own_steps.iter().filter_map(|s| s.usage) {
        anomalies.extend(tokens.get_or_insert_default().add(TokenCounts {
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
        }));
    }
    Trajectory {
        trajectory_id: job.trajectory_id.clone(),
        instance_id: job.problem.instance_id.clone(),
        sample: job.sample,
        agent: shared.agent.kind,
        policy: shared.policy.name().to_owned(),
        turns: episode.steps.len(),
        model_ms: own_steps.iter().map(|s| s.model_ms).sum(),
        tool_ms: own_setup_ms + own_steps.iter().map(|s| s.tool_ms).sum::<f64>(),
        messages: episode.messages,
        steps: episode.steps,
        stop_reason: episode.stop_reason,
        error: episode
            .policy_error
            .map(|(kind, message)| TrajectoryError { kind, message }),
        final_answer: episode.final_answer,
        reward,
        tokens,
        anomalies,
        context_tokens: episode.context_tokens,
        reward_ms,
        wall_ms,
        // The reward slot's seed is recorded only when the reward ran in one.
        seeds: job.seeds.map(|seeds| SlotSeeds {
            reward_slot: seeds.reward_slot.filter(|_| scored_in_fresh_slot),
            ..seeds
        }),
        setup,
        branch,
    }
}

/// The lines of an existing trajectories file.
struct Existing {
    lines: Vec<Value>,
    /// Lines that are not JSON objects (a line cut off by a crash).
    unreadable: usize,
    /// The file does not end with a newline, so the next append must start with one.
    needs_newline: bool,
}

fn read_existing(path: &Path) -> Result<Existing, RolloutError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(RolloutError::Io {
                action: "read",
                path: path.to_owned(),
                source,
            });
        }
    };
    let mut existing = Existing {
        lines: Vec::new(),
        unreadable: 0,
        needs_newline: !text.is_empty() && !text.ends_with('\n'),
    };
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(value @ Value::Object(_)) => existing.lines.push(value),
            _ => existing.unreadable += 1,
        }
    }
    Ok(existing)
}

/// Appends one JSON line per trajectory and flushes it to the OS at once, so an interruption
/// keeps every finished trajectory.
struct TrajectoryWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl TrajectoryWriter {
    fn open(path: &Path, needs_newline: bool) -> Result<Self, RolloutError> {
        let io = |source| RolloutError::Io {
            action: "append to",
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        if needs_newline {
            file.write_all(b"\n").map_err(io)?;
        }
        Ok(TrajectoryWriter {
            file,
            path: path.to_owned(),
        })
    }

    fn append(&mut self, trajectory: &Trajectory) -> Result<(), RolloutError> {
        let io = |source| RolloutError::Io {
            action: "append to",
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(trajectory).map_err(|e| io(std::io::Error::other(e)))?;
        line.push(b'\n');
        // One write per line: a crash mid-way leaves at most one cut-off line, which resume
        // reports as unreadable and runs again.
        self.file.write_all(&line).map_err(io)?;
        self.file.flush().map_err(io)
    }
}
