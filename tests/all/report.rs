//! Seeing a rollout: `rollout --notebooks`, `rollbox notebook` and `rollbox report`, through
//! the real binary over real rollouts (the offline oracle policy on the wasm backend), checked
//! by the real tools people open them with: nbformat's validator, `jupyter nbconvert`, and a
//! headless chromium with no network. scripts/setup-host.sh installs all three.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

/// The system Python, where scripts/setup-host.sh installs nbformat.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// A problem whose reference solution interleaves stdout and stderr and draws a plot, one
/// whose cell raises and whose answer is wrong, and a problem text that tries to break out of
/// the report's markup.
fn write_dataset(dir: &Path, fixed: bool) -> PathBuf {
    let plot = "Let me plot it.\n<code>\nimport sys\nimport matplotlib.pyplot as plt\nprint('to stdout')\n\
                print('to stderr', file=sys.stderr)\nplt.plot([1, 2, 3], [1, 4, 9])\nprint('after the plot')\n\
                6 * 7\n</code>";
    let wrong = if fixed { "\\boxed{2}" } else { "\\boxed{3}" };
    let rows = [
        json!({"instance_id": "plot-1", "problem": "What is 6 * 7? Plot *first*.", "ground_truth": "42",
               "reference_solution": [plot, "So \\boxed{42}."]}),
        json!({"instance_id": "hostile-2", "problem": "1 + 1 = ?</script><img src=x onerror=alert(1)>",
               "ground_truth": "2", "reference_solution": ["<code>\n1 / 0\n</code>", wrong]}),
    ];
    let path = dir.join(if fixed { "fixed.jsonl" } else { "dataset.jsonl" });
    let text: String = rows.iter().map(|r| format!("{r}\n")).collect();
    std::fs::write(&path, text).expect("write the dataset");
    path
}

fn rollbox(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rollbox"))
        .args(args)
        .output()
        .expect("run rollbox")
}

#[track_caller]
fn succeeded(output: Output) -> String {
    assert!(
        output.status.success(),
        "rollbox failed: {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A rollout of the dataset into `dir/name`, two samples per problem, with notebooks.
fn rollout(dir: &Path, name: &str, fixed: bool) -> PathBuf {
    let dataset = write_dataset(dir, fixed);
    let out = dir.join(name);
    succeeded(rollbox(&[
        "--quiet",
        "rollout",
        "--dataset",
        dataset.to_str().expect("utf-8 path"),
        "--out",
        out.to_str().expect("utf-8 path"),
        "--group-size",
        "2",
        "--notebooks",
    ]));
    out
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).expect("read")).expect("json")
}

