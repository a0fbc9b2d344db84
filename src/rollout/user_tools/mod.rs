//! Tools written by users: a Python file of typed, documented functions becomes extra tools for
//! the `tools` agent, and rollbox's own `calculator` is built the same way.
//!
//! Schemas come from the functions' signatures and docstrings, read by *parsing* the file on
//! the host (the rules are in `signature.rs` and `examples/README.md`); the file never runs on
//! the host. The functions run inside the trajectory's slot: before the first call in a slot,
//! one cell loads every file into a private module of its own (registered in `sys.modules`,
//! never in the notebook's globals); each call is then a cell that calls the function with the
//! model's JSON arguments and prints its result (a string as it is, anything else as JSON, or
//! its `repr`). An exception becomes a failed result whose output is
//! `` `name` failed: Error: message ``; the full traceback stays in the result's `cell.error`.

mod docstring;
mod signature;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use serde_json::{Value, json};

use crate::slot::tools::ToolName;
use crate::slot::{ErrorKind, ExecutionMetadata, ExecutionResult, ToolCall};

/// The registry that loads and calls tools inside a slot.
const REGISTRY_PY: &str = include_str!("../../../guest/tools/registry.py");
/// The built-in calculator's source.
const CALCULATOR_PY: &str = include_str!("../../../guest/tools/calculator.py");
/// The label the calculator's file has in schemas, errors and tracebacks.
pub const CALCULATOR_LABEL: &str = "rollbox/calculator.py";

/// Runs in a fresh globals dict (so nothing lands in the notebook's), with `payload` holding
/// the registry's source and the files as JSON.
const LOAD_PROGRAM: &str = r#"import json, sys, types
payload = json.loads(payload)
registry = sys.modules.get("_rollbox_tools")
if registry is None:
    registry = types.ModuleType("_rollbox_tools")
    exec(compile(payload["registry"], "<rollbox-tools>", "exec"), registry.__dict__)
    sys.modules["_rollbox_tools"] = registry
for label, module_name, source, names in payload["files"]:
    registry.load(label, module_name, source, names)
"#;

/// Runs in a fresh globals dict holding `name` and `arguments` (a JSON string).
const CALL_PROGRAM: &str = r#"import sys
registry = sys.modules.get("_rollbox_tools")
if registry is None:
    raise RuntimeError("the tools are not loaded in this slot (its interpreter restarted, or `_rollbox_tools` was removed from sys.modules); call the tool again")
registry.call(name, arguments)
"#;

/// One function of a tools file, as a model sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct UserTool {
    /// The function's name, which is the tool's.
    pub name: String,
    /// The docstring's text before its first section.
    pub description: String,
    /// The JSON Schema of the arguments object.
    pub parameters: Value,
}

impl UserTool {
    /// The OpenAI function-calling schema.
    pub fn schema(&self) -> Value {
        json!({
            "type": "function",
            "function": { "name": self.name, "description": self.description, "parameters": self.parameters }
        })
    }

    /// Checks that `arguments` names every required parameter and no unknown one. The values'
    /// types are left to the function, which sees them as JSON gives them.
    fn check_arguments(&self, arguments: &serde_json::Map<String, Value>) -> Result<(), String> {
        let properties = self.parameters["properties"].as_object();
        let known = |name: &str| properties.is_some_and(|p| p.contains_key(name));
        if let Some(unknown) = arguments.keys().find(|k| !known(k)) {
            let names: Vec<&str> = properties
                .map(|p| p.keys().map(String::as_str).collect())
                .unwrap_or_default();
            return Err(format!(
                "`{}` has no parameter `{unknown}`; its parameters are: {}",
                self.name,
                names.join(", ")
            ));
        }
        let required = self.parameters["required"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        let missing: Vec<&str> = required
            .iter()
            .filter_map(Value::as_str)
            .filter(|r| !arguments.contains_key(*r))
            .collect();
        if !missing.is_empty() {
            return Err(format!(
                "`{}` needs the argument(s) {}; call it again with them",
                self.name,
                missing.join(", ")
            ));
        }
        Ok(())
    }
}

/// A parsed tools file: its source (to load into slots) and its tools.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolsFile {
    /// How the file is named in errors and tracebacks (its path as given).
    pub label: String,
    /// The Python source.
    pub source: String,
    /// Its tools, in file order.
    pub tools: Vec<UserTool>,
}

