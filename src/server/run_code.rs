//! `POST /run_code`: SandboxFusion's request and response shapes, so code written for a
//! SandboxFusion server (verl's `sandbox_fusion` reward and tool) can point at rollbox as is.
//!
//! Each request runs in a fresh slot that is released afterwards. Python runs as one cell,
//! with script semantics on top: `__name__ == "__main__"`, the final expression's value is not
//! printed, an uncaught exception prints its traceback to stderr and gives return code 1, and
//! `sys.exit(n)` gives return code `n`, and as the program ends the guest waits for its
//! non-daemon threads and runs its atexit handlers, as CPython does on exit. A set-up cell puts
//! `stdin` and `files` in place first and asks the guest for that script ending;
//! `fetch_files` are read back by a cell after.
//!
//! Two things follow SandboxFusion rather than the slot API, because clients score rewards by
//! comparing `stdout` byte for byte:
//! - the streams hold only what the program wrote: output past the server's cap is cut with
//!   no marker, and the cut is reported beside them in `run_result.truncated`, a field
//!   SandboxFusion clients do not read;
//! - when every slot is busy the request waits for one, up to its own `run_timeout`, and only
//!   then answers 504, the one status verl's `call_sandbox_api` retries.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::api::ApiErrorCode;
use super::middleware::DetachedWork;
use super::routes::JsonBody;
use super::slots::Full;
use super::{ApiFailure, ServerState, Shared};
use crate::slot::LimitKind;
use crate::slot::tools::ToolName;
use crate::slot::{Backend, BackendError, CellError, ErrorKind, ExecutionResult, Slot, ToolCall};

/// The language every backend runs (as a notebook cell).
const PYTHON: &str = "python";
/// SandboxFusion's default for both timeouts, in seconds.
const DEFAULT_TIMEOUT_SECS: f64 = 10.0;
/// The trajectory id of `/run_code`'s slots, for logs.
const RUN_CODE_TRAJECTORY: &str = "run_code";
/// The bytes of each stream SandboxFusion returns: its runner reads a finished command's
/// stdout and stderr with `fd.read(1024 * 1024)` (`get_output_non_blocking` in
/// `sandbox/utils/execution.py`, bytedance/SandboxFusion), so at most 1 MiB each, cut silently.
pub const SANDBOX_FUSION_OUTPUT_BYTES: usize = 1024 * 1024;
/// How long to wait before trying again when the backend (not the slot table) was full.
const BACKEND_FULL_RETRY: Duration = Duration::from_millis(20);

/// SandboxFusion's `RunCodeRequest`. Unknown fields are ignored, as SandboxFusion does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunCodeRequest {
    /// The program's source.
    pub code: String,
    /// The language; rollbox runs `python` (more when the backend has them).
    #[serde(default = "python")]
    pub language: String,
    /// Seconds to compile; unused for Python.
    #[serde(default = "default_timeout")]
    pub compile_timeout: f64,
    /// Seconds to run, capped by the server's `--timeout`.
    #[serde(default = "default_timeout")]
    pub run_timeout: f64,
    /// Ignored: the server's `--memory` limit applies to every slot.
    #[serde(default = "no_memory_limit", rename = "memory_limit_MB")]
    pub memory_limit_mb: i64,
    /// Text the program reads from standard input.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Files to create before the run: relative path to base64 content (`null` entries are
    /// skipped).
    #[serde(default)]
    pub files: BTreeMap<String, Option<String>>,
    /// Relative paths of files to return, base64-encoded, after the run; missing ones are left out.
    #[serde(default)]
    pub fetch_files: Vec<String>,
    /// pytest's extra arguments in SandboxFusion; unused for Python.
    #[serde(default)]
    pub args: Vec<String>,
}

fn python() -> String {
    PYTHON.to_owned()
}

fn default_timeout() -> f64 {
    DEFAULT_TIMEOUT_SECS
}

fn no_memory_limit() -> i64 {
    -1
}

