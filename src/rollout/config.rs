//! The settings a rollout runs with: which agent loop ([`AgentKind`]), how it runs
//! ([`AgentConfig`]), and the rollout around it ([`RolloutConfig`]). Plain data, shared by the
//! agent loops, the policies, the runner and the summary.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::rollout::code_blocks::CodeTags;
use crate::rollout::user_tools::UserTools;
use crate::truncation::TokenCounter;

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
    /// The context budget, in tokens. With a [`AgentConfig::token_counter`], the conversation
    /// is counted exactly before each policy turn and the trajectory stops when the count
    /// exceeds the budget (this works offline, under the oracle too). Without one, it stops
    /// once the server reports a conversation of at least this many tokens (prompt plus
    /// completion of the last reply); unknown usage (the oracle) never stops on it.
    pub max_context_tokens: Option<u64>,
    /// The model's tokenizer and chat template, for the exact budget check.
    pub token_counter: Option<Arc<TokenCounter>>,
    /// Extra tools the `tools` agent offers besides the backend's, run as Python in the slot:
    /// [`UserTools::calculator_only`] by default.
    pub user_tools: Arc<UserTools>,
}

impl AgentConfig {
    /// Defaults for `kind`: 8 turns, `<code>`/`</code>`, output tag `output`, the default system
    /// prompt, no context budget, and the built-in `calculator` as the only extra tool of the
    /// `tools` agent.
    pub fn new(kind: AgentKind) -> Self {
        let user_tools = match kind {
            AgentKind::Tools => UserTools::calculator_only(),
            AgentKind::Notebook => Arc::default(),
        };
        AgentConfig {
            kind,
            max_turns: 8,
            code_tags: CodeTags::default(),
            output_tag: "output".to_owned(),
            system_prompt: None,
            max_context_tokens: None,
            token_counter: None,
            user_tools,
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
        AgentKind::Tools => "Solve the task. Use the python tool to run code in a persistent, sandboxed notebook, and \
                             the other tools when they help. When you are done, reply without tool calls and give the \
                             final answer as \\boxed{...}."
            .to_owned(),
    }
}

/// How a rollout runs.
#[derive(Clone, Debug)]
pub struct RolloutConfig {
    /// The agent loop and its settings.
    pub agent: AgentConfig,
    /// Trajectories per problem (G in GRPO).
    pub group_size: usize,
    /// Most trajectories running at once (each holds one slot).
    pub concurrency: usize,
    /// The output folder.
    pub out_dir: PathBuf,
    /// Skip trajectories already in `trajectories.jsonl` instead of refusing to run.
    pub resume: bool,
    /// A Python reward function's source (see [`crate::rollout::reward::custom_reward`]) that
    /// replaces the math and code rewards.
    pub custom_reward: Option<Arc<str>>,
    /// Compute each reward in a new slot holding only the trajectory's definitions, rather
    /// than in the trajectory's own slot; see [`crate::rollout::fresh_slot`].
    pub score_in_fresh_slot: bool,
    /// The run seed (`--seed N`): each trajectory's slot gets
    /// [`derive_slot_seed`](crate::seed::derive_slot_seed)`(N, instance_id, sample)` and its
    /// fresh reward slot that seed's first fork, both recorded in the trajectory
    /// ([`SlotSeeds`](crate::rollout::agent::SlotSeeds)) so it can be replayed alone. `None`:
    /// fresh entropy and real time.
    pub seed: Option<u64>,
    /// Branch each group after this many turns (`--branch-after-turn K`): the first K turns
    /// (and the problem's `setup_code`) run once per problem, then the slot and the
    /// conversation are forked into `group_size` continuations; see
    /// [`crate::rollout::branching`]. Needs a backend that can fork. `None`: every sample
    /// plays all its turns in its own slot (a `setup_code` is still run once per problem when
    /// the backend can fork and `group_size > 1`).
    pub branch_after_turn: Option<usize>,
}
