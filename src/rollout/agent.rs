//! The agent loops: `notebook` (code in tags, outputs as the next user message) and `tools`
//! (OpenAI function calling, results as `role: tool` messages). Each runs one problem in one
//! slot and returns an [`Episode`]; the runner adds the reward.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::chat::Message;
use crate::output::error_chain;
use crate::rollout::answer::extract_final_answer;
use crate::rollout::code_blocks::{CodeTags, extract_code_blocks};
use crate::rollout::dataset::Problem;
use crate::rollout::policy::{ModelReply, Policy, TurnRequest, Usage};
use crate::rollout::reward::Reward;
use crate::slot::{Backend, ErrorKind, ExecutionMetadata, ExecutionResult, Slot, ToolCall};

/// Which agent loop runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentKind {
    /// Code in `<code>` blocks (or fenced python), run in order; outputs come back as the next
    /// user message in an output tag.
    Notebook,
    /// OpenAI function calling with the backend's tool schemas; results as `role: tool`.
    Tools,
}

impl AgentKind {
    /// The agent's name, as on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Notebook => "notebook",
            AgentKind::Tools => "tools",
        }
    }
}

/// How an agent loop runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The loop.
    pub kind: AgentKind,
    /// Most assistant turns per trajectory.
    pub max_turns: usize,
    /// The notebook agent's code tags.
    pub code_tags: CodeTags,
    /// The tag the notebook agent wraps each block's output in (`output` gives
    /// `<output>...</output>`).
    pub output_tag: String,
    /// The system message; `None` uses [`default_system_prompt`].
    pub system_prompt: Option<String>,
    /// Stop once the server reports a conversation of at least this many tokens (prompt plus
    /// completion of the last reply). Unknown usage (the oracle) never stops on it.
    pub max_context_tokens: Option<u64>,
}

impl AgentConfig {
    /// Defaults for `kind`: 8 turns, `<code>`/`</code>`, output tag `output`, the default system
    /// prompt, no context budget.
    pub fn new(kind: AgentKind) -> Self {
        AgentConfig {
            kind,
            max_turns: 8,
            code_tags: CodeTags::default(),
            output_tag: "output".to_owned(),
            system_prompt: None,
            max_context_tokens: None,
        }
    }
}

/// The system prompt an agent uses when none is configured.
pub fn default_system_prompt(config: &AgentConfig) -> String {
    match config.kind {
        AgentKind::Notebook => format!(
            "Solve the task. To run Python, write it between {open} and {close}; blocks run in order in a \
             persistent notebook (numpy and sympy are available, there is no network) and you will see each \
             block's output between <{tag}> and </{tag}>. When you are done, give the final answer as \\boxed{{...}}.",
            open = config.code_tags.open,
            close = config.code_tags.close,
            tag = config.output_tag,
        ),
        AgentKind::Tools => "Solve the task. Use the python tool to run code in a persistent, sandboxed notebook. \
                             When you are done, reply without tool calls and give the final answer as \\boxed{...}."
            .to_owned(),
    }
}

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
    /// request (code extraction, dispatch, messages), minus the time the calls ran in their
    /// slots. The model's time is not in it.
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
}