/// SandboxFusion's `RunCodeResponse`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunCodeResponse {
    /// `Success` when the run finished with return code 0, `Failed` when it did not (an
    /// exception, a non-zero exit, a time limit), `SandboxError` when it could not run.
    pub status: RunStatus,
    /// Why, for `SandboxError`; empty otherwise.
    pub message: String,
    /// Always `null`: Python is not compiled.
    pub compile_result: Option<CommandRunResult>,
    /// The run, when there was one.
    pub run_result: Option<CommandRunResult>,
    /// Always `null`: rollbox has no pods.
    pub executor_pod_name: Option<String>,
    /// The fetched files: path to base64 content.
    pub files: BTreeMap<String, String>,
}

impl RunCodeResponse {
    /// A `SandboxError` answer saying `message`.
    pub fn sandbox_error(message: impl Into<String>) -> Self {
        RunCodeResponse {
            status: RunStatus::SandboxError,
            message: message.into(),
            compile_result: None,
            run_result: None,
            executor_pod_name: None,
            files: BTreeMap::new(),
        }
    }

    fn of_run(status: RunStatus, run: CommandRunResult) -> Self {
        RunCodeResponse {
            status,
            run_result: Some(run),
            message: String::new(),
            ..RunCodeResponse::sandbox_error("")
        }
    }
}

/// SandboxFusion's `RunStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    /// Ran, return code 0.
    Success,
    /// Ran, but failed or ran out of time.
    Failed,
    /// Could not run.
    SandboxError,
}

/// SandboxFusion's `CommandRunResult`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CommandRunResult {
    /// How the command ended.
    pub status: CommandRunStatus,
    /// Seconds it ran.
    pub execution_time: Option<f64>,
    /// Its exit status; `null` when it was stopped.
    pub return_code: Option<i32>,
    /// What it printed to standard output.
    pub stdout: Option<String>,
    /// What it printed to standard error, a traceback included.
    pub stderr: Option<String>,
    /// rollbox's own field, which SandboxFusion clients ignore: whether `stdout` or `stderr`
    /// was cut at the server's output cap. The streams themselves never carry a marker.
    #[serde(default)]
    pub truncated: bool,
}

/// SandboxFusion's `CommandRunStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandRunStatus {
    /// The command ran to its end (whatever its return code).
    Finished,
    /// The sandbox failed to run it.
    Error,
    /// It ran past its time (or instruction) limit and was stopped.
    TimeLimitExceeded,
}

/// `POST /run_code`. Request problems past JSON parsing (an unsupported language, a bad path)
/// are `SandboxError` answers, as SandboxFusion gives. When every slot is busy the request
/// waits for one until its `run_timeout` has passed, then answers 504.
pub(crate) async fn run_code(
    State(state): State<ServerState>,
    JsonBody(request): JsonBody<RunCodeRequest>,
) -> Result<Json<RunCodeResponse>, ApiFailure> {
    let plan = match RunPlan::new(request, &state.shared.backend.tools()) {
        Ok(plan) => plan,
        Err(message) => return Ok(Json(RunCodeResponse::sandbox_error(message))),
    };
    let deadline = tokio::time::Instant::now() + plan.timeout;
    loop {
        let reservation = state
            .shared
            .slots
            .reserve_within(deadline)
            .await
            .map_err(|full| no_slot_in_time(&full, plan.timeout))?;
        let shared = state.shared.clone();
        let attempt = plan.clone();
        // Detached so the slot is released even if the client hangs up.
        let outcome = DetachedWork::run(&state, async move {
            let outcome = run_in_fresh_slot(&shared, attempt).await;
            drop(reservation);
            outcome
        })
        .await;
        return match outcome {
            Some(Ok(response)) => Ok(Json(response)),
            Some(Err(BackendError::Exhausted { capacity })) => {
                // The backend is full though the table was not (its slots are shared with
                // something else): wait as for a busy table.
                if tokio::time::Instant::now() + BACKEND_FULL_RETRY >= deadline {
                    return Err(no_slot_in_time(&Full::Slots { capacity }, plan.timeout));
                }
                tokio::time::sleep(BACKEND_FULL_RETRY).await;
                continue;
            }
            Some(Err(error)) => Ok(Json(RunCodeResponse::sandbox_error(format!(
                "failed to start a slot: {}",
                crate::error_text::error_chain(&error)
            )))),
            None => Ok(Json(RunCodeResponse::sandbox_error(
                "the backend panicked; the details are in the server's log",
            ))),
        };
    }
}

