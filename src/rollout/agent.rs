//! The agent loops: `notebook` (code in tags, outputs as the next user message) and `tools`
//! (OpenAI function calling, results as `role: tool` messages). Each runs one problem in one
//! slot and returns an [`Episode`]; the runner adds the reward.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::chat::Message;
use crate::error_text::error_chain;
use crate::rollout::answer::extract_final_answer;
use crate::rollout::code_blocks::extract_code_blocks;
use crate::rollout::config::{AgentConfig, AgentKind, default_system_prompt};
use crate::rollout::dataset::Problem;
use crate::rollout::policy::{ModelReply, Policy, TurnRequest, Usage};
use crate::rollout::reward::Reward;
use crate::rollout::user_tools::tool_result;
use crate::slot::{Backend, ErrorKind, ExecutionMetadata, ExecutionResult, Slot, ToolCall};
use crate::truncation::{TokenCounter, TruncationError};

/// Why a trajectory ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The assistant gave a final answer (`\boxed{}` or `<answer>`).
    FinalAnswer,
    /// The assistant's reply had no code, no tool calls and no final answer.
    NoAction,
    /// The turn limit was reached.
    MaxTurns,
    /// The context budget was reached.
    ContextBudget,
    /// The policy gave no turn (the model endpoint failed, or the oracle ran out of turns).
    PolicyError,
    /// The engine could not prepare the next turn (the tokenizer failed to count the
    /// conversation for the context budget).
    EngineError,
}

/// One code block or tool call of a step, with its result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepCall {
    /// The tool call id the result answers (tools agent only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// The call as it ran.
    pub call: ToolCall,
    /// Its result: output, timing (`metadata.duration_us`) and any limit hit.
    pub result: ExecutionResult,
}

/// One assistant turn and what it ran.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// The 0-based turn.
    pub turn: usize,
    /// Time waiting for the policy, in milliseconds.
    pub model_ms: f64,
    /// Time running this turn's calls, wall clock, in milliseconds.
    pub tool_ms: f64,
    /// The engine's own time this turn, in milliseconds: from the reply's arrival to the next
    /// request (code extraction, dispatch, messages, and counting the conversation for an
    /// exact context budget before the request), minus the time the calls ran in their slots.
    /// The model's time is not in it.
    #[serde(default)]
    pub overhead_ms: f64,
    /// Token usage of the reply, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The reply's logprobs, when the server returned them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
    /// The reply's finish reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// HTTP attempts the reply took.
    pub attempts: u32,
    /// What was wrong with the server's report of the reply (see
    /// [`crate::rollout::policy::parse_usage`]), each as a sentence.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomalies: Vec<String>,
    /// The code blocks or tool calls it ran, in order.
    pub calls: Vec<StepCall>,
}

/// Summed token counts of a trajectory, when the policy reported them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Prompt tokens, summed over turns.
    pub prompt_tokens: u64,
    /// Generated tokens, summed over turns.
    pub completion_tokens: u64,
}

impl TokenCounts {
    /// Adds `other`, saturating at `u64::MAX` rather than wrapping; a sentence for each sum that
    /// saturated, to record as an anomaly.
    pub fn add(&mut self, other: TokenCounts) -> Vec<String> {
        let mut anomalies = Vec::new();
        for (name, sum, add) in [
            ("prompt_tokens", &mut self.prompt_tokens, other.prompt_tokens),
            (
                "completion_tokens",
                &mut self.completion_tokens,
                other.completion_tokens,
            ),
        ] {
            match sum.checked_add(add) {
                Some(total) => *sum = total,
                None => {
                    *sum = u64::MAX;
                    anomalies.push(format!("the sum of {name} passed {}; kept at that", u64::MAX));
                }
            }
        }
        anomalies
    }
}

/// A finished agent loop, before scoring.
#[derive(Clone, Debug, PartialEq)]
pub struct Episode {
    /// Every message, system prompt first.
    pub messages: Vec<Message>,
    /// One entry per assistant turn.
    pub steps: Vec<Step>,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// The policy's error, for [`StopReason::PolicyError`].
    pub policy_error: Option<(String, String)>,
    /// The final answer of the last assistant message, if any.
    pub final_answer: Option<String>,
    /// The conversation's exact token count at the last budget check, when a tokenizer is set.
    pub context_tokens: Option<u64>,
}

