//! Who writes the assistant's turns: the offline [`OraclePolicy`], which plays a problem's
//! reference solution, or [`ChatClient`], an OpenAI-compatible `/v1/chat/completions` client.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::chat::Message;
use crate::rollout::code_blocks::{CodeTags, extract_code_blocks};
use crate::rollout::config::AgentKind;
use crate::rollout::dataset::Problem;
use crate::rollout::scan_cost::charge;

/// What a policy is asked for: the next assistant message of a conversation.
#[derive(Clone, Copy, Debug)]
pub struct TurnRequest<'a> {
    /// The problem being solved.
    pub problem: &'a Problem,
    /// The conversation so far.
    pub messages: &'a [Message],
    /// The OpenAI function schemas on offer (empty for the notebook agent).
    pub tools: &'a [Value],
    /// The 0-based index of the assistant turn being asked for.
    pub turn: usize,
    /// Which agent loop is asking.
    pub agent: AgentKind,
    /// The code tags of the notebook agent.
    pub code_tags: &'a CodeTags,
    /// The seed to sample with, in a seeded rollout: a model server gets it as the request's
    /// `seed`, which with temperature 0 makes its replies repeat where the server honours it.
    pub seed: Option<u64>,
}

/// Token counts as an OpenAI-compatible server reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Tokens generated.
    #[serde(default)]
    pub completion_tokens: u64,
    /// Their sum.
    #[serde(default)]
    pub total_tokens: u64,
}

/// One assistant turn and what is known about how it was made.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelReply {
    /// The assistant message, tool calls included.
    pub message: Message,
    /// Token usage, when the server reports it.
    pub usage: Option<Usage>,
    /// `choices[0].logprobs`, when the server returns them.
    pub logprobs: Option<Value>,
    /// `choices[0].finish_reason`.
    pub finish_reason: Option<String>,
    /// How many HTTP requests it took (1 without retries; 0 for the oracle).
    pub attempts: u32,
    /// What was wrong with the server's report of the reply (a `usage` count that is negative,
    /// a float, a string or absurdly large), each as a sentence; the reply itself was usable.
    pub anomalies: Vec<String>,
}

/// Why a policy gave no turn.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The problem has no `reference_solution` for the oracle to play.
    #[error("problem `{instance_id}` has no reference_solution for the oracle policy")]
    NoReferenceSolution {
        /// The problem.
        instance_id: String,
    },
    /// A `<tool_call>` block of a reference solution is not `{"name": ..., "arguments": {...}}`.
    #[error("turn {turn} of the reference solution of `{instance_id}` has a bad <tool_call> block: {message}")]
    BadReferenceToolCall {
        /// The problem.
        instance_id: String,
        /// The 1-based turn.
        turn: usize,
        /// What is wrong with it.
        message: String,
    },
    /// The reference solution has fewer turns than the agent asked for.
    #[error("the reference solution has only {turns} turns; the agent asked for turn {asked}")]
    OutOfTurns {
        /// How many turns the reference solution has.
        turns: usize,
        /// The 1-based turn asked for.
        asked: usize,
    },
    /// The request failed after every retry: the connection failed, or timed out or broke
    /// before or while the body was read.
    #[error("failed to call the model endpoint after {attempts} attempts")]
    Request {
        /// How many attempts were made.
        attempts: u32,
        /// The last failure.
        #[source]
        source: reqwest::Error,
    },
    /// The endpoint answered with an error status (after retries for 429 and 5xx).
    #[error("the model endpoint answered HTTP {status} after {attempts} attempts: {body}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// How many attempts were made.
        attempts: u32,
        /// The start of the response body.
        body: String,
    },
    /// The endpoint's response body passed the client's `max_response_bytes` (a server that
    /// streams without end, or a reply far larger than any completion). Reading stopped there;
    /// not retried.
    #[error(
        "the model endpoint's response passed the limit of {limit} bytes ({received} bytes read); \
         raise --max-response-bytes if replies this large are expected"
    )]
    ResponseTooLarge {
        /// The limit, in bytes.
        limit: usize,
        /// The bytes read (or announced by `Content-Length`) when reading stopped.
        received: u64,
        /// How many attempts were made.
        attempts: u32,
    },
    /// The endpoint answered 2xx with a body that is not JSON: cut-off or malformed JSON, bytes
    /// that are not UTF-8 inside it, or a server-sent-events stream. Not retried.
    #[error("the model endpoint's response body is not JSON")]
    NotJson {
        /// Why it does not parse.
        #[source]
        source: serde_json::Error,
    },
    /// The endpoint answered 2xx with JSON that is not a chat completion (no `choices[0]`, no
    /// message, a message of the wrong shape). Not retried.
    #[error("the model endpoint's response is not a chat completion: {message}")]
    Decode {
        /// What is missing or wrong.
        message: String,
    },
}

