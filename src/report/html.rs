//! One self-contained HTML file that shows one rollout, or compares two: the summary, the
//! reward histogram, the time split, stop reasons and errors by kind (drawn here, as HTML and
//! inline SVG), and a sortable table of problems whose samples open, on a click, as notebooks.
//!
//! Nothing is loaded from the network. Each trajectory's notebook sits in its own inert
//! `<script type="application/json">` block, parsed only when it is opened, and the problem
//! table is drawn a page at a time, so 10,000 trajectories open as fast as a hundred. Every
//! text from a run (a model's, a cell's) is inserted as text, never as HTML: a report of a
//! hostile model's rollout runs none of its markup.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::RunFiles;
use super::notebook;
use crate::rollout::summary::PASS_THRESHOLD;

/// Bars of the reward histogram, over `[0, 1]` (a score of exactly 1 in the last).
const HISTOGRAM_BINS: usize = 10;
/// Colours of the first and second run.
const RUN_COLOURS: [&str; 2] = ["#3b6ea8", "#d9822b"];

/// The report of `runs` (one, or two to compare) as one HTML document.
pub fn report(runs: &[RunFiles]) -> String {
    let stats: Vec<RunStats> = runs.iter().map(RunStats::of).collect();
    let mut html = String::with_capacity(runs.iter().map(|r| r.trajectories.len()).sum::<usize>() * 4096);
    let title = runs.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(" vs ");
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>rollbox report: {}</title><style>{STYLE}</style></head><body>\
         <header><h1>rollbox report</h1><p>{}</p></header><main>",
        escape(&title),
        runs.iter()
            .enumerate()
            .map(|(i, r)| format!("<span class=\"run run{i}\">{}</span>", escape(&r.name)))
            .collect::<Vec<_>>()
            .join(" vs ")
    );
    summary_table(&mut html, runs, &stats);
    html.push_str("<section><h2>Reward distribution</h2>");
    histogram(&mut html, &stats);
    html.push_str("</section><section><h2>Where the time went</h2>");
    time_split(&mut html, &stats);
    html.push_str("</section><div class=\"columns\"><section><h2>Stop reasons</h2>");
    counts_table(&mut html, runs, stats.iter().map(|s| &s.stop_reasons).collect());
    html.push_str("</section><section><h2>Errors by kind</h2>");
    counts_table(&mut html, runs, stats.iter().map(|s| &s.errors).collect());
    html.push_str(
        "</section></div><section><h2>Problems</h2><p class=\"hint\">Click a column to sort, a row to \
         see its samples, a sample to open it as a notebook.</p><div id=\"problems\"></div></section>\
         <section id=\"trajectory\" hidden></section></main>",
    );
    index_data(&mut html, runs);
    for (r, run) in runs.iter().enumerate() {
        for (i, trajectory) in run.trajectories.iter().enumerate() {
            let _ = write!(html, "<script type=\"application/json\" id=\"t-{r}-{i}\">");
            push_json(&mut html, &notebook::notebook(trajectory));
            html.push_str("</script>\n");
        }
    }
    let _ = writeln!(html, "<script>{SCRIPT}</script></body></html>");
    html
}

/// What the report shows of one run, added up.
struct RunStats {
    trajectories: usize,
    problems: usize,
    mean_reward: f64,
    pass_rate: f64,
    mean_turns: f64,
    bins: [usize; HISTOGRAM_BINS],
    model_ms: f64,
    tool_ms: f64,
    reward_ms: f64,
    stop_reasons: BTreeMap<String, usize>,
    errors: BTreeMap<String, usize>,
}

