//! The slot API every backend implements: [`Backend`], [`Slot`], [`ToolCall`] and
//! [`ExecutionResult`].
//!
//! The shape is the one hermes-agent's tool backends use: `acquire(trajectory_id) -> Slot`,
//! `execute_batch([(slot, call)]) -> [result]`, `release(slot, reset_workspace)`. A guest's
//! outcome (a Python exception, a limit, a crashed interpreter) is data in the
//! [`ExecutionResult`]; a [`BackendError`] is reserved for the host failing to do what was asked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub(crate) mod batch;
pub mod cell;
pub mod limits;
pub mod outputs;
pub mod tools;
pub mod workspace;

pub use limits::{LimitKind, Limits};
pub use outputs::{Output, StreamName};
pub use tools::ToolName;

/// A slot's identifier, unique within one backend for its lifetime.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SlotId(pub u64);

impl std::fmt::Display for SlotId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "slot-{}", self.0)
    }
}

/// A handle to a live interpreter plus a private workspace directory. Cheap to clone; the state
/// it names lives in the backend until [`Backend::release`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// The slot's identifier within its backend.
    pub id: SlotId,
    /// The trajectory the slot was acquired for.
    pub trajectory_id: String,
    /// The backend that owns the slot (`wasm`, `process`, `remote`).
    pub backend: String,
    /// The workspace directory on the machine that runs the slot.
    pub workspace: PathBuf,
}

/// One tool invocation: a tool name and its JSON arguments, as a model's function call gives
/// them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The tool's name, one of [`ToolName`]'s or a backend-specific one.
    pub name: String,
    /// The arguments object.
    #[serde(default)]
    pub arguments: serde_json::Value,
    /// A wall-clock limit for this call only, in place of the backend's
    /// [`crate::Limits::timeout`]; it can only be shorter or equal.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_secs")]
    pub timeout: Option<Duration>,
}

impl ToolCall {
    /// A call of `name` with `arguments`.
    pub fn new(name: impl Into<String>, arguments: serde_json::Value) -> Self {
        ToolCall {
            name: name.into(),
            arguments,
            timeout: None,
        }
    }

    /// A `python` call that runs `code` as one notebook cell.
    pub fn python(code: impl Into<String>) -> Self {
        ToolCall::new("python", serde_json::json!({ "code": code.into() }))
    }

    /// The same call with its own, shorter time limit.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// The outcome of one [`ToolCall`]. Serialises to JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExecutionResult {
    /// Whether the call did what it was asked: the cell ran without an exception, the file was
    /// written.
    pub success: bool,
    /// The text a model should see: for a cell, its stdout, stderr, final value and traceback.
    pub output: String,
    /// Why the call did not succeed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ExecutionError>,
    /// The structured outcome of a `python` cell; for a `bash` command, its stdout and stderr
    /// apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<CellOutput>,
    /// How the call ran.
    pub metadata: ExecutionMetadata,
}

impl ExecutionResult {
    /// A failed result of `kind` with `message`, as both output and error.
    pub fn failure(kind: ErrorKind, message: impl Into<String>, metadata: ExecutionMetadata) -> Self {
        let message = message.into();
        ExecutionResult {
            success: false,
            output: message.clone(),
            error: Some(ExecutionError { kind, message }),
            cell: None,
            metadata,
        }
    }

    /// A successful result whose output is `output`.
    pub fn ok(output: impl Into<String>, metadata: ExecutionMetadata) -> Self {
        ExecutionResult {
            success: true,
            output: output.into(),
            error: None,
            cell: None,
            metadata,
        }
    }
}

/// What went wrong with a call, by kind, with a message that says what to do next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionError {
    /// The kind of failure.
    pub kind: ErrorKind,
    /// A sentence for people and models.
    pub message: String,
}

/// The kinds of failed calls. Guest outcomes first, then the caller's mistakes, then the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The cell raised an exception; see [`CellOutput::error`].
    CellError,
    /// A command exited with a non-zero status.
    NonZeroExit,
    /// A limit was reached; see [`ExecutionMetadata::limit_hit`].
    LimitExceeded,
    /// The interpreter trapped or died; its state is gone and the slot has a fresh one.
    GuestCrashed,
    /// The arguments do not fit the tool's schema.
    InvalidArguments,
    /// No tool has that name.
    UnknownTool,
    /// The tool exists but this backend does not have it (`bash` on `wasm`).
    ToolUnavailable,
    /// The slot is not live in this backend: never acquired, or already released.
    UnknownSlot,
    /// A file tool failed: not found, not unique, outside the workspace, not UTF-8.
    Workspace,
    /// The server or sandbox that holds the slot could not be reached or failed.
    Remote,
    /// The host failed to run the call.
    Backend,
}

