//! A hostile HTTP client against `rollbox serve`, over real sockets on loopback: connections
//! that never send their headers (slow-loris), that stop half-way through them, that sit idle,
//! and more of them than the server has descriptors.

use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rollbox::server::{ServerConfig, ServerState, serve};
use rollbox::{Backend, Limits, WasmBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::wasm_backend;

/// The longest any test waits for the server to do something; only guards against hangs.
const PATIENCE: Duration = Duration::from_secs(120);
/// A request head cut before its blank line.
const HALF_A_HEADER: &[u8] = b"GET /v1/health HTTP/1.1\r\nHost: rollbox\r\nX-Slow: ";
/// A whole health request on a connection kept alive.
const HEALTH_REQUEST: &[u8] = b"GET /v1/health HTTP/1.1\r\nHost: rollbox\r\n\r\n";

fn backend() -> Arc<dyn Backend> {
    static BACKEND: OnceLock<Arc<WasmBackend>> = OnceLock::new();
    BACKEND
        .get_or_init(|| Arc::new(wasm_backend(Limits::default())))
        .clone()
}

/// A server with `config` on a free loopback port, until the test's runtime ends. Returns its address.
async fn start(config: ServerConfig) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let address = listener.local_addr().expect("the listening address");
    let state = ServerState::new(backend(), config).expect("a valid server state");
    tokio::spawn(serve(listener, state, std::future::pending()));
    address
}

