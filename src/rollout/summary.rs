//! `summary.json`: what a rollout's trajectories add up to, at a glance.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::rollout::agent::{Step, TokenCounts, Trajectory};
use crate::rollout::config::RolloutConfig;
use crate::rollout::dataset::Dataset;
use crate::rollout::policy::Policy;
use crate::rollout::reward::RewardBreakdown;

/// The `errors_by_kind` entry counting usage anomalies (see
/// [`crate::rollout::policy::parse_usage`]) and token sums that saturated.
pub const USAGE_ANOMALY: &str = "usage_anomaly";

/// The score at or above which a trajectory counts as solved for pass@k.
pub const PASS_THRESHOLD: f64 = 1.0;

/// What this run (as opposed to the whole file, which may hold resumed work) did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    /// Trajectories written by this run.
    pub written: usize,
    /// Trajectories skipped because the file already had them (`--resume`).
    pub skipped: usize,
    /// Trajectories abandoned on interruption (not written; a resume runs them).
    pub abandoned: usize,
    /// Trajectories never started because of the interruption.
    pub not_started: usize,
    /// Trajectories that could not run at all, by kind (`slot_acquire`); not written.
    pub failed_by_kind: BTreeMap<String, usize>,
    /// Lines of the trajectories file that could not be read.
    pub unreadable_lines: usize,
    /// Whether the run was interrupted.
    pub interrupted: bool,
    /// Wall-clock seconds of this run.
    pub wall_seconds: f64,
    /// Groups whose shared prefix (setup and first turns) ran once and was forked into their
    /// samples' slots.
    #[serde(default)]
    pub groups_forked: usize,
}

/// The numbers of a rollout. Rewards, passes and times cover every trajectory in the file;
/// `run` covers this invocation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The policy's name.
    pub policy: String,
    /// The run seed (`--seed N`), when the rollout was seeded; each trajectory records its
    /// slots' own seeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Whether the offline oracle policy played reference solutions instead of a model.
    pub oracle_policy: bool,
    /// A plain sentence saying what the numbers measure.
    pub note: String,
    /// The agent loop.
    pub agent: String,
    /// Problems read from the dataset.
    pub problems: usize,
    /// Dataset lines skipped as unreadable, with their line numbers.
    pub dataset_errors: Vec<String>,
    /// Trajectories per problem.
    pub group_size: usize,
    /// The turn every group branched after (`--branch-after-turn`), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch_after_turn: Option<usize>,
    /// Trajectories in the file.
    pub trajectories: usize,
    /// Mean reward over trajectories.
    pub mean_reward: f64,
    /// pass@k (unbiased estimator, a trajectory passes at reward >= 1) for k = 1 and the group
    /// size, averaged over problems.
    pub pass_at_k: BTreeMap<String, f64>,
    /// Mean assistant turns per trajectory.
    pub mean_turns: f64,
    /// Most assistant turns in one trajectory.
    pub max_turns: usize,
    /// Seconds waiting for the policy, summed over trajectories; a branched group's shared
    /// prefix counts once.
    pub model_seconds: f64,
    /// Seconds running code and tools (setup cells included), summed over trajectories; a
    /// branched group's shared prefix counts once.
    pub tool_seconds: f64,
    /// Seconds computing rewards, summed over trajectories.
    pub reward_seconds: f64,
    /// Mean tool time per turn that ran something, in milliseconds.
    pub tool_ms_per_turn: f64,
    /// The median over every turn, including turns that ran no code, of the engine's own time
    /// per turn ([`crate::rollout::agent::Step::overhead_ms`]), in milliseconds. Acquiring the
    /// slot, scoring and writing the trajectory are not in it.
    pub median_overhead_ms_per_turn: f64,
    /// The same median over only the turns that ran at least one call: the engine's time
    /// around code, where a turn without code would pull the median down. 0 when no turn ran
    /// code.
    #[serde(default)]
    pub median_overhead_ms_per_turn_with_code: f64,
    /// Prompt and completion tokens, summed, when the policy reported them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<BTreeMap<String, u64>>,
    /// Trajectories by stop reason.
    pub stop_reasons: BTreeMap<String, usize>,
    /// Errors by kind: policy errors, failed calls by [`crate::ErrorKind`], limits hit, answers
    /// past a parsing limit (`answer_too_long`, `answer_too_deep`), usage anomalies
    /// (`usage_anomaly`: implausible counts, and token sums that saturated), and trajectories
    /// that could not run (`trajectory_panicked`, `slot_acquire`, ...).
    pub errors_by_kind: BTreeMap<String, usize>,
    /// Trajectories written per second of this run's wall clock.
    pub trajectories_per_second: f64,
    /// This run.
    pub run: RunStats,
}

