//! The wasm backend: notebook slots that are CPython interpreters in wasmtime instances.

mod backend;
mod capture;
mod engine;
mod interpreter;
mod module_shape;
mod poll;
mod snapshot;

pub use backend::{TOOLS, WasmBackend, WasmBackendConfig, WasmBackendError};
pub use interpreter::StartError;
/// How a cell's report and result read; the `process` backend's cells share them.
pub(crate) use interpreter::{GuestReport, finished_cell, render_for_model};
pub use snapshot::RestoreError;