/// Runs the configured loop on `problem`. `None` means the rollout was interrupted first and
/// the trajectory was abandoned.
///
/// A notebook reply's code runs even when the reply also gives the final answer (a coding
/// task's answer often defines the function and says `\boxed{done}`), so its outputs are the
/// last message. A tools reply with calls never ends the loop: the model sees their results.
pub async fn run_agent(context: &mut AgentContext<'_>, problem: &Problem) -> Option<Episode> {
    let system = context.config.system_prompt.clone().unwrap_or_else(|| default_system_prompt(context.config));
    let mut messages = vec![Message::system(system), Message::user(problem.problem.clone())];
    let mut steps = Vec::new();
    for turn in 0..context.config.max_turns {
        let started = Instant::now();
        let request = TurnRequest {
            problem,
            messages: &messages,
            tools: if context.config.kind == AgentKind::Tools { context.tools } else { &[] },
            turn,
            agent: context.config.kind,
            code_tags: &context.config.code_tags,
        };
        let reply = tokio::select! {
            reply = context.policy.next_turn(request) => reply,
            () = stopped(&mut context.stop) => return None,
        };
        let model_ms = millis(started.elapsed());
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                let message = error_chain(&error);
                let policy_error = Some((error.kind().to_owned(), message));
                return Some(Episode { messages, steps, stop_reason: StopReason::PolicyError, policy_error, final_answer: None });
            }
        };
        let turn_started = Instant::now();
        let ModelReply { message, usage, logprobs, finish_reason, attempts } = reply;
        let text = message.text().into_owned();
        let final_answer = extract_final_answer(&text);
        let tool_calls = message.tool_calls().to_vec();
        messages.push(message);
        let started = Instant::now();
        let (calls, replies) = match context.config.kind {
            AgentKind::Notebook => run_code_blocks(context, &text).await,
            AgentKind::Tools => run_tool_calls(context, &tool_calls).await,
        };
        let tool_ms = if calls.is_empty() { 0.0 } else { millis(started.elapsed()) };
        let ran_something = !calls.is_empty();
        messages.extend(replies);
        let in_slots_ms = calls.iter().map(|c| c.result.metadata.duration_us as f64 / 1e3).sum::<f64>();
        let overhead_ms = (millis(turn_started.elapsed()) - in_slots_ms).max(0.0);
        steps.push(Step { turn, model_ms, tool_ms, overhead_ms, usage, logprobs, finish_reason, attempts, calls });
        let stop_reason = if final_answer.is_some() && !(context.config.kind == AgentKind::Tools && ran_something) {
            Some(StopReason::FinalAnswer)
        } else if !ran_something {
            Some(StopReason::NoAction)
        } else if context.config.max_context_tokens.is_some_and(|budget| usage.is_some_and(|u| u.total_tokens >= budget)) {
            Some(StopReason::ContextBudget)
        } else {
            None
        };
        if let Some(stop_reason) = stop_reason {
            return Some(Episode { messages, steps, stop_reason, policy_error: None, final_answer });
        }
        if *context.stop.borrow() {
            return None;
        }
    }
    Some(Episode { messages, steps, stop_reason: StopReason::MaxTurns, policy_error: None, final_answer: None })
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
    let reply = results.iter().map(|r| format!("<{tag}>\n{}\n</{tag}>", r.output.trim_end())).collect::<Vec<_>>().join("\n");
    let calls = calls.into_iter().zip(results).map(|(call, result)| StepCall { tool_call_id: None, call, result }).collect();
    (calls, vec![Message::user(reply)])
}

/// Runs an assistant message's tool calls as one batch in the slot; each result comes back as
/// a `role: tool` message answering its call id. Arguments that are not a JSON object get an
/// error result without running.
async fn run_tool_calls(context: &AgentContext<'_>, tool_calls: &[crate::chat::ToolCall]) -> (Vec<StepCall>, Vec<Message>) {
    let mut parsed: Vec<(String, ToolCall, Option<ExecutionResult>)> = Vec::with_capacity(tool_calls.len());
    for call in tool_calls {
        let name = call.function.name.clone();
        match serde_json::from_str::<Value>(&call.function.arguments) {
            Ok(arguments @ Value::Object(_)) => parsed.push((call.id.clone(), ToolCall::new(name, arguments), None)),
            Ok(_) | Err(_) => {
                let metadata = ExecutionMetadata { tool: name.clone(), slot_id: Some(context.slot.id), ..Default::default() };
                let failure = ExecutionResult::failure(
                    ErrorKind::InvalidArguments,
                    "the arguments are not a JSON object; call the tool again with valid JSON arguments",
                    metadata,
                );
                let raw = Value::String(call.function.arguments.clone());
                parsed.push((call.id.clone(), ToolCall::new(name, raw), Some(failure)));
            }
        }
    }
    let batch = parsed.iter().filter(|(_, _, r)| r.is_none()).map(|(_, c, _)| (context.slot.clone(), c.clone())).collect::<Vec<_>>();
    let mut results = if batch.is_empty() { Vec::new() } else { context.backend.execute_batch(batch).await }.into_iter();
    let mut calls = Vec::with_capacity(parsed.len());
    let mut replies = Vec::with_capacity(parsed.len());
    for (id, call, failure) in parsed {
        let result = failure.or_else(|| results.next()).unwrap_or_else(|| {
            ExecutionResult::failure(ErrorKind::Backend, "the backend returned no result for the call", ExecutionMetadata::default())
        });
        replies.push(Message::tool(id.clone(), result.output.clone()));
        calls.push(StepCall { tool_call_id: Some(id), call, result });
    }
    (calls, replies)
}
