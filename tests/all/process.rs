//! The `process` backend over real bash, bubblewrap and the host's Python.

use rollbox::process::{ProcessBackend, ProcessBackendConfig};
use rollbox::{Backend, Limits, ToolCall};
use serde_json::json;

use crate::support::{ok, pretty, value};

/// A backend with `limits`, isolated with bubblewrap, its folders in a fresh temporary root.
pub fn process_backend(limits: Limits) -> (ProcessBackend, tempfile::TempDir) {
    let root = tempfile::tempdir().expect("tempdir");
    let config = ProcessBackendConfig { limits, workspace_root: Some(root.path().to_path_buf()), ..Default::default() };
    let backend = ProcessBackend::new(config).unwrap_or_else(|e| panic!("failed to start the process backend: {e:?}"));
    (backend, root)
}

#[tokio::test(flavor = "multi_thread")]
async fn smoke() {
    let (backend, _root) = process_backend(Limits::default());
    let slot = backend.acquire("smoke").await.expect("acquire");
    let r = backend.execute(&slot, ToolCall::new("bash", json!({"command": "echo hi; env; exit 3"}))).await;
    println!("{}", pretty(&r));
    let r = ok(backend.execute(&slot, ToolCall::python("import os, subprocess\nx = 41\nprint('out')\nos.write(1, b'raw\\n')\nsubprocess.run(['echo', 'sub'])\nx + 1")).await);
    println!("{}", pretty(&r));
    assert_eq!(value(&r), "42");
    let r = backend.execute(&slot, ToolCall::python("1/0")).await;
    println!("{}", pretty(&r));
    backend.release(&slot, true).await.expect("release");
}
