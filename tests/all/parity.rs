//! Parity: a program scored through rollbox gives what native CPython and SandboxFusion give.
//!
//! The corpus in `tests/data/parity/` (one program per `.py`, its standard input in a `.stdin`
//! beside it) runs three ways: as `python3 prog.py` (the reference, as SandboxFusion runs it),
//! and through `/run_code` on a server over the process backend and over the wasm backend.
//! Every difference that remains on wasm is listed in [`WASM_DIFFERENCES`] with its reason
//! (docs/parity.md explains each), and asserted: an unlisted difference fails, and so does a
//! listed one that went away. The process backend must match everywhere.
//!
//! Then `/run_code`'s SandboxFusion behaviour itself: whole long outputs with no marker, a
//! full server that queues instead of refusing, and verl's `check_correctness` protocol.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use rollbox::server::run_code::SANDBOX_FUSION_OUTPUT_BYTES;
use rollbox::server::{ServerConfig, ServerState, app};
use rollbox::{Backend, Limits, WasmBackend};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::process::process_backend;
use crate::support::wasm_backend;

/// The Python that runs the reference, and that the process backend runs.
const NATIVE_PYTHON: &str = "/usr/bin/python3";

/// Programs whose wasm result differs from native CPython's, and why (docs/parity.md has the
/// details). Each must still differ: a fix that makes one match should remove it here.
const WASM_DIFFERENCES: &[(&str, &str)] = &[
    (
        "float_sum",
        "CPython 3.12+ sums floats with compensated summation (sum([0.1] * 10) == 1.0); the host's \
         reference CPython is older. Not a wasm difference: any 3.12+ gives the slot's answer",
    ),
    (
        "np_astype_int",
        "astype(int) goes through np.dtype(int), numpy's C default integer: int32 on wasm32",
    ),
    ("np_int_underscore", "np.int_ is the C long: 32 bits on wasm32"),
    (
        "np_explicit_int32_cumsum_method",
        "ndarray.cumsum is C with no Python hook, so an int32 array accumulates in the C long: 32 bits",
    ),
    (
        "rec_lru_cache",
        "recursion through C (lru_cache's wrapper) is bounded by the wasm C stack: RecursionError \
         'Stack overflow' after about 200 levels",
    ),
    (
        "thr_deep_generator_recursion",
        "recursion through generator expressions is bounded by the wasm C stack; stack_size cannot grow it",
    ),
    (
        "thr_consumer_waits",
        "a thread waiting for work the main thread gives later: ThreadWaitError, since threads run at start()",
    ),
    (
        "thr_event_set_later",
        "a thread waiting for an Event the main thread sets later: ThreadWaitError",
    ),
];

/// Listed wasm differences that can give a wrong number with `Success`: each must come with a
/// `Wasm32IntegerWarning` in stderr, so that none is silent.
const WARNED_IN_WASM: &[&str] = &["np_astype_int", "np_int_underscore", "np_explicit_int32_cumsum_method"];

/// Programs whose process-backend result differs from native CPython's. The target is none.
const PROCESS_DIFFERENCES: &[(&str, &str)] = &[];

/// A server's limits as `rollbox serve` sets them: the backend keeps SandboxFusion's output cap.
fn serve_limits() -> Limits {
    Limits {
        output_bytes: SANDBOX_FUSION_OUTPUT_BYTES,
        ..Limits::default()
    }
}

/// One wasm backend with `rollbox serve`'s limits for every server in this module.
fn wasm() -> Arc<dyn Backend> {
    static BACKEND: OnceLock<Arc<WasmBackend>> = OnceLock::new();
    BACKEND.get_or_init(|| Arc::new(wasm_backend(serve_limits()))).clone()
}

fn server(backend: Arc<dyn Backend>, config: ServerConfig) -> Router {
    app(ServerState::new(backend, config).expect("a valid server state"))
}

/// How a program ended, in the terms a SandboxFusion client scores.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Outcome {
    /// `Success`, `Failed` or `SandboxError`, then `/` and the run's status.
    status: String,
    return_code: Option<i64>,
    stdout: String,
    /// Normalised by [`comparable_stderr`].
    stderr: String,
}