impl Summary {
    /// Summarises `trajectories` (the whole file) and this run's `stats`.
    pub fn new(
        trajectories: &[Trajectory],
        policy: &dyn Policy,
        config: &RolloutConfig,
        dataset: &Dataset,
        stats: RunStats,
    ) -> Summary {
        let count = trajectories.len();
        let mean = |sum: f64| if count == 0 { 0.0 } else { sum / count as f64 };
        let oracle = policy.is_oracle();
        let note = if oracle {
            "The oracle policy was used: the dataset's reference solutions were played as the assistant's turns, \
             so these numbers check the environment and rewards, not a model."
                .to_owned()
        } else {
            format!("Model `{}` wrote the assistant's turns.", policy.name())
        };
        let prefixes = shared_prefixes(trajectories);
        let steps = distinct_steps(trajectories, &prefixes);
        let turns_with_calls: usize = steps.iter().filter(|s| !s.calls.is_empty()).count();
        let tool_ms: f64 = trajectories.iter().map(|t| t.tool_ms).sum::<f64>()
            + prefixes
                .iter()
                .filter_map(|t| t.branch.as_ref())
                .map(|b| b.prefix_tool_ms)
                .sum::<f64>();
        let model_ms: f64 = trajectories.iter().map(|t| t.model_ms).sum::<f64>()
            + prefixes
                .iter()
                .filter_map(|t| t.branch.as_ref())
                .map(|b| b.prefix_model_ms)
                .sum::<f64>();
        let mut stop_reasons = BTreeMap::new();
        let mut errors_by_kind = BTreeMap::new();
        for trajectory in trajectories {
            let reason = serde_json::to_value(trajectory.stop_reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            *stop_reasons.entry(reason).or_insert(0) += 1;
            if let Some(error) = &trajectory.error {
                *errors_by_kind.entry(error.kind.clone()).or_insert(0) += 1;
            }
            if let RewardBreakdown::Math { limit: Some(limit), .. } = &trajectory.reward.breakdown {
                *errors_by_kind.entry(limit.clone()).or_insert(0) += 1;
            }
            let anomalies =
                trajectory.anomalies.len() + trajectory.steps.iter().map(|s| s.anomalies.len()).sum::<usize>();
            if anomalies > 0 {
                *errors_by_kind.entry(USAGE_ANOMALY.to_owned()).or_insert(0) += anomalies;
            }
            for call in trajectory.steps.iter().flat_map(|s| &s.calls) {
                if let Some(error) = &call.result.error {
                    let kind = serde_json::to_value(error.kind)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    *errors_by_kind.entry(format!("call_{kind}")).or_insert(0) += 1;
                }
                if let Some(limit) = call.result.metadata.limit_hit {
                    *errors_by_kind.entry(format!("limit_{limit}")).or_insert(0) += 1;
                }
            }
        }
        for (kind, n) in &stats.failed_by_kind {
            *errors_by_kind.entry(kind.clone()).or_insert(0) += n;
        }
        let mut token_sum: Option<TokenCounts> = None;
        let prefix_tokens = prefixes.iter().flat_map(|t| prefix_steps(t)).filter_map(|s| s.usage);
        let prefix_tokens = prefix_tokens.map(|u| TokenCounts {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        });
        for counts in trajectories.iter().filter_map(|t| t.tokens).chain(prefix_tokens) {
            let saturated = token_sum.get_or_insert_default().add(counts);
            if !saturated.is_empty() {
                *errors_by_kind.entry(USAGE_ANOMALY.to_owned()).or_insert(0) += saturated.len();
            }
        }
        let tokens = token_sum.map(|t| {
            BTreeMap::from([
                ("prompt_tokens".to_owned(), t.prompt_tokens),
                ("completion_tokens".to_owned(), t.completion_tokens),
            ])
        });
        Summary {
            policy: policy.name().to_owned(),
            seed: config.seed,
            oracle_policy: oracle,
            note,
            agent: config.agent.kind.as_str().to_owned(),
            problems: dataset.problems.len(),
            dataset_errors: dataset.errors.iter().map(ToString::to_string).collect(),
            group_size: config.group_size,
            branch_after_turn: config.branch_after_turn,
            trajectories: count,
            mean_reward: mean(trajectories.iter().map(|t| t.reward.score).sum()),
            pass_at_k: pass_at_k(trajectories, config.group_size),
            mean_turns: mean(trajectories.iter().map(|t| t.turns as f64).sum()),
            max_turns: trajectories.iter().map(|t| t.turns).max().unwrap_or(0),
            model_seconds: model_ms / 1e3,
            tool_seconds: tool_ms / 1e3,
            reward_seconds: trajectories.iter().map(|t| t.reward_ms).sum::<f64>() / 1e3,
            tool_ms_per_turn: if turns_with_calls == 0 {
                0.0
            } else {
                tool_ms / turns_with_calls as f64
            },
            median_overhead_ms_per_turn: median(steps.iter().map(|s| s.overhead_ms).collect()),
            median_overhead_ms_per_turn_with_code: median(
                steps
                    .iter()
                    .filter(|s| !s.calls.is_empty())
                    .map(|s| s.overhead_ms)
                    .collect(),
            ),
            tokens,
            stop_reasons,
            errors_by_kind,
            trajectories_per_second: if stats.wall_seconds > 0.0 {
                stats.written as f64 / stats.wall_seconds
            } else {
                0.0
            },
            run: stats,
        }
    }
}

/// One trajectory of each branched group (the first in the file): whose `branch` and prefix
/// steps stand for the group's shared prefix, counted once.
fn shared_prefixes(trajectories: &[Trajectory]) -> Vec<&Trajectory> {
    let mut seen = HashSet::new();
    trajectories
        .iter()
        .filter(|t| {
            t.branch
                .as_ref()
                .is_some_and(|b| seen.insert(b.parent_trajectory_id.as_str()))
        })
        .collect()
}

/// A branched trajectory's copy of its group's shared steps.
fn prefix_steps(trajectory: &Trajectory) -> &[Step] {
    let shared = trajectory.branch.as_ref().map_or(0, |b| b.prefix_steps);
    &trajectory.steps[..shared.min(trajectory.steps.len())]
}

/// Every step that ran, once: each trajectory's own steps, and each shared prefix's steps once.
fn distinct_steps<'a>(trajectories: &'a [Trajectory], prefixes: &[&'a Trajectory]) -> Vec<&'a Step> {
    let own = trajectories.iter().flat_map(|t| &t.steps[prefix_steps(t).len()..]);
    own.chain(prefixes.iter().flat_map(|t| prefix_steps(t))).collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

/// pass@1 and pass@G, averaged over problems, with the unbiased estimator
/// `1 - C(n - c, k) / C(n, k)` over each problem's n samples of which c passed.
fn pass_at_k(trajectories: &[Trajectory], group_size: usize) -> BTreeMap<String, f64> {
    let mut by_problem: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for t in trajectories {
        let entry = by_problem.entry(t.instance_id.as_str()).or_default();
        entry.0 += 1;
        entry.1 += usize::from(t.reward.score >= PASS_THRESHOLD);
    }
    let mut ks = vec![1];
    if group_size > 1 {
        ks.push(group_size);
    }
    let mut out = BTreeMap::new();
    for k in ks {
        let estimates: Vec<f64> = by_problem
            .values()
            .filter(|(n, _)| *n >= k)
            .map(|&(n, c)| pass_estimate(n, c, k))
            .collect();
        if !estimates.is_empty() {
            out.insert(
                format!("pass@{k}"),
                estimates.iter().sum::<f64>() / estimates.len() as f64,
            );
        }
    }
    out
}

/// The unbiased pass@k estimate for one problem with `n` samples of which `c` passed.
pub fn pass_estimate(n: usize, c: usize, k: usize) -> f64 {
    if n - c < k {
        return 1.0;
    }
    1.0 - ((n - c + 1)..=n).map(|i| 1.0 - k as f64 / i as f64).product::<f64>()
}
