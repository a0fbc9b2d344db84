//! The remote backend against real `rollbox serve` servers on loopback: the local provisioner
//! starts the real binary (`CARGO_BIN_EXE_rollbox`), and tests kill, restart and overload
//! those servers. Where a real server cannot misbehave on cue (a hang, a 500), a scripted
//! loopback server stands in; the tests that use one say so.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use rollbox::error_text::error_chain;
use rollbox::remote::provision::{
    ListedProvisioner, LocalProvisioner, LocalProvisionerConfig, ModalConfig, ModalProvisioner, Provisioner,
};
use rollbox::remote::{PoolConfig, ProvisionConfig, RemoteBackend, RemoteBackendConfig, SlotHealth};
use rollbox::{Backend, ErrorKind, Slot, ToolCall};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::conformance;
use crate::support::{ok, pretty, value};

/// Generous: only there so a broken test fails instead of hanging.
use crate::support::NO_HANG;

fn local_provisioner(server_args: &[&str]) -> Arc<LocalProvisioner> {
    let mut config = LocalProvisionerConfig::new(env!("CARGO_BIN_EXE_rollbox"));
    config.server_args = server_args.iter().map(|a| a.to_string()).collect();
    Arc::new(LocalProvisioner::new(config))
}

async fn local_backend(pool: PoolConfig, server_args: &[&str]) -> (RemoteBackend, Arc<LocalProvisioner>) {
    let provisioner = local_provisioner(server_args);
    let backend = RemoteBackend::with_provisioner(pool, provisioner.clone())
        .await
        .unwrap_or_else(|e| panic!("the remote backend starts: {e:?}"));
    (backend, provisioner)
}

fn pool(slots_per_server: usize, min_servers: usize, max_servers: usize) -> PoolConfig {
    PoolConfig {
        slots_per_server,
        min_servers,
        max_servers,
        ..PoolConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_passes_the_conformance_suite() {
    let (backend, provisioner) = local_backend(pool(2, 1, 2), &[]).await;
    assert_eq!(backend.name(), "remote");
    assert!(
        backend.tools().iter().any(|t| t.as_str() == "python"),
        "the tools come from the servers: {:?}",
        backend.tools()
    );
    tokio::time::timeout(NO_HANG, async {
        conformance::run_all(&backend).await;
        conformance::the_default_profile_is_imported_already(&backend).await;
        conformance::a_cell_past_its_time_limit_is_interrupted_and_keeps_the_state(&backend).await;
    })
    .await
    .expect("the suite finishes");
    let pids: Vec<u32> = backend
        .servers()
        .iter()
        .filter_map(|s| provisioner.pid(&s.id))
        .collect();
    assert!(!pids.is_empty());
    backend.shutdown().await.expect("shutdown");
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "server process {pid} outlived shutdown"
        );
    }
}

