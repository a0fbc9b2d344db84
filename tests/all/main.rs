//! rollbox's one integration-test binary: a module per area, over the real runtime.

mod bench;
mod cli;
mod conformance;
mod datasets;
mod fork;
mod guest_paths;
mod hostile;
mod hostile_cells;
mod hostile_clients;
mod hostile_corpus;
mod load;
mod parity;
mod process;
mod remote;
mod report;
mod reproducibility;
mod rollout;
mod runtime;
mod server;
mod support;
mod swe;
mod templates;
mod truncation;
mod wasm;
