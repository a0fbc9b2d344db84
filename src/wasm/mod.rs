//! The wasm backend: notebook slots that are CPython interpreters in wasmtime instances.
//!
//! - [`backend`](WasmBackend): the [`crate::Backend`] implementation, its config and slot table;
//! - `engine`: the one wasmtime configuration, and the epoch ticker that enforces time limits;
//! - `factory`: what every interpreter shares, and how a new one starts (restored or booted);
//! - `interpreter`: one live interpreter, running a cell and shaping its result;
//! - `host`: the store's host state, the memory limiter and the door;
//! - `bootstrap`: the Python the host sends a new interpreter, and the guest's environment;
//! - `snapshot`, `module_shape`: memory snapshots new interpreters restore, and their checks;
//! - `poll`, `capture`: the deadline-aware `poll_oneoff` and the captured stdout/stderr;
//! - `world`: a seeded slot's entropy stream and virtual clock (`--seed`);
//! - `rollback`: a slot's memory as it was before its running cell, to go back to (`--rollback`);
//! - [`runtime`]: the pinned CPython runtime, installed and compiled once.

mod backend;
mod bootstrap;
mod capture;
mod cow;
mod descriptors;
mod disk;
mod engine;
mod factory;
mod file_size;
mod host;
mod interpreter;
mod module_shape;
mod poll;
mod rollback;
pub mod runtime;
mod snapshot;
mod world;

pub use backend::{
    DEFAULT_PROFILE, DEFAULT_PROFILE_MIN_MEMORY, TOOLS, WasmBackend, WasmBackendConfig, WasmBackendError,
};
pub use factory::RollbackError;
pub use interpreter::{RestoreError, StartError};