/// `remote` over servers that run the `process` backend: the conformance suite, and the shell
/// checks (`bash`, timeouts that kill background children, output caps, a clean environment).
/// The servers run on this machine, so the background-process check can look in its `/proc`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_over_process_passes_the_conformance_and_shell_suites() {
    let mut config = LocalProvisionerConfig::new(env!("CARGO_BIN_EXE_rollbox"));
    config.server_backend = "process".into();
    let backend = RemoteBackend::with_provisioner(pool(4, 1, 1), Arc::new(LocalProvisioner::new(config)))
        .await
        .unwrap_or_else(|e| panic!("the remote backend starts: {e:?}"));
    assert!(
        backend.tools().iter().any(|t| t.as_str() == "bash"),
        "the servers serve the process backend's tools: {:?}",
        backend.tools()
    );
    tokio::time::timeout(NO_HANG, async {
        conformance::run_all(&backend).await;
        conformance::run_shell(&backend).await;
        conformance::a_cell_past_its_time_limit_is_interrupted_and_keeps_the_state(&backend).await;
    })
    .await
    .expect("the suites finish");
    backend.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_server_mid_batch_fails_only_its_calls() {
    let (backend, provisioner) = local_backend(pool(1, 2, 3), &[]).await;
    let backend = Arc::new(backend);
    let doomed = backend.acquire("doomed").await.expect("acquire");
    let survivor = backend.acquire("survivor").await.expect("acquire");
    let doomed_server = server_of(&backend, &doomed);
    assert_ne!(doomed_server, server_of(&backend, &survivor), "one slot per server");

    let marker = doomed.workspace.join("started");
    let batch = vec![
        (
            doomed.clone(),
            ToolCall::python("open('started', 'w').write('x')\nimport time\ntime.sleep(25)"),
        ),
        (survivor.clone(), ToolCall::python("y = 21")),
        (doomed.clone(), ToolCall::python("'never runs'")),
        (survivor.clone(), ToolCall::python("y * 2")),
    ];
    let running = tokio::spawn({
        let backend = backend.clone();
        async move { backend.execute_batch(batch).await }
    });
    wait_until("the doomed slot's cell has started", || marker.exists()).await;
    kill(
        provisioner.pid(&doomed_server).expect("the doomed server runs"),
        libc::SIGKILL,
    );
    let results = tokio::time::timeout(NO_HANG, running)
        .await
        .expect("the batch ends")
        .expect("the batch task");
    // A killed server cannot remove its workspaces (<root>/<slot>/workspace): do it here.
    if let Some(root) = doomed.workspace.parent().and_then(|slot_dir| slot_dir.parent()) {
        std::fs::remove_dir_all(root).expect("remove the killed server's workspace root");
    }

    assert_eq!(results.len(), 4, "every call gets exactly one result");
    for result in [&results[0], &results[2]] {
        assert_eq!(
            result.error.as_ref().map(|e| e.kind),
            Some(ErrorKind::Remote),
            "{}",
            pretty(result)
        );
        assert!(
            result.output.contains(&doomed_server) && result.output.contains("acquire a new one"),
            "{}",
            result.output
        );
        assert!(result.metadata.state_lost);
        assert_eq!(result.metadata.slot_id, Some(doomed.id));
    }
    assert_eq!(
        value(&ok(results[3].clone())),
        "42",
        "the other server's calls are untouched"
    );
    assert!(matches!(backend.slot_health(doomed.id), Some(SlotHealth::Lost { .. })));
    assert_eq!(backend.slot_health(survivor.id), Some(SlotHealth::Alive));
    let down = backend
        .servers()
        .into_iter()
        .find(|s| s.id == doomed_server)
        .expect("the dead server is still listed");
    assert!(down.down.is_some(), "{down:?}");

    let replacement = backend
        .acquire("replacement")
        .await
        .expect("a new slot on a new server");
    let replacement_server = server_of(&backend, &replacement);
    assert_ne!(replacement_server, doomed_server);
    assert_eq!(
        value(&ok(backend.execute(&replacement, ToolCall::python("6 * 7")).await)),
        "42"
    );
    let lost_again = backend.execute(&doomed, ToolCall::python("1")).await;
    assert!(lost_again.output.contains("is lost"), "{}", pretty(&lost_again));

    backend.release(&doomed, true).await.expect("a lost slot releases");
    assert!(
        backend.servers().iter().all(|s| s.id != doomed_server),
        "a dead server is dropped with its last slot"
    );
    backend.release(&survivor, true).await.expect("release");
    backend.release(&replacement, true).await.expect("release");
    backend.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_slots_over_four_servers_lose_no_results() {
    let (backend, _) = local_backend(pool(125, 4, 4), &[]).await;
    let backend = Arc::new(backend);
    let acquired = tokio::time::timeout(
        NO_HANG,
        join_all((0..500).map(|i| {
            let backend = backend.clone();
            async move { backend.acquire(&format!("crowd-{i}")).await }
        })),
    )
    .await
    .expect("acquires end");
    let slots: Vec<Slot> = acquired.into_iter().map(|r| r.expect("acquire")).collect();
    let servers = backend.servers();
    assert_eq!(
        servers.iter().map(|s| s.slots).collect::<Vec<_>>(),
        [125; 4],
        "{servers:?}"
    );

    let runs = slots.iter().enumerate().map(|(i, slot)| {
        let (backend, slot) = (backend.clone(), slot.clone());
        tokio::spawn(async move {
            let first = backend.execute(&slot, ToolCall::python(format!("x = {i}\nx"))).await;
            let second = backend
                .execute(&slot, ToolCall::python(format!("assert x == {i}\nx * 2 + 1")))
                .await;
            (i, first, second)
        })
    });
    let finished = tokio::time::timeout(NO_HANG, join_all(runs)).await.expect("cells end");
    let mut checked = 0;
    for run in finished {
        let (i, first, second) = run.expect("a slot's task");
        assert_eq!(value(&ok(first)), i.to_string());
        assert_eq!(value(&ok(second)), (2 * i + 1).to_string());
        checked += 2;
    }
    assert_eq!(checked, 1000, "every one of the 1000 results is present and correct");
    for released in join_all(slots.iter().map(|s| backend.release(s, true))).await {
        released.expect("release");
    }
    backend.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_is_a_clear_error() {
    let provisioner = local_provisioner(&[]);
    let real = provisioner.provision(1).await.expect("a real server").remove(0);
    for token in [Some("not-the-token".to_string()), None] {
        let listed = Arc::new(ListedProvisioner::new(std::slice::from_ref(&real.url), token));
        let error = match RemoteBackend::with_provisioner(pool(1, 1, 1), listed).await {
            Ok(_) => panic!("a wrong or missing token must be refused"),
            Err(error) => error,
        };
        let text = error_chain(&error);
        assert!(text.contains("401") && text.contains(&real.url), "{text}");
        assert!(
            error.hint().is_some_and(|h| h.contains("ROLLBOX_SERVER_TOKEN")),
            "{:?}",
            error.hint()
        );
    }
    provisioner.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_size_limit_is_a_clear_error() {
    let (backend, _) = local_backend(pool(1, 1, 1), &["--max-body-bytes", "65536"]).await;
    let slot = backend.acquire("big").await.expect("acquire");
    let big = ToolCall::new("write_file", json!({"path": "big.txt", "content": "x".repeat(100_000)}));
    let refused = backend.execute(&slot, big).await;
    assert_eq!(
        refused.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::Remote),
        "{}",
        pretty(&refused)
    );
    assert!(
        refused.output.contains("413") && refused.output.contains("size limit"),
        "{}",
        refused.output
    );
    assert!(!refused.metadata.state_lost, "a refused request loses nothing");
    assert_eq!(
        value(&ok(backend.execute(&slot, ToolCall::python("1 + 1")).await)),
        "2",
        "the slot still works"
    );
    backend.release(&slot, true).await.expect("release");
    backend.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_comes_back_is_used_again() {
    let token = "comeback-token-0123456789";
    let (first, url) = spawn_server("127.0.0.1:0", token).await;
    let listen = url.trim_start_matches("http://").to_string();
    let listed = Arc::new(ListedProvisioner::new(std::slice::from_ref(&url), Some(token.into())));
    let backend = RemoteBackend::with_provisioner(pool(4, 1, 1), listed)
        .await
        .expect("start");
    let forgotten = backend.acquire("forgotten").await.expect("acquire");
    ok(backend.execute(&forgotten, ToolCall::python("x = 1")).await);

    // Restarted behind the client's back: the new process does not know the slot.
    stop(first).await;
    let (second, _) = spawn_server(&listen, token).await;
    let gone = backend.execute(&forgotten, ToolCall::python("x")).await;
    assert_eq!(
        gone.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::Remote),
        "{}",
        pretty(&gone)
    );
    assert!(
        gone.output.contains("no longer has it") && gone.metadata.state_lost,
        "{}",
        gone.output
    );
    assert!(matches!(
        backend.slot_health(forgotten.id),
        Some(SlotHealth::Lost { .. })
    ));

    // Down while the client calls it, then back: the next acquire finds it again.
    let cut_off = backend
        .acquire("cut-off")
        .await
        .expect("acquire on the restarted server");
    stop(second).await;
    let unreachable = backend.execute(&cut_off, ToolCall::python("1")).await;
    assert!(
        unreachable.output.contains("failed to reach server"),
        "{}",
        pretty(&unreachable)
    );
    assert!(backend.servers()[0].down.is_some());
    let (third, _) = spawn_server(&listen, token).await;
    let fresh = backend
        .acquire("fresh")
        .await
        .expect("the server is used again once it answers");
    assert_eq!(
        value(&ok(backend.execute(&fresh, ToolCall::python("2 + 2")).await)),
        "4"
    );
    assert!(backend.servers()[0].down.is_none());

    for slot in [&forgotten, &cut_off, &fresh] {
        backend.release(slot, true).await.expect("release");
    }
    backend.shutdown().await.expect("shutdown");
    stop(third).await;
}

fn server_of(backend: &RemoteBackend, slot: &Slot) -> String {
    backend
        .slot_info(slot.id)
        .expect("the backend holds the slot")
        .server_id
}

fn kill(pid: u32, signal: i32) {
    let pid = i32::try_from(pid).expect("a pid");
    // SAFETY: kill(2) on a child the provisioner spawned and still holds.
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {pid}");
}

/// Polls `condition` until it holds; fails (never hangs) after [`NO_HANG`].
async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + NO_HANG;
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real `rollbox serve` on `listen` with `token`, and its URL from the listening line.
async fn spawn_server(listen: &str, token: &str) -> (tokio::process::Child, String) {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["--quiet", "serve", "--listen", listen])
        .env(rollbox::env_vars::SERVER_TOKEN, token)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn rollbox serve");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = tokio::time::timeout(NO_HANG, lines.next_line())
        .await
        .expect("a listening line")
        .expect("read")
        .expect("a line");
    let listening: serde_json::Value = serde_json::from_str(&line).expect("JSON");
    (child, listening["url"].as_str().expect("a url").to_string())
}

/// Stops a server (SIGTERM: it releases its slots, removes its workspaces and exits) and waits
/// until it is gone.
async fn stop(mut child: tokio::process::Child) {
    kill(child.id().expect("the server runs"), libc::SIGTERM);
    let status = tokio::time::timeout(NO_HANG, child.wait())
        .await
        .expect("the server exits")
        .expect("wait");
    assert!(status.success(), "{status:?}");
}

/// A scripted stand-in for `rollbox serve`, because a real server cannot misbehave on cue. It
/// answers health, acquire and release like the real one, and answers an execute request as
/// its first cell's code says: `hang` never answers, `fail` is a 500 with an error body,
/// `forget` says the slot is unknown (as after a restart), anything else succeeds.
async fn scripted_server() -> String {
    use axum::Json;
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use rollbox::server::api::{
        AcquireRequest, AcquireResponse, ApiError, ApiErrorCode, ErrorBody, ExecuteRequest, ExecuteResponse, Health,
        ReleaseResponse,
    };
    use rollbox::{ExecutionMetadata, ExecutionResult, SlotId};

    async fn health() -> Json<Health> {
        Json(Health {
            status: "ok".into(),
            api_version: "v1".into(),
            rollbox_version: "scripted".into(),
            backend: "scripted".into(),
            tools: vec!["python".into()],
            live_slots: 0,
            max_slots: 10,
        })
    }
    async fn acquire(Json(request): Json<AcquireRequest>) -> Json<AcquireResponse> {
        let slot = Slot {
            id: SlotId(7),
            trajectory_id: request.trajectory_id,
            backend: "scripted".into(),
            workspace: "/nowhere".into(),
        };
        Json(AcquireResponse { slot })
    }
    async fn execute(Json(request): Json<ExecuteRequest>) -> Response {
        let code = request
            .calls
            .first()
            .and_then(|c| c.call.arguments["code"].as_str())
            .unwrap_or_default()
            .to_string();
        let metadata = |c: &rollbox::server::api::SlotCall| ExecutionMetadata {
            slot_id: Some(c.slot_id),
            tool: c.call.name.clone(),
            ..Default::default()
        };
        match code.as_str() {
            "hang" => std::future::pending().await,
            "fail" => {
                let error = ApiError {
                    code: ApiErrorCode::Internal,
                    message: "scripted failure".into(),
                };
                (StatusCode::INTERNAL_SERVER_ERROR, Json(ErrorBody { error })).into_response()
            }
            "forget" => {
                let results = request
                    .calls
                    .iter()
                    .map(|c| ExecutionResult::failure(ErrorKind::UnknownSlot, "unknown slot", metadata(c)))
                    .collect();
                Json(ExecuteResponse { results }).into_response()
            }
            _ => Json(ExecuteResponse {
                results: request
                    .calls
                    .iter()
                    .map(|c| ExecutionResult::ok("fine", metadata(c)))
                    .collect(),
            })
            .into_response(),
        }
    }
    let app = axum::Router::new()
        .route("/v1/health", get(health))
        .route("/v1/slots", post(acquire))
        .route("/v1/execute", post(execute))
        .route(
            "/v1/slots/{id}/release",
            post(|| async { Json(ReleaseResponse { slot_id: SlotId(7) }) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("address"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_failing_server_gets_clear_errors_and_never_hangs() {
    // Scripted server (see `scripted_server`): a real one cannot hang or fail on cue.
    let url = scripted_server().await;
    let listed = Arc::new(ListedProvisioner::new(std::slice::from_ref(&url), None));
    let config = PoolConfig {
        call_timeout: Duration::from_millis(200),
        request_margin: Duration::from_millis(300),
        ..pool(2, 1, 1)
    };
    let backend = RemoteBackend::with_provisioner(config, listed).await.expect("start");
    let slot = backend.acquire("scripted").await.expect("acquire");
    assert_eq!(value_of_output(&backend, &slot, "fine").await, "fine");

    let slow = tokio::time::timeout(NO_HANG, backend.execute(&slot, ToolCall::python("hang")))
        .await
        .expect("the client gives up by itself");
    assert_eq!(
        slow.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::Remote),
        "{}",
        pretty(&slow)
    );
    assert!(
        slow.output.contains("did not answer within 0.5 s") && slow.output.contains("may still be running"),
        "{}",
        slow.output
    );
    assert_eq!(
        backend.slot_health(slot.id),
        Some(SlotHealth::Alive),
        "a slow server has not lost the slot"
    );

    let failed = backend.execute(&slot, ToolCall::python("fail")).await;
    assert_eq!(
        failed.error.as_ref().map(|e| e.kind),
        Some(ErrorKind::Remote),
        "{}",
        pretty(&failed)
    );
    assert!(
        failed.output.contains("500")
            && failed.output.contains("scripted failure")
            && failed.output.contains("see its log"),
        "{}",
        failed.output
    );
    assert_eq!(backend.slot_health(slot.id), Some(SlotHealth::Alive));

    let forgotten = backend.execute(&slot, ToolCall::python("forget")).await;
    assert!(
        forgotten.output.contains("no longer has it") && forgotten.metadata.state_lost,
        "{}",
        pretty(&forgotten)
    );
    assert!(matches!(backend.slot_health(slot.id), Some(SlotHealth::Lost { .. })));
    backend.release(&slot, true).await.expect("a lost slot releases");
    backend.shutdown().await.expect("shutdown");
}

async fn value_of_output(backend: &RemoteBackend, slot: &Slot, code: &str) -> String {
    ok(backend.execute(slot, ToolCall::python(code)).await).output
}

/// Modal's SDK replaced by a stand-in package (tests/data/remote/modal_stand_in.py, which says
/// what it does and does not exercise), because Modal cannot be reached from here; and a
/// `python` wrapper that puts it first on PYTHONPATH, handed to rollbox as `--modal-python`.
pub struct ModalStandIn {
    dir: tempfile::TempDir,
    /// The wrapper to pass as `--modal-python`.
    pub python: std::path::PathBuf,
}

impl ModalStandIn {
    pub fn new(package_source: &str, settings: serde_json::Value) -> ModalStandIn {
        let dir = tempfile::tempdir().expect("a temp dir");
        let sdk = dir.path().join("sdk");
        std::fs::create_dir_all(sdk.join("modal")).expect("mkdir");
        std::fs::write(sdk.join("modal").join("__init__.py"), package_source).expect("write the stand-in");
        let mut settings = settings;
        settings["binary"] = json!(env!("CARGO_BIN_EXE_rollbox"));
        settings["record"] = json!(dir.path().join("calls.jsonl"));
        std::fs::write(sdk.join("stand_in.json"), settings.to_string()).expect("write the settings");
        let python = dir.path().join("python");
        std::fs::write(
            &python,
            format!("#!/bin/sh\nPYTHONPATH='{}' exec python3 \"$@\"\n", sdk.display()),
        )
        .expect("write the wrapper");
        std::fs::set_permissions(&python, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        ModalStandIn { dir, python }
    }

    pub fn recording(settings: serde_json::Value) -> ModalStandIn {
        ModalStandIn::new(include_str!("../data/remote/modal_stand_in.py"), settings)
    }

    pub fn config(&self) -> ModalConfig {
        ModalConfig {
            python: self.python.clone(),
            ..ModalConfig::new(env!("CARGO_BIN_EXE_rollbox"))
        }
    }

    /// Every SDK call recorded so far, in order.
    fn calls(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.dir.path().join("calls.jsonl")).unwrap_or_default();
        text.lines()
            .map(|line| serde_json::from_str(line).expect("a JSON line"))
            .collect()
    }

    pub fn calls_named(&self, name: &str) -> Vec<serde_json::Value> {
        self.calls().into_iter().filter(|c| c["call"] == name).collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modal_sandboxes_are_created_and_always_terminated() {
    let stand_in = ModalStandIn::recording(json!({}));
    let config = RemoteBackendConfig {
        pool: pool(1, 1, 2),
        provision: ProvisionConfig::Modal(stand_in.config()),
    };
    let backend = RemoteBackend::start(config)
        .await
        .unwrap_or_else(|e| panic!("start: {}", error_chain(&e)));
    let warm = backend.acquire("warm").await.expect("acquire on the warm sandbox");
    let extra = backend.acquire("extra").await.expect("acquire on a second sandbox");
    assert_eq!(
        value(&ok(backend
            .execute_batch(vec![(warm.clone(), ToolCall::python("6 * 7"))])
            .await
            .remove(0))),
        "42"
    );
    assert_eq!(
        value(&ok(backend.execute(&extra, ToolCall::python("7 * 6")).await)),
        "42"
    );
    let (warm_id, extra_id) = (server_of(&backend, &warm), server_of(&backend, &extra));

    backend.release(&extra, true).await.expect("release");
    let terminated: Vec<_> = stand_in
        .calls_named("Sandbox.terminate")
        .into_iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(
        terminated,
        [json!(extra_id)],
        "the sandbox beyond the warm minimum ends with its last slot"
    );
    backend.release(&warm, true).await.expect("release");
    assert_eq!(
        stand_in.calls_named("Sandbox.terminate").len(),
        1,
        "the warm sandbox stays"
    );
    backend.shutdown().await.expect("shutdown");
    let terminated: Vec<_> = stand_in
        .calls_named("Sandbox.terminate")
        .into_iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(terminated, [json!(extra_id), json!(warm_id)], "shutdown ends the rest");

    let lookup = &stand_in.calls_named("App.lookup")[0];
    assert_eq!(
        (&lookup["name"], &lookup["create_if_missing"]),
        (&json!("rollbox"), &json!(true))
    );
    let image: Vec<_> = stand_in
        .calls()
        .into_iter()
        .filter(|c| c["call"].as_str().is_some_and(|n| n.starts_with("Image.")))
        .collect();
    assert_eq!(image[0]["python_version"], "3.11");
    assert_eq!(image[1]["packages"], json!(["git", "python3", "python3-pytest"]));
    assert_eq!(
        (&image[2]["local_path"], &image[2]["remote_path"], &image[2]["copy"]),
        (
            &json!(env!("CARGO_BIN_EXE_rollbox")),
            &json!("/usr/local/bin/rollbox"),
            &json!(true)
        )
    );
    let creates = stand_in.calls_named("Sandbox.create");
    assert_eq!(creates.len(), 2);
    for create in &creates {
        let args: Vec<&str> = create["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert_eq!(
            args[..7],
            [
                "/usr/local/bin/rollbox",
                "serve",
                "--listen",
                "0.0.0.0:8000",
                "--backend",
                "process",
                "--unsafe-no-isolation"
            ]
        );
        assert_eq!(create["encrypted_ports"], json!([8000]));
        assert_eq!(create["timeout"], json!(7200));
    }
    assert!(
        stand_in
            .calls_named("Secret.from_dict")
            .iter()
            .all(|s| s["names"] == json!(["ROLLBOX_SERVER_TOKEN"]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_modal_helper_terminates_its_sandboxes_when_rollbox_goes_away() {
    let stand_in = ModalStandIn::recording(json!({}));
    let provisioner = ModalProvisioner::start(stand_in.config())
        .await
        .unwrap_or_else(|e| panic!("start: {}", error_chain(&e)));
    let made = provisioner
        .provision(2)
        .await
        .unwrap_or_else(|e| panic!("provision: {}", error_chain(&e)));
    assert_eq!(made.len(), 2);
    // No shutdown: dropping closes the helper's stdin, as rollbox dying would.
    drop(provisioner);
    wait_until("the helper terminated both sandboxes", || {
        stand_in.calls_named("Sandbox.terminate").len() == 2
    })
    .await;
    let ids: Vec<_> = stand_in
        .calls_named("Sandbox.terminate")
        .into_iter()
        .map(|c| c["id"].as_str().map(str::to_string))
        .collect();
    for endpoint in &made {
        assert!(
            ids.contains(&Some(endpoint.id.clone())),
            "{} was not terminated: {ids:?}",
            endpoint.id
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_modal_create_leaves_no_sandbox_behind() {
    let stand_in = ModalStandIn::recording(json!({ "fail_on_create_number": 2 }));
    let provisioner = ModalProvisioner::start(stand_in.config())
        .await
        .unwrap_or_else(|e| panic!("start: {}", error_chain(&e)));
    let error = match provisioner.provision(2).await {
        Ok(_) => panic!("the second sandbox fails, so the request fails"),
        Err(error) => error_chain(&error),
    };
    assert!(
        error.contains("1 of 2 sandboxes failed") && error.contains("the stand-in refuses"),
        "{error}"
    );
    let created: Vec<_> = stand_in
        .calls_named("Sandbox.create")
        .into_iter()
        .map(|c| c["id"].clone())
        .collect();
    let terminated: Vec<_> = stand_in
        .calls_named("Sandbox.terminate")
        .into_iter()
        .map(|c| c["id"].clone())
        .collect();
    assert_eq!(created.len(), 1);
    assert_eq!(
        created, terminated,
        "all or nothing: the one that started is terminated"
    );
    provisioner.shutdown().await.expect("shutdown");
}

#[test]
fn modal_dry_run_prints_the_plan_without_importing_modal() {
    // This stand-in fails on import: the dry run must never import modal.
    let stand_in = ModalStandIn::new("raise ImportError('the dry run imported modal')\n", json!({}));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args([
            "exec",
            "--backend",
            "remote",
            "--provision",
            "modal",
            "--dry-run",
            "--slots-per-sandbox",
            "10",
            "--min-sandboxes",
            "2",
            "--modal-python",
        ])
        .arg(&stand_in.python)
        .output()
        .expect("run rollbox");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the plan is JSON");
    assert_eq!(
        (
            &plan["slots_per_sandbox"],
            &plan["min_sandboxes"],
            &plan["started_up_front"]
        ),
        (&json!(10), &json!(2), &json!(2))
    );
    let servers = &plan["servers"];
    assert_eq!(servers["image"][0]["call"], "modal.Image.debian_slim");
    assert_eq!(servers["sandbox"]["call"], "modal.Sandbox.create");
    assert_eq!(servers["sandbox"]["kwargs"]["encrypted_ports"], json!([8000]));
    assert_eq!(servers["sandbox"]["args"][5], "process");
    assert!(
        servers["sandbox"]["args"]
            .as_array()
            .expect("args")
            .contains(&json!("--max-slots"))
    );
    assert_eq!(servers["on_release_shutdown_or_exit"]["call"], "sandbox.terminate");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("ROLLBOX_SERVER_TOKEN\": \"0"),
        "no real token is printed"
    );
}

#[test]
fn ctrl_c_terminates_the_modal_sandboxes() {
    modal_sandboxes_end_when_rollbox_gets(libc::SIGINT);
}

/// Under SIGKILL rollbox runs no clean-up of its own: the helper sees its stdin close, and its
/// clean-up must not depend on its stderr, whose reader died with rollbox.
#[test]
fn kill_9_of_rollbox_still_terminates_the_modal_sandboxes() {
    modal_sandboxes_end_when_rollbox_gets(libc::SIGKILL);
}

fn modal_sandboxes_end_when_rollbox_gets(signal: i32) {
    let stand_in = ModalStandIn::recording(json!({}));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args([
            "--quiet",
            "exec",
            "--backend",
            "remote",
            "--provision",
            "modal",
            "-c",
            "import time\ntime.sleep(25)",
            "--modal-python",
        ])
        .arg(&stand_in.python)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("run rollbox");
    let deadline = std::time::Instant::now() + NO_HANG;
    while stand_in.calls_named("Sandbox.tunnels").is_empty() {
        assert!(std::time::Instant::now() < deadline, "no sandbox was created");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Give the cell a moment to start; if the signal lands earlier, the helper's own clean-up
    // (its stdin closes when rollbox dies) must terminate the sandbox just the same.
    std::thread::sleep(Duration::from_millis(500));
    kill(child.id(), signal);
    let status = child.wait().expect("rollbox exits");
    assert!(!status.success(), "{status:?}");
    while stand_in.calls_named("Sandbox.terminate").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the sandbox was never terminated");
        std::thread::sleep(Duration::from_millis(20));
    }
    let created = stand_in.calls_named("Sandbox.create")[0]["id"].clone();
    assert_eq!(stand_in.calls_named("Sandbox.terminate")[0]["id"], created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_cells_on_remote_servers_and_explains_a_bad_setup() {
    let rollbox = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"));
        command
            .args(["exec", "--backend", "remote"])
            .args(args)
            .env_remove(rollbox::env_vars::SERVER_TOKEN);
        command
    };
    let out = rollbox(&["--quiet", "-c", "x = 20", "-c", "x * 2 + 2"])
        .output()
        .expect("run rollbox");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");

    let token = "exec-test-token-0123456789";
    let (server, url) = spawn_server("127.0.0.1:0", token).await;
    let listed = [
        "--provision",
        "static",
        "--servers",
        url.as_str(),
        "--token-env",
        "EXEC_TEST_TOKEN",
        "-c",
        "6 * 7",
    ];
    let out = rollbox(&listed)
        .env("EXEC_TEST_TOKEN", token)
        .output()
        .expect("run rollbox");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "42\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = rollbox(&listed)
        .env("EXEC_TEST_TOKEN", "wrong-token-0123456789")
        .output()
        .expect("run rollbox");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("401")
            && stderr.contains(&url)
            && stderr.contains("hint:")
            && stderr.contains("ROLLBOX_SERVER_TOKEN"),
        "{stderr}"
    );
    let out = rollbox(&["--provision", "static", "-c", "1"])
        .output()
        .expect("run rollbox");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--servers http://HOST:PORT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop(server).await;
}

/// The processes whose parent is `pid` (every thread's children).
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether `pid` is alive (a zombie counts as gone: it has exited, only its entry remains).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rollbox_leaves_no_local_server_behind() {
    // `repl --backend remote` starts a local `rollbox serve` child; kill -9 of the parent must
    // not leave that server running (its parent would become pid 1, forever).
    let mut parent = std::process::Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(["--quiet", "repl", "--backend", "remote"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run rollbox repl");
    let mut stdin = parent.stdin.take().expect("stdin");
    use std::io::{BufRead, Write};
    writeln!(stdin, "print('ready')\n").expect("send a cell");
    let mut stdout = std::io::BufReader::new(parent.stdout.take().expect("stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("read the cell's output");
    assert_eq!(line.trim(), "ready", "the repl ran its first cell on the server");
    let servers = children_of(parent.id());
    assert!(!servers.is_empty(), "the repl started a local server");
    kill(parent.id(), libc::SIGKILL);
    parent.wait().expect("reap the killed rollbox");
    wait_until("every local server has exited", || {
        !servers.iter().any(|&pid| alive(pid))
    })
    .await;
}

/// A seeded remote slot: the seed reaches the server (another process), whose slot draws what
/// a slot of the same seed draws in this process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_remote_slot_draws_what_a_local_slot_of_that_seed_draws() {
    let draw = "import random, os, time\n(random.random(), os.urandom(4).hex(), time.time())";
    let (backend, _provisioner) = local_backend(pool(2, 1, 1), &[]).await;
    let remote = backend.acquire_seeded("t", 42).await.expect("acquire");
    let over_http = value_of_output(&backend, &remote, draw).await;
    let local = crate::support::shared_wasm();
    let slot = local.acquire_seeded("t", 42).await.expect("acquire");
    let here = ok(local.execute(&slot, ToolCall::python(draw)).await).output;
    local.release(&slot, true).await.expect("release");
    assert_eq!(over_http, here);
    backend.shutdown().await.expect("shutdown");
}

/// `remote` over wasm servers started with `--rollback`: a stopped cell rolls its slot back on
/// the slot's own server, and the result says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_rolls_back_on_the_slots_own_server() {
    let (backend, _provisioner) = local_backend(pool(2, 1, 1), &["--rollback"]).await;
    tokio::time::timeout(NO_HANG, conformance::a_stopped_cell_rolls_the_slot_back(&backend))
        .await
        .expect("the check finishes");
    backend.shutdown().await.expect("shutdown");
}