impl PolicyError {
    /// A short, stable name for counting errors by kind. The model client's kinds:
    /// - `model_request`: the connection failed, or broke while the body was read, on every
    ///   attempt;
    /// - `model_timeout`: the request timed out (before the headers or while reading the
    ///   body) on every attempt;
    /// - `model_http_status` / `model_rate_limited`: an error status (429 for the latter);
    /// - `model_response_too_large`: the body passed `max_response_bytes`;
    /// - `model_bad_response`: a body that arrived whole but is not a chat completion (not JSON,
    ///   not UTF-8, an SSE stream, no `choices[0].message`).
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::NoReferenceSolution { .. } => "oracle_no_reference",
            PolicyError::OutOfTurns { .. } => "oracle_out_of_turns",
            PolicyError::BadReferenceToolCall { .. } => "oracle_bad_tool_call",
            PolicyError::Request { source, .. } if source.is_timeout() => "model_timeout",
            PolicyError::Request { .. } => "model_request",
            PolicyError::Status { status: 429, .. } => "model_rate_limited",
            PolicyError::Status { .. } => "model_http_status",
            PolicyError::ResponseTooLarge { .. } => "model_response_too_large",
            // One kind for every body that arrived whole but is not a chat completion.
            PolicyError::NotJson { .. } | PolicyError::Decode { .. } => "model_bad_response",
        }
    }
}

/// A source of assistant turns. Object-safe: use it as `Arc<dyn Policy>`.
#[async_trait]
pub trait Policy: Send + Sync {
    /// A short name for summaries (`oracle`, or the model's name).
    fn name(&self) -> &str;

    /// Whether this policy plays reference solutions rather than asking a model.
    fn is_oracle(&self) -> bool {
        false
    }

    /// The next assistant message.
    async fn next_turn(&self, request: TurnRequest<'_>) -> Result<ModelReply, PolicyError>;
}

/// Plays a problem's `reference_solution` as the assistant's turns, offline.
///
/// For the `tools` agent, each turn's code blocks become `python` tool calls, so the same
/// reference solutions drive both agents; and each Hermes-style
/// `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` block becomes a call of that tool
/// (the calculator, a user tool, any tool), so a reference solution can use every tool. Calls
/// keep the order they have in the text, with ids `call_<turn>_<n>`. The notebook agent ignores
/// `<tool_call>` blocks.
#[derive(Clone, Copy, Debug, Default)]
pub struct OraclePolicy;

#[async_trait]
impl Policy for OraclePolicy {
    fn name(&self) -> &str {
        "oracle"
    }

    fn is_oracle(&self) -> bool {
        true
    }

