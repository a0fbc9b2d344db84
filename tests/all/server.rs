//! The slot server: its router driven with `oneshot` (no socket) over a real wasm backend,
//! then the real `rollbox serve` binary on a loopback port, and the Python client's tests
//! against it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use rollbox::env_vars;
use rollbox::server::{BearerToken, api::ErrorBody};
use rollbox::server::{ServerConfig, ServerState, app};
use rollbox::{Backend, Limits, WasmBackend};
use serde_json::{Value, json};
use tower::ServiceExt;

use crate::support::wasm_backend;

/// A token long enough for the server's rules.
const TOKEN: &str = "test-token-0123456789abcdef";
/// The longest any test waits for the server to do something; only guards against hangs.
const PATIENCE: Duration = Duration::from_secs(120);

/// One wasm backend for every server in this module (each server has its own slot table).
fn backend() -> Arc<dyn Backend> {
    static BACKEND: OnceLock<Arc<WasmBackend>> = OnceLock::new();
    BACKEND
        .get_or_init(|| Arc::new(wasm_backend(Limits::default())))
        .clone()
}

fn server(config: ServerConfig) -> Router {
    app(ServerState::new(backend(), config).expect("a valid server state"))
}

/// An answer: its status and body.
struct Reply {
    status: StatusCode,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The body as an [`ErrorBody`], asserting the status matches its code.
    #[track_caller]
    fn error(&self) -> ErrorBody {
        let body: ErrorBody = serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not an ErrorBody ({e}): {}", String::from_utf8_lossy(&self.body)));
        assert_eq!(
            self.status.as_u16(),
            body.error.code.http_status(),
            "{}",
            body.error.message
        );
        body
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

async fn send(app: &Router, method: &str, path: &str, token: Option<&str>, body: Option<Vec<u8>>) -> Reply {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(token) = token {
        request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(body.map_or_else(Body::empty, Body::from))
        .expect("a request");
    let response = app.clone().oneshot(request).await.expect("the router is infallible");
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("a body")
        .to_vec();
    Reply { status, body }
}

async fn get(app: &Router, path: &str) -> Reply {
    send(app, "GET", path, None, None).await
}

async fn post(app: &Router, path: &str, body: Value) -> Reply {
    send(app, "POST", path, None, Some(body.to_string().into_bytes())).await
}

async fn acquire(app: &Router, trajectory: &str) -> u64 {
    let reply = post(app, "/v1/slots", json!({"trajectory_id": trajectory})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["slot"]["id"].as_u64().expect("a slot id")
}

fn python(slot: u64, code: &str) -> Value {
    json!({"slot_id": slot, "call": {"name": "python", "arguments": {"code": code}}})
}

async fn execute(app: &Router, calls: Vec<Value>) -> Vec<Value> {
    let reply = post(app, "/v1/execute", json!({ "calls": calls })).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["results"].as_array().expect("results").clone()
}

fn config_with_token() -> ServerConfig {
    ServerConfig {
        token: Some(BearerToken::new(TOKEN).expect("a valid token")),
        ..ServerConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_and_wrong_tokens_get_401_on_every_route() {
    let app = server(config_with_token());
    let routes = [
        ("GET", "/v1/health"),
        ("GET", "/metrics"),
        ("GET", "/v1/slots"),
        ("POST", "/v1/execute"),
        ("POST", "/run_code"),
        ("GET", "/no/such/route"),
    ];
    for (method, path) in routes {
        for token in [None, Some("wrong-token-0123456789abcdef")] {
            let reply = send(&app, method, path, token, Some(b"{}".to_vec())).await;
            assert_eq!(
                reply.status,
                StatusCode::UNAUTHORIZED,
                "{method} {path} with {token:?}: {}",
                reply.text()
            );
            let message = reply.error().error.message;
            assert!(message.contains("token"), "{message}");
        }
    }
    let reply = send(&app, "GET", "/v1/health", Some(TOKEN), None).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["api_version"], "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_413_as_an_error_body() {
    let app = server(ServerConfig {
        max_body_bytes: 1024,
        ..ServerConfig::default()
    });
    let big = python(1, &"x".repeat(4096));
    let reply = post(&app, "/v1/execute", json!({ "calls": [big] })).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", reply.text());
    assert!(reply.error().error.message.contains("--max-body-bytes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_json_gets_400_with_serdes_message() {
    let app = server(ServerConfig::default());
    let reply = send(&app, "POST", "/v1/execute", None, Some(b"{not json".to_vec())).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.error().error.message.contains("key must be a string"),
        "{}",
        reply.text()
    );

    let reply = post(&app, "/v1/execute", json!({"calls": 5})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply
            .error()
            .error
            .message
            .contains("invalid type: integer `5`, expected a sequence"),
        "{}",
        reply.text()
    );

    let reply = send(&app, "POST", "/v1/slots", None, None).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.error().error.message.contains("missing field `trajectory_id`"),
        "{}",
        reply.text()
    );

    let reply = send(&app, "DELETE", "/v1/execute", None, None).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "a wrong method is an ErrorBody too: {}",
        reply.text()
    );
    reply.error();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_slots_are_404_on_release_and_failed_results_in_a_batch() {
    let app = server(ServerConfig::default());
    let reply = post(&app, "/v1/slots/424242/release", json!({})).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(
        reply.error().error.code,
        rollbox::server::api::ApiErrorCode::UnknownSlot
    );
    let reply = post(&app, "/v1/slots/not-a-number/release", json!({})).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);

    let slot = acquire(&app, "release-twice").await;
    let reply = send(&app, "POST", &format!("/v1/slots/slot-{slot}/release"), None, None).await;
    assert_eq!(
        reply.status,
        StatusCode::OK,
        "an empty body and the slot-N form are accepted: {}",
        reply.text()
    );
    let results = execute(&app, vec![python(slot, "1")]).await;
    assert_eq!(results[0]["error"]["kind"], "unknown_slot", "{:#}", results[0]);
    let reply = post(&app, &format!("/v1/slots/{slot}/release"), json!({})).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_in_order_with_each_failure_in_its_place() {
    let app = server(ServerConfig::default());
    let a = acquire(&app, "batch-a").await;
    let b = acquire(&app, "batch-b").await;
    let results = execute(
        &app,
        vec![
            python(a, "x = 1"),
            python(b, "1 / 0"),
            python(a, "x += 1\nx"),
            python(999_999, "1"),
            json!({"slot_id": b, "call": {"name": "teleport", "arguments": {}}}),
            python(a, "x * 10"),
        ],
    )
    .await;
    assert_eq!(results.len(), 6);
    let kinds: Vec<&Value> = results.iter().map(|r| &r["error"]["kind"]).collect();
    assert_eq!(
        kinds,
        [
            &Value::Null,
            &json!("cell_error"),
            &Value::Null,
            &json!("unknown_slot"),
            &json!("unknown_tool"),
            &Value::Null
        ]
    );
    assert_eq!(results[2]["cell"]["result"]["text/plain"], "2");
    assert_eq!(results[5]["cell"]["result"]["text/plain"], "20");
    assert_eq!(results[1]["metadata"]["slot_id"], b);
    assert_eq!(results[3]["metadata"]["slot_id"], 999_999);

    let listed = get(&app, "/v1/slots").await.json();
    let ids: Vec<&Value> = listed["slots"]
        .as_array()
        .expect("slots")
        .iter()
        .map(|s| &s["slot"]["id"])
        .collect();
    assert_eq!(ids, [&json!(a), &json!(b)], "oldest first");
    for slot in [a, b] {
        assert_eq!(
            post(
                &app,
                &format!("/v1/slots/{slot}/release"),
                json!({"reset_workspace": true})
            )
            .await
            .status,
            StatusCode::OK
        );
    }
    assert_eq!(get(&app, "/v1/health").await.json()["live_slots"], 0);
}

async fn run_code(app: &Router, request: Value) -> Value {
    let reply = post(app, "/run_code", request).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_code_answers_in_sandbox_fusions_shape() {
    let app = server(ServerConfig::default());
    let ok = run_code(&app, json!({"code": "if __name__ == '__main__':\n    print(input()[::-1])\n41 + 1", "language": "python", "stdin": "olleh\n"})).await;
    assert_eq!(ok["status"], "Success", "{ok:#}");
    assert_eq!(ok["message"], "");
    assert_eq!(ok["compile_result"], Value::Null);
    let run = &ok["run_result"];
    assert_eq!(
        (&run["status"], &run["return_code"], &run["stdout"], &run["stderr"]),
        (&json!("Finished"), &json!(0), &json!("hello\n"), &json!(""))
    );
    assert!(run["execution_time"].as_f64().is_some(), "{ok:#}");

    let failed = run_code(
        &app,
        json!({"code": "def f():\n    raise ValueError('nope')\nf()", "language": "python"}),
    )
    .await;
    assert_eq!(failed["status"], "Failed", "{failed:#}");
    assert_eq!(failed["run_result"]["status"], "Finished");
    assert_eq!(failed["run_result"]["return_code"], 1);
    let stderr = failed["run_result"]["stderr"].as_str().expect("stderr");
    assert!(
        stderr.starts_with("Traceback") && stderr.trim_end().ends_with("ValueError: nope"),
        "{stderr}"
    );

    let exited = run_code(
        &app,
        json!({"code": "import sys\nprint('bye')\nsys.exit(3)", "language": "python"}),
    )
    .await;
    assert_eq!(
        (
            &exited["status"],
            &exited["run_result"]["return_code"],
            &exited["run_result"]["stdout"]
        ),
        (&json!("Failed"), &json!(3), &json!("bye\n"))
    );

    let slow = run_code(&app, json!({"code": "print('started', flush=True)\nwhile True:\n    pass", "language": "python", "run_timeout": 0.5})).await;
    assert_eq!(slow["status"], "Failed", "{slow:#}");
    assert_eq!(slow["run_result"]["status"], "TimeLimitExceeded");
    assert_eq!(slow["run_result"]["return_code"], Value::Null);

    let cpp = run_code(&app, json!({"code": "int main() {}", "language": "cpp"})).await;
    assert_eq!(cpp["status"], "SandboxError");
    assert!(
        cpp["message"]
            .as_str()
            .is_some_and(|m| m.contains("`cpp`") && m.contains("python")),
        "{cpp:#}"
    );
    assert_eq!(
        get(&app, "/v1/health").await.json()["live_slots"],
        0,
        "every /run_code slot is released"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_code_puts_files_in_place_and_fetches_them_back() {
    let app = server(ServerConfig::default());
    // "3 4\n" in base64.
    let request = json!({
        "code": "a, b = map(int, open('data/in.txt').read().split())\nopen('out.txt', 'w').write(str(a * b))",
        "language": "python",
        "files": {"data/in.txt": "MyA0Cg=="},
        "fetch_files": ["out.txt", "missing.txt"],
    });
    let answer = run_code(&app, request).await;
    assert_eq!(answer["status"], "Success", "{answer:#}");
    assert_eq!(
        answer["files"],
        json!({"out.txt": "MTI="}),
        "12 in base64; a missing file is left out"
    );
    let outside = run_code(
        &app,
        json!({"code": "1", "language": "python", "files": {"../escape.txt": "eA=="}}),
    )
    .await;
    assert_eq!(outside["status"], "SandboxError", "{outside:#}");
    // Content that is not base64 is refused, never written as a silently wrong file; padding
    // and line breaks are optional.
    let garbled = run_code(
        &app,
        json!({"code": "1", "language": "python", "files": {"in.txt": "!!!"}}),
    )
    .await;
    assert_eq!(garbled["status"], "SandboxError", "{garbled:#}");
    assert!(
        garbled["message"].as_str().unwrap_or_default().contains("base64"),
        "{garbled:#}"
    );
    let lenient = run_code(
        &app,
        json!({"code": "print(open('in.txt').read())", "language": "python", "files": {"in.txt": "aGVs\nbG8"}}),
    )
    .await;
    assert_eq!(lenient["run_result"]["stdout"], "hello\n", "{lenient:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slots_expire_and_later_calls_get_unknown_slot() {
    let app = server(ServerConfig {
        idle_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    });
    let slot = acquire(&app, "expiring").await;
    let deadline = Instant::now() + PATIENCE;
    while get(&app, "/v1/health").await.json()["live_slots"] != 0 {
        assert!(Instant::now() < deadline, "the idle slot never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let results = execute(&app, vec![python(slot, "1")]).await;
    assert_eq!(results[0]["error"]["kind"], "unknown_slot", "{:#}", results[0]);
    assert!(results[0]["output"].as_str().is_some_and(|o| o.contains("expired")));
    assert!(
        get(&app, "/metrics")
            .await
            .text()
            .contains("rollbox_expired_slots_total 1\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_calls_and_slots() {
    let app = server(ServerConfig::default());
    let slot = acquire(&app, "metrics").await;
    execute(
        &app,
        vec![
            python(slot, "1"),
            python(slot, "1 / 0"),
            json!({"slot_id": slot, "call": {"name": "no such tool"}}),
        ],
    )
    .await;
    get(&app, "/nowhere").await;
    let reply = get(&app, "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK);
    let text = reply.text();
    for line in [
        "# TYPE rollbox_http_requests_total counter",
        "rollbox_http_requests_total{route=\"/v1/slots\",status=\"200\"} 1",
        "rollbox_http_requests_total{route=\"/v1/execute\",status=\"200\"} 1",
        "rollbox_http_requests_total{route=\"unmatched\",status=\"404\"} 1",
        "rollbox_tool_calls_total{tool=\"python\",outcome=\"ok\"} 1",
        "rollbox_tool_calls_total{tool=\"python\",outcome=\"cell_error\"} 1",
        "rollbox_tool_calls_total{tool=\"other\",outcome=\"unknown_tool\"} 1",
        "rollbox_live_slots 1",
        "rollbox_expired_slots_total 0",
        "rollbox_http_requests_in_flight 1",
    ] {
        assert!(text.lines().any(|l| l == line), "missing `{line}` in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_the_timeout_gets_504() {
    let app = server(ServerConfig {
        request_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    });
    let slot = acquire(&app, "slow").await;
    let reply = post(
        &app,
        "/v1/execute",
        json!({"calls": [python(slot, "import time\ntime.sleep(2)")]}),
    )
    .await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
    assert!(reply.error().error.message.contains("--request-timeout"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_concurrency_limit_and_its_queue_requests_get_503() {
    let app = server(ServerConfig {
        max_concurrent_requests: 1,
        max_queued_requests: 0,
        ..ServerConfig::default()
    });
    let slot = acquire(&app, "hog").await;
    let slow = tokio::spawn({
        let app = app.clone();
        async move {
            post(
                &app,
                "/v1/execute",
                json!({"calls": [python(slot, "import time\ntime.sleep(1.5)\n'done'")]}),
            )
            .await
        }
    });
    // Probe until the slow request holds the only turn; health is never limited.
    let deadline = Instant::now() + PATIENCE;
    let refused = loop {
        let reply = get(&app, "/v1/slots").await;
        if reply.status != StatusCode::OK {
            break reply;
        }
        assert!(Instant::now() < deadline, "no request was ever refused");
        assert!(
            !slow.is_finished(),
            "the slow request ended before any probe was refused"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "{}", refused.text());
    assert!(refused.error().error.message.contains("--max-concurrent-requests"));
    assert_eq!(
        get(&app, "/v1/health").await.status,
        StatusCode::OK,
        "health skips the limit"
    );
    let finished = slow.await.expect("the slow request");
    assert_eq!(finished.json()["results"][0]["cell"]["result"]["text/plain"], "'done'");
}

/// A `rollbox serve` process, killed if a test ends without stopping it.
struct ServeProcess {
    child: Child,
    url: String,
    stderr: Arc<std::sync::Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl ServeProcess {
    /// Starts the real binary on a free loopback port and waits for its listening line.
    fn start(extra: &[&str]) -> ServeProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rollbox"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .env(env_vars::SERVER_TOKEN, TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start rollbox serve");
        let stderr = Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr");
        let sink = stderr.clone();
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(&mut pipe).lines().map_while(Result::ok) {
                let mut text = sink.lock().unwrap_or_else(|p| p.into_inner());
                text.push_str(&line);
                text.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (lines, received) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let mut server = ServeProcess {
            child,
            url: String::new(),
            stderr,
            stderr_reader: Some(stderr_reader),
        };
        let line = received
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|e| panic!("no listening line ({e}); stderr:\n{}", server.stderr()));
        let event: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("the listening line is not JSON ({e}): {line}"));
        assert_eq!(
            (&event["event"], &event["api_version"]),
            (&json!("listening"), &json!("v1")),
            "{line}"
        );
        server.url = event["url"].as_str().expect("a url").to_owned();
        assert!(
            server.url.starts_with("http://127.0.0.1:") && !server.url.ends_with(":0"),
            "{line}"
        );
        server
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits for the process to exit, with a generous deadline.
    fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // All of stderr is in once its reader has seen the pipe close.
                if let Some(reader) = self.stderr_reader.take() {
                    let _ = reader.join();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "rollbox serve did not exit; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::AUTHORIZATION,
        format!("Bearer {TOKEN}").parse().expect("a header value"),
    );
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(PATIENCE)
        .build()
        .expect("an HTTP client")
}

async fn post_json(client: &reqwest::Client, url: String, body: Value) -> Value {
    let response = client
        .post(url)
        .json(&body)
        .send()
        .await
        .expect("the request went through");
    assert!(response.status().is_success(), "status {}", response.status());
    response.json().await.expect("a JSON answer")
}

/// Waits until the server's first slot has a call running.
async fn wait_until_busy(client: &reqwest::Client, url: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let listed: Value = client
            .get(format!("{url}/v1/slots"))
            .send()
            .await
            .expect("listing")
            .json()
            .await
            .expect("JSON");
        if listed["slots"][0]["busy"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "the slow cell never started: {listed:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_serves_slots_and_drains_a_slow_cell_on_sigterm() {
    let mut server = ServeProcess::start(&[]);
    let client = http_client();
    let url = server.url.clone();
    let unauthorised = reqwest::get(format!("{url}/v1/health")).await.expect("a response");
    assert_eq!(unauthorised.status(), reqwest::StatusCode::UNAUTHORIZED);

    let slot = post_json(&client, format!("{url}/v1/slots"), json!({"trajectory_id": "real"})).await["slot"]["id"]
        .as_u64()
        .expect("an id");
    let answer = post_json(
        &client,
        format!("{url}/v1/execute"),
        json!({"calls": [python(slot, "y = 6 * 7\ny")]}),
    )
    .await;
    assert_eq!(answer["results"][0]["cell"]["result"]["text/plain"], "42", "{answer:#}");

    let slow_call = json!({"calls": [python(slot, "import time\ntime.sleep(1.5)\n'done'")]});
    let slow = tokio::spawn({
        let (client, url) = (client.clone(), format!("{url}/v1/execute"));
        async move { post_json(&client, url, slow_call).await }
    });
    wait_until_busy(&client, &url).await;
    let killed = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let finished = slow.await.expect("the request task");
    assert_eq!(
        finished["results"][0]["cell"]["result"]["text/plain"], "'done'",
        "the in-flight request got its result: {finished:#}"
    );
    let status = tokio::task::block_in_place(|| server.wait());
    assert!(status.success(), "exit status {status}; stderr:\n{}", server.stderr());
    assert!(server.stderr().contains("released 1 slots"), "{}", server.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_forces_the_exit() {
    let mut server = ServeProcess::start(&[]);
    let client = http_client();
    let url = server.url.clone();
    let slot = post_json(&client, format!("{url}/v1/slots"), json!({"trajectory_id": "stuck"})).await["slot"]["id"]
        .as_u64()
        .expect("an id");
    let stuck = tokio::spawn({
        let (client, url) = (client.clone(), format!("{url}/v1/execute"));
        async move {
            client
                .post(url)
                .json(&json!({"calls": [python(slot, "import time\ntime.sleep(25)")]}))
                .send()
                .await
        }
    });
    wait_until_busy(&client, &url).await;
    let pid = server.child.id().to_string();
    let terminate = || {
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .expect("kill")
                .success()
        )
    };
    terminate();
    let deadline = Instant::now() + PATIENCE;
    while !server.stderr().contains("shutting down") {
        assert!(
            Instant::now() < deadline,
            "the first SIGTERM was not seen: {}",
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    terminate();
    let status = tokio::task::block_in_place(|| server.wait());
    assert_eq!(
        status.code(),
        Some(130),
        "the second signal exits at once, not after the 25 s cell; stderr:\n{}",
        server.stderr()
    );
    assert!(server.stderr().contains("forced exit"));
    stuck.abort();
}

#[test]
fn listening_beyond_loopback_without_a_token_is_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["serve", "--listen", "0.0.0.0:0"])
        .env_remove(env_vars::SERVER_TOKEN)
        .output()
        .expect("failed to run rollbox serve");
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty(), "no listening line");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to listen on 0.0.0.0") && stderr.contains("ROLLBOX_SERVER_TOKEN"),
        "{stderr}"
    );
}

#[test]
fn the_python_client_passes_its_tests_against_the_real_server() {
    let server = ServeProcess::start(&["--idle-timeout", "60"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python/test_rollbox_client.py");
    let out = Command::new("python3")
        .arg(script)
        .env(env_vars::SERVER_URL, &server.url)
        .env(env_vars::SERVER_TOKEN, TOKEN)
        .output()
        .expect("failed to run python3");
    assert!(
        out.status.success(),
        "the Python client's tests failed:\n--- stdout\n{}\n--- stderr\n{}\n--- server stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.stderr()
    );
}

/// The command a Modal sandbox runs (taken from the dry-run plan, so the two cannot drift),
/// started here on loopback: the process backend without bubblewrap, bash and Python over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_modal_sandbox_command_serves_bash_and_python() {
    let plan = Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args([
            "exec",
            "--backend",
            "remote",
            "--provision",
            "modal",
            "--dry-run",
            "-c",
            "1",
        ])
        .output()
        .expect("failed to run the dry run");
    assert!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
    let plan: Value = serde_json::from_slice(&plan.stdout).expect("the plan is JSON");
    let command: Vec<String> =
        serde_json::from_value(plan["servers"]["sandbox"]["args"].clone()).expect("the sandbox's command");
    let listen = command.iter().position(|a| a == "--listen").expect("a --listen flag");
    assert_eq!(&command[1..listen], ["serve"], "{command:?}");
    let rest: Vec<&str> = command[listen + 2..].iter().map(String::as_str).collect();
    assert!(rest.windows(2).any(|w| w == ["--backend", "process"]), "{rest:?}");

    let server = ServeProcess::start(&rest);
    let client = http_client();
    let url = server.url.clone();
    let health: Value = client
        .get(format!("{url}/v1/health"))
        .send()
        .await
        .expect("health")
        .json()
        .await
        .expect("JSON");
    assert_eq!(health["backend"], "process", "{health:#}");
    let slot = post_json(
        &client,
        format!("{url}/v1/slots"),
        json!({"trajectory_id": "modal-command"}),
    )
    .await["slot"]["id"]
        .as_u64()
        .expect("an id");
    let bash = json!({"slot_id": slot, "call": {"name": "bash", "arguments": {"command": "echo $((6 * 7)) > answer.txt && git --version >/dev/null && cat answer.txt"}}});
    let answer = post_json(
        &client,
        format!("{url}/v1/execute"),
        json!({"calls": [bash, python(slot, "n = int(open('answer.txt').read())"), python(slot, "n + 1")]}),
    )
    .await;
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results.len(), 3, "{answer:#}");
    assert_eq!(results[0]["output"].as_str().map(str::trim), Some("42"), "{answer:#}");
    assert_eq!(results[2]["cell"]["result"]["text/plain"], "43", "{answer:#}");
}

/// `{"seed": N}` in the acquire body seeds the slot with N; `ServerConfig::seed` derives a seed
/// for an acquire that names none. Each is checked against a slot seeded directly.
#[tokio::test]
async fn an_acquire_body_seed_and_the_server_seed_start_seeded_slots() {
    let draw = "import random, os\n(random.random(), os.urandom(4).hex())";
    let direct = |seed: u64| async move {
        let slot = backend().acquire_seeded("t", seed).await.expect("acquire");
        let result = backend().execute(&slot, rollbox::ToolCall::python(draw)).await;
        backend().release(&slot, true).await.expect("release");
        result
            .cell
            .and_then(|c| c.result)
            .and_then(|r| r.get("text/plain").cloned())
    };
    let shown = |result: &Value| result["cell"]["result"]["text/plain"].as_str().map(str::to_owned);
    let app = server(ServerConfig::default());
    let reply = post(&app, "/v1/slots", json!({"trajectory_id": "t", "seed": 42})).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let slot = reply.json()["slot"]["id"].as_u64().expect("a slot id");
    let results = execute(&app, vec![python(slot, draw)]).await;
    assert_eq!(shown(&results[0]), direct(42).await, "{:#}", results[0]);
    let unseeded = acquire(&app, "t").await;
    let results = execute(&app, vec![python(unseeded, draw)]).await;
    assert_ne!(shown(&results[0]), direct(42).await, "{:#}", results[0]);
    let seeded_server = server(ServerConfig {
        seed: Some(7),
        ..ServerConfig::default()
    });
    let slot = acquire(&seeded_server, "t").await;
    let results = execute(&seeded_server, vec![python(slot, draw)]).await;
    let derived = rollbox::seed::derive_slot_seed(7, "t", 0);
    assert_eq!(shown(&results[0]), direct(derived).await, "{:#}", results[0]);
}
