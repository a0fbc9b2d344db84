//! Datasets say what they need: every shipped example runs with `--dataset` and `--out` alone,
//! at full oracle reward, and flags still override what a dataset asks for.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn rollout(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .arg("rollout")
        .args(args)
        .output()
        .expect("run rollbox rollout")
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

#[test]
fn every_shipped_dataset_runs_with_no_other_flag_at_full_oracle_reward() {
    let mut datasets: Vec<PathBuf> = std::fs::read_dir(examples())
        .expect("examples/")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    datasets.sort();
    assert!(datasets.len() >= 5, "{datasets:?}");
    for dataset in datasets {
        let out = tempfile::tempdir().expect("tempdir");
        let output = rollout(&[
            "--dataset",
            dataset.to_str().expect("utf-8"),
            "--out",
            out.path().to_str().expect("utf-8"),
        ]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{}: {stderr}", dataset.display());
        let summary: Value =
            serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).expect("summary.json"))
                .expect("JSON");
        assert_eq!(
            summary["mean_reward"].as_f64(),
            Some(1.0),
            "{}: {summary:#}\n{stderr}",
            dataset.display()
        );
    }
}

#[test]
fn flags_override_what_a_dataset_asks_for_and_a_bad_sidecar_is_a_clear_error() {
    let out = tempfile::tempdir().expect("tempdir");
    let out_path = out.path().to_str().expect("utf-8");
    // SWE rows pick the process backend only when --backend is not given.
    let swe = examples().join("swe.jsonl");
    let output = rollout(&[
        "--dataset",
        swe.to_str().expect("utf-8"),
        "--out",
        out_path,
        "--backend",
        "wasm",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("bash"), "{stderr}");

    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = dir.path().join("d.jsonl");
    std::fs::write(
        &dataset,
        r#"{"instance_id": "a", "problem": "1+1", "ground_truth": "2", "reference_solution": ["\\boxed{2}"]}"#,
    )
    .expect("write");
    std::fs::write(dir.path().join("d.rollbox.json"), r#"{"agent": "tool"}"#).expect("write");
    let output = rollout(&["--dataset", dataset.to_str().expect("utf-8"), "--out", out_path]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("d.rollbox.json") && stderr.contains("notebook or tools"),
        "{stderr}"
    );
}