    async fn next_turn(&self, request: TurnRequest<'_>) -> Result<ModelReply, PolicyError> {
        let turns = request
            .problem
            .reference_solution
            .as_ref()
            .ok_or_else(|| PolicyError::NoReferenceSolution {
                instance_id: request.problem.instance_id.clone(),
            })?;
        let text = turns.get(request.turn).ok_or(PolicyError::OutOfTurns {
            turns: turns.len(),
            asked: request.turn + 1,
        })?;
        let mut message = Message::assistant(text.clone());
        if request.agent == AgentKind::Tools {
            let calls =
                reference_tool_calls(text, request.code_tags).map_err(|message| PolicyError::BadReferenceToolCall {
                    instance_id: request.problem.instance_id.clone(),
                    turn: request.turn + 1,
                    message,
                })?;
            for (n, (name, arguments)) in calls.into_iter().enumerate() {
                message = message.with_tool_call(format!("call_{}_{n}", request.turn), name, arguments);
            }
        }
        Ok(ModelReply {
            message,
            usage: None,
            logprobs: None,
            finish_reason: Some("stop".to_owned()),
            attempts: 0,
            anomalies: Vec::new(),
        })
    }
}

pub(crate) const TOOL_CALL_OPEN: &str = "<tool_call>";
const TOOL_CALL_CLOSE: &str = "</tool_call>";

/// The tool calls a reference turn makes, in text order: `python` for each code block, and the
/// tool each `<tool_call>` block names, as (name, JSON arguments).
///
/// One forward pass: each piece of text is searched once for the next tag, and each block's JSON
/// is parsed by serde_json, whose nesting limit (128) bounds its recursion.
fn reference_tool_calls(text: &str, tags: &CodeTags) -> Result<Vec<(String, String)>, String> {
    let mut calls = Vec::new();
    let mut rest = text;
    loop {
        let (before, block) = match rest.split_once(TOOL_CALL_OPEN) {
            Some((before, after)) => (before, Some(after)),
            None => (rest, None),
        };
        charge(before.len() + TOOL_CALL_OPEN.len());
        for code in extract_code_blocks(before, tags) {
            calls.push(("python".to_owned(), json!({ "code": code.code }).to_string()));
        }
        let Some(block) = block else { return Ok(calls) };
        let (body, after) = block
            .split_once(TOOL_CALL_CLOSE)
            .ok_or("it has no closing </tool_call>")?;
        charge(body.len() + TOOL_CALL_CLOSE.len());
        let call: Value = serde_json::from_str(body.trim()).map_err(|e| format!("it is not JSON ({e})"))?;
        let name = call
            .get("name")
            .and_then(Value::as_str)
            .ok_or("it has no string `name`")?;
        let arguments = call
            .get("arguments")
            .filter(|a| a.is_object())
            .ok_or("its `arguments` is not an object")?;
        calls.push((name.to_owned(), arguments.to_string()));
        rest = after;
    }
}

/// The default response body limit: 8 MiB. A completion of 32k tokens with top-5 logprobs is
/// about 2 to 4 MB of JSON, so this is a few MB above any real reply, and far below what a server
/// streaming without end would cost.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// How a [`ChatClient`] talks to its endpoint.
#[derive(Clone, Debug)]
pub struct ChatClientConfig {
    /// The server's base URL (`http://localhost:8000/v1`) or the full
    /// `.../chat/completions` URL.
    pub url: String,
    /// The `model` field of each request.
    pub model: String,
    /// A bearer token, if the server needs one.
    pub api_key: Option<String>,
    /// Most requests in flight at once, across every trajectory.
    pub max_in_flight: usize,
    /// Retries after the first attempt, for 429, 5xx, connection failures, and timeouts or
    /// broken connections before or while the body is read (one rule for every failure to
    /// receive a whole response).
    pub max_retries: u32,
    /// The wait before the first retry; it doubles per retry up to `max_backoff`, each wait
    /// jittered down by up to half. A `Retry-After` header in seconds is honoured when it asks
    /// for longer.
    pub initial_backoff: Duration,
    /// The longest wait between retries.
    pub max_backoff: Duration,
    /// The time limit of one HTTP request, body included.
    pub request_timeout: Duration,
    /// The largest response body read, in bytes; reading stops as soon as a body passes it
    /// ([`PolicyError::ResponseTooLarge`]).
    pub max_response_bytes: usize,
    /// Sampling temperature, if set.
    pub temperature: Option<f64>,
    /// Most tokens per reply, if set.
    pub max_tokens: Option<u32>,
    /// Ask for logprobs of the sampled tokens.
    pub logprobs: bool,
}

impl ChatClientConfig {
    /// Defaults for `url` and `model`: 16 requests in flight, 4 retries from 1 s backing off to
    /// 30 s, a 300 s request timeout, an 8 MiB response limit ([`DEFAULT_MAX_RESPONSE_BYTES`]),
    /// the server's own sampling defaults, logprobs requested.
    pub fn new(url: impl Into<String>, model: impl Into<String>) -> Self {
        ChatClientConfig {
            url: url.into(),
            model: model.into(),
            api_key: None,
            max_in_flight: 16,
            max_retries: 4,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            request_timeout: Duration::from_secs(300),
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            temperature: None,
            max_tokens: None,
            logprobs: true,
        }
    }
}

/// The HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
#[error("failed to build the HTTP client for the model endpoint")]
pub struct ChatClientError(#[source] reqwest::Error);

/// An OpenAI-compatible chat-completions client (vLLM, SGLang, llama.cpp's server, OpenAI).
#[derive(Clone, Debug)]
pub struct ChatClient {
    http: reqwest::Client,
    endpoint: String,
    config: ChatClientConfig,
    in_flight: Arc<Semaphore>,
}

/// How much of an error body is kept in a [`PolicyError::Status`].
const ERROR_BODY_CHARS: usize = 500;

/// How much of an error status's body is read: enough for [`ERROR_BODY_CHARS`] characters of
/// any UTF-8.
const ERROR_BODY_BYTES: usize = 4 * ERROR_BODY_CHARS;

impl ChatClient {
    /// A client for `config`'s endpoint.
    pub fn new(config: ChatClientConfig) -> Result<Self, ChatClientError> {
        let http = reqwest::Client::builder()
            .timeout(config.request_timeout)
            .build()
            .map_err(ChatClientError)?;
        let base = config.url.trim_end_matches('/');
        let endpoint = if base.ends_with("/chat/completions") {
            base.to_owned()
        } else {
            format!("{base}/chat/completions")
        };
        let in_flight = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
        Ok(ChatClient {
            http,
            endpoint,
            config,
            in_flight,
        })
    }

    /// The URL requests go to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn body(&self, messages: &[Message], tools: &[Value]) -> Value {
        let mut body = json!({ "model": self.config.model, "messages": messages });
        if !tools.is_empty() {
            body["tools"] = json!(tools);
        }
        if let Some(t) = self.config.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(n) = self.config.max_tokens {
            body["max_tokens"] = json!(n);
        }
        if self.config.logprobs {
            body["logprobs"] = json!(true);
        }
        body
    }

    /// The wait before retry number `retry` (0-based): the doubled backoff with "equal jitter"
    /// (between half and all of it), so trajectories rate-limited together do not retry in
    /// lockstep; never shorter than the server's `Retry-After`, never longer than `max_backoff`.
    fn backoff(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        use std::hash::BuildHasher;
        let doubled = self
            .config
            .initial_backoff
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.config.max_backoff);
        // `RandomState` is seeded randomly per instance: std's randomness, without a new crate.
        let unit = (std::collections::hash_map::RandomState::new().hash_one(retry) % 1024) as f64 / 1024.0;
        let jittered = doubled.mul_f64(0.5 + 0.5 * unit);
        jittered.max(retry_after.unwrap_or_default().min(self.config.max_backoff))
    }

