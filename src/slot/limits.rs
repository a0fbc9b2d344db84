//! The one [`Limits`] type every backend enforces, and the [`LimitKind`] a violation reports.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one tool call may spend. Every backend enforces every field; a call that reaches a limit
/// ends with that limit's [`LimitKind`] in its result, never with a panic or a hang.
///
/// The defaults (see [`Limits::default`]) suit an agent's notebook cell: 30 s of wall-clock time,
/// 1 GiB of guest memory, 256 KiB of output per stream, no fuel metering, 256 open files, and files of at most 1 GiB.
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
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::Time => "time",
            LimitKind::Memory => "memory",
            LimitKind::Output => "output",
            LimitKind::Fuel => "fuel",
        })
    }
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
