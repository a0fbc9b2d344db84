//! The wasm backend: notebook slots that are CPython interpreters in wasmtime instances.

mod backend;
mod capture;
mod engine;
mod interpreter;
mod poll;

pub use backend::{TOOLS, WasmBackend, WasmBackendConfig, WasmBackendError};
pub use interpreter::StartError;
/// How a cell's result reads for a model; the `process` backend renders its cells the same way.
pub(crate) use interpreter::render_for_model;