    /// Sends one request and reads its body (up to the limit), holding an in-flight permit only
    /// while it is on the wire: the status, any `Retry-After`, the body.
    async fn send_once(&self, body: &Value) -> Result<(reqwest::StatusCode, Option<Duration>, Vec<u8>), Received> {
        // The semaphore is never closed, so acquiring only waits.
        let _permit = self.in_flight.acquire().await;
        let mut request = self.http.post(&self.endpoint).json(body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(Received::Failed)?;
        let status = response.status();
        let retry_after = retry_after(&response);
        let bytes = read_body(response, self.config.max_response_bytes).await?;
        Ok((status, retry_after, bytes))
    }
}

#[async_trait]
impl Policy for ChatClient {
    fn name(&self) -> &str {
        &self.config.model
    }

    async fn next_turn(&self, request: TurnRequest<'_>) -> Result<ModelReply, PolicyError> {
        let mut body = self.body(request.messages, request.tools);
        if let Some(seed) = request.seed {
            body["seed"] = json!(seed);
        }
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let retries_left = attempt <= self.config.max_retries;
            // One rule for every failure to receive a whole response: a connection that fails,
            // or times out or breaks before the headers or while the body is read, is retried.
            let (status, retry_after, bytes) = match self.send_once(&body).await {
                Ok(received) => received,
                Err(Received::Failed(source)) if retries_left && is_transient(&source) => {
                    tokio::time::sleep(self.backoff(attempt - 1, None)).await;
                    continue;
                }
                Err(Received::Failed(source)) => {
                    return Err(PolicyError::Request {
                        attempts: attempt,
                        source,
                    });
                }
                Err(Received::TooLarge { received }) => {
                    return Err(PolicyError::ResponseTooLarge {
                        limit: self.config.max_response_bytes,
                        received,
                        attempts: attempt,
                    });
                }
            };
            if status.is_success() {
                let value: Value = serde_json::from_slice(&bytes).map_err(|source| PolicyError::NotJson { source })?;
                return parse_completion(value, attempt);
            }
            let retryable = status.as_u16() == 429 || status.is_server_error();
            if retryable && retries_left {
                tokio::time::sleep(self.backoff(attempt - 1, retry_after)).await;
                continue;
            }
            let body: String = String::from_utf8_lossy(&bytes).chars().take(ERROR_BODY_CHARS).collect();
            return Err(PolicyError::Status {
                status: status.as_u16(),
                attempts: attempt,
                body,
            });
        }
    }
}

/// Whether a failure to receive a response is worth another attempt: a connection that failed,
/// a timeout (before the headers or while reading the body), or a body cut off mid-way.
fn is_transient(error: &reqwest::Error) -> bool {
    error.is_timeout() || error.is_connect() || error.is_body()
}