/// A scored trajectory: one line of `trajectories.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trajectory {
    /// `<instance_id>/<sample>`, unique in a rollout; resume skips ids already written.
    pub trajectory_id: String,
    /// The problem.
    pub instance_id: String,
    /// The sample's index within its group.
    pub sample: usize,
    /// The agent loop.
    pub agent: AgentKind,
    /// The policy's name (`oracle` or the model).
    pub policy: String,
    /// The full conversation, system prompt first: with `steps[].logprobs`, a training sample.
    pub messages: Vec<Message>,
    /// One entry per assistant turn.
    pub steps: Vec<Step>,
    /// Why it ended.
    pub stop_reason: StopReason,
    /// The policy error's kind and message, when it ended on one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<TrajectoryError>,
    /// The extracted final answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_answer: Option<String>,
    /// The reward and its breakdown.
    pub reward: Reward,
    /// Summed token usage, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<TokenCounts>,
    /// What was wrong with the trajectory's numbers as a whole (a token sum that saturated);
    /// each step's own anomalies are in `steps[].anomalies`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomalies: Vec<String>,
    /// The conversation's exact token count (model's tokenizer and chat template, tool schemas
    /// included) at the last context-budget check, when a tokenizer was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_tokens: Option<u64>,
    /// Assistant turns taken.
    pub turns: usize,
    /// Total time waiting for the policy, in milliseconds.
    pub model_ms: f64,
    /// Total time running calls, in milliseconds.
    pub tool_ms: f64,
    /// Time computing the reward, in milliseconds.
    pub reward_ms: f64,
    /// Wall-clock time of the whole trajectory, slot start to release, in milliseconds.
    pub wall_ms: f64,
    /// The seeds its slots had, in a seeded rollout (`--seed`): what `rollout --replay` needs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<SlotSeeds>,
    /// The problem's `setup_code` cell as it ran, before the first turn: in this trajectory's
    /// own slot, or once for the whole group in the slot it was forked from (then `branch`
    /// says so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub setup: Option<StepCall>,
    /// Where this trajectory branched off its group's shared prefix, when its slot was forked
    /// from one (`--branch-after-turn`, or a `setup_code` run once per group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<Branch>,
}

/// Where a branched trajectory left its group's shared prefix.
///
/// The group's first `prefix_steps` turns ran once, in a slot of their own
/// (`parent_trajectory_id`), which was then forked once per sample. Every trajectory of the
/// group holds the same first `prefix_messages` messages and `prefix_steps` steps, copied from
/// that one run: a trainer credits them once per group, and each trajectory's own tokens start
/// at message `prefix_messages`. The trajectory's `model_ms`, `tool_ms` and `tokens` cover its
/// own steps only; the prefix's times are here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Branch {
    /// The group: the problem's `instance_id`.
    pub group_id: String,
    /// The id the shared prefix ran under (`<instance_id>/prefix`); never a line of its own.
    pub parent_trajectory_id: String,
    /// The turn the group branched after (`--branch-after-turn K`; 0 when only the setup was
    /// shared).
    pub after_turn: usize,
    /// Messages shared by the whole group, system prompt first.
    pub prefix_messages: usize,
    /// Steps shared by the whole group. Less than `after_turn` when the prefix ended early (a
    /// final answer): then every sample is that one trajectory.
    pub prefix_steps: usize,
    /// Which fork of the parent this trajectory's slot was (0-based; the sample's index). A
    /// seeded slot's seed is `derive_fork_seed(seeds.prefix_slot, fork_index)`.
    pub fork_index: usize,
    /// Time the prefix waited for the policy, in milliseconds (once for the group).
    pub prefix_model_ms: f64,
    /// Time the prefix ran calls (setup included), in milliseconds (once for the group).
    pub prefix_tool_ms: f64,
}

/// The seeds of a seeded trajectory's slots: each slot's seed as the backend used it, so one
/// trajectory can be replayed alone without the rest of its run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotSeeds {
    /// The run seed (`--seed N`).
    pub run: u64,
    /// The trajectory's own slot: `derive_slot_seed(run, instance_id, sample)`.
    pub slot: u64,
    /// The fresh slot its reward was computed in, if any: `derive_fork_seed(slot, 0)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_slot: Option<u64>,
    /// For a branched trajectory, the slot its group's shared prefix ran in, which its own slot
    /// was forked from: `derive_slot_seed(run, "<instance_id>/prefix", 0)`. Its own `slot` is
    /// then `derive_fork_seed(prefix_slot, branch.fork_index)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_slot: Option<u64>,
}