impl RunStats {
    fn of(run: &RunFiles) -> RunStats {
        let n = run.trajectories.len().max(1) as f64;
        let mut stats = RunStats {
            trajectories: run.trajectories.len(),
            problems: 0,
            mean_reward: 0.0,
            pass_rate: 0.0,
            mean_turns: 0.0,
            bins: [0; HISTOGRAM_BINS],
            model_ms: 0.0,
            tool_ms: 0.0,
            reward_ms: 0.0,
            stop_reasons: BTreeMap::new(),
            errors: BTreeMap::new(),
        };
        let mut problems: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for t in &run.trajectories {
            let score = t.reward.score;
            stats.mean_reward += score / n;
            stats.mean_turns += t.turns as f64 / n;
            stats.bins[bin(score)] += 1;
            stats.model_ms += t.model_ms;
            stats.tool_ms += t.tool_ms;
            stats.reward_ms += t.reward_ms;
            *stats.stop_reasons.entry(json_name(&t.stop_reason)).or_default() += 1;
            if let Some(error) = &t.error {
                *stats.errors.entry(format!("trajectory: {}", error.kind)).or_default() += 1;
            }
            for call in t.steps.iter().flat_map(|s| &s.calls) {
                if let Some(error) = &call.result.error {
                    *stats
                        .errors
                        .entry(format!("call: {}", json_name(&error.kind)))
                        .or_default() += 1;
                }
            }
            let problem = problems.entry(&t.instance_id).or_default();
            problem.0 += 1;
            problem.1 += usize::from(score >= PASS_THRESHOLD);
        }
        stats.problems = problems.len();
        stats.pass_rate =
            problems.values().map(|&(n, c)| c as f64 / n as f64).sum::<f64>() / problems.len().max(1) as f64;
        stats
    }
}

fn bin(score: f64) -> usize {
    let clamped = if score.is_finite() { score.clamp(0.0, 1.0) } else { 0.0 };
    ((clamped * HISTOGRAM_BINS as f64) as usize).min(HISTOGRAM_BINS - 1)
}

/// A serialisable enum's name as it appears in JSON (`final_answer`).
fn json_name(value: &impl serde::Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(name)) => name,
        _ => "unknown".to_owned(),
    }
}