/// stderr with each traceback reduced to its exception line, and other indented lines dropped:
/// frames name different files natively (`/tmp/.../prog.py`, the stdlib's path) and in a slot
/// (`<cell-1>`), and CPython versions draw carets differently. What a program printed to
/// stderr itself, and every exception's type and message, are kept.
fn comparable_stderr(stderr: &str) -> String {
    stderr
        .lines()
        .filter(|line| !line.starts_with(' ') && *line != "Traceback (most recent call last):")
        .map(|line| format!("{line}\n"))
        .collect()
}

/// A corpus program.
struct Program {
    name: String,
    code: String,
    stdin: Option<String>,
}

fn corpus() -> Vec<Program> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/parity");
    let mut programs: Vec<Program> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("failed to read {}: {e}", dir.display()))
        .filter_map(|entry| {
            let path = entry.expect("a directory entry").path();
            (path.extension()? == "py").then_some(path)
        })
        .map(|path: PathBuf| Program {
            name: path.file_stem().expect("a name").to_string_lossy().into_owned(),
            code: std::fs::read_to_string(&path).expect("the program"),
            stdin: std::fs::read_to_string(path.with_extension("stdin")).ok(),
        })
        .collect();
    programs.sort_by(|a, b| a.name.cmp(&b.name));
    programs
}

/// Runs `program` as `python3 prog.py` in a fresh folder, as SandboxFusion's runner does.
async fn natively(program: &Program) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("prog.py"), &program.code).expect("write the program");
    let mut child = tokio::process::Command::new(NATIVE_PYTHON)
        .arg("prog.py")
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start python3");
    let mut input = child.stdin.take().expect("stdin");
    let text = program.stdin.clone().unwrap_or_default();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let _ = input.write_all(text.as_bytes()).await;
    });
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} ran natively for a minute", program.name))
        .expect("python3 ran");
    let code = output.status.code().map(i64::from);
    Outcome {
        status: if code == Some(0) {
            "Success/Finished"
        } else {
            "Failed/Finished"
        }
        .into(),
        return_code: code,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: comparable_stderr(&String::from_utf8_lossy(&output.stderr)),
    }
}

async fn post(app: &Router, path: &str, body: &Value) -> (StatusCode, Value) {
    let request = Request::builder()
        .method("POST")
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .expect("a request");
    let response = app.clone().oneshot(request).await.expect("the router is infallible");
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("a body");
    let value = serde_json::from_slice(&bytes).unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)));
    (status, value)
}

/// Runs `program` through `/run_code`, as verl sends it.
async fn through_run_code(app: &Router, program: &Program) -> Outcome {
    let request = json!({
        "code": program.code, "stdin": program.stdin.clone().unwrap_or_default(), "language": "python",
        "compile_timeout": 30, "run_timeout": 30, "files": {}, "fetch_files": [],
    });
    let (status, answer) = post(app, "/run_code", &request).await;
    assert_eq!(status, StatusCode::OK, "{}: {answer:#}", program.name);
    let run = &answer["run_result"];
    assert_eq!(run["truncated"], false, "{}: {answer:#}", program.name);
    Outcome {
        status: format!(
            "{}/{}",
            answer["status"].as_str().unwrap_or("?"),
            run["status"].as_str().unwrap_or("none")
        ),
        return_code: run["return_code"].as_i64(),
        stdout: run["stdout"].as_str().unwrap_or_default().to_owned(),
        stderr: comparable_stderr(run["stderr"].as_str().unwrap_or_default()),
    }
}