impl ToolsFile {
    /// Parses `source`; `label` names it in errors and tracebacks.
    pub fn parse(label: &str, source: &str) -> Result<ToolsFile, ToolsFileError> {
        let tools = signature::tools_in(label, source)?;
        if tools.is_empty() {
            return Err(ToolsFileError::NoTools { file: label.to_owned() });
        }
        Ok(ToolsFile {
            label: label.to_owned(),
            source: source.to_owned(),
            tools,
        })
    }

    /// Reads and parses the file at `path`.
    pub fn read(path: &Path) -> Result<ToolsFile, ToolsFileError> {
        let source = std::fs::read_to_string(path).map_err(|source| ToolsFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        ToolsFile::parse(&path.display().to_string(), &source)
    }

    /// rollbox's `calculator` tool (`guest/tools/calculator.py`).
    pub fn calculator() -> ToolsFile {
        static CALCULATOR: LazyLock<ToolsFile> = LazyLock::new(|| {
            // A unit test parses the shipped file, so this cannot fail in a build that passed.
            ToolsFile::parse(CALCULATOR_LABEL, CALCULATOR_PY).expect("the shipped calculator.py parses")
        });
        CALCULATOR.clone()
    }
}

/// A tools file could not become tools.
#[derive(Debug, thiserror::Error)]
pub enum ToolsFileError {
    /// The file could not be read.
    #[error("failed to read the tools file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid Python.
    #[error("failed to parse the tools file {file} as Python (line {line})")]
    Parse {
        /// The file's label.
        file: String,
        /// The 1-based line of the error.
        line: usize,
        /// The parser's error.
        #[source]
        source: Box<rustpython_parser::ParseError>,
    },
    /// A public function does not follow the schema rules.
    #[error(
        "failed to make a tool of `{function}` ({file}, line {line}): {problem}; or rename it to start with `_` to keep it out of the tools"
    )]
    Function {
        /// The file's label.
        file: String,
        /// The 1-based line of the `def`.
        line: usize,
        /// The function.
        function: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
    /// The file has no public top-level function.
    #[error(
        "the tools file {file} defines no tools: each top-level `def` whose name does not start with `_` becomes one"
    )]
    NoTools {
        /// The file's label.
        file: String,
    },
    /// Two files define the same tool.
    #[error("the tool `{name}` is defined in both {first} and {second}; rename one, tool names must be unique")]
    Duplicate {
        /// The tool.
        name: String,
        /// The file that defined it first.
        first: String,
        /// The file that defined it again.
        second: String,
    },
    /// A tool has the name of one of rollbox's built-in tools.
    #[error(
        "the tool `{name}` in {file} has the name of a built-in tool; rename it (the built-in tools are python, bash, read_file, write_file, edit_file, list_dir and search)"
    )]
    Builtin {
        /// The tool.
        name: String,
        /// Its file.
        file: String,
    },
}

/// The extra tools a `tools` agent offers besides the backend's: every tool of every file,
/// with unique names. Empty by default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UserTools {
    files: Vec<ToolsFile>,
    /// Tool name -> (file index, tool index).
    by_name: HashMap<String, (usize, usize)>,
}

impl UserTools {
    /// The tools of `files`; a name defined twice, or the name of a built-in tool, is an error.
    pub fn new(files: Vec<ToolsFile>) -> Result<UserTools, ToolsFileError> {
        let mut by_name = HashMap::new();
        for (file_index, file) in files.iter().enumerate() {
            for (tool_index, tool) in file.tools.iter().enumerate() {
                if ToolName::from_name(&tool.name).is_some() {
                    return Err(ToolsFileError::Builtin {
                        name: tool.name.clone(),
                        file: file.label.clone(),
                    });
                }
                if let Some((first, _)) = by_name.insert(tool.name.clone(), (file_index, tool_index)) {
                    let first = files[first].label.clone();
                    return Err(ToolsFileError::Duplicate {
                        name: tool.name.clone(),
                        first,
                        second: file.label.clone(),
                    });
                }
            }
        }
        Ok(UserTools { files, by_name })
    }

