//! Rollouts: agent trajectories over a dataset, each in its own slot, scored and written out.
//!
//! The pieces, one module per concern:
//! - [`config`] holds the settings: the agent loop and the rollout around it;
//! - [`dataset`] reads problems from JSONL, with per-line errors;
//! - [`code_blocks`] finds the code a notebook agent's message asks to run;
//! - [`answer`] extracts final answers and compares plain numbers on the host;
//! - [`policy`] writes the assistant turns (the offline [`policy::OraclePolicy`] or an
//!   OpenAI-compatible [`policy::ChatClient`]);
//! - [`agent`] holds the `notebook` and `tools` loops that turn a problem into a [`Trajectory`];
//! - [`user_tools`] turns Python files of typed functions (and the built-in `calculator`) into
//!   extra tools that run in the trajectory's slot;
//! - [`reward`] computes math and code rewards in the trajectory's own slot, or
//!   [`fresh_slot`] in a new one;
//! - [`runner`] handles groups, concurrency, `trajectories.jsonl`, resume and interruption;
//! - [`branching`] runs a group's shared prefix (its `setup_code` and first K turns) once and
//!   forks the slot into the group's continuations;
//! - [`summary`] adds it all up in `summary.json`;
//! - [`replay`] runs one seeded trajectory's calls again and finds the first divergence;
//! - [`scan_cost`] counts the bytes the parsers of model output read, to test that their cost is
//!   linear (see `docs/hostile-model.md` for every limit on what a model can send);
//! - [`swe`] prepares and scores SWE tasks (a repository at a commit, its tests as the reward).

pub mod agent;
pub mod answer;
pub mod branching;
pub mod code_blocks;
pub mod config;
pub mod dataset;
pub mod fresh_slot;
pub mod policy;
pub mod replay;
pub mod reward;
pub mod runner;
pub mod scan_cost;
pub mod summary;
pub mod swe;
pub mod user_tools;

pub use agent::{StopReason, Trajectory};
pub use config::{AgentConfig, AgentKind, RolloutConfig};
pub use dataset::{Dataset, Problem};
pub use policy::{ChatClient, ChatClientConfig, OraclePolicy, Policy};
pub use runner::{RolloutError, RolloutReporter, RolloutRun, StopSignal, run_rollout};
pub use summary::Summary;
pub use user_tools::{ToolsFile, UserTools};
