//! The conformance suite: behaviour every `Backend` must share. Each check takes
//! `&dyn Backend`; each backend's test module calls `run_all` (or single checks) with a real
//! instance of itself.

use rollbox::{Backend, ErrorKind, Slot, SlotId, ToolCall};
use serde_json::json;

use crate::support::{ok, pretty, value};

/// Every check in this module, in turn.
pub async fn run_all(backend: &dyn Backend) {
    state_persists_across_calls(backend).await;
    results_come_back_in_call_order(backend).await;
    slots_are_isolated(backend).await;
    file_tools_round_trip(backend).await;
    paths_cannot_leave_the_workspace(backend).await;
    bad_calls_get_clear_errors(backend).await;
    released_slots_are_gone(backend).await;
}

pub async fn state_persists_across_calls(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-state").await.expect("acquire");
    ok(backend.execute(&slot, ToolCall::python("counter = 40\ndef bump(n):\n    return n + 1")).await);
    let result = ok(backend.execute(&slot, ToolCall::python("counter = bump(bump(counter))\ncounter")).await);
    assert_eq!(value(&result), "42");
    backend.release(&slot, true).await.expect("release");
}

pub async fn results_come_back_in_call_order(backend: &dyn Backend) {
    let a = backend.acquire("conformance-order-a").await.expect("acquire");
    let b = backend.acquire("conformance-order-b").await.expect("acquire");
    let mut calls = Vec::new();
    for i in 0..5 {
        calls.push((a.clone(), ToolCall::python(format!("seen_a = globals().get('seen_a', []) + [{i}]\nseen_a"))));
        calls.push((b.clone(), ToolCall::python(format!("{i} * 10"))));
    }
    let results = backend.execute_batch(calls).await;
    assert_eq!(results.len(), 10);
    for i in 0..5 {
        let expected: Vec<String> = (0..=i).map(|n| n.to_string()).collect();
        assert_eq!(value(&results[2 * i]), format!("[{}]", expected.join(", ")), "slot a's calls ran out of order");
        assert_eq!(value(&results[2 * i + 1]), (i * 10).to_string());
        assert_eq!(results[2 * i].metadata.slot_id, Some(a.id));
        assert_eq!(results[2 * i + 1].metadata.slot_id, Some(b.id));
    }
    backend.release(&a, true).await.expect("release");
    backend.release(&b, true).await.expect("release");
}

pub async fn slots_are_isolated(backend: &dyn Backend) {
    let a = backend.acquire("conformance-iso-a").await.expect("acquire");
    let b = backend.acquire("conformance-iso-b").await.expect("acquire");
    assert_ne!(a.id, b.id);
    assert_ne!(a.workspace, b.workspace);
    ok(backend.execute(&a, ToolCall::python("secret = 'a'\nopen('mine.txt', 'w').write('a')")).await);
    let r = ok(backend.execute(&b, ToolCall::python("import os\n('secret' in globals(), os.path.exists('mine.txt'))")).await);
    assert_eq!(value(&r), "(False, False)");
    backend.release(&a, true).await.expect("release");
    backend.release(&b, true).await.expect("release");
}