    /// Only the built-in `calculator`: what the `tools` agent offers by default.
    pub fn calculator_only() -> Arc<UserTools> {
        static ONLY: LazyLock<Arc<UserTools>> = LazyLock::new(|| {
            Arc::new(UserTools::new(vec![ToolsFile::calculator()]).expect("one file alone has no clashing names"))
        });
        ONLY.clone()
    }

    /// Whether there are no tools.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The tool called `name`.
    pub fn get(&self, name: &str) -> Option<&UserTool> {
        let &(file, tool) = self.by_name.get(name)?;
        self.files.get(file)?.tools.get(tool)
    }

    /// Every tool, file by file in order.
    pub fn tools(&self) -> impl Iterator<Item = &UserTool> {
        self.files.iter().flat_map(|f| &f.tools)
    }

    /// The OpenAI function-calling schemas of every tool.
    pub fn schemas(&self) -> Vec<Value> {
        self.tools().map(UserTool::schema).collect()
    }

    /// The `python` call that loads every file into a slot. Loading again replaces the modules.
    pub fn load_call(&self) -> ToolCall {
        let files: Vec<Value> = self
            .files
            .iter()
            .enumerate()
            .map(|(i, f)| {
                json!([
                    f.label,
                    format!("_rollbox_tools_{i}"),
                    f.source,
                    f.tools.iter().map(|t| &t.name).collect::<Vec<_>>()
                ])
            })
            .collect();
        let payload = json!({ "registry": REGISTRY_PY, "files": files }).to_string();
        ToolCall::python(format!(
            "exec({}, {{\"payload\": {}}})\n",
            py_string(LOAD_PROGRAM),
            py_string(&payload)
        ))
    }

    /// The `python` call that runs tool `name` with `arguments` in a slot the tools are loaded
    /// in, or a failed result when the arguments do not fit the tool (it does not run then).
    /// `None` when no user tool has that name.
    pub fn call(&self, name: &str, arguments: &Value) -> Option<Result<ToolCall, ExecutionResult>> {
        let tool = self.get(name)?;
        let checked = match arguments.as_object() {
            Some(object) => tool.check_arguments(object),
            None => Err(format!("the arguments of `{name}` must be a JSON object")),
        };
        Some(match checked {
            Ok(()) => {
                let arguments = py_string(&arguments.to_string());
                Ok(ToolCall::python(format!(
                    "exec({}, {{\"name\": {}, \"arguments\": {arguments}}})\n",
                    py_string(CALL_PROGRAM),
                    py_string(name)
                )))
            }
            Err(message) => {
                let metadata = ExecutionMetadata {
                    tool: name.to_owned(),
                    ..Default::default()
                };
                Err(ExecutionResult::failure(ErrorKind::InvalidArguments, message, metadata))
            }
        })
    }
}

/// The result of a tool call's cell, as the model should see it: named after the tool, and an
/// exception as one `` `name` failed: Error: message `` line after whatever it printed.
pub fn tool_result(name: &str, mut result: ExecutionResult) -> ExecutionResult {
    result.metadata.tool = name.to_owned();
    if let Some(cell) = &result.cell
        && let Some(error) = &cell.error
        && result.metadata.limit_hit.is_none()
        && !result.metadata.state_lost
    {
        let printed = [cell.stdout.trim_end(), cell.stderr.trim_end()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>();
        let mut output = printed.join("\n");
        if !output.is_empty() {
            output.push('\n');
        }
        output.push_str(&format!("`{name}` failed: {}: {}", error.name, error.value));
        result.output = output;
    }
    result
}

/// A Python string literal of `text` (JSON's escapes are valid Python).
fn py_string(text: &str) -> String {
    Value::String(text.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_calculator_parses_into_one_documented_tool() {
        let calculator = ToolsFile::parse(CALCULATOR_LABEL, CALCULATOR_PY).expect("calculator.py parses");
        let [tool] = calculator.tools.as_slice() else {
            panic!("one tool: {:?}", calculator.tools)
        };
        assert_eq!(tool.name, "calculator");
        assert!(
            tool.description.starts_with("Evaluate an arithmetic expression"),
            "{}",
            tool.description
        );
        assert_eq!(tool.parameters["required"], json!(["expression"]));
        assert_eq!(tool.parameters["properties"]["expression"]["type"], "string");
        assert!(
            tool.parameters["properties"]["expression"]["description"]
                .as_str()
                .is_some_and(|d| d.contains("2 * (3 + 4)"))
        );
    }
}
