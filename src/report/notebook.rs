//! A trajectory as a Jupyter notebook (nbformat 4.5): the problem as the first markdown cell,
//! each model turn as a markdown cell followed by the code it ran as code cells with their real
//! outputs (figures included), and the reward last.

use serde_json::{Map, Value, json};

use crate::chat::{Message, Role};
use crate::rollout::Trajectory;
use crate::rollout::agent::StepCall;
use crate::slot::{MimeBundle, Output};

/// The notebook of `trajectory`, as the JSON of an `.ipynb` file.
pub fn notebook(trajectory: &Trajectory) -> Value {
    let mut cells = Cells::default();
    let problem = trajectory
        .messages
        .iter()
        .find(|m| m.role == Role::User)
        .map(|m| m.text().into_owned())
        .unwrap_or_default();
    cells.markdown(format!(
        "# {} (sample {})\n\n{}",
        escape_markdown(&trajectory.instance_id),
        trajectory.sample,
        escape_markdown(&problem)
    ));
    let turns: Vec<&Message> = trajectory
        .messages
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .collect();
    for (turn, message) in turns.iter().enumerate() {
        cells.markdown(model_turn(turn, message));
        for call in trajectory.steps.get(turn).map_or(&[][..], |step| &step.calls) {
            cells.code(call);
        }
    }
    cells.markdown(reward_cell(trajectory));
    json!({
        "nbformat": 4,
        "nbformat_minor": 5,
        "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"},
            "rollbox": {
                "trajectory_id": trajectory.trajectory_id,
                "policy": trajectory.policy,
                "reward": trajectory.reward.score,
                "stop_reason": trajectory.stop_reason,
            },
        },
        "cells": cells.cells,
    })
}

/// A file name for `trajectory_id`'s notebook: its characters outside `[A-Za-z0-9._-]` as `_`
/// (`ids/3` becomes `ids_3.ipynb`).
pub fn file_name(trajectory_id: &str) -> String {
    let stem: String = trajectory_id
        .chars()
        .map(|c| match c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
            true => c,
            false => '_',
        })
        .collect();
    format!("{stem}.ipynb")
}

/// The cells built so far, numbered for their ids and execution counts.
#[derive(Default)]
struct Cells {
    cells: Vec<Value>,
    executed: u64,
}

impl Cells {
    fn markdown(&mut self, source: String) {
        let id = format!("cell-{}", self.cells.len());
        self.cells
            .push(json!({"cell_type": "markdown", "id": id, "metadata": {}, "source": source}));
    }

    fn code(&mut self, call: &StepCall) {
        self.executed += 1;
        let count = self.executed;
        let (source, outputs) = match (call.call.name.as_str(), &call.result.cell) {
            ("python", Some(cell)) => (
                python_source(call),
                cell.outputs_or_fields()
                    .into_iter()
                    .map(|o| output_json(o, count))
                    .collect(),
            ),
            _ => (
                other_tool_source(call),
                vec![json!({"output_type": "stream", "name": "stdout", "text": call.result.output})],
            ),
        };
        let id = format!("cell-{}", self.cells.len());
        self.cells.push(json!({
            "cell_type": "code",
            "id": id,
            "metadata": {"rollbox": {"tool": call.call.name, "success": call.result.success,
                                      "duration_us": call.result.metadata.duration_us}},
            "execution_count": count,
            "source": source,
            "outputs": outputs,
        }));
    }
}

fn python_source(call: &StepCall) -> String {
    call.call
        .arguments
        .get("code")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// A call of another tool, shown as a comment naming it and its arguments.
fn other_tool_source(call: &StepCall) -> String {
    let arguments = serde_json::to_string_pretty(&call.call.arguments).unwrap_or_default();
    format!("# tool call: {}\n{}", call.call.name, comment_lines(&arguments))
}

fn comment_lines(text: &str) -> String {
    text.lines()
        .map(|line| format!("# {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One output in the notebook's JSON, JSON MIME types as JSON and `execute_result` numbered.
fn output_json(output: Output, count: u64) -> Value {
    match output {
        Output::DisplayData { data, .. } => {
            json!({"output_type": "display_data", "data": mime_json(data), "metadata": {}})
        }
        Output::ExecuteResult { data, .. } => json!({
            "output_type": "execute_result",
            "execution_count": count,
            "data": mime_json(data),
            "metadata": {},
        }),
        other => serde_json::to_value(other).unwrap_or(Value::Null),
    }
}

/// A bundle as nbformat wants it: JSON types (`application/json`, `*+json`) as JSON values, the
/// rest as strings. A JSON type whose text does not parse is kept as plain text.
fn mime_json(bundle: MimeBundle) -> Value {
    let mut data = Map::new();
    for (mime, text) in bundle {
        let is_json = mime == "application/json" || mime.ends_with("+json");
        match is_json {
            true => match serde_json::from_str::<Value>(&text) {
                Ok(value @ Value::Object(_)) => {
                    data.insert(mime, value);
                }
                _ => {
                    data.entry("text/plain").or_insert(Value::String(text));
                }
            },
            false => {
                data.insert(mime, Value::String(text));
            }
        }
    }
    Value::Object(data)
}

fn model_turn(turn: usize, message: &Message) -> String {
    let mut text = format!("**Model, turn {}**\n\n{}", turn + 1, escape_markdown(&message.text()));
    for call in message.tool_calls() {
        text.push_str(&format!(
            "\n\n*calls `{}`*",
            escape_markdown(&call.function.name).replace('`', "'")
        ));
    }
    text
}

fn reward_cell(trajectory: &Trajectory) -> String {
    let breakdown = serde_json::to_string_pretty(&trajectory.reward.breakdown).unwrap_or_default();
    let error = trajectory
        .error
        .as_ref()
        .map(|e| format!("\n- error: `{}`: {}", e.kind, escape_markdown(&e.message)))
        .unwrap_or_default();
    format!(
        "## Reward: {}\n\n- stop reason: `{}`\n- turns: {}\n- time: model {:.0} ms, tools {:.0} ms, reward {:.0} ms\
         {error}\n\n```json\n{}\n```",
        trajectory.reward.score,
        serde_json::to_value(trajectory.stop_reason)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default(),
        trajectory.turns,
        trajectory.model_ms,
        trajectory.tool_ms,
        trajectory.reward_ms,
        breakdown.replace("```", "` ` `"),
    )
}

/// Text shown literally in markdown: HTML tags (a notebook agent's `<code>` blocks) and
/// markdown's own markers are escaped.
fn escape_markdown(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '&' => escaped.push_str("&amp;"),
            '\\' | '`' | '*' | '_' | '#' | '[' | ']' | '|' | '$' => {
                escaped.push('\\');
                escaped.push(c);
            }
            '\n' => escaped.push_str("  \n"),
            _ => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_keep_only_safe_characters() {
        assert_eq!(file_name("gsm8k-12/3"), "gsm8k-12_3.ipynb");
        assert_eq!(file_name("../x y"), ".._x_y.ipynb");
    }

    #[test]
    fn json_mime_types_become_json_and_bad_json_stays_text() {
        let bundle: MimeBundle = [
            ("application/json".to_string(), "{\"a\": 1}".to_string()),
            ("text/html".to_string(), "<b>x</b>".to_string()),
        ]
        .into();
        assert_eq!(
            mime_json(bundle),
            json!({"application/json": {"a": 1}, "text/html": "<b>x</b>"})
        );
        let bad: MimeBundle = [("application/json".to_string(), "[1".to_string())].into();
        assert_eq!(mime_json(bad), json!({"text/plain": "[1"}));
    }
}
