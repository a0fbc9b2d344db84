//! The tools a slot offers, their OpenAI function-calling schemas, and their typed arguments.
//!
//! A [`crate::ToolCall`] carries a name and JSON arguments as a model wrote them;
//! [`ToolRequest::parse`] turns it into a typed request or a clear error saying which argument
//! is wrong.

use serde::Deserialize;
use serde_json::{Value, json};

/// The tools rollbox knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolName {
    /// Run a cell in the slot's persistent Python interpreter.
    Python,
    /// Run a shell command in the workspace (native backends only).
    Bash,
    /// Read a text file in the workspace.
    ReadFile,
    /// Create or overwrite a text file in the workspace.
    WriteFile,
    /// Replace one exact, unique string in a file.
    EditFile,
    /// List a directory in the workspace.
    ListDir,
    /// Search the workspace's text files with a regular expression.
    Search,
}

impl ToolName {
    /// Every tool, in the order schemas are listed.
    pub const ALL: [ToolName; 7] = [
        ToolName::Python,
        ToolName::Bash,
        ToolName::ReadFile,
        ToolName::WriteFile,
        ToolName::EditFile,
        ToolName::ListDir,
        ToolName::Search,
    ];

    /// The name a model calls the tool by.
    pub fn as_str(self) -> &'static str {
        match self {
            ToolName::Python => "python",
            ToolName::Bash => "bash",
            ToolName::ReadFile => "read_file",
            ToolName::WriteFile => "write_file",
            ToolName::EditFile => "edit_file",
            ToolName::ListDir => "list_dir",
            ToolName::Search => "search",
        }
    }

    /// The tool called `name`, if rollbox has one.
    pub fn from_name(name: &str) -> Option<ToolName> {
        ToolName::ALL.into_iter().find(|t| t.as_str() == name)
    }

    /// The tool's OpenAI function-calling schema (`{"type": "function", "function": {...}}`).
    pub fn schema(self) -> Value {
        let (description, parameters) = match self {
            ToolName::Python => (
                "Run Python code in a persistent interpreter, like a Jupyter cell. Variables, \
                 imports and functions persist across calls. The value of the final expression is \
                 returned. The working directory is the workspace the file tools use.",
                object(&[("code", "string", "The Python code to run.")], &["code"]),
            ),
            ToolName::Bash => (
                "Run a bash command in the workspace directory and return its output and exit code.",
                object(
                    &[
                        ("command", "string", "The command line to run with bash -c."),
                        ("timeout", "number", "Seconds before the command is killed (optional)."),
                    ],
                    &["command"],
                ),
            ),
            ToolName::ReadFile => (
                "Read a text file from the workspace. Paths are relative to the workspace.",
                object(
                    &[
                        ("path", "string", "The file's path, relative to the workspace."),
                        (
                            "offset",
                            "integer",
                            "The first line to return, counting from 1 (optional).",
                        ),
                        ("limit", "integer", "The most lines to return (optional)."),
                    ],
                    &["path"],
                ),
            ),
            ToolName::WriteFile => (
                "Create or overwrite a text file in the workspace, creating parent directories.",
                object(
                    &[
                        ("path", "string", "The file's path, relative to the workspace."),
                        ("content", "string", "The full new content of the file."),
                    ],
                    &["path", "content"],
                ),
            ),
            ToolName::EditFile => (
                "Replace one exact occurrence of `old_string` with `new_string` in a workspace \
                 file. Fails if the text is missing or occurs more than once: include more \
                 surrounding lines to make it unique.",
                object(
                    &[
                        ("path", "string", "The file's path, relative to the workspace."),
                        ("old_string", "string", "The exact text to replace."),
                        ("new_string", "string", "The replacement text."),
                    ],
                    &["path", "old_string", "new_string"],
                ),
            ),
            ToolName::ListDir => (
                "List the entries of a workspace directory (directories end with /).",
                object(
                    &[(
                        "path",
                        "string",
                        "The directory, relative to the workspace (default: the workspace).",
                    )],
                    &[],
                ),
            ),
            ToolName::Search => (
                "Search the workspace's text files for a regular expression; returns path:line: text.",
                object(
                    &[
                        ("pattern", "string", "A regular expression (Rust regex syntax)."),
                        (
                            "path",
                            "string",
                            "A directory or file to search under (default: the workspace).",
                        ),
                    ],
                    &["pattern"],
                ),
            ),
        };
        json!({
            "type": "function",
            "function": { "name": self.as_str(), "description": description, "parameters": parameters }
        })
    }
}

impl std::fmt::Display for ToolName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The schemas of `tools`, ready for a chat-completions request's `tools` field.
pub fn schemas(tools: &[ToolName]) -> Vec<Value> {
    tools.iter().map(|t| t.schema()).collect()
}

fn object(properties: &[(&str, &str, &str)], required: &[&str]) -> Value {
    let props: serde_json::Map<String, Value> = properties
        .iter()
        .map(|(name, ty, desc)| (name.to_string(), json!({ "type": ty, "description": desc })))
        .collect();
    json!({ "type": "object", "properties": props, "required": required, "additionalProperties": false })
}

