//! rollbox's one integration-test binary: a module per area, over the real runtime.

mod bench;
mod cli;
mod conformance;
mod guest_paths;
mod hostile;
mod hostile_cells;
mod parity;
mod process;
mod remote;
mod reproducibility;
mod rollout;
mod runtime;
mod server;
mod support;
mod swe;
mod truncation;
mod wasm;