/// How a call ran.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ExecutionMetadata {
    /// The tool that ran.
    pub tool: String,
    /// The slot it ran in.
    pub slot_id: Option<SlotId>,
    /// Wall-clock time spent running the call in its slot, in microseconds.
    pub duration_us: u64,
    /// The limit the call reached, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_hit: Option<LimitKind>,
    /// Whether some output was cut off.
    #[serde(default)]
    pub truncated: bool,
    /// Whether the slot's interpreter state was lost (and replaced by a fresh one).
    #[serde(default)]
    pub state_lost: bool,
    /// Whether the cell was interrupted at its time limit, as Jupyter stops a cell: CPython
    /// raised `KeyboardInterrupt` in it and kept its state (unless `state_lost` says the cell
    /// did not stop within its grace period and was stopped for good).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
    /// Whether the cell had to be stopped (a trap) and the slot was rolled back to its state
    /// from just before it, instead of losing it (the wasm backend's `--rollback`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rolled_back: bool,
    /// A command's exit status (`bash`), when it exited on its own; `None` when it was killed
    /// or the tool runs no command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
}

/// The structured result of one `python` cell, in the shape Jupyter and E2B users know.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CellOutput {
    /// What the cell printed to standard output.
    pub stdout: String,
    /// What the cell printed to standard error (warnings, logging).
    pub stderr: String,
    /// The value of the cell's final expression, kept apart from stdout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<MimeBundle>,
    /// Rich outputs the cell displayed, in order (a matplotlib figure as `image/png`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub display: Vec<MimeBundle>,
    /// The exception the cell raised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<CellError>,
    /// Everything above in the order it was produced, in nbformat v4's shape: stream text in
    /// the order written (stdout and stderr interleaved as the host saw them), displays, the
    /// final value, the exception. Empty only from a backend that predates it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<Output>,
}

impl CellOutput {
    /// [`CellOutput::outputs`] rebuilt from the other fields when a cell has none, in the
    /// order a cell without interleaving would give: stdout, stderr, displays, the final
    /// value, the exception. For results whose order is lost (a killed interpreter's, a
    /// command's) and for readers of old results.
    pub fn outputs_or_fields(&self) -> Vec<Output> {
        if !self.outputs.is_empty() {
            return self.outputs.clone();
        }
        let streams = [(StreamName::Stdout, &self.stdout), (StreamName::Stderr, &self.stderr)];
        let mut outputs: Vec<Output> = streams
            .into_iter()
            .filter(|(_, text)| !text.is_empty())
            .map(|(name, text)| Output::Stream {
                name,
                text: text.clone(),
            })
            .collect();
        outputs.extend(self.display.iter().map(|data| Output::DisplayData {
            data: data.clone(),
            metadata: BTreeMap::new(),
        }));
        outputs.extend(self.result.iter().map(|data| Output::ExecuteResult {
            execution_count: None,
            data: data.clone(),
            metadata: BTreeMap::new(),
        }));
        outputs.extend(self.error.iter().map(CellError::to_output));
        outputs
    }
}

impl CellError {
    /// The exception as an nbformat `error` output.
    pub fn to_output(&self) -> Output {
        Output::Error {
            ename: self.name.clone(),
            evalue: self.value.clone(),
            traceback: self.traceback.clone(),
        }
    }
}

/// A display's representations keyed by MIME type: `text/plain` always, `text/html`,
/// `image/png` (base64) and others when the object offers them.
pub type MimeBundle = BTreeMap<String, String>;

/// An exception a cell raised.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellError {
    /// The exception's class name (`ZeroDivisionError`).
    pub name: String,
    /// Its message (`division by zero`).
    pub value: String,
    /// The formatted traceback, one entry per line.
    pub traceback: Vec<String>,
}