/// Why one attempt produced no whole response.
enum Received {
    /// The request or the body read failed.
    Failed(reqwest::Error),
    /// The body passed the limit after this many bytes (or announced that many).
    TooLarge { received: u64 },
}

/// The `Retry-After` header in seconds, if the response has one.
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
}

/// Reads `response`'s body chunk by chunk, stopping as soon as it passes `limit` bytes; a
/// `Content-Length` above the limit is refused before reading anything. An error status's body
/// is read only up to [`ERROR_BODY_BYTES`] (it is kept for the message, not parsed), and never
/// counts as too large.
async fn read_body(mut response: reqwest::Response, limit: usize) -> Result<Vec<u8>, Received> {
    let error_status = !response.status().is_success();
    let limit = if error_status { ERROR_BODY_BYTES } else { limit };
    if let Some(announced) = response.content_length()
        && announced > limit as u64
        && !error_status
    {
        return Err(Received::TooLarge { received: announced });
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Received::Failed)? {
        if body.len() + chunk.len() > limit {
            if error_status {
                body.extend_from_slice(&chunk[..limit - body.len()]);
                return Ok(body);
            }
            return Err(Received::TooLarge {
                received: (body.len() + chunk.len()) as u64,
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads `choices[0]` and `usage` of a chat completion.
fn parse_completion(mut value: Value, attempts: u32) -> Result<ModelReply, PolicyError> {
    let (usage, anomalies) = parse_usage(value.get("usage"));
    let choice = value
        .get_mut("choices")
        .and_then(|c| c.get_mut(0))
        .map(Value::take)
        .ok_or_else(|| PolicyError::Decode {
            message: "no choices[0]".to_owned(),
        })?;
    let message = choice
        .get("message")
        .cloned()
        .ok_or_else(|| PolicyError::Decode {
            message: "no choices[0].message".to_owned(),
        })
        .and_then(|m| {
            serde_json::from_value::<Message>(m).map_err(|e| PolicyError::Decode {
                message: format!("choices[0].message: {e}"),
            })
        })?;
    let logprobs = choice.get("logprobs").filter(|l| !l.is_null()).cloned();
    let finish_reason = choice.get("finish_reason").and_then(Value::as_str).map(str::to_owned);
    Ok(ModelReply {
        message,
        usage,
        logprobs,
        finish_reason,
        attempts,
        anomalies,
    })
}

/// The most tokens one reply's `usage` may report before it is recorded as an anomaly: far
/// above any context window, far below where sums could overflow.
pub const MAX_PLAUSIBLE_TOKENS: u64 = 1 << 40;

/// A chat completion's `usage`, and a sentence for each count that is not a plausible token
/// count. A count that is not a non-negative integer (negative, a float, a string) counts as 0;
/// an absurdly large one is kept as reported (sums saturate, see
/// [`crate::rollout::agent::TokenCounts`]). A missing or `null` usage is `None`, no anomaly.
pub fn parse_usage(usage: Option<&Value>) -> (Option<Usage>, Vec<String>) {
    let mut anomalies = Vec::new();
    let fields = match usage {
        None | Some(Value::Null) => return (None, anomalies),
        Some(Value::Object(fields)) => fields,
        Some(other) => {
            anomalies.push(format!("usage is {}, not an object; ignored", clip(other)));
            return (None, anomalies);
        }
    };
    let mut count = |name: &str| match fields.get(name) {
        None | Some(Value::Null) => 0,
        Some(value) => match value.as_u64() {
            Some(n) if n > MAX_PLAUSIBLE_TOKENS => {
                anomalies.push(format!(
                    "usage.{name} is {n}, past {MAX_PLAUSIBLE_TOKENS} (MAX_PLAUSIBLE_TOKENS); kept as reported"
                ));
                n
            }
            Some(n) => n,
            None => {
                anomalies.push(format!(
                    "usage.{name} is {}, not a non-negative integer; counted as 0",
                    clip(value)
                ));
                0
            }
        },
    };
    let usage = Usage {
        prompt_tokens: count("prompt_tokens"),
        completion_tokens: count("completion_tokens"),
        total_tokens: count("total_tokens"),
    };
    (Some(usage), anomalies)
}

/// A JSON value as text for an anomaly, cut to a few dozen characters.
fn clip(value: &Value) -> String {
    const MAX_CHARS: usize = 40;
    let text = value.to_string();
    match text.char_indices().nth(MAX_CHARS) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text,
    }
}
