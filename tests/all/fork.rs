//! Forking a slot: the fork starts with its parent's interpreter state and files, and from
//! then on neither sees the other's writes; memory comes back when forks are released.

use std::process::Command;

use rollbox::{Backend, BackendError, Limits, ToolCall};
use serde_json::Value;

use crate::process::process_backend;
use crate::support::{ok, shared_wasm, value};

async fn run(backend: &dyn Backend, slot: &rollbox::Slot, code: &str) -> String {
    value(&ok(backend.execute(slot, ToolCall::python(code)).await))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_starts_with_its_parents_state_and_then_goes_its_own_way() {
    let backend = shared_wasm();
    let parent = backend.acquire("fork-parent").await.unwrap();
    ok(backend
        .execute(
            &parent,
            ToolCall::python(
                "import os, random\nimport numpy as np\nx = 41\narr = np.arange(5)\nbig = bytes(range(256)) * 8192\n\
                 open('shared.txt', 'w').write('parent')\nopen('/tmp/t.txt', 'w').write('tmp-parent')",
            ),
        )
        .await);
    let child = backend.fork(&parent, "fork-child").await.unwrap();
    assert_ne!(child.id, parent.id);
    let everything = "(x, arr.tolist(), len(big), big[-1], open('shared.txt').read(), open('/tmp/t.txt').read())";
    let inherited = "(41, [0, 1, 2, 3, 4], 2097152, 255, 'parent', 'tmp-parent')";
    assert_eq!(
        run(backend, &child, everything).await,
        inherited,
        "the fork starts as its parent"
    );

    ok(backend
        .execute(
            &child,
            ToolCall::python(
                "x = 1\narr[0] = 99\nbig = b''\nopen('shared.txt', 'w').write('child')\n\
                 open('child.txt', 'w').write('c')\nopen('/tmp/t.txt', 'w').write('tmp-child')",
            ),
        )
        .await);
    assert_eq!(
        run(backend, &parent, &format!("{everything}, os.path.exists('child.txt')")).await,
        format!("({inherited}, False)"),
        "the parent sees none of the fork's writes, in memory or in files"
    );
    ok(backend
        .execute(&parent, ToolCall::python("x = 2\nopen('parent.txt', 'w').write('p')"))
        .await);
    assert_eq!(
        run(
            backend,
            &child,
            "x, int(arr[0]), len(big), os.path.exists('parent.txt'), open('/tmp/t.txt').read()"
        )
        .await,
        "(1, 99, 0, False, 'tmp-child')",
        "the fork sees none of the parent's later writes"
    );

    let grandchild = backend.fork(&child, "fork-grandchild").await.unwrap();
    assert_eq!(
        run(
            backend,
            &grandchild,
            "x, open('shared.txt').read(), os.path.exists('child.txt')"
        )
        .await,
        "(1, 'child', True)",
        "a fork of a fork starts as the fork"
    );

    let draw = "random.random(), float(np.random.rand())";
    let (a, b) = (run(backend, &parent, draw).await, run(backend, &child, draw).await);
    assert_ne!(a, b, "a fork draws from random streams of its own");
    for slot in [&parent, &child, &grandchild] {
        backend.release(slot, true).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_holding_a_file_open_is_not_forked_and_lives_on() {
    let backend = shared_wasm();
    let parent = backend.acquire("fork-open-file").await.unwrap();
    ok(backend
        .execute(&parent, ToolCall::python("f = open('log.txt', 'w')\nf.write('a')"))
        .await);
    let error = backend
        .fork(&parent, "fork-open-file-child")
        .await
        .expect_err("an open file cannot be forked");
    assert!(matches!(error, BackendError::Fork { .. }), "{error:?}");
    let message = rollbox::error_text::error_chain(&error);
    assert!(message.contains("close them"), "{message}");
    ok(backend
        .execute(
            &parent,
            ToolCall::python("f.write('b')\nf.close()\nopen('log.txt').read()"),
        )
        .await);
    let child = backend.fork(&parent, "fork-open-file-child").await.unwrap();
    assert_eq!(run(backend, &child, "open('log.txt').read()").await, "'ab'");
    backend.release(&child, true).await.unwrap();
    backend.release(&parent, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_process_backend_cannot_fork_and_says_so() {
    let (backend, _root) = process_backend(Limits::default());
    let slot = backend.acquire("fork-process").await.unwrap();
    let error = backend.fork(&slot, "fork-process-child").await.expect_err("no fork");
    assert!(
        matches!(&error, BackendError::Unsupported { backend, .. } if backend == "process"),
        "{error:?}"
    );
    assert!(error.to_string().contains("replay"), "{error}");
    backend.release(&slot, true).await.unwrap();
}

/// 2,000 forks of a slot holding 10 MB, each released: the process's PSS at the end is within
/// 10% of its start. Run as `rollbox bench` in a process of its own, so that no other test's
/// memory is counted; the bench warms the parent first (a full collection maps its image's
/// pages), so that the parent's own first full collection is not counted as the forks'.
///
/// Its runtime cache is a private copy: a page of a file that other processes map too (the
/// compiled runtime, the snapshot) counts a share in PSS that changes as those processes, the
/// suite's other tests, come and go.
#[test]
fn two_thousand_forks_and_releases_give_their_memory_back() {
    let cache = private_runtime_cache();
    let output = Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args([
            "--quiet",
            "bench",
            "--json",
            "--cells",
            "0",
            "--acquires",
            "0",
            "--slots",
            "0",
        ])
        .args(["--rounds", "0", "--starts", "0", "--forks", "3", "--fork-churn", "2000"])
        .arg("--cache-dir")
        .arg(cache.path())
        .output()
        .expect("run rollbox bench");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: Value = serde_json::from_slice(&output.stdout).expect("a JSON report");
    let fork = &report["fork"];
    let (before, after) = (
        fork["churn_pss_before_mb"].as_f64().expect("PSS before"),
        fork["churn_pss_after_mb"].as_f64().expect("PSS after"),
    );
    assert_eq!(fork["churn"], 2000, "{report:#}");
    eprintln!("2,000 forks and releases: process PSS {before:.1} MB before, {after:.1} MB after");
    assert!(
        after <= before * 1.1,
        "memory did not come back: PSS {before:.1} MB before 2,000 forks and releases, {after:.1} MB after"
    );
}

/// A new cache folder with copies (new files, not links) of the installed runtime and of the
/// compiled files a wasm backend loads, so that no other process maps its files.
fn private_runtime_cache() -> tempfile::TempDir {
    use rollbox::wasm::runtime::{RuntimeOptions, compiled, install};
    let options = RuntimeOptions::from_env();
    let cache = tempfile::tempdir().expect("tempdir");
    let engine = shared_wasm().engine();
    let mut files = vec![
        compiled::compiled_path(&options, engine),
        compiled::guest_code_path(&options),
        compiled::initial_memory_path(&options),
    ];
    let mut folders = vec![install::install_dir(&options)];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).expect("the installed runtime") {
            let path = entry.expect("an entry").path();
            if path.is_dir() {
                folders.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for file in files {
        let relative = file.strip_prefix(&options.cache_dir).expect("inside the cache");
        let target = cache.path().join(relative);
        std::fs::create_dir_all(target.parent().expect("a folder")).expect("create");
        std::fs::copy(&file, &target).unwrap_or_else(|e| panic!("copy {}: {e}", file.display()));
    }
    cache
}