pub async fn file_tools_round_trip(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-files").await.expect("acquire");
    let write = ToolCall::new("write_file", json!({"path": "pkg/notes.txt", "content": "alpha\nbeta\ngamma\n"}));
    ok(backend.execute(&slot, write).await);
    let read = ok(backend.execute(&slot, ToolCall::new("read_file", json!({"path": "pkg/notes.txt", "offset": 2, "limit": 1}))).await);
    assert_eq!(read.output, "beta\n");
    let edit = ToolCall::new("edit_file", json!({"path": "pkg/notes.txt", "old_string": "beta", "new_string": "BETA"}));
    ok(backend.execute(&slot, edit).await);
    let seen = ok(backend.execute(&slot, ToolCall::python("open('pkg/notes.txt').read()")).await);
    assert_eq!(value(&seen), "'alpha\\nBETA\\ngamma\\n'", "the interpreter and the file tools share one workspace");
    let missing = backend.execute(&slot, ToolCall::new("edit_file", json!({"path": "pkg/notes.txt", "old_string": "delta", "new_string": "x"}))).await;
    assert_eq!(missing.error.as_ref().map(|e| e.kind), Some(ErrorKind::Workspace), "{}", pretty(&missing));
    assert!(missing.output.contains("not found"), "{}", missing.output);
    ok(backend.execute(&slot, ToolCall::new("write_file", json!({"path": "dup.txt", "content": "x x"}))).await);
    let dup = backend.execute(&slot, ToolCall::new("edit_file", json!({"path": "dup.txt", "old_string": "x", "new_string": "y"}))).await;
    assert!(dup.output.contains("occurs 2 times"), "{}", pretty(&dup));
    let listing = ok(backend.execute(&slot, ToolCall::new("list_dir", json!({}))).await);
    assert_eq!(listing.output, "dup.txt\npkg/");
    let found = ok(backend.execute(&slot, ToolCall::new("search", json!({"pattern": "^gam"}))).await);
    assert_eq!(found.output, "pkg/notes.txt:3: gamma");
    backend.release(&slot, true).await.expect("release");
}

pub async fn paths_cannot_leave_the_workspace(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-escape").await.expect("acquire");
    for path in ["../outside.txt", "/etc/passwd", "a/../../x", "/workspace/../etc/passwd"] {
        let r = backend.execute(&slot, ToolCall::new("read_file", json!({"path": path}))).await;
        assert_eq!(r.error.as_ref().map(|e| e.kind), Some(ErrorKind::Workspace), "{path}: {}", pretty(&r));
        assert!(r.output.contains("outside the workspace"), "{path}: {}", r.output);
        let w = backend.execute(&slot, ToolCall::new("write_file", json!({"path": path, "content": "x"}))).await;
        assert!(!w.success, "{path}: writing outside the workspace must fail: {}", pretty(&w));
    }
    backend.release(&slot, true).await.expect("release");
}

pub async fn bad_calls_get_clear_errors(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-bad").await.expect("acquire");
    let unknown = backend.execute(&slot, ToolCall::new("teleport", json!({}))).await;
    assert_eq!(unknown.error.as_ref().map(|e| e.kind), Some(ErrorKind::UnknownTool));
    assert!(unknown.output.contains("teleport") && unknown.output.contains("python"), "{}", unknown.output);
    let missing_arg = backend.execute(&slot, ToolCall::new("python", json!({"source": "1"}))).await;
    assert_eq!(missing_arg.error.as_ref().map(|e| e.kind), Some(ErrorKind::InvalidArguments));
    assert!(missing_arg.output.contains("code"), "{}", missing_arg.output);
    let as_string = ok(backend.execute(&slot, ToolCall::new("python", json!("{\"code\": \"6 * 7\"}"))).await);
    assert_eq!(value(&as_string), "42", "arguments given as a JSON string are accepted");
    let syntax = backend.execute(&slot, ToolCall::python("def broken(:\n    pass")).await;
    assert!(!syntax.success);
    assert_eq!(syntax.cell.as_ref().and_then(|c| c.error.as_ref()).map(|e| e.name.as_str()), Some("SyntaxError"), "{}", pretty(&syntax));
    assert!(!syntax.metadata.state_lost);
    backend.release(&slot, true).await.expect("release");
}

pub async fn released_slots_are_gone(backend: &dyn Backend) {
    let slot = backend.acquire("conformance-release").await.expect("acquire");
    let workspace = slot.workspace.clone();
    backend.release(&slot, true).await.expect("release");
    assert!(!workspace.exists() || slot.backend == "remote", "reset_workspace removes the workspace");
    let after = backend.execute(&slot, ToolCall::python("1")).await;
    assert_eq!(after.error.as_ref().map(|e| e.kind), Some(ErrorKind::UnknownSlot), "{}", pretty(&after));
    assert!(backend.release(&slot, true).await.is_err(), "a second release is an error");
    let never: Slot = Slot { id: SlotId(u64::MAX), ..slot };
    let r = backend.execute(&never, ToolCall::python("1")).await;
    assert_eq!(r.error.map(|e| e.kind), Some(ErrorKind::UnknownSlot));
}