impl SlotSeeds {
    /// The seeds of sample `sample` of `instance_id` in a run seeded with `run`.
    pub fn derive(run: u64, instance_id: &str, sample: usize) -> Self {
        let slot = crate::seed::derive_slot_seed(run, instance_id, sample as u64);
        SlotSeeds {
            run,
            slot,
            reward_slot: Some(crate::seed::derive_fork_seed(slot, 0)),
            prefix_slot: None,
        }
    }

    /// The seed of the slot a group's shared prefix runs in, in a run seeded with `run`.
    pub fn prefix(run: u64, instance_id: &str) -> u64 {
        crate::seed::derive_slot_seed(run, &prefix_trajectory_id(instance_id), 0)
    }

    /// The seeds of the continuation forked as fork `fork_index` from a prefix slot seeded
    /// with `prefix_slot`: the fork's seed is the one the backend derives for it.
    pub fn forked(run: u64, prefix_slot: u64, fork_index: usize) -> Self {
        let slot = crate::seed::derive_fork_seed(prefix_slot, fork_index as u64);
        SlotSeeds {
            run,
            slot,
            reward_slot: Some(crate::seed::derive_fork_seed(slot, 0)),
            prefix_slot: Some(prefix_slot),
        }
    }
}

/// The trajectory id a group's shared prefix runs under.
pub fn prefix_trajectory_id(instance_id: &str) -> String {
    format!("{instance_id}/prefix")
}

/// An error recorded in a trajectory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrajectoryError {
    /// A stable name for counting (`model_timeout`, `oracle_out_of_turns`, ...).
    pub kind: String,
    /// The message with its causes.
    pub message: String,
}

/// What an agent loop needs besides the problem.
pub struct AgentContext<'a> {
    /// Where calls run.
    pub backend: &'a dyn Backend,
    /// The trajectory's slot.
    pub slot: &'a Slot,
    /// Who writes the assistant turns.
    pub policy: &'a dyn Policy,
    /// How the loop runs.
    pub config: &'a AgentConfig,
    /// The function schemas offered to the tools agent.
    pub tools: &'a [Value],
    /// Becomes `true` when the rollout is interrupted.
    pub stop: watch::Receiver<bool>,
    /// The seed the policy samples with, in a seeded rollout (the trajectory's slot seed).
    pub seed: Option<u64>,
}

/// Runs the configured loop on `problem`. `None` means the rollout was interrupted first and
/// the trajectory was abandoned.
///
/// A notebook reply's code runs even when the reply also gives the final answer (a coding
/// task's answer often defines the function and says `\boxed{done}`), so its outputs are the
/// last message. A tools reply with calls never ends the loop: the model sees their results.
pub async fn run_agent(context: &mut AgentContext<'_>, problem: &Problem) -> Option<Episode> {
    let state = AgentState::start(context.config, problem);
    run_agent_from(context, problem, state).await
}

/// Runs the configured loop on `problem` from `state` (a conversation paused between turns, as
/// [`run_turns`] leaves it) to its end; see [`run_agent`].
pub async fn run_agent_from(context: &mut AgentContext<'_>, problem: &Problem, state: AgentState) -> Option<Episode> {
    Some(
        match run_turns(context, problem, state, context.config.max_turns).await? {
            Turns::Ended(episode) => episode,
            Turns::Paused(state) => Episode::ended(
                state.messages,
                state.steps,
                StopReason::MaxTurns,
                None,
                state.context_tokens,
            ),
        },
    )
}

/// A conversation paused between two turns: what a branch point hands to every continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentState {
    /// Every message so far, system prompt first.
    pub messages: Vec<Message>,
    /// One entry per assistant turn taken; the next turn's index is its length.
    pub steps: Vec<Step>,
    /// Whether the `tools` agent's user tools are loaded in the slot (a fork inherits them).
    pub tools_loaded: bool,
    /// The conversation's exact token count at the last budget check.
    pub context_tokens: Option<u64>,
}