/// 504: the request waited its whole `run_timeout` for a slot. SandboxFusion clients (verl's
/// `call_sandbox_api`) retry exactly this status.
fn no_slot_in_time(full: &Full, waited: Duration) -> ApiFailure {
    ApiFailure::new(
        ApiErrorCode::Timeout,
        format!(
            "no slot came free within the request's run_timeout ({:.1} s): {}; retry, or raise that setting",
            waited.as_secs_f64(),
            full.reason()
        ),
    )
}

/// A checked request.
#[derive(Clone)]
pub(crate) struct RunPlan {
    code: String,
    timeout: Duration,
    /// The set-up cell: stdin and files put in place, and script semantics for the program.
    setup: String,
    fetch_files: Vec<String>,
}

impl RunPlan {
    pub(crate) fn new(request: RunCodeRequest, tools: &[ToolName]) -> Result<RunPlan, String> {
        if request.language != PYTHON || !tools.contains(&ToolName::Python) {
            let supported = if tools.contains(&ToolName::Python) {
                PYTHON
            } else {
                "nothing: this backend has no python tool"
            };
            return Err(format!(
                "language `{}` is not supported by this rollbox server; it runs: {supported}",
                request.language
            ));
        }
        let timeout = Duration::try_from_secs_f64(request.run_timeout)
            .ok()
            .filter(|t| !t.is_zero())
            .ok_or_else(|| {
                format!(
                    "run_timeout must be a positive number of seconds, not {}",
                    request.run_timeout
                )
            })?;
        for path in request.files.keys().chain(&request.fetch_files) {
            check_relative(path)?;
        }
        let mut canonical = BTreeMap::new();
        for (path, data) in &request.files {
            if let Some(data) = data {
                canonical.insert(path, canonical_base64(path, data)?);
            }
        }
        let files: BTreeMap<&String, &String> = canonical.iter().map(|(path, data)| (*path, data)).collect();
        let setup = setup_cell(request.stdin.as_deref(), &files);
        Ok(RunPlan {
            code: request.code,
            timeout,
            setup,
            fetch_files: request.fetch_files,
        })
    }
}

/// A file's content, checked to be base64 (standard alphabet; padding and line breaks
/// optional) and re-encoded canonically for the set-up cell: Python's lenient decoder would
/// turn anything else into a silently wrong file (`"!!!"` into an empty one).
fn canonical_base64(path: &str, data: &str) -> Result<String, String> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

    const LENIENT_PADDING: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT_PADDING
        .decode(compact.as_bytes())
        .map(|bytes| base64::engine::general_purpose::STANDARD.encode(bytes))
        .map_err(|error| format!("files[{path:?}] is not valid base64 ({error}); encode the file's bytes with base64"))
}

/// Paths stay inside the slot's workspace: relative, without `..`.
fn check_relative(path: &str) -> Result<(), String> {
    let p = std::path::Path::new(path);
    let escapes = p
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_) | std::path::Component::CurDir));
    if path.is_empty() || escapes {
        return Err(format!(
            "the file path `{path}` must be relative to the working directory and must not contain `..`"
        ));
    }
    Ok(())
}

async fn run_in_fresh_slot(shared: &Shared, plan: RunPlan) -> Result<RunCodeResponse, BackendError> {
    let backend = &*shared.backend;
    let slot = backend.acquire(RUN_CODE_TRAJECTORY).await?;
    let response = run_plan(shared, &slot, plan).await;
    if let Err(error) = backend.release(&slot, true).await {
        tracing::warn!(slot = %slot.id, %error, "failed to release a /run_code slot");
    }
    Ok(response)
}

async fn run_plan(shared: &Shared, slot: &Slot, plan: RunPlan) -> RunCodeResponse {
    let backend: &dyn Backend = &*shared.backend;
    let prepared = backend.execute(slot, ToolCall::python(plan.setup)).await;
    if !prepared.success {
        return RunCodeResponse::sandbox_error(format!("failed to put stdin and files in place: {}", prepared.output));
    }
    let result = backend
        .execute(slot, ToolCall::python(plan.code).with_timeout(plan.timeout))
        .await;
    shared.metrics.count_calls(std::slice::from_ref(&result));
    let mut response = response_for(&result, shared.config.run_code_output_bytes);
    if !plan.fetch_files.is_empty() && response.status != RunStatus::SandboxError {
        match fetch_files(backend, slot, &plan.fetch_files).await {
            Ok(files) => response.files = files,
            Err(message) => return RunCodeResponse::sandbox_error(message),
        }
    }
    response
}