#[test]
fn trajectories_become_valid_notebooks_with_their_outputs_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = rollout(dir.path(), "run", false);
    let notebooks = run.join("notebooks");
    let mut files: Vec<_> = std::fs::read_dir(&notebooks)
        .expect("notebooks/")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 4, "one notebook per trajectory: {files:?}");

    // nbformat's own validator, on every file.
    let check = Command::new(SYSTEM_PYTHON)
        .arg("-c")
        .arg("import sys, nbformat\nfor f in sys.argv[1:]:\n    nbformat.validate(nbformat.read(f, as_version=4))\nprint('valid')")
        .args(&files)
        .output()
        .expect("run python (scripts/setup-host.sh installs nbformat)");
    assert!(
        check.status.success(),
        "nbformat rejected a notebook: {}",
        String::from_utf8_lossy(&check.stderr)
    );

    let plot = read_json(&notebooks.join("plot-1_0.ipynb"));
    let cells = plot["cells"].as_array().expect("cells");
    assert_eq!(cells[0]["cell_type"], "markdown");
    assert!(cells[0]["source"].as_str().expect("text").contains("What is 6 \\* 7?"));
    let last = cells.last().expect("a last cell");
    assert!(
        last["source"].as_str().expect("text").starts_with("## Reward: 1"),
        "{last}"
    );
    let code = cells.iter().find(|c| c["cell_type"] == "code").expect("a code cell");
    let kinds: Vec<String> = code["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .map(|o| {
            format!(
                "{}:{}",
                o["output_type"].as_str().unwrap_or(""),
                o["name"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "stream:stdout",
            "stream:stderr",
            "stream:stdout",
            "execute_result:",
            "display_data:"
        ],
        "{code:#}"
    );
    assert!(
        code["outputs"][4]["data"]["image/png"]
            .as_str()
            .is_some_and(|png| png.len() > 1000)
    );
    let hostile = read_json(&notebooks.join("hostile-2_0.ipynb"));
    let error = &hostile["cells"][2]["outputs"][0];
    assert_eq!(
        (&error["output_type"], &error["ename"]),
        (&json!("error"), &json!("ZeroDivisionError"))
    );

    // One trajectory on its own, by id; an unknown id says what ids look like.
    let only = dir.path().join("only");
    let trajectories = run.join("trajectories.jsonl");
    let listed = succeeded(rollbox(&[
        "notebook",
        trajectories.to_str().expect("utf-8"),
        "--id",
        "plot-1/1",
        "--out",
        only.to_str().expect("utf-8"),
    ]));
    assert_eq!(listed.trim(), only.join("plot-1_1.ipynb").display().to_string());
    let unknown = rollbox(&["notebook", trajectories.to_str().expect("utf-8"), "--id", "nope"]);
    let stderr = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        !unknown.status.success() && stderr.contains("`nope`") && stderr.contains("<instance_id>/<sample>"),
        "{stderr}"
    );

    // Jupyter's own converter renders it, figure and streams included.
    let html_dir = dir.path().join("html");
    let converted = Command::new("jupyter")
        .args(["nbconvert", "--to", "html", "--output-dir"])
        .arg(&html_dir)
        .arg(notebooks.join("plot-1_0.ipynb"))
        .output()
        .expect("run jupyter nbconvert (scripts/setup-host.sh installs it)");
    assert!(
        converted.status.success(),
        "{}",
        String::from_utf8_lossy(&converted.stderr)
    );
    let html = std::fs::read_to_string(html_dir.join("plot-1_0.html")).expect("the converted notebook");
    assert!(html.contains("data:image/png;base64,") && html.contains("to stderr") && html.contains("42"));
}

/// The page as chromium leaves it after loading `url` headless, with no network, and the
/// lines its console printed.
fn browse(url: &str) -> (String, Vec<String>) {
    let profile = tempfile::tempdir().expect("tempdir");
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--host-resolver-rules=MAP * ~NOTFOUND",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--dump-dom", url])
        .output()
        .expect("run chromium (scripts/setup-host.sh installs it)");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let console = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|line| line.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect();
    (String::from_utf8_lossy(&output.stdout).into_owned(), console)
}

/// The element `<tag ... id="id" ...>...</tag>` of `dom`, up to the first closing tag after it.
fn element<'a>(dom: &'a str, tag: &str, id: &str) -> &'a str {
    let open = format!("<{tag} id=\"{id}\"");
    let start = dom.find(&open).unwrap_or_else(|| panic!("no {open} in the page"));
    let end = dom[start..].find(&format!("</{tag}>")).expect("a closing tag") + start;
    &dom[start..end]
}

/// The index of `trajectory_id` in the run's trajectories.jsonl, as the report numbers them.
fn index_of(run: &Path, trajectory_id: &str) -> usize {
    std::fs::read_to_string(run.join("trajectories.jsonl"))
        .expect("trajectories.jsonl")
        .lines()
        .position(|line| line.contains(&format!("\"trajectory_id\":\"{trajectory_id}\"")))
        .expect("the trajectory is in the file")
}

