//! The runtime compiled to native code once and kept as a `.cwasm` file.
//!
//! The cache key covers the pinned wasm's sha256 and wasmtime's own compatibility hash of the
//! engine (its version and every setting that changes the code), so a new wasmtime or a
//! different engine configuration never loads a stale artifact. A file lock keeps parallel
//! processes from compiling the same module at once.

use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::{Engine, Module};

use super::install::hex;
use super::{InstalledRuntime, RuntimeError, RuntimeOptions, io_err, pinned};
use crate::reporter::Reporter;

/// Where the compiled snapshot for `engine` is cached.
pub fn compiled_path(options: &RuntimeOptions, engine: &Engine) -> PathBuf {
    let mut key = Sha256Hasher(Sha256::new());
    pinned().artifacts.snapshot.sha256.hash(&mut key);
    engine.precompile_compatibility_hash().hash(&mut key);
    let digest = hex(&key.0.finalize());
    options
        .cache_dir
        .join("compiled")
        .join(format!("python-snapshot-{}.cwasm", &digest[..32]))
}

/// Where the guest module's compiled code (`guest/rollbox_guest.py`, marshalled by the runtime's
/// own CPython) is cached: keyed by the runtime and the guest's source, so a new runtime or a
/// changed guest never loads stale code.
pub fn guest_code_path(options: &RuntimeOptions) -> PathBuf {
    let mut key = Sha256Hasher(Sha256::new());
    pinned().artifacts.snapshot.sha256.hash(&mut key);
    crate::slot::cell::GUEST_SOURCE.hash(&mut key);
    let digest = hex(&key.0.finalize());
    options
        .cache_dir
        .join("compiled")
        .join(format!("rollbox-guest-{}.marshal", &digest[..32]))
}

/// The runtime's module for `engine`: loaded from the cache, or compiled and cached first.
pub fn load_or_compile(
    engine: &Engine,
    runtime: &InstalledRuntime,
    options: &RuntimeOptions,
    reporter: &dyn Reporter,
) -> Result<Module, RuntimeError> {
    let path = compiled_path(options, engine);
    if let Some(module) = try_load(engine, &path) {
        return Ok(module);
    }
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let lock_path = path.with_extension("lock");
    let lock = File::create(&lock_path).map_err(io_err("create", &lock_path))?;
    lock.lock().map_err(io_err("lock", &lock_path))?;
    // Another process may have compiled it while this one waited for the lock.
    if let Some(module) = try_load(engine, &path) {
        return Ok(module);
    }
    let wasm = fs::read(&runtime.snapshot).map_err(io_err("read", &runtime.snapshot))?;
    reporter.on_step_start("compiling the Python runtime (once; about a minute)", None);
    let compiled = engine.precompile_module(&wasm).map_err(|e| RuntimeError::Compile {
        path: runtime.snapshot.clone(),
        source: e.into_boxed_dyn_error(),
    })?;
    reporter.on_step_end();
    let staging = path.with_extension(format!("tmp-{}", std::process::id()));
    fs::write(&staging, &compiled).map_err(io_err("write", &staging))?;
    fs::rename(&staging, &path).map_err(io_err("move into place", &path))?;
    try_load(engine, &path).ok_or_else(|| RuntimeError::CorruptCache {
        path: path.clone(),
        reason: "the freshly compiled module could not be loaded".into(),
    })
}

fn try_load(engine: &Engine, path: &Path) -> Option<Module> {
    if !path.is_file() {
        return None;
    }
    // SAFETY: only files rollbox itself wrote, complete (written elsewhere, then renamed), into
    // the user's own cache folder are loaded; wasmtime checks the header and the engine
    // compatibility, and a file that fails is recompiled.
    match unsafe { Module::deserialize_file(engine, path) } {
        Ok(module) => Some(module),
        Err(error) => {
            tracing::warn!(path = %path.display(), %error, "cached compiled runtime is unusable; recompiling");
            None
        }
    }
}

/// Feeds `Hash` input into sha256, so the key is stable across processes and Rust versions.
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        0 // never read: the key is the sha256 digest
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}
