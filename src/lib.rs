//! rollbox: an execution engine for LLM-agent rollouts.
//!
//! Agents' tool calls and notebook cells run in *slots* behind one [`Backend`] trait:
//! `acquire(trajectory_id) -> Slot`, `execute_batch([(slot, call)])`, `release(slot, reset)`.
//! The default backend, [`wasm::WasmBackend`], gives each slot a live CPython 3.15
//! interpreter in its own wasmtime instance, so state persists across cells like a Jupyter
//! kernel, at microseconds per call.
//!
//! The modules, in the order a reader meets them (docs/ARCHITECTURE.md has the long form):
//! - [`slot`]: the slot API every backend implements, its [`Limits`], its tools and the cell
//!   report every Python-running backend shares;
//! - the backends: [`wasm`] (the default), [`process`] (bubblewrap on a real host) and
//!   [`remote`] (HTTP to `rollbox serve`);
//! - the applications: [`server`] (`rollbox serve`), [`rollout`] (agents over datasets, scored),
//!   [`report`] (a rollout as notebooks and as one HTML report),
//!   [`truncation`] (conversations cut to a token budget) and [`bench`] (measurements of any
//!   backend, shared by `rollbox bench`, the criterion benches and their tests);
//! - shared vocabulary: [`chat`], [`env_vars`], [`error_text`], [`reporter`] and [`seed`] (how
//!   `--seed` becomes one seed per slot).
#![warn(missing_docs)]

pub mod slot;

pub mod process;
pub mod remote;
pub mod wasm;

pub mod bench;
pub mod report;
pub mod rollout;
pub mod server;
pub mod truncation;

pub mod chat;
pub mod env_vars;
pub mod error_text;
pub mod reporter;
pub mod seed;

#[doc(hidden)]
pub mod fuzzing;

pub use reporter::{Reporter, SilentReporter};
pub use slot::{
    Backend, BackendError, CellError, CellOutput, ErrorKind, ExecutionError, ExecutionMetadata, ExecutionResult,
    LimitKind, Limits, Slot, SlotId, ToolCall, ToolName,
};
pub use wasm::{WasmBackend, WasmBackendConfig};
