//! OpenAI chat-completions message types.
//!
//! These types read and write the `messages` array of the OpenAI chat format, tool calls included.
//! Every struct keeps the fields it does not model in an `extra` map (`#[serde(flatten)]`), so
//! reading a conversation and writing it back loses nothing a provider added (`reasoning_content`,
//! `refusal`, `cache_control`, ...).
//!
//! ```
//! use rollbox::chat::{Message, Role};
//!
//! let message: Message = serde_json::from_str(r#"{"role":"user","content":"hi","x-trace":7}"#)?;
//! assert_eq!(message.role, Role::User);
//! assert_eq!(message.text(), "hi");
//! assert_eq!(serde_json::to_string(&message)?, r#"{"role":"user","content":"hi","x-trace":7}"#);
//! # Ok::<(), serde_json::Error>(())
//! ```

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Who wrote a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the whole conversation.
    System,
    /// OpenAI's newer name for system-level instructions in some models.
    Developer,
    /// The human (or the environment speaking for them, e.g. notebook cell outputs).
    User,
    /// The model.
    Assistant,
    /// The result of a tool call, tied to it by `tool_call_id`.
    Tool,
    /// Any role this crate does not know; kept verbatim so a round trip is lossless.
    #[serde(untagged)]
    Other(String),
}

impl Role {
    /// The role's name as it appears on the wire and in chat templates.
    pub fn as_str(&self) -> &str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Other(name) => name,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message's content: a plain string, or an array of typed parts (text, images, ...).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// `"content": "..."`.
    Text(String),
    /// `"content": [{"type": "text", "text": "..."}, {"type": "image_url", ...}]`.
    Parts(Vec<ContentPart>),
}

/// One element of an array-valued [`Content`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContentPart {
    /// The part's `type`, e.g. `text` or `image_url`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part; `None` for other kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// Everything else the part carries (`image_url`, `cache_control`, ...), kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ContentPart {
    /// A `{"type": "text", "text": ...}` part.
    pub fn text(text: impl Into<String>) -> Self {
        ContentPart {
            kind: "text".to_owned(),
            text: Some(text.into()),
            extra: Map::new(),
        }
    }
}

/// A function call the assistant asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The id a later [`Role::Tool`] message answers with `tool_call_id`.
    pub id: String,
    /// The call's `type`; OpenAI only defines `function`.
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    /// Which function, with which arguments.
    pub function: FunctionCall,
    /// Fields this crate does not model, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn function_kind() -> String {
    "function".to_owned()
}

/// The function part of a [`ToolCall`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name, e.g. `python`.
    pub name: String,
    /// The arguments as a JSON-encoded string, exactly as the model produced them (it may not be
    /// valid JSON; models make mistakes and the rollout must still be able to record them).
    pub arguments: String,
    /// Fields this crate does not model, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One chat message.
///
/// `content` reads both a missing field and `null` as `None`, and writes `None` as `null` (the
/// form OpenAI itself uses for an assistant message that only calls tools).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What it says; `None` when it only carries tool calls.
    #[serde(default)]
    pub content: Option<Content>,
    /// Calls the assistant asked for, in order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// For a [`Role::Tool`] message: the [`ToolCall::id`] it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// An optional participant or function name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Fields this crate does not model, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    /// A message with the given role and plain-text content and nothing else.
    pub fn new(role: Role, text: impl Into<String>) -> Self {
        Message {
            role,
            content: Some(Content::Text(text.into())),
            tool_calls: None,
            tool_call_id: None,
            name: None,
            extra: Map::new(),
        }
    }

    /// A system message.
    pub fn system(text: impl Into<String>) -> Self {
        Message::new(Role::System, text)
    }

    /// A user message.
    pub fn user(text: impl Into<String>) -> Self {
        Message::new(Role::User, text)
    }

    /// An assistant message with text only.
    pub fn assistant(text: impl Into<String>) -> Self {
        Message::new(Role::Assistant, text)
    }

    /// A tool result answering the call with id `tool_call_id`.
    pub fn tool(tool_call_id: impl Into<String>, text: impl Into<String>) -> Self {
        Message {
            tool_call_id: Some(tool_call_id.into()),
            ..Message::new(Role::Tool, text)
        }
    }

    /// Adds a function call to this message (builder style).
    pub fn with_tool_call(
        mut self,
        id: impl Into<String>,
        name: impl Into<String>,
        arguments: impl Into<String>,
    ) -> Self {
        let call = ToolCall {
            id: id.into(),
            kind: function_kind(),
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.into(),
                extra: Map::new(),
            },
            extra: Map::new(),
        };
        self.tool_calls.get_or_insert_with(Vec::new).push(call);
        self
    }

    /// The message's text: the string content, or its text parts joined with newlines.
    /// Borrowed when the content is a plain string.
    pub fn text(&self) -> Cow<'_, str> {
        match &self.content {
            None => Cow::Borrowed(""),
            Some(Content::Text(text)) => Cow::Borrowed(text),
            Some(Content::Parts(parts)) => {
                let texts: Vec<&str> = parts.iter().filter_map(|p| p.text.as_deref()).collect();
                match texts.as_slice() {
                    [only] => Cow::Borrowed(only),
                    _ => Cow::Owned(texts.join("\n")),
                }
            }
        }
    }

    /// The tool calls, or an empty slice when there are none.
    pub fn tool_calls(&self) -> &[ToolCall] {
        self.tool_calls.as_deref().unwrap_or(&[])
    }
}