#[test]
fn the_report_opens_in_a_real_browser_and_shows_a_clicked_trajectory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let run = rollout(dir.path(), "run", false);
    let report = PathBuf::from(succeeded(rollbox(&["report", run.to_str().expect("utf-8")])).trim());
    assert_eq!(report, run.join("report.html"));
    let html = std::fs::read_to_string(&report).expect("the report");
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "the report loads nothing"
    );

    // The problem table and the histogram, before any click.
    let (dom, console) = browse(&format!("file://{}", report.display()));
    assert_eq!(console, Vec::<String>::new(), "the console stays silent");
    assert!(
        dom.contains("data-errors=\"0\"") && dom.contains("data-ready=\"1\""),
        "the script ran"
    );
    let histogram = element(&dom, "svg", "histogram");
    let drawn = histogram
        .split("<rect class=\"bar\"")
        .skip(1)
        .filter(|bar| !bar.contains("height=\"0.0\""))
        .count();
    assert_eq!(drawn, 2, "one bar at reward 0 and one at 1: {histogram}");
    let problems = element(&dom, "div", "problems");
    assert!(
        problems.contains("plot-1") && problems.contains("hostile-2"),
        "{problems}"
    );
    assert!(element(&dom, "section", "trajectory").contains("hidden"));

    // A click on a sample is a jump to its hash: the trajectory opens as a notebook.
    let plot = index_of(&run, "plot-1/0");
    let (dom, console) = browse(&format!("file://{}#t-0-{plot}", report.display()));
    assert_eq!(console, Vec::<String>::new());
    let view = element(&dom, "section", "trajectory");
    assert!(!view.contains("hidden"), "{view}");
    for shown in [
        "What is 6 * 7? Plot *first*.",
        "to stdout",
        "to stderr",
        "after the plot",
        "## Reward: 1",
    ] {
        assert!(view.contains(shown), "{shown:?} is not in the trajectory view: {view}");
    }
    assert!(
        view.contains("<img src=\"data:image/png;base64,iVBOR"),
        "the figure shows"
    );
    let order: Vec<usize> = ["to stdout", "to stderr", "after the plot", "<img"]
        .iter()
        .map(|s| view.find(s).expect("shown"))
        .collect();
    assert!(order.is_sorted(), "outputs in the order written: {order:?}");

    // The hostile problem text is text, not markup.
    let hostile = index_of(&run, "hostile-2/0");
    let (dom, _) = browse(&format!("file://{}#t-0-{hostile}", report.display()));
    assert!(dom.contains("data-errors=\"0\""));
    let view = element(&dom, "section", "trajectory");
    assert!(
        view.contains("&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;"),
        "{view}"
    );
    assert!(!dom.contains("<img src=\"x\""));
}

#[test]
fn two_runs_compare_per_problem_in_the_browser() {
    let dir = tempfile::tempdir().expect("tempdir");
    let before = rollout(dir.path(), "before", false);
    let after = rollout(dir.path(), "after", true);
    let out = dir.path().join("compare.html");
    succeeded(rollbox(&[
        "report",
        before.to_str().expect("utf-8"),
        after.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
    ]));
    let (dom, console) = browse(&format!("file://{}", out.display()));
    assert_eq!(console, Vec::<String>::new());
    assert!(dom.contains("data-errors=\"0\""));
    let problems = element(&dom, "div", "problems");
    assert!(
        problems.contains("pass rate (A)") && problems.contains("pass rate (B)"),
        "{problems}"
    );
    // hostile-2 went from 0 of 2 to 2 of 2: its row ends in a delta of 1.
    let row = problems
        .split("<tr class=\"problem\">")
        .find(|row| row.contains("hostile-2"))
        .expect("a row for hostile-2");
    assert!(row.contains("<td>1</td></tr>"), "{row}");
    let bars = element(&dom, "svg", "histogram").matches("<rect class=\"bar\"").count();
    assert_eq!(bars, 20, "ten bins, a bar for each run");
}

#[test]
fn a_rollout_prints_progress_lines_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dataset = write_dataset(dir.path(), false);
    // Not --quiet, and stderr is a pipe here: plain lines instead of a bar that never shows.
    let output = rollbox(&[
        "rollout",
        "--dataset",
        dataset.to_str().expect("utf-8"),
        "--out",
        dir.path().join("run").to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("rollout: starting (2)\n"), "{stderr}");
    assert!(
        stderr.contains("rollout: 2 of 2 (100%), mean reward 0.500, "),
        "the last trajectory always gets a line: {stderr}"
    );
    assert!(stderr.contains("rollout: done in "), "{stderr}");
}

#[test]
fn the_notebook_agent_on_tool_calling_problems_says_which_flags_fix_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tools = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tools.jsonl");
    // The dataset's sidecar asks for the tools agent; the notebook agent is forced here.
    let output = rollbox(&[
        "rollout",
        "--agent",
        "notebook",
        "--dataset",
        tools.to_str().expect("utf-8"),
        "--out",
        dir.path().join("run").to_str().expect("utf-8"),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: 5 of the 5 problems (first `tools-001`) call tools in <tool_call> blocks")
            && stderr.contains("--agent tools")
            && stderr.contains("--tools-file examples/tools.py"),
        "{stderr}"
    );
}