/// The host failed to do what was asked of a backend. Guest outcomes never take this form.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The slot is not live in this backend.
    #[error("slot {0} is not live in this backend: it was never acquired here or was already released")]
    UnknownSlot(SlotId),
    /// A slot's interpreter could not be started.
    #[error("failed to start an interpreter for trajectory `{trajectory_id}`")]
    StartInterpreter {
        /// The trajectory the slot was for.
        trajectory_id: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A slot's workspace could not be made or cleaned.
    #[error("failed to prepare the workspace at {path}")]
    Workspace {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The backend is at its slot capacity.
    #[error("no free slot: all {capacity} slots are in use; release one or raise the capacity")]
    Exhausted {
        /// How many slots the backend holds at most.
        capacity: usize,
    },
    /// A slot could not be forked. The slot itself is unharmed.
    #[error("failed to fork slot {slot} into trajectory `{trajectory_id}`")]
    Fork {
        /// The slot being forked.
        slot: SlotId,
        /// The trajectory the fork was for.
        trajectory_id: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend cannot do this at all.
    #[error("the {backend} backend cannot {operation}: {advice}")]
    Unsupported {
        /// The backend's name.
        backend: String,
        /// What was asked (`fork a slot`).
        operation: &'static str,
        /// Why not, and what to use instead.
        advice: String,
    },
    /// A seeded slot was asked of a backend that cannot seed slots.
    #[error(
        "failed to acquire a seeded slot for trajectory `{trajectory_id}`: the `{backend}` backend cannot seed slots; run without a seed or use the wasm backend"
    )]
    Unseedable {
        /// The backend's name.
        backend: String,
        /// The trajectory the slot was for.
        trajectory_id: String,
    },
    /// A remote server or sandbox failed.
    #[error("{what}")]
    Remote {
        /// What failed, for people ("failed to acquire a slot for trajectory `t`"), with advice
        /// where there is some.
        what: String,
        /// Why, when another error said so; kept whole, so its causes print too.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

/// A source of sandboxed slots. Object-safe: use it as `Arc<dyn Backend>`.
///
/// Calls for different slots run in parallel; calls for one slot run in the order given.
#[async_trait::async_trait]
pub trait Backend: Send + Sync {
    /// The backend's short name (`wasm`, `process`, `remote`).
    fn name(&self) -> &str;

    /// The tools this backend can run; a call to any other tool fails with
    /// [`ErrorKind::ToolUnavailable`] or [`ErrorKind::UnknownTool`].
    fn tools(&self) -> Vec<ToolName>;

    /// Starts a slot for `trajectory_id`: a fresh interpreter and an empty workspace.
    async fn acquire(&self, trajectory_id: &str) -> Result<Slot, BackendError>;

    /// Starts a slot for `trajectory_id` whose every observation repeats: seeded with `seed`,
    /// used as it is (a slot seed, see [`crate::seed`]), whatever seed the backend was built
    /// with. How much a backend can make repeatable is its own: everything for `wasm`, hash
    /// order and `random` for `process` (docs/reproducibility.md). The default refuses, so a
    /// backend that cannot seed never ignores a seed in silence.
    async fn acquire_seeded(&self, trajectory_id: &str, seed: u64) -> Result<Slot, BackendError> {
        let _ = seed;
        Err(BackendError::Unseedable {
            backend: self.name().to_string(),
            trajectory_id: trajectory_id.to_string(),
        })
    }

    /// Runs every call and returns one result per call, in the same order. Never fails as a
    /// whole: a call that cannot run gets a failed result of its own.
    async fn execute_batch(&self, calls: Vec<(Slot, ToolCall)>) -> Vec<ExecutionResult>;

    /// Starts a new slot for `trajectory_id` in the same state as `slot`: its interpreter's
    /// variables, imported modules and open figures, and a copy of its workspace and `/tmp`.
    /// From then on the two are independent. The fork gets new random streams. Calls for
    /// `slot` wait while it is copied. Backends that cannot fork answer
    /// [`BackendError::Unsupported`], which is the default.
    async fn fork(&self, slot: &Slot, trajectory_id: &str) -> Result<Slot, BackendError> {
        let _ = (slot, trajectory_id);
        Err(BackendError::Unsupported {
            backend: self.name().to_string(),
            operation: "fork a slot",
            advice: "only the wasm backend (and remote servers running it) can copy a live interpreter; \
                     acquire a new slot and replay the cells instead"
                .into(),
        })
    }

    /// Ends a slot's interpreter. With `reset_workspace`, its workspace is deleted; without,
    /// the directory stays on disk for the caller to inspect and remove.
    async fn release(&self, slot: &Slot, reset_workspace: bool) -> Result<(), BackendError>;

    /// Stops what the backend started outside this process (a remote backend's servers and
    /// Modal sandboxes) and refuses further acquires. The in-process backends hold nothing
    /// that outlives them, so the default does nothing. Call it before exiting, also on Ctrl-C.
    async fn shutdown(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// The most memory one slot may hold in this process (its memory limit), which a server
    /// charges each slot against its memory budget; `None` when slots hold none here (the
    /// remote backend's live on other servers).
    fn slot_memory_bytes(&self) -> Option<u64> {
        None
    }

    /// Runs one call; a convenience over [`Backend::execute_batch`].
    async fn execute(&self, slot: &Slot, call: ToolCall) -> ExecutionResult {
        let mut results = self.execute_batch(vec![(slot.clone(), call)]).await;
        results.pop().unwrap_or_else(|| {
            ExecutionResult::failure(
                ErrorKind::Backend,
                "the backend returned no result for the call",
                ExecutionMetadata {
                    slot_id: Some(slot.id),
                    ..Default::default()
                },
            )
        })
    }
}

/// Serialises an optional [`Duration`] as fractional seconds.
mod opt_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|secs| Duration::try_from_secs_f64(secs).map_err(D::Error::custom))
            .transpose()
    }
}