/// What differs between two outcomes, shortened for a failure message.
fn difference(native: &Outcome, other: &Outcome) -> Option<String> {
    let short = |text: &str| text.chars().take(300).collect::<String>();
    let mut parts = Vec::new();
    if native.status != other.status || native.return_code != other.return_code {
        parts.push(format!(
            "status {}/{:?} vs {}/{:?}",
            native.status, native.return_code, other.status, other.return_code
        ));
    }
    if native.stdout != other.stdout {
        parts.push(format!(
            "stdout {:?} vs {:?}",
            short(&native.stdout),
            short(&other.stdout)
        ));
    }
    if native.stderr != other.stderr {
        parts.push(format!(
            "stderr {:?} vs {:?}",
            short(&native.stderr),
            short(&other.stderr)
        ));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// Checks each program's difference against `expected`: unlisted differences and listed
/// programs that no longer differ are both failures. Returns the report lines.
fn judge(backend: &str, results: &BTreeMap<String, Option<String>>, expected: &[(&str, &str)]) -> Vec<String> {
    let mut failures = Vec::new();
    for (name, found) in results {
        let listed = expected.iter().any(|(n, _)| n == name);
        match (found, listed) {
            (Some(what), false) => failures.push(format!("{backend}: {name} differs from native CPython: {what}")),
            (None, true) => failures.push(format!(
                "{backend}: {name} is listed as a difference but now matches native CPython; remove it from the list and docs/parity.md"
            )),
            _ => {}
        }
    }
    for (name, _) in expected {
        if !results.contains_key(*name) {
            failures.push(format!("{backend}: {name} is listed but is not in the corpus"));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_corpus_gives_native_results_with_every_wasm_difference_listed() {
    let programs = corpus();
    assert!(programs.len() >= 60, "the corpus has {} programs", programs.len());
    let wasm_app = server(wasm(), ServerConfig::default());
    let (process, _root) = process_backend(serve_limits());
    let process_app = server(Arc::new(process), ServerConfig::default());
    let mut wasm_results = BTreeMap::new();
    let mut process_results = BTreeMap::new();
    let mut silent = Vec::new();
    for program in &programs {
        let (native, in_wasm, in_process) = tokio::join!(
            natively(program),
            through_run_code(&wasm_app, program),
            through_run_code(&process_app, program)
        );
        if WARNED_IN_WASM.contains(&program.name.as_str()) && !in_wasm.stderr.contains("Wasm32IntegerWarning") {
            silent.push(format!(
                "wasm: {} differs without a Wasm32IntegerWarning in stderr",
                program.name
            ));
        }
        wasm_results.insert(program.name.clone(), difference(&native, &in_wasm));
        process_results.insert(program.name.clone(), difference(&native, &in_process));
    }
    let mut failures = judge("wasm", &wasm_results, WASM_DIFFERENCES);
    failures.extend(judge("process", &process_results, PROCESS_DIFFERENCES));
    failures.extend(silent);
    let same = wasm_results.values().filter(|d| d.is_none()).count();
    eprintln!(
        "parity: {same} of {} programs identical on wasm, {} on process",
        programs.len(),
        process_results.values().filter(|d| d.is_none()).count()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_output_comes_back_whole_or_cut_without_a_marker() {
    // SandboxFusion's own cap: a server keeps 1 MiB per stream.
    let app = server(wasm(), ServerConfig::default());
    let whole = json!({"code": "print('x' * 300000)", "language": "python"});
    let (status, answer) = post(&app, "/run_code", &whole).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["status"], "Success");
    assert_eq!(answer["run_result"]["stdout"].as_str().map(str::len), Some(300_001));
    assert_eq!(answer["run_result"]["truncated"], false);

    // Past the server's /run_code cap: cut there, no marker, reported beside the stream.
    let capped = server(
        wasm(),
        ServerConfig {
            run_code_output_bytes: 1000,
            ..ServerConfig::default()
        },
    );
    let long =
        json!({"code": "import sys\nprint('y' * 5000)\nprint('z' * 3000, file=sys.stderr)", "language": "python"});
    let (_, answer) = post(&capped, "/run_code", &long).await;
    let run = &answer["run_result"];
    assert_eq!(answer["status"], "Success", "{answer:#}");
    assert_eq!(run["stdout"], "y".repeat(1000), "{answer:#}");
    assert_eq!(run["stderr"], "z".repeat(1000), "{answer:#}");
    assert_eq!(run["truncated"], true);

    // Past the backend's own cap, which marks the cut inside the stream for models: the
    // marker is taken out and the cut reported beside it.
    let small: Arc<dyn Backend> = Arc::new(wasm_backend(Limits {
        output_bytes: 4096,
        ..Limits::default()
    }));
    let (_, answer) = post(&server(small, ServerConfig::default()), "/run_code", &long).await;
    let run = &answer["run_result"];
    assert_eq!(run["stdout"], "y".repeat(4096), "{answer:#}");
    assert_eq!(run["stderr"], "z".repeat(3000) + "\n", "{answer:#}");
    assert_eq!(run["truncated"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_requests_to_eight_slots_all_get_answers_and_none_503() {
    let app = server(
        wasm(),
        ServerConfig {
            max_slots: 8,
            ..ServerConfig::default()
        },
    );
    let requests: usize = 200;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..requests {
        let app = app.clone();
        tasks.spawn(async move {
            let request = json!({"code": format!("print(sum(range({i})))"), "language": "python", "run_timeout": 30});
            let (status, answer) = post(&app, "/run_code", &request).await;
            let expected = format!("{}\n", (0..i as u64).sum::<u64>());
            (
                status,
                answer["status"] == "Success" && answer["run_result"]["stdout"] == expected,
            )
        });
    }
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let mut right = 0;
    while let Some(joined) = tasks.join_next().await {
        let (status, correct) = joined.expect("a request task");
        *by_status.entry(status.as_u16()).or_default() += 1;
        right += usize::from(correct);
    }
    let elapsed = started.elapsed();
    eprintln!(
        "run_code: {requests} concurrent requests, 8 slots: statuses {by_status:?}, {:.1} requests/s ({:.2} s)",
        requests as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    assert_eq!(
        by_status.get(&503),
        None,
        "a full server must queue, never refuse: {by_status:?}"
    );
    assert_eq!(
        by_status,
        BTreeMap::from([(200, requests)]),
        "every request answered 200"
    );
    assert_eq!(right, requests, "every answer has its program's output");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_waits_past_its_run_timeout_for_a_slot_gets_504() {
    let app = server(
        wasm(),
        ServerConfig {
            max_slots: 1,
            ..ServerConfig::default()
        },
    );
    let hog = tokio::spawn({
        let app = app.clone();
        async move {
            let request = json!({"code": "import time\ntime.sleep(3)\nprint('hogged')", "language": "python"});
            post(&app, "/run_code", &request).await
        }
    });
    let state_probe = json!({"code": "print('probe')", "language": "python", "run_timeout": 0.5});
    // Wait until the hog holds the only slot: a probe then waits its 0.5 s and gets 504.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (status, answer) = loop {
        let (status, answer) = post(&app, "/run_code", &state_probe).await;
        if status != StatusCode::OK {
            break (status, answer);
        }
        assert!(Instant::now() < deadline && !hog.is_finished(), "no probe ever waited");
    };
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{answer:#}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("run_timeout") && message.contains("--max-slots"),
        "{message}"
    );
    let (status, hogged) = hog.await.expect("the hog");
    assert_eq!(
        (status, &hogged["run_result"]["stdout"]),
        (StatusCode::OK, &json!("hogged\n"))
    );
    // A request that can wait long enough gets the slot once it is free.
    let patient = json!({"code": "print('patient')", "language": "python", "run_timeout": 30});
    let (status, answer) = post(&app, "/run_code", &patient).await;
    assert_eq!(
        (status, &answer["run_result"]["stdout"]),
        (StatusCode::OK, &json!("patient\n"))
    );
}

/// verl's score for one test case, as `_process_single_case` in
/// `verl/utils/reward_score/sandbox_fusion/utils.py` computes it from a `/run_code` answer.
#[derive(Debug, PartialEq)]
enum VerlScore {
    /// `True`: stdout matched the expected output (trailing newlines aside).
    Passed,
    /// `False`: it ran and printed something else.
    WrongAnswer,
    /// `-1`: an API or sandbox error.
    ApiError,
    /// `-2`: a runtime error (non-zero exit or `Error`).
    RuntimeError,
    /// `-3`: past the time limit.
    Timeout,
}

/// verl's `call_sandbox_api`: the exact JSON it posts, retried on 504 only (three attempts).
async fn verl_call(app: &Router, code: &str, stdin: &str, timeout: u64) -> Option<Value> {
    let payload = json!({
        "compile_timeout": timeout, "run_timeout": timeout, "code": code, "stdin": stdin,
        "language": "python", "files": {}, "fetch_files": [],
    });
    for _ in 0..3 {
        let (status, answer) = post(app, "/run_code", &payload).await;
        match status {
            StatusCode::GATEWAY_TIMEOUT => continue,
            StatusCode::OK => return Some(answer),
            _ => return None, // raise_for_status: an API error, scored -1
        }
    }
    None
}

/// verl's classification of an answer; only the fields verl reads are read.
fn verl_score(answer: Option<&Value>, expected: &str) -> VerlScore {
    let Some(answer) = answer else {
        return VerlScore::ApiError;
    };
    let run = &answer["run_result"];
    let (run_status, return_code) = (run["status"].as_str(), run["return_code"].as_i64());
    match answer["status"].as_str() {
        Some("Success") if run_status == Some("Finished") => {
            let stdout = run["stdout"].as_str().unwrap_or_default();
            if stdout.trim_end_matches('\n') == expected.trim_end_matches('\n') {
                VerlScore::Passed
            } else {
                VerlScore::WrongAnswer
            }
        }
        Some("Failed") if run_status == Some("TimeLimitExceeded") => VerlScore::Timeout,
        Some("Failed") if run_status == Some("Error") || (run_status == Some("Finished") && return_code != Some(0)) => {
            VerlScore::RuntimeError
        }
        _ => VerlScore::ApiError,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verls_check_correctness_scores_rollbox_answers_as_native_runs() {
    let app = server(wasm(), ServerConfig::default());
    let echo_sum = "a, b = map(int, input().split())\nprint(a + b)";
    let cases: &[(&str, &str, &str, u64, VerlScore)] = &[
        (echo_sum, "2 3\n", "5\n", 10, VerlScore::Passed),
        (echo_sum, "2 3\n", "6\n", 10, VerlScore::WrongAnswer),
        ("print(1 / 0)", "", "", 10, VerlScore::RuntimeError),
        ("import sys\nsys.exit(2)", "", "", 10, VerlScore::RuntimeError),
        ("while True:\n    pass", "", "", 1, VerlScore::Timeout),
        // The issue's differences, each scored as native CPython would be.
        ("print('x' * 300000)", "", &"x".repeat(300_000), 10, VerlScore::Passed),
        (
            "import sys, threading\ndef main():\n    print(int(input()) * 2)\nthreading.stack_size(2**27)\nsys.setrecursionlimit(10**6)\nthreading.Thread(target=main).start()",
            "21\n",
            "42",
            10,
            VerlScore::Passed,
        ),
        (
            "import numpy as np\nprint(np.arange(100000).sum())",
            "",
            "4999950000",
            30,
            VerlScore::Passed,
        ),
        (
            "from IPython.display import display, HTML\ndisplay(HTML('<b>x</b>'))\nprint('ok')",
            "",
            "ok",
            10,
            VerlScore::Passed,
        ),
    ];
    for (code, stdin, expected, timeout, score) in cases {
        let answer = verl_call(&app, code, stdin, *timeout).await;
        assert_eq!(&verl_score(answer.as_ref(), expected), score, "{code}: {answer:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numpy_integer_idioms_before_and_after_native_widths() {
    let app = server(wasm(), ServerConfig::default());
    let programs: Vec<Program> = corpus().into_iter().filter(|p| p.name.starts_with("np_")).collect();
    assert!(programs.len() >= 30, "the numpy corpus has {} idioms", programs.len());
    let mut table = vec![
        "| idiom | native CPython | wasm, numpy's own widths | wasm, rollbox's widths |".to_string(),
        "|---|---|---|---|".to_string(),
    ];
    let (mut before_same, mut after_same) = (0, 0);
    for program in &programs {
        let plain = Program {
            name: program.name.clone(),
            code: format!("__import__('rollbox_guest').numpy_native_ints(False)\n{}", program.code),
            stdin: None,
        };
        let (native, before, after) = tokio::join!(
            natively(program),
            through_run_code(&app, &plain),
            through_run_code(&app, program)
        );
        before_same += usize::from(difference(&native, &before).is_none());
        after_same += usize::from(difference(&native, &after).is_none());
        let cell = |o: &Outcome| {
            let text = if o.stdout.is_empty() { &o.stderr } else { &o.stdout };
            text.trim_end().replace('\n', " ").replace('|', "\\|")
        };
        table.push(format!(
            "| `{}` | {} | {} | {} |",
            program.name,
            cell(&native),
            cell(&before),
            cell(&after)
        ));
        if program.name == "np_arange_sum" {
            assert_eq!(before.stdout, "704982704\n", "numpy's own int32 wraps around");
            assert_eq!(after.stdout, "4999950000\n", "rollbox's widths give the native sum");
        }
    }
    eprintln!(
        "numpy idioms identical to native: {before_same} of {} with numpy's own widths, {after_same} with rollbox's\n{}",
        programs.len(),
        table.join("\n")
    );
    assert!(
        after_same > before_same,
        "the widths change nothing: {after_same} vs {before_same}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipython_display_in_a_wasm_slot_gives_display_bundles() {
    let backend = wasm();
    let slot = backend.acquire("ipython").await.expect("a slot");
    let code = "from IPython.display import display, HTML, Markdown, Latex, JSON, Image, clear_output\n\
                import IPython\n\
                print('dropped')\n\
                display(Markdown('# gone'))\n\
                clear_output()\n\
                png = b'\\x89PNG\\r\\n\\x1a\\n' + bytes(8)\n\
                display(HTML('<b>x</b>'), Markdown('# t'), Latex('$x^2$'), JSON({'a': 1}), Image(png))\n\
                print(IPython.get_ipython())";
    let result = crate::support::ok(backend.execute(&slot, rollbox::ToolCall::python(code)).await);
    let cell = result.cell.expect("a cell");
    assert_eq!(cell.stdout, "None\n", "clear_output forgot what came before");
    let kinds: Vec<Vec<&str>> = cell
        .display
        .iter()
        .map(|bundle| bundle.keys().map(String::as_str).collect())
        .collect();
    assert_eq!(
        kinds,
        [
            vec!["text/html", "text/plain"],
            vec!["text/markdown", "text/plain"],
            vec!["text/latex", "text/plain"],
            vec!["application/json", "text/plain"],
            vec!["image/png", "text/plain"],
        ]
    );
    assert_eq!(cell.display[0]["text/html"], "<b>x</b>");
    assert_eq!(cell.display[0]["text/plain"], "<IPython.core.display.HTML object>");
    assert_eq!(cell.display[3]["application/json"], r#"{"a": 1}"#);
    assert_eq!(cell.display[4]["image/png"], "iVBORw0KGgoAAAAAAAAAAA==");
    backend.release(&slot, true).await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thread_that_waits_for_another_fails_loudly_on_wasm_and_never_hangs() {
    let backend = wasm();
    let slot = backend.acquire("threads").await.expect("a slot");
    for code in [
        "import threading\ne = threading.Event()\nthreading.Thread(target=e.wait).start()",
        "import threading, queue\nq = queue.Queue()\nthreading.Thread(target=q.get).start()",
        "import threading\nlock = threading.Lock()\nlock.acquire()\nthreading.Thread(target=lock.acquire).start()",
    ] {
        let result = backend.execute(&slot, rollbox::ToolCall::python(code)).await;
        let error = result.cell.as_ref().and_then(|c| c.error.as_ref());
        assert_eq!(
            error.map(|e| e.name.as_str()),
            Some("ThreadWaitError"),
            "{code}: {}",
            crate::support::pretty(&result)
        );
        assert!(
            error.is_some_and(|e| e.value.contains("no threads") && e.value.contains("process backend")),
            "the message names the limitation and the way out: {}",
            crate::support::pretty(&result)
        );
        assert_eq!(result.metadata.limit_hit, None, "a loud error, not a time limit");
    }
    // With a timeout the wait sleeps it out and fails, as with nobody to wake it.
    let timed = "import threading\ne = threading.Event()\nout = []\nt = threading.Thread(target=lambda: out.append(e.wait(0.05)))\nt.start()\nt.join()\nout";
    let result = crate::support::ok(backend.execute(&slot, rollbox::ToolCall::python(timed)).await);
    assert_eq!(crate::support::value(&result), "[False]");
    backend.release(&slot, true).await.expect("release");
}