/// The SandboxFusion answer for a cell's result, each stream cut to `cap` bytes.
fn response_for(result: &ExecutionResult, cap: usize) -> RunCodeResponse {
    let execution_time = Some(result.metadata.duration_us as f64 / 1e6);
    let (stdout, mut stderr) = result
        .cell
        .as_ref()
        .map(|c| (c.stdout.clone(), c.stderr.clone()))
        .unwrap_or_default();
    let run = |status, return_code, stdout: String, stderr: String| {
        let (stdout, stdout_cut) = program_output(&stdout, result.metadata.truncated, cap);
        let (stderr, stderr_cut) = program_output(&stderr, result.metadata.truncated, cap);
        CommandRunResult {
            status,
            execution_time,
            return_code,
            stdout: Some(stdout),
            stderr: Some(stderr),
            truncated: stdout_cut || stderr_cut,
        }
    };
    if matches!(result.metadata.limit_hit, Some(LimitKind::Time | LimitKind::Fuel)) {
        return RunCodeResponse::of_run(
            RunStatus::Failed,
            run(CommandRunStatus::TimeLimitExceeded, None, stdout, stderr),
        );
    }
    let return_code = match result.error.as_ref().map(|e| e.kind) {
        None => 0,
        Some(ErrorKind::CellError) => {
            let (code, printed) = result
                .cell
                .as_ref()
                .and_then(|c| c.error.as_ref())
                .map_or((1, String::new()), exit_of);
            stderr.push_str(&printed);
            code
        }
        Some(ErrorKind::LimitExceeded) => {
            // Out of memory: a script would die with a non-zero status and a message.
            stderr.push_str(&result.output);
            1
        }
        Some(_) => {
            let mut response = RunCodeResponse::of_run(
                RunStatus::SandboxError,
                run(CommandRunStatus::Error, None, stdout, stderr),
            );
            response.message = result.output.clone();
            return response;
        }
    };
    let status = if return_code == 0 {
        RunStatus::Success
    } else {
        RunStatus::Failed
    };
    RunCodeResponse::of_run(
        status,
        run(CommandRunStatus::Finished, Some(return_code), stdout, stderr),
    )
}

/// What the program wrote to a stream, at most `cap` bytes of it, with no truncation marker;
/// and whether anything was cut. The backend marks its own cuts inside the stream (for
/// models); `backend_cut` says there are some to take out.
fn program_output(text: &str, backend_cut: bool, cap: usize) -> (String, bool) {
    let (mut text, dropped) = if backend_cut {
        crate::slot::cell::strip_output_cut_markers(text)
    } else {
        (text.to_owned(), 0)
    };
    if text.len() <= cap {
        return (text, dropped > 0);
    }
    let mut end = cap;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    (text, true)
}

/// The return code a script ending with `error` would have, and what Python would print.
fn exit_of(error: &CellError) -> (i32, String) {
    if error.name != "SystemExit" {
        let text = if error.traceback.is_empty() {
            format!("{}: {}", error.name, error.value)
        } else {
            error.traceback.join("\n")
        };
        return (1, text + "\n");
    }
    // `sys.exit(arg)`: no argument or None is 0, an integer is the status (mod 256 as the OS
    // keeps it), anything else is printed and gives 1.
    match error.value.as_str() {
        "" | "None" | "False" => (0, String::new()),
        "True" => (1, String::new()),
        value => match value.parse::<i64>() {
            Ok(code) => (code.rem_euclid(256) as i32, String::new()),
            Err(_) => (1, format!("{value}\n")),
        },
    }
}

