//! The one [`Limits`] type every backend enforces, and the [`LimitKind`] a violation reports.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one tool call may spend. Every backend enforces every field; a call that reaches a limit
/// ends with that limit's [`LimitKind`] in its result, never with a panic or a hang.
///
/// The defaults (see [`Limits::default`]) suit an agent's notebook cell: 30 s of wall-clock time,
/// 1 GiB of guest memory, 256 KiB of output per stream, no fuel metering, 256 open files, files of at most 1 GiB,
/// 8 GiB and 500,000 files on a slot's disk, and 1,024 processes (process backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Wall-clock time for one call, measured from when the call starts running in its slot.
    #[serde(with = "duration_secs_f64")]
    pub timeout: Duration,
    /// The most memory the slot's interpreter may hold, in bytes.
    pub memory_bytes: u64,
    /// The most bytes kept of each output stream (stdout, stderr) of one call; the rest is cut
    /// off with a visible marker.
    pub output_bytes: usize,
    /// Optional instruction budget for one call (wasm fuel). `None` means unmetered, which is
    /// faster: metering needs differently compiled code.
    pub fuel: Option<u64>,
    /// The most files a slot may hold open at once, beyond those it starts with. Past it, an
    /// open fails in the cell with `EMFILE` and the slot goes on. A wasm slot's files are
    /// descriptors of the host process, which every slot shares; the process backend sets each
    /// program's `RLIMIT_NOFILE`.
    #[serde(default = "default_open_files")]
    pub open_files: u32,
    /// The longest file a slot may write, in bytes, sparse or not. Past it, the write or
    /// truncation fails in the cell with `EFBIG` ("File too large"); on the process backend
    /// it is each program's `RLIMIT_FSIZE`, so bash's own commands are killed by `SIGXFSZ`.
    #[serde(default = "default_file_bytes")]
    pub file_bytes: u64,
    /// The most bytes a slot's folders (its workspace and its `/tmp`) may hold in all. Past it,
    /// a write fails in the cell with `ENOSPC` ("No space left on device") and the call reports
    /// [`LimitKind::Disk`]. wasm: counted by the host as the guest writes (apparent file sizes);
    /// process: the size of the slot's own tmpfs.
    #[serde(default = "default_disk_bytes")]
    pub disk_bytes: u64,
    /// The most files (and folders) a slot's folders may hold. Past it, creating one fails in
    /// the cell with `ENOSPC` and the call reports [`LimitKind::Files`].
    #[serde(default = "default_disk_files")]
    pub disk_files: u64,
    /// The most processes and threads a slot runs at once (process backend: its cgroup's
    /// `pids.max`). Past it, `fork` fails in the cell with `EAGAIN` and the call reports
    /// [`LimitKind::Processes`]; every process of the slot dies at release.
    #[serde(default = "default_processes")]
    pub processes: u32,
}

/// [`Limits::disk_bytes`] when a serialised `Limits` predates it.
fn default_disk_bytes() -> u64 {
    Limits::default().disk_bytes
}

/// [`Limits::disk_files`] when a serialised `Limits` predates it.
fn default_disk_files() -> u64 {
    Limits::default().disk_files
}

/// [`Limits::processes`] when a serialised `Limits` predates it.
fn default_processes() -> u32 {
    Limits::default().processes
}

/// [`Limits::file_bytes`] when a serialised `Limits` predates it.
fn default_file_bytes() -> u64 {
    Limits::default().file_bytes
}

/// [`Limits::open_files`] when a serialised `Limits` predates it.
fn default_open_files() -> u32 {
    Limits::default().open_files
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(30),
            memory_bytes: 1 << 30,
            output_bytes: 256 * 1024,
            fuel: None,
            open_files: 256,
            file_bytes: 1 << 30,
            disk_bytes: 8 << 30,
            disk_files: 500_000,
            processes: 1_024,
        }
    }
}

/// Which limit a call reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitKind {
    /// The call ran past [`Limits::timeout`].
    Time,
    /// The interpreter asked for more than [`Limits::memory_bytes`].
    Memory,
    /// A stream passed [`Limits::output_bytes`]; the rest was cut off.
    Output,
    /// The call spent its [`Limits::fuel`].
    Fuel,
    /// The slot's folders reached [`Limits::disk_bytes`]; a write failed with `ENOSPC`.
    Disk,
    /// The slot's folders reached [`Limits::disk_files`]; creating a file failed with `ENOSPC`.
    Files,
    /// The slot reached [`Limits::processes`]; a `fork` failed with `EAGAIN`.
    Processes,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::Time => "time",
            LimitKind::Memory => "memory",
            LimitKind::Output => "output",
            LimitKind::Fuel => "fuel",
            LimitKind::Disk => "disk",
            LimitKind::Files => "files",
            LimitKind::Processes => "processes",
        })
    }
}

/// Marks `result` as having reached `limit`, and says so where the model reads: in the error's
/// message when the call failed (a fork bomb usually also runs out of time), and as a last line
/// of the output. The limit the slot reached names the cause better than the time it ran out of.
pub(crate) fn report_limit(result: &mut crate::slot::ExecutionResult, limit: LimitKind, message: String) {
    result.metadata.limit_hit = Some(limit);
    if let Some(error) = result.error.as_mut() {
        error.kind = crate::slot::ErrorKind::LimitExceeded;
        error.message = format!("{}; {message}", error.message);
    }
    if !result.output.is_empty() && !result.output.ends_with('\n') {
        result.output.push('\n');
    }
    result.output.push_str(&format!("[rollbox: {message}]"));
}

/// Serialises a [`Duration`] as fractional seconds, the unit people write in configs.
pub(crate) mod duration_secs_f64 {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs = f64::deserialize(d)?;
        Duration::try_from_secs_f64(secs).map_err(D::Error::custom)
    }
}
