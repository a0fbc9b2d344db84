//! Rollouts: agent trajectories over a dataset, each in its own slot, scored and written out.
//!
//! The pieces, one module per concern:
//! - [`dataset`] reads problems from JSONL, with per-line errors;
//! - [`code_blocks`] finds the code a notebook agent's message asks to run;
//! - [`answer`] extracts final answers and compares plain numbers on the host;
//! - [`policy`] writes the assistant turns (the offline [`policy::OraclePolicy`] or an
//!   OpenAI-compatible [`policy::ChatClient`]);
//! - [`agent`] holds the `notebook` and `tools` loops that turn a problem into a [`Trajectory`];
//! - [`reward`] computes math and code rewards in the trajectory's own slot;
//! - [`runner`] handles groups, concurrency, `trajectories.jsonl`, resume and interruption;
//! - [`summary`] adds it all up in `summary.json`.

pub mod agent;
pub mod answer;
pub mod code_blocks;
pub mod dataset;
pub mod policy;
pub mod reward;
pub mod runner;
pub mod summary;

pub use agent::{AgentConfig, AgentKind, StopReason, Trajectory};
pub use dataset::{Dataset, Problem};
pub use policy::{ChatClient, ChatClientConfig, OraclePolicy, Policy};
pub use runner::{RolloutConfig, RolloutError, RolloutReporter, RolloutRun, StopSignal, run_rollout};
pub use summary::Summary;