/// A Python cell that makes `stdin` the cell's standard input, writes `files`, and asks the
/// guest for script semantics in the next cell: non-daemon threads waited for and atexit
/// handlers run at its end, `os._exit(n)` as status n. The data travels as hex of a JSON
/// document, which no quoting in the code can break.
fn setup_cell(stdin: Option<&str>, files: &BTreeMap<&String, &String>) -> String {
    let spec = serde_json::json!({ "stdin": stdin, "files": files });
    format!(
        "import base64 as _rb_b64, io as _rb_io, json as _rb_json, os as _rb_os, sys as _rb_sys\n\
         _rb_spec = _rb_json.loads(bytes.fromhex('{}').decode('utf-8'))\n\
         for _rb_path, _rb_data in _rb_spec['files'].items():\n\
         \x20   if _rb_os.path.dirname(_rb_path):\n\
         \x20       _rb_os.makedirs(_rb_os.path.dirname(_rb_path), exist_ok=True)\n\
         \x20   with open(_rb_path, 'wb') as _rb_file:\n\
         \x20       _rb_file.write(_rb_b64.b64decode(_rb_data))\n\
         if _rb_spec['stdin'] is not None:\n\
         \x20   _rb_sys.stdin = _rb_io.TextIOWrapper(_rb_io.BytesIO(_rb_spec['stdin'].encode('utf-8')), encoding='utf-8')\n\
         del _rb_b64, _rb_io, _rb_json, _rb_os, _rb_sys, _rb_spec\n\
         __import__('rollbox_guest')._begin_script()\n",
        hex(spec.to_string().as_bytes())
    )
}

/// Reads `paths` back as base64 through a Python cell that prints them as one JSON object.
async fn fetch_files(backend: &dyn Backend, slot: &Slot, paths: &[String]) -> Result<BTreeMap<String, String>, String> {
    let code = format!(
        "import base64 as _rb_b64, json as _rb_json\n\
         _rb_found = {{}}\n\
         for _rb_path in _rb_json.loads(bytes.fromhex('{}').decode('utf-8')):\n\
         \x20   try:\n\
         \x20       with open(_rb_path, 'rb') as _rb_file:\n\
         \x20           _rb_found[_rb_path] = _rb_b64.b64encode(_rb_file.read()).decode('ascii')\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         print(_rb_json.dumps(_rb_found))\n\
         del _rb_b64, _rb_json, _rb_found\n",
        hex(serde_json::to_string(paths).unwrap_or_default().as_bytes())
    );
    let result = backend.execute(slot, ToolCall::python(code)).await;
    if result.metadata.truncated {
        return Err("the fetched files are larger than the server's output limit; fetch fewer or smaller files, or raise --max-output".into());
    }
    let stdout = result.cell.as_ref().map(|c| c.stdout.as_str()).unwrap_or_default();
    serde_json::from_str(stdout.trim()).map_err(|_| format!("failed to fetch the files: {}", result.output))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut text, b| {
            let _ = write!(text, "{b:02x}");
            text
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(name: &str, value: &str) -> CellError {
        CellError {
            name: name.into(),
            value: value.into(),
            traceback: vec!["Traceback (most recent call last):".into(), format!("{name}: {value}")],
        }
    }

    #[test]
    fn exits_map_to_return_codes_as_a_script_would() {
        assert_eq!(exit_of(&error("SystemExit", "")), (0, String::new()));
        assert_eq!(exit_of(&error("SystemExit", "3")), (3, String::new()));
        assert_eq!(exit_of(&error("SystemExit", "-1")), (255, String::new()));
        assert_eq!(exit_of(&error("SystemExit", "bye")), (1, "bye\n".into()));
        let (code, printed) = exit_of(&error("ValueError", "bad"));
        assert_eq!(code, 1);
        assert!(
            printed.starts_with("Traceback") && printed.ends_with("ValueError: bad\n"),
            "{printed}"
        );
    }

    #[test]
    fn paths_must_stay_in_the_workspace() {
        assert!(check_relative("data/in.txt").is_ok());
        for bad in ["", "/etc/passwd", "../x", "a/../../x"] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unsupported_languages_name_what_is_supported() {
        let request: RunCodeRequest =
            serde_json::from_value(serde_json::json!({"code": "int main(){}", "language": "cpp"})).expect("parses");
        let message = RunPlan::new(request, &[ToolName::Python])
            .err()
            .expect("cpp is refused");
        assert!(message.contains("`cpp`") && message.contains("python"), "{message}");
    }
}