impl AgentState {
    /// The state before the first turn: the system prompt and the problem.
    pub fn start(config: &AgentConfig, problem: &Problem) -> Self {
        let system = config
            .system_prompt
            .clone()
            .unwrap_or_else(|| default_system_prompt(config));
        AgentState {
            messages: vec![Message::system(system), Message::user(problem.problem.clone())],
            steps: Vec::new(),
            tools_loaded: false,
            context_tokens: None,
        }
    }
}

/// Where [`run_turns`] stopped.
#[derive(Clone, Debug, PartialEq)]
pub enum Turns {
    /// The trajectory ended (a final answer, no action, the budget, an error) before the turn
    /// asked for.
    Ended(Episode),
    /// The turn asked for was reached with the trajectory still going.
    Paused(AgentState),
}

/// Runs turns of the configured loop on `problem` from `state` until turn `until_turn` (0-based,
/// not run) or the trajectory's end, whichever is first. `None` means the rollout was
/// interrupted and the trajectory abandoned. A branched rollout runs a group's first K turns
/// with `until_turn = K` once, then each continuation from the paused state.
pub async fn run_turns(
    context: &mut AgentContext<'_>,
    problem: &Problem,
    state: AgentState,
    until_turn: usize,
) -> Option<Turns> {
    let AgentState {
        mut messages,
        mut steps,
        mut tools_loaded,
        mut context_tokens,
    } = state;
    let offered: &[Value] = if context.config.kind == AgentKind::Tools {
        context.tools
    } else {
        &[]
    };
    let budget = match BudgetCheck::new(context.config, offered) {
        Ok(budget) => budget,
        Err(error) => {
            return Some(Turns::Ended(Episode::engine_error(
                messages,
                steps,
                &error,
                context_tokens,
            )));
        }
    };
    for turn in steps.len()..until_turn.min(context.config.max_turns) {
        let counting = Instant::now();
        if let Some(budget) = &budget {
            match budget.count(&messages) {
                Ok(count) => context_tokens = Some(count),
                Err(error) => {
                    return Some(Turns::Ended(Episode::engine_error(
                        messages,
                        steps,
                        &error,
                        context_tokens,
                    )));
                }
            }
            if context_tokens.is_some_and(|count| count > budget.budget) {
                return Some(Turns::Ended(Episode::ended(
                    messages,
                    steps,
                    StopReason::ContextBudget,
                    None,
                    context_tokens,
                )));
            }
        }
        let counting_ms = millis(counting.elapsed());
        let started = Instant::now();
        let request = TurnRequest {
            problem,
            messages: &messages,
            tools: offered,
            turn,
            agent: context.config.kind,
            code_tags: &context.config.code_tags,
            seed: context.seed,
        };
        let reply = tokio::select! {
            reply = context.policy.next_turn(request) => reply,
            () = stopped(&mut context.stop) => return None,
        };
        let model_ms = millis(started.elapsed());
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                let policy_error = Some((error.kind().to_owned(), error_chain(&error)));
                return Some(Turns::Ended(Episode {
                    messages,
                    steps,
                    stop_reason: StopReason::PolicyError,
                    policy_error,
                    final_answer: None,
                    context_tokens,
                }));
            }
        };
        let turn_started = Instant::now();
        let ModelReply {
            message,
            usage,
            logprobs,
            finish_reason,
            attempts,
            anomalies,
        } = reply;
        let text = message.text().into_owned();
        let final_answer = extract_final_answer(&text);
        let tool_calls = message.tool_calls().to_vec();
        messages.push(message);
        let started = Instant::now();
        let (calls, replies) = match context.config.kind {
            AgentKind::Notebook => run_code_blocks(context, &text).await,
            AgentKind::Tools => run_tool_calls(context, &tool_calls, &mut tools_loaded).await,
        };
        let tool_ms = if calls.is_empty() {
            0.0
        } else {
            millis(started.elapsed())
        };
        let ran_something = !calls.is_empty();
        messages.extend(replies);
        let in_slots_ms = calls
            .iter()
            .map(|c| c.result.metadata.duration_us as f64 / 1e3)
            .sum::<f64>();
        let overhead_ms = counting_ms + (millis(turn_started.elapsed()) - in_slots_ms).max(0.0);
        steps.push(Step {
            turn,
            model_ms,
            tool_ms,
            overhead_ms,
            usage,
            logprobs,
            finish_reason,
            attempts,
            anomalies,
            calls,
        });
        let stop_reason = if final_answer.is_some() && !(context.config.kind == AgentKind::Tools && ran_something) {
            Some(StopReason::FinalAnswer)
        } else if !ran_something {
            Some(StopReason::NoAction)
        } else if budget.is_none()
            && context
                .config
                .max_context_tokens
                .is_some_and(|limit| usage.is_some_and(|u| u.total_tokens >= limit))
        {
            Some(StopReason::ContextBudget)
        } else {
            None
        };
        if let Some(stop_reason) = stop_reason {
            return Some(Turns::Ended(Episode {
                messages,
                steps,
                stop_reason,
                policy_error: None,
                final_answer,
                context_tokens,
            }));
        }
        if *context.stop.borrow() {
            return None;
        }
    }
    Some(Turns::Paused(AgentState {
        messages,
        steps,
        tools_loaded,
        context_tokens,
    }))
}

