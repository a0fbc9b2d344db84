//! Summarising the middle of a conversation with a model, for [`super::llm_compaction`].

use std::error::Error as StdError;
use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{Value, json};

use crate::chat::Message;

/// What to summarise, and how long the summary may be.
#[derive(Debug, Clone, PartialEq)]
pub struct SummaryRequest {
    /// The messages to summarise, oldest first (already AST-compacted).
    pub messages: Vec<Message>,
    /// Most tokens the summary may take to fit the budget; a longer one is not used.
    pub max_tokens: usize,
}

/// Something that writes a summary of messages: a model endpoint, or a callback.
///
/// Object-safe: [`super::llm_compaction`] takes `&dyn Summarizer`.
#[async_trait]
pub trait Summarizer: Send + Sync {
    /// Summarises `request.messages` in at most about `request.max_tokens` tokens.
    async fn summarize(&self, request: SummaryRequest) -> Result<String, SummarizerError>;
}

/// Why a summary could not be had. [`super::llm_compaction`] never returns these: it falls back
/// to AST compaction and records the reason.
#[derive(Debug, thiserror::Error)]
pub enum SummarizerError {
    /// The HTTP client could not be built.
    #[error("failed to build the HTTP client for the summariser")]
    Client(#[source] reqwest::Error),
    /// The request did not complete (connection, timeout, body).
    #[error("failed to call the summariser endpoint")]
    Request(#[source] reqwest::Error),
    /// The endpoint answered with an error status.
    #[error("summariser endpoint answered HTTP {status}")]
    Status {
        /// The HTTP status code.
        status: u16,
    },
    /// The endpoint answered 2xx without `choices[0].message.content`.
    #[error("summariser response has no choices[0].message.content")]
    MissingContent,
    /// A callback summariser failed.
    #[error("summariser callback failed")]
    Callback(#[source] Box<dyn StdError + Send + Sync>),
}

/// The instruction sent with every summary request.
const SUMMARY_INSTRUCTIONS: &str = "You compress the earlier part of a coding agent's session in a \
stateful Python notebook so the agent can continue it. Summarise the transcript the user gives \
you: the task and the plan, what was tried and what was learned, the errors met and how they were \
fixed, and every variable, function and class the code defined with what it holds or does (the \
notebook still holds them). Be concise and factual; write no preamble.";

/// A [`Summarizer`] that calls an OpenAI-compatible `POST {base}/v1/chat/completions`.
#[derive(Debug, Clone)]
pub struct OpenAiSummarizer {
    client: reqwest::Client,
    endpoint: String,
    model: String,
    api_key: Option<String>,
    timeout: Duration,
}

impl OpenAiSummarizer {
    /// A summariser for `model` at `base_url` (e.g. `http://127.0.0.1:8000`; the
    /// `/v1/chat/completions` path is appended). Defaults: no API key, a 60 s timeout per call
    /// (a rollout step should not wait longer for a summary it can do without).
    pub fn new(base_url: &str, model: impl Into<String>) -> Result<Self, SummarizerError> {
        let client = reqwest::Client::builder().build().map_err(SummarizerError::Client)?;
        Ok(OpenAiSummarizer {
            client,
            endpoint: format!("{}/v1/chat/completions", base_url.trim_end_matches('/')),
            model: model.into(),
            api_key: None,
            timeout: Duration::from_secs(60),
        })
    }

    /// Sends `Authorization: Bearer {key}` with each request.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// Gives up on a request after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

#[async_trait]
impl Summarizer for OpenAiSummarizer {
    async fn summarize(&self, request: SummaryRequest) -> Result<String, SummarizerError> {
        let body = json!({
            "model": self.model,
            "messages": [
                {"role": "system", "content": SUMMARY_INSTRUCTIONS},
                {"role": "user", "content": transcript(&request.messages)},
            ],
            "max_tokens": request.max_tokens,
            // Greedy decoding keeps compaction as deterministic as the endpoint allows.
            "temperature": 0,
        });
        let mut call = self.client.post(&self.endpoint).timeout(self.timeout).json(&body);
        if let Some(key) = &self.api_key {
            call = call.bearer_auth(key);
        }
        let response = call.send().await.map_err(SummarizerError::Request)?;
        let status = response.status();
        if !status.is_success() {
            return Err(SummarizerError::Status {
                status: status.as_u16(),
            });
        }
        let answer: Value = response.json().await.map_err(SummarizerError::Request)?;
        answer
            .pointer("/choices/0/message/content")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(SummarizerError::MissingContent)
    }
}

/// The messages as a plain transcript, one block per message, tool calls spelled out.
fn transcript(messages: &[Message]) -> String {
    let mut text = String::new();
    for message in messages {
        let _ = writeln!(text, "[{}]\n{}", message.role, message.text());
        for call in message.tool_calls() {
            let _ = writeln!(text, "[tool call {}] {}", call.function.name, call.function.arguments);
        }
        text.push('\n');
    }
    text
}

/// A [`Summarizer`] from an async closure, for callers that summarise in-process.
///
/// ```
/// use rollbox::truncation::{FnSummarizer, SummaryRequest};
///
/// let summarizer = FnSummarizer(|request: SummaryRequest| async move {
///     Ok::<_, std::io::Error>(format!("{} messages about fitting a model", request.messages.len()))
/// });
/// # let _ = summarizer;
/// ```
pub struct FnSummarizer<F>(pub F);

#[async_trait]
impl<F, Fut, E> Summarizer for FnSummarizer<F>
where
    F: Fn(SummaryRequest) -> Fut + Send + Sync,
    Fut: Future<Output = Result<String, E>> + Send,
    E: Into<Box<dyn StdError + Send + Sync>>,
{
    async fn summarize(&self, request: SummaryRequest) -> Result<String, SummarizerError> {
        (self.0)(request)
            .await
            .map_err(|error| SummarizerError::Callback(error.into()))
    }
}