/// Reads until the server closes the connection; returns everything it sent. Panics if it is
/// still open after [`PATIENCE`].
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let reading = async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(PATIENCE, reading)
        .await
        .expect("the server kept the connection open past every timeout");
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_header_connections_are_closed_after_the_header_timeout() {
    let address = start(ServerConfig {
        header_read_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    })
    .await;
    let mut silent = Vec::new();
    let mut halves = Vec::new();
    for _ in 0..20 {
        silent.push(TcpStream::connect(address).await.expect("a connection"));
        let mut half = TcpStream::connect(address).await.expect("a connection");
        half.write_all(HALF_A_HEADER).await.expect("half a header sent");
        halves.push(half);
    }
    for stream in silent.iter_mut().chain(halves.iter_mut()) {
        let answer = read_until_closed(stream).await;
        // Closed without an answer: no request was ever complete.
        assert!(
            !String::from_utf8_lossy(&answer).contains("200 OK"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_is_served_then_closed_after_the_idle_timeout() {
    // A header timeout no test would reach, so only the idle timeout can close the connection.
    let address = start(ServerConfig {
        header_read_timeout: Duration::from_secs(3_600),
        connection_idle_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    })
    .await;
    let mut stream = TcpStream::connect(address).await.expect("a connection");
    stream.write_all(HEALTH_REQUEST).await.expect("a request sent");
    let answer = String::from_utf8_lossy(&read_until_closed(&mut stream).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    // The connection stayed open for another request (keep-alive): the close came later.
    assert!(!answer.to_ascii_lowercase().contains("connection: close"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_not_cut_by_the_header_or_idle_timeout_while_it_runs() {
    let address = start(ServerConfig {
        header_read_timeout: Duration::from_secs(1),
        connection_idle_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    })
    .await;
    let client = reqwest::Client::builder().timeout(PATIENCE).build().expect("a client");
    let url = format!("http://{address}");
    let acquired: serde_json::Value = client
        .post(format!("{url}/v1/slots"))
        .json(&serde_json::json!({"trajectory_id": "slow"}))
        .send()
        .await
        .expect("acquired")
        .json()
        .await
        .expect("JSON");
    let slot = acquired["slot"]["id"].as_u64().expect("a slot id");
    // A cell three times longer than both timeouts, with no byte on the wire while it runs.
    let call = serde_json::json!({"calls": [{"slot_id": slot, "call": {"name": "python",
        "arguments": {"code": "import time; time.sleep(3); 'slept'"}}}]});
    let answer: serde_json::Value = client
        .post(format!("{url}/v1/execute"))
        .json(&call)
        .send()
        .await
        .expect("the slow call was answered")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        answer["results"][0]["cell"]["result"]["text/plain"], "'slept'",
        "{answer:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_health_answers_once_idle_connections_are_dropped() {
    let address = start(ServerConfig {
        max_connections: 4,
        header_read_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    })
    .await;
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(
            TcpStream::connect(address)
                .await
                .expect("a connection (the backlog takes it)"),
        );
    }
    let health = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("a client")
        .get(format!("http://{address}/v1/health"))
        .send()
        .await
        .expect("health answered once the silent connections were dropped");
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    drop(silent);
}

/// The issue's own case: more idle sockets than the server may open descriptors. The real
/// binary runs under `ulimit -n 256` with 300 silent connections; the connection cap keeps
/// `accept` from ever failing with "Too many open files", and health answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_silent_sockets_than_descriptors_never_starve_accept() {
    let mut child = Command::new("bash")
        .args(["-c", "ulimit -n 256 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_rollbox"))
        .args(["serve", "--listen", "127.0.0.1:0", "--header-read-timeout", "1"])
        // The server ends when this pipe closes, so a test that panics leaves none behind.
        .arg("--exit-on-stdin-eof")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start rollbox serve");
    let stdout = child.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        line
    })
    .await
    .expect("the listening line");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    let url = event["url"].as_str().expect("a url").to_owned();
    let address = url.trim_start_matches("http://").to_owned();
    let mut silent = Vec::new();
    for _ in 0..300 {
        silent.push(
            TcpStream::connect(&address)
                .await
                .expect("a connection (the backlog takes it)"),
        );
    }
    let health = reqwest::Client::builder()
        .timeout(PATIENCE)
        .build()
        .expect("a client")
        .get(format!("{url}/v1/health"))
        .send()
        .await
        .expect("health answered");
    assert_eq!(health.status(), reqwest::StatusCode::OK);
    drop(silent);
    let _ = child.kill();
    let output = child.wait_with_output().expect("the server's output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("Too many open files") && !stderr.contains("failed to accept"),
        "accept failed: {stderr}"
    );
}

/// The server-wide memory budget: each slot is charged its memory limit (1 GiB here), so a
/// 2.5 GiB budget admits two slots; the third acquire gets 503 saying which setting to raise,
/// and a release makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquires_past_the_memory_budget_get_503_naming_the_budget() {
    let slot_bytes = Limits::default().memory_bytes;
    let address = start(ServerConfig {
        memory_budget_bytes: Some(slot_bytes * 5 / 2),
        ..ServerConfig::default()
    })
    .await;
    let client = reqwest::Client::builder().timeout(PATIENCE).build().expect("a client");
    let acquire = |name: &'static str| {
        let client = client.clone();
        async move {
            client
                .post(format!("http://{address}/v1/slots"))
                .json(&serde_json::json!({"trajectory_id": name}))
                .send()
                .await
                .expect("an answer")
        }
    };
    let first = acquire("a").await;
    assert_eq!(first.status(), reqwest::StatusCode::OK);
    let first: serde_json::Value = first.json().await.expect("JSON");
    assert_eq!(acquire("b").await.status(), reqwest::StatusCode::OK);
    let refused = acquire("c").await;
    assert_eq!(refused.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    let body: serde_json::Value = refused.json().await.expect("JSON");
    let message = body["error"]["message"].as_str().expect("a message");
    assert!(
        message.contains("memory budget is full") && message.contains("--memory-budget"),
        "{message}"
    );
    let id = first["slot"]["id"].as_u64().expect("a slot id");
    let released = client
        .post(format!("http://{address}/v1/slots/{id}/release"))
        .send()
        .await
        .expect("released");
    assert!(released.status().is_success(), "{}", released.status());
    assert_eq!(acquire("d").await.status(), reqwest::StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_budget_smaller_than_one_slot_is_refused_at_start() {
    let config = ServerConfig {
        memory_budget_bytes: Some(Limits::default().memory_bytes / 2),
        ..ServerConfig::default()
    };
    let error = ServerState::new(backend(), config).err().expect("refused");
    assert!(
        error.to_string().contains("smaller than one slot's memory limit"),
        "{error}"
    );
}