fn summary_table(html: &mut String, runs: &[RunFiles], stats: &[RunStats]) {
    html.push_str("<section><h2>Summary</h2><table class=\"summary\"><tr><th></th>");
    for (i, run) in runs.iter().enumerate() {
        let _ = write!(html, "<th class=\"run{i}\">{}</th>", escape(&run.name));
    }
    html.push_str("</tr>");
    let per_run = |value: &dyn Fn(usize) -> String| (0..runs.len()).map(value).collect::<Vec<_>>();
    let rows = [
        (
            "policy",
            per_run(&|i| runs[i].summary.as_ref().map_or("?".to_owned(), |s| s.policy.clone())),
        ),
        ("trajectories", per_run(&|i| stats[i].trajectories.to_string())),
        ("problems", per_run(&|i| stats[i].problems.to_string())),
        ("mean reward", per_run(&|i| format!("{:.3}", stats[i].mean_reward))),
        (
            "pass rate (mean over problems)",
            per_run(&|i| format!("{:.3}", stats[i].pass_rate)),
        ),
        ("mean turns", per_run(&|i| format!("{:.2}", stats[i].mean_turns))),
        ("model time", per_run(&|i| seconds(stats[i].model_ms))),
        ("tool time", per_run(&|i| seconds(stats[i].tool_ms))),
        ("unreadable lines", per_run(&|i| runs[i].unreadable_lines.to_string())),
    ];
    for (name, values) in rows {
        let _ = write!(html, "<tr><th>{name}</th>");
        for value in values {
            let _ = write!(html, "<td>{}</td>", escape(&value));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    if let Some(note) = runs.iter().find_map(|r| r.summary.as_ref().map(|s| s.note.clone())) {
        let _ = write!(html, "<p class=\"hint\">{}</p>", escape(&note));
    }
    html.push_str("</section>");
}

fn seconds(ms: f64) -> String {
    format!("{:.1} s", ms / 1000.0)
}

/// The histogram as inline SVG: for each bin, one bar per run.
fn histogram(html: &mut String, stats: &[RunStats]) {
    let (width, height, pad) = (640.0, 220.0, 30.0);
    let highest = stats.iter().flat_map(|s| s.bins).max().unwrap_or(0).max(1) as f64;
    let slot = (width - 2.0 * pad) / HISTOGRAM_BINS as f64;
    let bar = (slot - 6.0) / stats.len() as f64;
    let _ = write!(
        html,
        "<svg id=\"histogram\" viewBox=\"0 0 {width} {height}\" width=\"{width}\" height=\"{height}\" role=\"img\" \
         aria-label=\"reward histogram\">"
    );
    for (b, _) in stats[0].bins.iter().enumerate() {
        for (r, run) in stats.iter().enumerate() {
            let count = run.bins[b];
            let h = (height - 2.0 * pad) * count as f64 / highest;
            let x = pad + b as f64 * slot + 3.0 + r as f64 * bar;
            let y = height - pad - h;
            let _ = write!(
                html,
                "<rect class=\"bar\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar:.1}\" height=\"{h:.1}\" fill=\"{}\">\
                 <title>{:.1}–{:.1}: {count}</title></rect>",
                RUN_COLOURS[r % 2],
                b as f64 / HISTOGRAM_BINS as f64,
                (b + 1) as f64 / HISTOGRAM_BINS as f64,
            );
            if count > 0 {
                let _ = write!(
                    html,
                    "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{count}</text>",
                    x + bar / 2.0,
                    y - 3.0
                );
            }
        }
    }
    for b in 0..=HISTOGRAM_BINS {
        let x = pad + b as f64 * slot;
        let _ = write!(
            html,
            "<text x=\"{x:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\">{:.1}</text>",
            height - pad + 14.0,
            b as f64 / HISTOGRAM_BINS as f64
        );
    }
    let _ = write!(
        html,
        "<line x1=\"{pad}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\" stroke=\"#555\"/></svg>",
        y = height - pad,
        x2 = width - pad
    );
}

/// Each run's model, tool and reward time as one stacked bar, with the numbers.
fn time_split(html: &mut String, stats: &[RunStats]) {
    let parts = [("model", "#6a8fc7"), ("tools", "#6fb37b"), ("reward", "#c7a46a")];
    for (r, run) in stats.iter().enumerate() {
        let values = [run.model_ms, run.tool_ms, run.reward_ms];
        let total = values.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        let _ = write!(
            html,
            "<div class=\"split\"><svg class=\"split-bar run{r}\" viewBox=\"0 0 500 18\" width=\"500\" height=\"18\">"
        );
        let mut x = 0.0;
        for ((name, colour), value) in parts.iter().zip(values) {
            let w = 500.0 * value / total;
            let _ = write!(
                html,
                "<rect x=\"{x:.1}\" y=\"0\" width=\"{w:.1}\" height=\"18\" fill=\"{colour}\"><title>{name}: {}</title></rect>",
                seconds(value)
            );
            x += w;
        }
        html.push_str("</svg> ");
        for ((name, colour), value) in parts.iter().zip(values) {
            let _ = write!(
                html,
                "<span class=\"key\"><i style=\"background:{colour}\"></i>{name} {} ({:.0}%)</span>",
                seconds(value),
                100.0 * value / total
            );
        }
        html.push_str("</div>");
    }
}

fn counts_table(html: &mut String, runs: &[RunFiles], counts: Vec<&BTreeMap<String, usize>>) {
    let mut names: Vec<&String> = counts.iter().flat_map(|c| c.keys()).collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        html.push_str("<p class=\"hint\">none</p>");
        return;
    }
    html.push_str("<table><tr><th></th>");
    for (i, run) in runs.iter().enumerate() {
        let _ = write!(html, "<th class=\"run{i}\">{}</th>", escape(&run.name));
    }
    html.push_str("</tr>");
    for name in names {
        let _ = write!(html, "<tr><th>{}</th>", escape(name));
        for count in &counts {
            let _ = write!(html, "<td>{}</td>", count.get(name).copied().unwrap_or(0));
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
}

/// The small index the page's script draws the problem table from: each run's trajectories
/// (id, reward, stop reason, turns) and each problem's samples in each run.
fn index_data(html: &mut String, runs: &[RunFiles]) {
    let mut problems: BTreeMap<&str, Vec<Vec<usize>>> = BTreeMap::new();
    for (r, run) in runs.iter().enumerate() {
        for (i, t) in run.trajectories.iter().enumerate() {
            problems
                .entry(&t.instance_id)
                .or_insert_with(|| vec![Vec::new(); runs.len()])[r]
                .push(i);
        }
    }
    let index = json!({
        "threshold": PASS_THRESHOLD,
        "runs": runs.iter().map(|run| json!({
            "name": run.name,
            "trajectories": run.trajectories.iter().map(|t| json!([
                t.trajectory_id, t.reward.score, json_name(&t.stop_reason), t.turns,
                t.error.as_ref().map(|e| e.kind.clone()),
            ])).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "problems": problems.into_iter().map(|(id, samples)| json!([id, samples])).collect::<Vec<_>>(),
    });
    html.push_str("<script type=\"application/json\" id=\"index\">");
    push_json(html, &index);
    html.push_str("</script>\n");
}

/// `value` as JSON safe inside a `<script>` element: every `<` escaped, so no text in it can
/// close the element.
fn push_json(html: &mut String, value: &Value) {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned());
    html.push_str(&text.replace('<', "\\u003c"));
}

fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '&' => escaped.push_str("&amp;"),
            '"' => escaped.push_str("&quot;"),
            _ => escaped.push(c),
        }
    }
    escaped
}

const STYLE: &str = r#"
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#24364d;color:#fff;padding:10px 24px}header h1{margin:0;font-size:20px}header p{margin:4px 0 0}
main{padding:0 24px 40px;max-width:1200px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 16px;margin:16px 0}
h2{font-size:16px;margin:6px 0 10px}
table{border-collapse:collapse}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
td{font-variant-numeric:tabular-nums}
.columns{display:flex;gap:16px;flex-wrap:wrap}.columns section{flex:1;min-width:300px}
.hint{color:#666;font-size:12px}
.run0{color:#3b6ea8}.run1{color:#d9822b}header .run0,header .run1{color:#fff;font-weight:bold}
.split{margin:6px 0}.key{margin-right:14px;font-size:12px}.key i{display:inline-block;width:10px;height:10px;margin-right:4px}
#problems th{cursor:pointer;user-select:none}#problems tr.problem{cursor:pointer}#problems tr.problem:hover{background:#f2f6fb}
.samples a{margin-right:8px}.pass{color:#2a7d3a}.fail{color:#b03a2e}
.pager button{margin:6px 4px 0 0}
#trajectory .cell{border-left:3px solid #ccc;margin:10px 0;padding:4px 10px}
#trajectory .markdown{border-color:#9bb7d6;white-space:pre-wrap}
#trajectory .code pre.source{background:#f5f5f5;padding:6px;margin:0}
#trajectory pre{white-space:pre-wrap;word-break:break-word;margin:4px 0}
#trajectory .stderr{background:#fdecea}#trajectory .error{background:#fdecea;color:#8a1f11}
#trajectory .prompt{color:#888;font-size:12px}
#trajectory img{max-width:100%;border:1px solid #eee}
.banner{background:#fdecea;color:#8a1f11;padding:8px 24px}
"#;

/// The page's script: errors shown on the page (and counted in `data-errors` for tests), the
/// problem table (sortable, paged), and a trajectory's notebook opened from the URL's hash
/// (`#t-<run>-<index>`).
const SCRIPT: &str = r##"
"use strict";
(function () {
  const body = document.body;
  body.dataset.errors = "0";
  const failed = (message) => {
    body.dataset.errors = String(Number(body.dataset.errors) + 1);
    const banner = document.createElement("div");
    banner.className = "banner";
    banner.textContent = "report error: " + message;
    body.prepend(banner);
  };
  window.addEventListener("error", (e) => failed(e.message));
  const el = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    for (const child of children) node.append(child);
    return node;
  };
  const index = JSON.parse(document.getElementById("index").textContent);
  const runs = index.runs;
  const PAGE = 100;
  const rows = index.problems.map(([id, samples]) => {
    const per = samples.map((list, r) => {
      const scores = list.map((i) => runs[r].trajectories[i][1]);
      const n = scores.length;
      return {n, rate: n ? scores.filter((s) => s >= index.threshold).length / n : null,
              mean: n ? scores.reduce((a, b) => a + b, 0) / n : null, list};
    });
    const delta = runs.length === 2 && per[0].n && per[1].n ? per[1].rate - per[0].rate : null;
    return {id, per, delta};
  });
  const columns = [{name: "problem", key: (p) => p.id}];
  runs.forEach((run, r) => {
    const tag = runs.length > 1 ? " (" + "AB"[r] + ")" : "";
    columns.push({name: "pass rate" + tag, key: (p) => p.per[r].rate, cls: "run" + r});
    columns.push({name: "mean reward" + tag, key: (p) => p.per[r].mean, cls: "run" + r});
    columns.push({name: "samples" + tag, key: (p) => p.per[r].n, cls: "run" + r});
  });
  if (runs.length === 2) columns.push({name: "Δ pass rate (B − A)", key: (p) => p.delta});
  let sortBy = 0, descending = false, page = 0;
  const fmt = (v) => (v === null || v === undefined ? "–" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : v);
  const compare = (a, b) => {
    const x = columns[sortBy].key(a), y = columns[sortBy].key(b);
    if (x === y) return 0;
    if (x === null) return 1;
    if (y === null) return -1;
    return (x < y ? -1 : 1) * (descending ? -1 : 1);
  };
  const holder = document.getElementById("problems");
  function drawTable() {
    const sorted = rows.slice().sort(compare);
    const pages = Math.max(1, Math.ceil(sorted.length / PAGE));
    page = Math.min(page, pages - 1);
    const table = el("table");
    const head = el("tr");
    columns.forEach((c, i) => {
      const th = el("th", c.cls ? {class: c.cls} : {}, c.name + (i === sortBy ? (descending ? " ▼" : " ▲") : ""));
      th.addEventListener("click", () => { descending = i === sortBy ? !descending : false; sortBy = i; drawTable(); });
      head.append(th);
    });
    table.append(head);
    for (const p of sorted.slice(page * PAGE, (page + 1) * PAGE)) {
      const tr = el("tr", {class: "problem"});
      columns.forEach((c) => tr.append(el("td", c.cls ? {class: c.cls} : {}, fmt(c.key(p)))));
      const detail = el("tr", {class: "samples", hidden: ""});
      const cell = el("td", {colspan: String(columns.length)});
      p.per.forEach((per, r) => per.list.forEach((i) => {
        const [id, score, stop] = runs[r].trajectories[i];
        const link = el("a", {href: "#t-" + r + "-" + i, class: score >= index.threshold ? "pass" : "fail"},
                        (runs.length > 1 ? "AB"[r] + ": " : "") + id + " (" + fmt(score) + ", " + stop + ")");
        cell.append(link, " ");
      }));
      detail.append(cell);
      tr.addEventListener("click", () => { detail.hidden = !detail.hidden; });
      table.append(tr, detail);
    }
    const pager = el("div", {class: "pager"}, "page " + (page + 1) + " of " + pages + " (" + sorted.length + " problems) ");
    if (page > 0) { const b = el("button", {}, "previous"); b.onclick = () => { page--; drawTable(); }; pager.append(b); }
    if (page + 1 < pages) { const b = el("button", {}, "next"); b.onclick = () => { page++; drawTable(); }; pager.append(b); }
    holder.replaceChildren(table, pager);
  }
  const text = (source) => (Array.isArray(source) ? source.join("") : source || "");
  // Markdown cells escape the run's text for Jupyter; here it is shown as plain text.
  const plain = (md) => text(md).replace(/  \n/g, "\n").replace(/\\([\\`*_#\[\]|$])/g, "$1")
    .replace(/&lt;/g, "<").replace(/&gt;/g, ">").replace(/&amp;/g, "&");
  function output(o) {
    if (o.output_type === "stream") return el("pre", {class: o.name}, text(o.text));
    if (o.output_type === "error") return el("pre", {class: "error"}, o.traceback.length ? o.traceback.join("\n") : o.ename + ": " + o.evalue);
    const data = o.data || {};
    const box = el("div", {class: o.output_type});
    if (data["image/png"]) box.append(el("img", {src: "data:image/png;base64," + text(data["image/png"]).replace(/[^A-Za-z0-9+/=]/g, ""), alt: "figure"}));
    else if (data["text/plain"] !== undefined) box.append(el("pre", {}, text(data["text/plain"])));
    else box.append(el("pre", {}, "[" + Object.keys(data).join(", ") + "]"));
    return box;
  }
  function openTrajectory() {
    const view = document.getElementById("trajectory");
    const match = /^#(t-\d+-\d+)$/.exec(location.hash);
    const block = match && document.getElementById(match[1]);
    if (!block) { view.hidden = true; return; }
    const nb = JSON.parse(block.textContent);
    const cells = nb.cells.map((c) => {
      if (c.cell_type === "markdown") return el("div", {class: "cell markdown"}, plain(c.source));
      const node = el("div", {class: "cell code"}, el("div", {class: "prompt"}, "In [" + c.execution_count + "]:"),
                      el("pre", {class: "source"}, text(c.source)));
      for (const o of c.outputs) node.append(output(o));
      return node;
    });
    const close = el("a", {href: "#"}, "close");
    view.replaceChildren(el("h2", {}, "Trajectory " + nb.metadata.rollbox.trajectory_id + " ", close), ...cells);
    view.hidden = false;
    view.scrollIntoView();
  }
  drawTable();
  window.addEventListener("hashchange", openTrajectory);
  openTrajectory();
  body.dataset.ready = "1";
  // Time from navigation to a drawn page, for BENCHMARKS.md's figure.
  body.dataset.readyMs = performance.now().toFixed(0);
})();
"##;