impl Episode {
    fn ended(
        messages: Vec<Message>,
        steps: Vec<Step>,
        stop_reason: StopReason,
        final_answer: Option<String>,
        context_tokens: Option<u64>,
    ) -> Self {
        Episode {
            messages,
            steps,
            stop_reason,
            policy_error: None,
            final_answer,
            context_tokens,
        }
    }

    fn engine_error(
        messages: Vec<Message>,
        steps: Vec<Step>,
        error: &TruncationError,
        context_tokens: Option<u64>,
    ) -> Self {
        let policy_error = Some(("token_count".to_owned(), error_chain(error)));
        Episode {
            policy_error,
            ..Episode::ended(messages, steps, StopReason::EngineError, None, context_tokens)
        }
    }
}

/// The exact context-budget check: the model's tokenizer and chat template over the
/// conversation and the offered tool schemas ([`TokenCounter::count_prompt`]: rendered by a
/// model's own template; with a built-in one, one JSON line each, as Qwen's template lists them).
struct BudgetCheck<'a> {
    counter: &'a TokenCounter,
    budget: u64,
    tools: &'a [Value],
}

impl<'a> BudgetCheck<'a> {
    /// `None` unless both a budget and a tokenizer are configured.
    fn new(config: &'a AgentConfig, tools: &'a [Value]) -> Result<Option<Self>, TruncationError> {
        let (Some(budget), Some(counter)) = (config.max_context_tokens, config.token_counter.as_deref()) else {
            return Ok(None);
        };
        Ok(Some(BudgetCheck { counter, budget, tools }))
    }

    /// The prompt's tokens if `messages` were sent now.
    fn count(&self, messages: &[Message]) -> Result<u64, TruncationError> {
        Ok(self.counter.count_prompt(messages, self.tools)? as u64)
    }
}

/// Resolves once the stop flag is (or becomes) `true`; never if its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Runs a notebook reply's code blocks in order as one batch in the slot; the outputs, each in
/// the output tag, come back as one user message.
async fn run_code_blocks(context: &AgentContext<'_>, text: &str) -> (Vec<StepCall>, Vec<Message>) {
    let blocks = extract_code_blocks(text, &context.config.code_tags);
    if blocks.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let calls: Vec<ToolCall> = blocks.into_iter().map(|b| ToolCall::python(b.code)).collect();
    let batch = calls.iter().map(|c| (context.slot.clone(), c.clone())).collect();
    let results = context.backend.execute_batch(batch).await;
    let tag = &context.config.output_tag;
    let reply = results
        .iter()
        .map(|r| format!("<{tag}>\n{}\n</{tag}>", r.output.trim_end()))
        .collect::<Vec<_>>()
        .join("\n");
    let calls = calls
        .into_iter()
        .zip(results)
        .map(|(call, result)| StepCall {
            tool_call_id: None,
            call,
            result,
        })
        .collect();
    (calls, vec![Message::user(reply)])
}

