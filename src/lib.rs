//! rollbox: an execution engine for LLM-agent rollouts.
//!
//! Agents' tool calls and notebook cells run in *slots* behind one [`Backend`] trait:
//! `acquire(trajectory_id) -> Slot`, `execute_batch([(slot, call)])`, `release(slot, reset)`.
//! The default backend, [`wasm::WasmBackend`], gives each slot a live CPython 3.15
//! interpreter in its own wasmtime instance, so state persists across cells like a Jupyter
//! kernel, at microseconds per call.

mod batch;
pub mod bench;
pub mod chat;
pub mod env_vars;
pub mod limits;
pub mod output;
pub mod process;
pub mod remote;
pub mod reporter;
pub mod rollout;
pub mod runtime;
pub mod server;
pub mod slot;
pub mod swe;
pub mod tools;
pub mod truncation;
pub mod wasm;

pub use limits::{LimitKind, Limits};
pub use reporter::{Reporter, SilentReporter};
pub use slot::{
    Backend, BackendError, CellError, CellOutput, ErrorKind, ExecutionError, ExecutionMetadata, ExecutionResult, Slot,
    SlotId, ToolCall,
};
pub use tools::ToolName;
pub use wasm::{WasmBackend, WasmBackendConfig};
