//! Shared fixtures: real wasm backends over the real runtime, and assertions that print the
//! whole result (the guest's stdout and stderr included) when they fail.

use std::sync::OnceLock;

use rollbox::{Backend, ExecutionResult, Limits, SilentReporter, Slot, ToolCall, WasmBackend, WasmBackendConfig};

/// How long a test waits for something that must finish before it calls it a hang. A guard
/// against a stuck suite, never a speed check.
pub const NO_HANG: std::time::Duration = std::time::Duration::from_secs(300);

/// A backend with `limits`, over the runtime in the user's cache (installed on first use).
pub fn wasm_backend(limits: Limits) -> WasmBackend {
    WasmBackend::new(
        WasmBackendConfig {
            limits,
            ..WasmBackendConfig::from_env()
        },
        &SilentReporter,
    )
    .unwrap_or_else(|e| panic!("failed to start the wasm backend: {e:?}"))
}

/// One default-limits backend shared by the tests that need nothing special.
pub fn shared_wasm() -> &'static WasmBackend {
    static BACKEND: OnceLock<WasmBackend> = OnceLock::new();
    BACKEND.get_or_init(|| wasm_backend(Limits::default()))
}

/// Asserts success and returns the result; on failure prints all of it.
#[track_caller]
pub fn ok(result: ExecutionResult) -> ExecutionResult {
    assert!(result.success, "expected success, got:\n{}", pretty(&result));
    result
}

/// The final expression's `text/plain`, asserting there is one.
#[track_caller]
pub fn value(result: &ExecutionResult) -> String {
    result
        .cell
        .as_ref()
        .and_then(|c| c.result.as_ref())
        .and_then(|r| r.get("text/plain"))
        .cloned()
        .unwrap_or_else(|| panic!("expected a final value, got:\n{}", pretty(result)))
}

/// The whole result as pretty JSON, for failure messages.
pub fn pretty(result: &ExecutionResult) -> String {
    serde_json::to_string_pretty(result).unwrap_or_else(|e| format!("{result:?} ({e})"))
}

/// A `bash` tool call running `command`.
pub fn bash(command: &str) -> ToolCall {
    ToolCall::new("bash", serde_json::json!({ "command": command }))
}

/// Applies `patch` in `slot`'s workspace with `git apply`, through the bash tool, asserting
/// that it applies.
pub async fn apply_patch(backend: &dyn Backend, slot: &Slot, patch: &str) {
    ok(backend
        .execute(
            slot,
            bash(&format!("git apply <<'ROLLBOX_PATCH'\n{patch}ROLLBOX_PATCH")),
        )
        .await);
}