/// A tool call with its arguments checked and typed.
#[derive(Clone, Debug, PartialEq)]
pub enum ToolRequest {
    /// `python`.
    Python(PythonArgs),
    /// `bash`.
    Bash(BashArgs),
    /// `read_file`.
    ReadFile(ReadFileArgs),
    /// `write_file`.
    WriteFile(WriteFileArgs),
    /// `edit_file`.
    EditFile(EditFileArgs),
    /// `list_dir`.
    ListDir(ListDirArgs),
    /// `search`.
    Search(SearchArgs),
}

/// Arguments of `python`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonArgs {
    /// The cell's source.
    pub code: String,
}

/// Arguments of `bash`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BashArgs {
    /// The command line.
    pub command: String,
    /// Seconds before the command is killed; never more than the backend's limit.
    #[serde(default)]
    pub timeout: Option<f64>,
}

/// Arguments of `read_file`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadFileArgs {
    /// Path relative to the workspace.
    pub path: String,
    /// First line, from 1.
    #[serde(default)]
    pub offset: Option<usize>,
    /// Most lines.
    #[serde(default)]
    pub limit: Option<usize>,
}

/// Arguments of `write_file`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteFileArgs {
    /// Path relative to the workspace.
    pub path: String,
    /// The new content.
    pub content: String,
}

/// Arguments of `edit_file`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditFileArgs {
    /// Path relative to the workspace.
    pub path: String,
    /// The exact text to replace; must occur exactly once.
    pub old_string: String,
    /// Its replacement.
    pub new_string: String,
}

/// Arguments of `list_dir`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListDirArgs {
    /// Directory relative to the workspace.
    #[serde(default = "workspace_root")]
    pub path: String,
}

/// Arguments of `search`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchArgs {
    /// A regular expression.
    pub pattern: String,
    /// Where to search, relative to the workspace.
    #[serde(default = "workspace_root")]
    pub path: String,
}

fn workspace_root() -> String {
    ".".to_string()
}

/// What kind of JSON value `value` is, for an error message.
fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

/// Why a call could not be turned into a [`ToolRequest`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ToolCallError {
    /// No tool has this name.
    #[error(
        "there is no tool named `{0}`; the tools are: python, bash, read_file, write_file, edit_file, list_dir, search"
    )]
    UnknownTool(String),
    /// The arguments do not fit the schema.
    #[error("invalid arguments for `{tool}`: {reason}; see the tool's JSON schema")]
    InvalidArguments {
        /// The tool.
        tool: ToolName,
        /// What is wrong, from the schema check.
        reason: String,
    },
}

impl ToolRequest {
    /// Checks `name` and `arguments` against the tool's schema. Arguments may also be a JSON
    /// string holding the object, as some model servers send them.
    pub fn parse(name: &str, arguments: &Value) -> Result<ToolRequest, ToolCallError> {
        let tool = ToolName::from_name(name).ok_or_else(|| ToolCallError::UnknownTool(name.to_string()))?;
        let decoded;
        let arguments = match arguments {
            Value::String(text) => {
                decoded = serde_json::from_str::<Value>(text).map_err(|e| ToolCallError::InvalidArguments {
                    tool,
                    reason: format!("the arguments string is not JSON ({e})"),
                })?;
                &decoded
            }
            Value::Null => &Value::Object(Default::default()),
            other => other,
        };
        // Only an object: serde would take a list as the fields in order (`["print(1)"]`).
        if !arguments.is_object() {
            return Err(ToolCallError::InvalidArguments {
                tool,
                reason: format!(
                    "the arguments are a JSON {}, not an object of named fields",
                    json_kind(arguments)
                ),
            });
        }
        fn typed<T: serde::de::DeserializeOwned>(tool: ToolName, v: &Value) -> Result<T, ToolCallError> {
            T::deserialize(v).map_err(|e| ToolCallError::InvalidArguments {
                tool,
                reason: e.to_string(),
            })
        }
        Ok(match tool {
            ToolName::Python => ToolRequest::Python(typed(tool, arguments)?),
            ToolName::Bash => ToolRequest::Bash(typed(tool, arguments)?),
            ToolName::ReadFile => ToolRequest::ReadFile(typed(tool, arguments)?),
            ToolName::WriteFile => ToolRequest::WriteFile(typed(tool, arguments)?),
            ToolName::EditFile => ToolRequest::EditFile(typed(tool, arguments)?),
            ToolName::ListDir => ToolRequest::ListDir(typed(tool, arguments)?),
            ToolName::Search => ToolRequest::Search(typed(tool, arguments)?),
        })
    }

    /// The tool this request is for.
    pub fn tool(&self) -> ToolName {
        match self {
            ToolRequest::Python(_) => ToolName::Python,
            ToolRequest::Bash(_) => ToolName::Bash,
            ToolRequest::ReadFile(_) => ToolName::ReadFile,
            ToolRequest::WriteFile(_) => ToolName::WriteFile,
            ToolRequest::EditFile(_) => ToolName::EditFile,
            ToolRequest::ListDir(_) => ToolName::ListDir,
            ToolRequest::Search(_) => ToolName::Search,
        }
    }
}