/// Runs an assistant message's tool calls as one batch in the slot; each result comes back as
/// a `role: tool` message answering its call id. Arguments that are not a JSON object (or do
/// not fit a user tool) get an error result without running.
///
/// A user tool runs as a `python` cell. When the batch calls one and the tools are not loaded
/// in the slot yet, the cell that loads them goes first in the same batch; its time is added to
/// the first user tool call's. `tools_loaded` is cleared when the slot's interpreter restarted.
async fn run_tool_calls(
    context: &AgentContext<'_>,
    tool_calls: &[crate::chat::ToolCall],
    tools_loaded: &mut bool,
) -> (Vec<StepCall>, Vec<Message>) {
    let user_tools = &context.config.user_tools;
    let planned: Vec<(String, ToolCall, Dispatch)> = tool_calls.iter().map(|call| plan_call(context, call)).collect();
    let calls_user_tool = planned.iter().any(|(_, _, d)| matches!(d, Dispatch::UserTool(_)));
    let load_first = calls_user_tool && !*tools_loaded;
    let mut batch: Vec<(Slot, ToolCall)> = Vec::with_capacity(planned.len() + 1);
    if load_first {
        batch.push((context.slot.clone(), user_tools.load_call()));
    }
    for (_, _, dispatch) in &planned {
        if let Dispatch::Run(call) | Dispatch::UserTool(call) = dispatch {
            batch.push((context.slot.clone(), call.clone()));
        }
    }
    let mut results = if batch.is_empty() {
        Vec::new()
    } else {
        context.backend.execute_batch(batch).await
    }
    .into_iter();
    let load = if load_first { results.next() } else { None };
    *tools_loaded = load.as_ref().map_or(*tools_loaded, |l| l.success);
    let mut load_us = load.as_ref().map_or(0, |l| l.metadata.duration_us);
    let mut calls = Vec::with_capacity(planned.len());
    let mut replies = Vec::with_capacity(planned.len());
    for (id, call, dispatch) in planned {
        let missing = || {
            ExecutionResult::failure(
                ErrorKind::Backend,
                "the backend returned no result for the call",
                ExecutionMetadata::default(),
            )
        };
        let result = match dispatch {
            Dispatch::Failed(result) => result,
            Dispatch::Run(_) => results.next().unwrap_or_else(missing),
            Dispatch::UserTool(_) => {
                let mut result = tool_result(&call.name, results.next().unwrap_or_else(missing));
                // A remote backend reports these times: saturate rather than wrap.
                result.metadata.duration_us = result.metadata.duration_us.saturating_add(std::mem::take(&mut load_us));
                if let Some(load) = load.as_ref().filter(|l| !l.success) {
                    result.output = format!(
                        "failed to load the tools in the slot, so `{}` did not run: {}",
                        call.name,
                        load.output.trim()
                    );
                }
                result
            }
        };
        if result.metadata.state_lost {
            *tools_loaded = false;
        }
        replies.push(Message::tool(id.clone(), result.output.clone()));
        calls.push(StepCall {
            tool_call_id: Some(id),
            call,
            result,
        });
    }
    (calls, replies)
}

/// How one tool call of a message runs.
#[allow(
    clippy::large_enum_variant,
    reason = "one short-lived value per tool call; boxing the result would only add an allocation"
)]
enum Dispatch {
    /// As itself, by the backend.
    Run(ToolCall),
    /// A user tool, as this `python` cell.
    UserTool(ToolCall),
    /// Not at all: its arguments are unusable, and this is its result.
    Failed(ExecutionResult),
}

/// The call id, the call as the model made it (as recorded in the step), and how it runs.
fn plan_call(context: &AgentContext<'_>, call: &crate::chat::ToolCall) -> (String, ToolCall, Dispatch) {
    let name = call.function.name.clone();
    let metadata = || ExecutionMetadata {
        tool: name.clone(),
        slot_id: Some(context.slot.id),
        ..Default::default()
    };
    let arguments = match serde_json::from_str::<Value>(&call.function.arguments) {
        Ok(arguments @ Value::Object(_)) => arguments,
        Ok(_) | Err(_) => {
            let failure = ExecutionResult::failure(
                ErrorKind::InvalidArguments,
                "the arguments are not a JSON object; call the tool again with valid JSON arguments",
                metadata(),
            );
            let raw = Value::String(call.function.arguments.clone());
            return (call.id.clone(), ToolCall::new(name, raw), Dispatch::Failed(failure));
        }
    };
    let dispatch = match context.config.user_tools.call(&name, &arguments) {
        None => Dispatch::Run(ToolCall::new(name.clone(), arguments.clone())),
        Some(Ok(cell)) => Dispatch::UserTool(cell),
        Some(Err(mut failure)) => {
            failure.metadata = metadata();
            Dispatch::Failed(failure)
        }
    };
    (call.id.clone(), ToolCall::new(name, arguments), dispatch)
}
