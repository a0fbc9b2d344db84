//! Exact token counts: a Hugging Face `tokenizer.json` for the text, plus the chat template
//! around the messages: a built-in one whose fixed cost per message is counted once
//! ([`ChatTemplate`]), or the model's own Jinja template, rendered and tokenised
//! ([`TokenCounter::with_jinja`], [`Counting`]).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Mutex;

use tokenizers::parallelism::MaybeParallelIterator;
use tokenizers::utils::SysRegex;
use tokenizers::{Model, ModelWrapper, NormalizerWrapper, OffsetReferential, OffsetType, PreTokenizer, Tokenizer};

use crate::chat::{Content, Message, Role};

use super::TruncationError;
use super::added_tokens::{AddedTokenSplit, Piece};
use super::skeleton::SkeletonCache;
use super::template::{JinjaChatTemplate, ModelFiles, TemplateChoice};

/// The text a chat template wraps around messages, used to count their overhead in tokens.
///
/// Each string is tokenised once when a [`TokenCounter`] is built (per role, for
/// `message_start`), so the per-message overhead costs nothing afterwards. Placeholders:
/// `{role}` in `message_start`; `{name}` and `{arguments}` in `tool_call`.
///
/// The overhead is counted apart from the content. With special tokens like `<|im_start|>` that
/// is exact, because they split the text; the one exception is content that starts with a blank
/// line, whose newline can merge with the header's. Grouping quirks of a template (Qwen renders
/// consecutive tool results in one `user` block) are counted per message, which can only
/// overcount, so a result that fits by this count also fits the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// Text before a message's content, e.g. `<|im_start|>{role}\n`.
    pub message_start: String,
    /// Text after a message's content, e.g. `<|im_end|>\n`.
    pub message_end: String,
    /// Text before a [`Role::Tool`] message's content (replaces `message_start` for tool results).
    pub tool_result_start: String,
    /// Text after a [`Role::Tool`] message's content (replaces `message_end` for tool results).
    pub tool_result_end: String,
    /// How one tool call is rendered after the assistant's content.
    pub tool_call: String,
    /// Text appended once after the last message to prompt the model's reply.
    pub generation_prompt: String,
}

impl ChatTemplate {
    /// The ChatML template of Qwen2.5 and Qwen3 instruct models:
    ///
    /// ```text
    /// <|im_start|>{role}\n{content}<|im_end|>\n
    /// ```
    ///
    /// Assistant tool calls follow the content as
    /// `\n<tool_call>\n{"name": "{name}", "arguments": {arguments}}\n</tool_call>`; a tool result
    /// is rendered as `<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n`;
    /// and `<|im_start|>assistant\n` primes the reply. The default system prompt Qwen2.5 inserts
    /// when a conversation has none is not counted: the rollout always sends its own.
    pub fn qwen_chatml() -> Self {
        ChatTemplate {
            message_start: "<|im_start|>{role}\n".to_owned(),
            message_end: "<|im_end|>\n".to_owned(),
            tool_result_start: "<|im_start|>user\n<tool_response>\n".to_owned(),
            tool_result_end: "\n</tool_response><|im_end|>\n".to_owned(),
            tool_call: "\n<tool_call>\n{\"name\": \"{name}\", \"arguments\": {arguments}}\n</tool_call>".to_owned(),
            generation_prompt: "<|im_start|>assistant\n".to_owned(),
        }
    }

    /// No template at all: a message costs exactly its content's tokens (and tool calls their
    /// name and arguments). Useful for tests and for counting raw text.
    pub fn bare() -> Self {
        ChatTemplate {
            message_start: String::new(),
            message_end: String::new(),
            tool_result_start: String::new(),
            tool_result_end: String::new(),
            tool_call: "{name}{arguments}".to_owned(),
            generation_prompt: String::new(),
        }
    }

    fn render_tool_call(&self, name: &str, arguments: &str) -> String {
        self.tool_call.replace("{name}", name).replace("{arguments}", arguments)
    }
}

impl Default for ChatTemplate {
    /// [`ChatTemplate::qwen_chatml`].
    fn default() -> Self {
        ChatTemplate::qwen_chatml()
    }
}

/// Most message counts remembered by a [`TokenCounter`] (about 2.5 MB). A rollout's
/// conversation is a few hundred messages, so this holds dozens of concurrent rollouts; when it
/// fills up it is cleared, which costs one re-count, never a wrong count.
const COUNT_CACHE_CAPACITY: usize = 65_536;

/// Counts tokens for messages, exactly as the model's Hugging Face tokenizer does for the text.
///
/// Built once per model and shared; counting is `&self` and thread-safe. It remembers the count
/// of each message it has seen (keyed by a 64-bit hash of its role and texts), because the
/// rollout loop compacts before every model call and all but the newest messages were counted
/// on the previous call: only new or changed messages are tokenised again. For the same reason it
/// also remembers the Python skeleton of each code cell compacted with it, so all of a
/// conversation's caches live, and end, with the counter the caller holds.
pub struct TokenCounter {
    tokenizer: Tokenizer,
    cache: Mutex<HashMap<u64, usize>>,
    skeletons: SkeletonCache,
    template: ChatTemplate,
    /// Start plus end overhead for each role seen at construction (all the standard ones).
    role_overhead: HashMap<Role, usize>,
    generation_prompt_tokens: usize,
    /// The normalizer is absent or a Unicode normal form, which leaves ASCII text unchanged.
    normal_form_only: bool,
    /// The pre-tokenizer, when it is a regex split followed by GPT-2's byte-level mapping.
    byte_level_split: Option<ByteLevelSplit>,
    /// The model's own Jinja template, when one is used instead of `template`.
    jinja: Option<JinjaCounting>,
    /// Where the template came from (for the CLI's warning when it fell back).
    origin: TemplateOrigin,
}

/// Where a [`TokenCounter`]'s chat template came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// A built-in [`ChatTemplate`], chosen by name.
    Builtin,
    /// A Jinja template: the model's own or a file, named by where it was read.
    Jinja(String),
    /// `auto` found no template in the model's files, so the built-in `qwen` one is used: counts
    /// are then exact only for a ChatML model.
    Fallback {
        /// What was looked at.
        model: std::path::PathBuf,
    },
}

/// How a Jinja template's prompts are counted. Chosen when the counter is built, by
/// [`probe_locality`]: the cheaper way is used only when it gave the full render's count on every
/// probe conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// Message by message: each message adds the tokens it adds to a render of a short window of
    /// the conversation before it (the head up to the first user message, and the
    /// [`WINDOW_MESSAGES`] messages just before). A rollout loop renders and tokenises only the
    /// messages it has not seen.
    Windowed,
    /// The whole conversation is rendered for each count, because the template renders a message
    /// differently depending on messages far from it (DeepSeek's first tool call, Qwen3's
    /// reasoning kept only after the last user query). The render's pieces between special tokens
    /// are still tokenised only once each.
    FullRender,
}

/// Messages before the current one that a [`Counting::Windowed`] window holds besides the head.
pub const WINDOW_MESSAGES: usize = 3;
/// Most head messages (leading system messages and the first user message) a window holds.
const MAX_ANCHOR: usize = 4;

/// A Jinja template and the caches of counting with it.
struct JinjaCounting {
    template: JinjaChatTemplate,
    counting: Counting,
    /// Whether a render's token count is the sum of its pieces between added tokens (see
    /// [`TokenCounter::count_rendered`]).
    piece_split: bool,
    /// Our own split at added tokens, when the tokenizer's added tokens allow it.
    added_split: Option<AddedTokenSplit>,
    /// Token counts of render pieces between added tokens, by hash.
    pieces: Mutex<HashMap<u64, usize>>,
    /// What a message adds to the render of its window, by hash of tools, window and message.
    deltas: Mutex<HashMap<u64, i64>>,
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCounter")
            .field("template", &self.template)
            .field("role_overhead", &self.role_overhead)
            .field("origin", &self.origin)
            .field("counting", &self.counting())
            .finish_non_exhaustive()
    }
}

impl TokenCounter {
    /// Loads `tokenizer.json` from `path` and pairs it with `template`.
    pub fn from_file(path: impl AsRef<Path>, template: ChatTemplate) -> Result<Self, TruncationError> {
        TokenCounter::new(load_tokenizer(path.as_ref())?, template)
    }

    /// Pairs an already loaded tokenizer with `template`.
    pub fn new(tokenizer: Tokenizer, template: ChatTemplate) -> Result<Self, TruncationError> {
        let normal_form_only = matches!(
            tokenizer.get_normalizer(),
            None | Some(
                NormalizerWrapper::NFC(_)
                    | NormalizerWrapper::NFD(_)
                    | NormalizerWrapper::NFKC(_)
                    | NormalizerWrapper::NFKD(_)
            )
        );
        let mut counter = TokenCounter {
            byte_level_split: ByteLevelSplit::of(&tokenizer),
            normal_form_only,
            tokenizer,
            template,
            cache: Mutex::new(HashMap::new()),
            skeletons: SkeletonCache::default(),
            role_overhead: HashMap::new(),
            generation_prompt_tokens: 0,
            jinja: None,
            origin: TemplateOrigin::Builtin,
        };
        counter.measure_template()?;
        Ok(counter)
    }

    /// Loads a model's tokenizer and chat template. `path` is a model folder (`tokenizer.json`
    /// beside `tokenizer_config.json`, and perhaps `chat_template.jinja`) or a `tokenizer.json`
    /// alone.
    ///
    /// [`TemplateChoice::Auto`] renders the model's own Jinja template; when the model ships none
    /// (or only a `tokenizer.json` was given), it falls back to [`ChatTemplate::qwen_chatml`] and
    /// [`TokenCounter::template_origin`] says so, for the caller to warn.
    pub fn from_model(path: impl AsRef<Path>, choice: &TemplateChoice) -> Result<Self, TruncationError> {
        let files = ModelFiles::locate(path.as_ref());
        let jinja = match choice {
            TemplateChoice::Qwen => return TokenCounter::from_file(&files.tokenizer, ChatTemplate::qwen_chatml()),
            TemplateChoice::Bare => return TokenCounter::from_file(&files.tokenizer, ChatTemplate::bare()),
            TemplateChoice::File(template) => JinjaChatTemplate::from_file(template, files.folder.as_deref())?,
            TemplateChoice::Auto => match &files.folder {
                Some(folder) => match JinjaChatTemplate::from_model_folder(folder)? {
                    Some(jinja) => jinja,
                    None => return TokenCounter::fallback(&files, folder),
                },
                None => return TokenCounter::fallback(&files, &files.tokenizer),
            },
        };
        let tokenizer = load_tokenizer(&files.tokenizer)?;
        TokenCounter::with_jinja(tokenizer, jinja)
    }

    fn fallback(files: &ModelFiles, looked_at: &Path) -> Result<Self, TruncationError> {
        let mut counter = TokenCounter::from_file(&files.tokenizer, ChatTemplate::qwen_chatml())?;
        counter.origin = TemplateOrigin::Fallback {
            model: looked_at.to_owned(),
        };
        Ok(counter)
    }

    /// Pairs an already loaded tokenizer with a Jinja chat template, and probes the template to
    /// choose how to count with it ([`Counting`]).
    pub fn with_jinja(tokenizer: Tokenizer, template: JinjaChatTemplate) -> Result<Self, TruncationError> {
        let piece_split = pieces_add_up(&tokenizer);
        let added_split = AddedTokenSplit::of(&tokenizer);
        let origin = TemplateOrigin::Jinja(template.name().to_owned());
        let mut counter = TokenCounter::new(tokenizer, ChatTemplate::bare())?;
        counter.origin = origin;
        counter.jinja = Some(JinjaCounting {
            template,
            // Until the probe has chosen: the full render is right for every template.
            counting: Counting::FullRender,
            piece_split,
            added_split,
            pieces: Mutex::new(HashMap::new()),
            deltas: Mutex::new(HashMap::new()),
        });
        counter.measure_template()?;
        let counting = probe_locality(&counter)?;
        if let Some(jinja) = &mut counter.jinja {
            jinja.counting = counting;
        }
        Ok(counter)
    }

    /// Where the chat template came from.
    pub fn template_origin(&self) -> &TemplateOrigin {
        &self.origin
    }

    /// How prompts are counted with a Jinja template; `None` with a built-in one.
    pub fn counting(&self) -> Option<Counting> {
        self.jinja.as_ref().map(|jinja| jinja.counting)
    }

    /// Whether per-message counts are only an estimate of what a message adds, so a strategy
    /// must check its result with [`TokenCounter::count_prompt`] (true for Jinja templates).
    pub(crate) fn needs_exact_check(&self) -> bool {
        self.jinja.is_some()
    }

    /// Counts the generation prompt and each role's overhead once, with the template in use.
    fn measure_template(&mut self) -> Result<(), TruncationError> {
        self.generation_prompt_tokens = match &self.jinja {
            None => self.count_text(&self.template.generation_prompt)?,
            Some(jinja) => {
                let context = canonical_context(&Role::User);
                let with = self.count_rendered(&jinja.template.render(&context, &[], true)?)?;
                with.saturating_sub(self.count_rendered(&jinja.template.render(&context, &[], false)?)?)
            }
        };
        self.role_overhead.clear();
        for role in [Role::System, Role::Developer, Role::User, Role::Assistant, Role::Tool] {
            // A template may reject a role (Gemma has no tool role): then it has no overhead to
            // bound with, and counting such a message reports the template's error.
            if let Ok(overhead) = self.compute_role_overhead(&role) {
                self.role_overhead.insert(role, overhead);
            }
        }
        Ok(())
    }

    /// The chat template this counter adds to each message.
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// Tokens in `text` alone, without special tokens added around it: the length of
    /// `tokenizer.encode(text, add_special_tokens=False)` in Hugging Face.
    ///
    /// Runs the tokenizer's own steps (added tokens, normalizer, pre-tokenizer, model) and only
    /// counts: no `Encoding` (ids, offsets, word indices) is built. A Unicode normal form leaves
    /// ASCII text as it is, so for ASCII text such a normalizer is skipped.
    pub fn count_text(&self, text: &str) -> Result<usize, TruncationError> {
        if text.is_empty() {
            return Ok(0);
        }
        let counting = |error| TruncationError::CountTokens { source: error };
        let skip_normalizer = self.normal_form_only && text.is_ascii();
        let normalizer = if skip_normalizer {
            None
        } else {
            self.tokenizer.get_normalizer()
        };
        let mut pretokenized = self
            .tokenizer
            .get_added_vocabulary()
            .extract_and_normalize(normalizer, text);
        // The same splits and byte mapping as the pre-tokenizer, without its bookkeeping.
        let byte_level_split = self.byte_level_split.as_ref().filter(|_| skip_normalizer);
        if byte_level_split.is_none()
            && let Some(pre_tokenizer) = self.tokenizer.get_pre_tokenizer()
        {
            pre_tokenizer.pre_tokenize(&mut pretokenized).map_err(counting)?;
        }
        let model = self.tokenizer.get_model();
        let mut mapped = String::new();
        let mut count = 0;
        for (piece, _, tokens) in pretokenized.get_splits(OffsetReferential::Normalized, OffsetType::None) {
            count += match (tokens, byte_level_split) {
                // An added (special) token, already split out.
                (Some(tokens), _) => tokens.len(),
                (None, Some(split)) => split.count(piece, model, &mut mapped).map_err(counting)?,
                (None, None) => model.tokenize(piece).map_err(counting)?.len(),
            };
        }
        Ok(count)
    }

    /// Tokens the template adds once to prompt the reply (counted once per conversation).
    pub fn generation_prompt_tokens(&self) -> usize {
        self.generation_prompt_tokens
    }

    /// Tokens one message costs in the rendered prompt: its template overhead, its text and its
    /// tool calls.
    ///
    /// With a Jinja template this is what the message adds when it is appended to a short
    /// conversation of its role's usual predecessors (system, user, and an assistant tool call
    /// before a tool result): an estimate, as the template may render a message differently
    /// elsewhere. [`TokenCounter::count_prompt`] is exact.
    pub fn count_message(&self, message: &Message) -> Result<usize, TruncationError> {
        Ok(self.count_each(&[message])?[0])
    }

    /// [`TokenCounter::count_message`] for every message, counting all of them in one parallel
    /// batch.
    pub fn count_messages(&self, messages: &[Message]) -> Result<Vec<usize>, TruncationError> {
        self.count_each(&messages.iter().collect::<Vec<_>>())
    }

    /// [`TokenCounter::count_messages`] for messages that are not contiguous (a plan counts the
    /// versions it chose, some original and some compacted).
    pub(crate) fn count_each(&self, messages: &[&Message]) -> Result<Vec<usize>, TruncationError> {
        let keys: Vec<u64> = messages.iter().map(|message| self.cache_key(message)).collect();
        let cached: Vec<Option<usize>> = {
            let cache = self.lock_cache();
            keys.iter().map(|key| cache.get(key).copied()).collect()
        };
        if let Some(jinja) = &self.jinja {
            return self.count_each_rendered(jinja, messages, &keys, cached);
        }
        let mut texts: Vec<String> = Vec::new();
        let mut owners: Vec<usize> = Vec::new();
        let mut counts = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            if let Some(count) = cached[index] {
                counts.push(count);
                continue;
            }
            counts.push(self.overhead(&message.role)?);
            for piece in self.pieces(message) {
                if !piece.is_empty() {
                    texts.push(piece);
                    owners.push(index);
                }
            }
        }
        // On the tokenizer's own thread pool, as its batch encoding would be.
        let text_counts: Vec<usize> = texts
            .into_maybe_par_iter()
            .map(|text| self.count_text(&text))
            .collect::<Result<_, _>>()?;
        for (owner, tokens) in owners.into_iter().zip(text_counts) {
            counts[owner] += tokens;
        }
        let fresh: Vec<(u64, usize)> = (0..messages.len())
            .filter(|&index| cached[index].is_none())
            .map(|index| (keys[index], counts[index]))
            .collect();
        self.remember(&fresh);
        Ok(counts)
    }

    /// Tokens for the whole prompt: every message plus the generation prompt.
    pub fn count_conversation(&self, messages: &[Message]) -> Result<usize, TruncationError> {
        self.count_prompt(messages, &[])
    }

    /// Tokens for the whole prompt with the tool schemas `tools` (OpenAI's `tools` array) offered:
    /// what the server's tokenizer makes of the template's render of it, generation prompt
    /// included.
    ///
    /// With a Jinja template this is exact: the count equals
    /// `len(tokenizer.encode(render(messages, tools, add_generation_prompt=True),
    /// add_special_tokens=False))` (see [`Counting`] for how it stays incremental). With a
    /// built-in template, the tools are counted as one JSON line each, as Qwen's template lists
    /// them, without the instructions a model's template puts around the list.
    pub fn count_prompt(&self, messages: &[Message], tools: &[serde_json::Value]) -> Result<usize, TruncationError> {
        let Some(jinja) = &self.jinja else {
            let counts = self.count_messages(messages)?;
            let listing = tools
                .iter()
                .map(serde_json::Value::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            return Ok(counts.iter().sum::<usize>() + self.generation_prompt_tokens + self.count_text(&listing)?);
        };
        match jinja.counting {
            Counting::FullRender => self.count_rendered(&jinja.template.render(messages, tools, true)?),
            Counting::Windowed => self.count_windowed(jinja, messages, tools),
        }
    }

    /// Renders `messages` with the counter's Jinja template (`None` with a built-in template).
    pub fn render(
        &self,
        messages: &[Message],
        tools: &[serde_json::Value],
        add_generation_prompt: bool,
    ) -> Option<Result<String, TruncationError>> {
        let jinja = self.jinja.as_ref()?;
        Some(jinja.template.render(messages, tools, add_generation_prompt))
    }

    /// Tokens of a rendered prompt: the sum over its pieces between added tokens (each added
    /// token is one token, and the tokenizer handles the text between them piece by piece), each
    /// piece counted once and then remembered. A rollout's renders share almost all their pieces
    /// (a message's content sits between the same special tokens every time), so little is
    /// tokenised again.
    fn count_rendered(&self, text: &str) -> Result<usize, TruncationError> {
        let Some(jinja) = self.jinja.as_ref().filter(|jinja| jinja.piece_split) else {
            return self.count_text(text);
        };
        let mut count = 0;
        let mut missing: Vec<(u64, String)> = Vec::new();
        {
            let pieces = lock(&jinja.pieces);
            let mut visit = |piece: Piece<'_>| -> Result<(), std::convert::Infallible> {
                match piece {
                    Piece::Added => count += 1,
                    Piece::Text(piece) => {
                        let key = hash_of(piece);
                        match pieces.get(&key) {
                            Some(tokens) => count += tokens,
                            None => missing.push((key, piece.to_owned())),
                        }
                    }
                }
                Ok(())
            };
            match &jinja.added_split {
                // The same pieces as the library's split, without a `NormalizedString` of the
                // whole render.
                Some(split) => split.for_each_piece(text, visit),
                None => {
                    let split = self
                        .tokenizer
                        .get_added_vocabulary()
                        .extract_and_normalize(None::<&NormalizerWrapper>, text);
                    split
                        .get_splits(OffsetReferential::Original, OffsetType::None)
                        .into_iter()
                        .try_for_each(|(piece, _, tokens)| match tokens {
                            // An added token is one token; one piece holds one.
                            Some(tokens) => (0..tokens.len()).try_for_each(|_| visit(Piece::Added)),
                            None => visit(Piece::Text(piece)),
                        })
                }
            }
            .unwrap_or_else(|never| match never {});
        }
        let counted: Vec<(u64, usize)> = missing
            .into_maybe_par_iter()
            .map(|(key, piece)| Ok((key, self.count_text(&piece)?)))
            .collect::<Result<_, TruncationError>>()?;
        count += counted.iter().map(|(_, tokens)| tokens).sum::<usize>();
        remember_in(&jinja.pieces, &counted);
        Ok(count)
    }

    /// [`Counting::Windowed`]: the first message's render, then for each later message what it
    /// adds to the render of its window, then what the generation prompt adds to the last
    /// window. The sum telescopes to the full render's count when the template is local (which
    /// [`probe_locality`] checked).
    fn count_windowed(
        &self,
        jinja: &JinjaCounting,
        messages: &[Message],
        tools: &[serde_json::Value],
    ) -> Result<usize, TruncationError> {
        if messages.is_empty() {
            return self.count_rendered(&jinja.template.render(messages, tools, true)?);
        }
        let tools_key = hash_of(&serde_json::Value::from(tools.to_vec()).to_string());
        let keys: Vec<u64> = messages.iter().map(|message| self.cache_key(message)).collect();
        let anchor = anchor_len(messages);
        let mut total: i64 = 0;
        for index in 0..=messages.len() {
            let window = window_of(index, anchor);
            let mut hasher = DefaultHasher::new();
            (tools_key, index == messages.len()).hash(&mut hasher);
            window.iter().for_each(|&at| keys[at].hash(&mut hasher));
            keys.get(index).hash(&mut hasher);
            let key = hasher.finish();
            if let Some(&delta) = lock(&jinja.deltas).get(&key) {
                total += delta;
                continue;
            }
            let mut context: Vec<Message> = window.iter().map(|&at| messages[at].clone()).collect();
            let before = match context.is_empty() {
                true => 0,
                false => self.count_rendered(&jinja.template.render(&context, tools, false)?)?,
            };
            let after = match messages.get(index) {
                Some(message) => {
                    context.push(message.clone());
                    self.count_rendered(&jinja.template.render(&context, tools, false)?)?
                }
                None => self.count_rendered(&jinja.template.render(&context, tools, true)?)?,
            };
            let delta = after as i64 - before as i64;
            remember_in(&jinja.deltas, &[(key, delta)]);
            total += delta;
        }
        // A count is the length of a token list, so a sum of differences that telescopes to it
        // is never negative; a negative one would be a template that is not local after all.
        Ok(total.max(0) as usize)
    }

    /// [`TokenCounter::count_each`] with a Jinja template: each message not yet counted is
    /// appended to its role's canonical context (in parallel) and what it adds is its count.
    fn count_each_rendered(
        &self,
        jinja: &JinjaCounting,
        messages: &[&Message],
        keys: &[u64],
        cached: Vec<Option<usize>>,
    ) -> Result<Vec<usize>, TruncationError> {
        let missing: Vec<usize> = (0..messages.len()).filter(|&index| cached[index].is_none()).collect();
        let counted: Vec<usize> = missing
            .clone()
            .into_maybe_par_iter()
            .map(|index| self.appended_tokens(jinja, messages[index]))
            .collect::<Result<_, _>>()?;
        let mut counts: Vec<usize> = cached.into_iter().map(Option::unwrap_or_default).collect();
        let mut fresh = Vec::with_capacity(missing.len());
        for (index, tokens) in missing.into_iter().zip(counted) {
            counts[index] = tokens;
            fresh.push((keys[index], tokens));
        }
        self.remember(&fresh);
        Ok(counts)
    }

    /// What `message` adds when appended to its role's canonical context.
    fn appended_tokens(&self, jinja: &JinjaCounting, message: &Message) -> Result<usize, TruncationError> {
        let mut context = canonical_context(&message.role);
        let before = match context.is_empty() {
            true => 0,
            false => self.count_rendered(&jinja.template.render(&context, &[], false)?)?,
        };
        context.push(message.clone());
        let after = self.count_rendered(&jinja.template.render(&context, &[], false)?)?;
        Ok(after.saturating_sub(before))
    }

    /// The texts of a message that are tokenised separately: its content (each text part) and
    /// each rendered tool call. Owned, because batch encoding needs owned inputs anyway.
    fn pieces(&self, message: &Message) -> Vec<String> {
        let mut pieces = Vec::new();
        match &message.content {
            None => {}
            Some(Content::Text(text)) => pieces.push(text.clone()),
            // Non-text parts (images) are not counted: their cost depends on the vision
            // encoder, not on the tokenizer, and the rollouts this serves are text-only.
            Some(Content::Parts(parts)) => {
                pieces.extend(parts.iter().filter_map(|part| part.text.clone()));
            }
        }
        for call in message.tool_calls() {
            pieces.push(
                self.template
                    .render_tool_call(&call.function.name, &call.function.arguments),
            );
        }
        pieces
    }

    fn cache_key(&self, message: &Message) -> u64 {
        // DefaultHasher::new() uses fixed keys, so keys are stable within the process.
        let mut hasher = DefaultHasher::new();
        message.role.as_str().hash(&mut hasher);
        match &message.content {
            None => 0u8.hash(&mut hasher),
            Some(Content::Text(text)) => text.hash(&mut hasher),
            Some(Content::Parts(parts)) => parts.iter().for_each(|part| part.text.hash(&mut hasher)),
        }
        for call in message.tool_calls() {
            call.function.name.hash(&mut hasher);
            call.function.arguments.hash(&mut hasher);
        }
        hasher.finish()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, HashMap<u64, usize>> {
        lock(&self.cache)
    }

    fn remember(&self, counts: &[(u64, usize)]) {
        remember_in(&self.cache, counts);
    }

    /// The skeletons of code cells compacted with this counter.
    pub(crate) fn skeletons(&self) -> &SkeletonCache {
        &self.skeletons
    }

    /// The template's tokens around a message of `role` (0 for a role not seen at
    /// construction): a cheap bound used to size counting batches, never to count.
    pub(crate) fn overhead_tokens(&self, role: &Role) -> usize {
        self.role_overhead.get(role).copied().unwrap_or(0)
    }

    fn overhead(&self, role: &Role) -> Result<usize, TruncationError> {
        match self.role_overhead.get(role) {
            Some(&overhead) => Ok(overhead),
            None => self.compute_role_overhead(role),
        }
    }

    fn compute_role_overhead(&self, role: &Role) -> Result<usize, TruncationError> {
        if let Some(jinja) = &self.jinja {
            let empty = Message {
                content: Some(Content::Text(String::new())),
                ..canonical_message(role)
            };
            return self.appended_tokens(jinja, &empty);
        }
        let (start, end) = if *role == Role::Tool {
            (self.template.tool_result_start.clone(), &self.template.tool_result_end)
        } else {
            (
                self.template.message_start.replace("{role}", role.as_str()),
                &self.template.message_end,
            )
        };
        Ok(self.count_text(&start)? + self.count_text(end)?)
    }
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer, TruncationError> {
    Tokenizer::from_file(path).map_err(|source| TruncationError::LoadTokenizer {
        path: path.to_owned(),
        source,
    })
}

fn lock<V>(cache: &Mutex<HashMap<u64, V>>) -> std::sync::MutexGuard<'_, HashMap<u64, V>> {
    // A panic while holding the lock cannot leave a wrong count behind (inserts are single
    // operations), so a poisoned cache is still good.
    cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Adds `entries` to a cache, clearing it first when it would pass [`COUNT_CACHE_CAPACITY`]:
/// that costs a re-count, never a wrong count.
fn remember_in<V: Copy>(cache: &Mutex<HashMap<u64, V>>, entries: &[(u64, V)]) {
    let mut cache = lock(cache);
    if cache.len() + entries.len() > COUNT_CACHE_CAPACITY {
        cache.clear();
    }
    cache.extend(entries.iter().copied());
}

fn hash_of(text: &str) -> u64 {
    // DefaultHasher::new() uses fixed keys, so keys are stable within the process.
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// Whether a render's count is the sum of its pieces' counts between added tokens. The tokenizer
/// itself splits at added tokens and handles each piece on its own, so this holds unless a piece
/// is treated differently for being first (a Metaspace pre-tokenizer that prepends `▁` only to
/// the first piece) or an added token is matched only after a normalizer changed the text.
fn pieces_add_up(tokenizer: &Tokenizer) -> bool {
    let serialized = |value: Option<String>| value.unwrap_or_default().replace(' ', "");
    let pre_tokenizer = serialized(
        tokenizer
            .get_pre_tokenizer()
            .and_then(|p| serde_json::to_string(p).ok()),
    );
    let first_only = pre_tokenizer.contains("\"prepend_scheme\":\"first\"");
    let normalizer = serialized(tokenizer.get_normalizer().and_then(|n| serde_json::to_string(n).ok()));
    let no_op_normalizer = normalizer.is_empty() || normalizer == r#"{"type":"Sequence","normalizers":[]}"#;
    let normalized_added = tokenizer
        .get_added_vocabulary()
        .get_added_tokens_decoder()
        .values()
        .any(|token| token.normalized);
    !first_only && (no_op_normalizer || !normalized_added)
}

/// A short stand-in for a message of `role` in a canonical context.
fn canonical_message(role: &Role) -> Message {
    let text = |text: &str| Some(Content::Text(text.to_owned()));
    match role {
        Role::System => Message {
            content: text("You are a helpful assistant."),
            ..Message::system("")
        },
        Role::User => Message::user("Hello."),
        Role::Tool => Message {
            role: Role::Tool,
            content: text("1"),
            tool_call_id: Some("call_0".to_owned()),
            ..Message::user("")
        },
        // An assistant that calls a tool (content "", which every template can read), so a tool
        // result can follow it.
        _ => {
            let mut call = Message::assistant("");
            call.role = role.clone();
            call.tool_calls = Some(vec![crate::chat::ToolCall {
                id: "call_0".to_owned(),
                kind: "function".to_owned(),
                function: crate::chat::FunctionCall {
                    name: "python".to_owned(),
                    arguments: "{\"code\": \"1\"}".to_owned(),
                    extra: Default::default(),
                },
                extra: Default::default(),
            }]);
            call
        }
    }
}

/// The messages a message of `role` is appended to for its per-message count: those that
/// usually come before it (a system prompt, a user message, an assistant tool call before a
/// tool result), so role-order checks in templates pass.
fn canonical_context(role: &Role) -> Vec<Message> {
    let system = canonical_message(&Role::System);
    let user = canonical_message(&Role::User);
    match role {
        Role::System | Role::Developer => Vec::new(),
        Role::User => vec![system],
        Role::Tool => vec![system, user, canonical_message(&Role::Assistant)],
        _ => vec![system, user],
    }
}

/// How many leading messages every window keeps: the system messages and the first user
/// message (templates put tools and system prompts around them), at most [`MAX_ANCHOR`].
fn anchor_len(messages: &[Message]) -> usize {
    let head = match messages.iter().position(|m| m.role == Role::User) {
        Some(first_user) => first_user + 1,
        None => messages
            .iter()
            .take_while(|m| matches!(m.role, Role::System | Role::Developer))
            .count(),
    };
    head.min(MAX_ANCHOR)
}

/// The window before message `index`: the anchor, then the [`WINDOW_MESSAGES`] messages just
/// before `index`, in order and without repeats.
fn window_of(index: usize, anchor: usize) -> Vec<usize> {
    let recent = index.saturating_sub(WINDOW_MESSAGES).max(anchor.min(index));
    (0..anchor.min(index)).chain(recent..index).collect()
}

/// Decides how to count with a Jinja template: [`Counting::Windowed`] when, on every prefix of
/// the probe conversations (every role, tool calls, consecutive tool results, reasoning in
/// content, a late system message, runs longer than a window), with and without tools, the
/// windowed count equals the full render's; otherwise [`Counting::FullRender`]. A prefix the
/// template rejects in a full render proves nothing and is skipped; one it renders whole but
/// rejects in a window is a mismatch.
///
/// A probe is evidence, not proof: a template could depend on something no probe exercises.
/// The tests check every shipped template against full renders on generated conversations.
fn probe_locality(counter: &TokenCounter) -> Result<Counting, TruncationError> {
    let Some(jinja) = &counter.jinja else {
        return Ok(Counting::FullRender);
    };
    let tools = [
        serde_json::json!({"type": "function", "function": {"name": "python", "description": "Run code.", "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}),
    ];
    for conversation in probe_conversations() {
        for tools in [&tools[..0], &tools[..]] {
            for end in 1..=conversation.len() {
                let prefix = &conversation[..end];
                let Ok(full) = jinja.template.render(prefix, tools, true) else {
                    continue;
                };
                let full = counter.count_rendered(&full)?;
                match counter.count_windowed(jinja, prefix, tools) {
                    Ok(windowed) if windowed == full => {}
                    _ => return Ok(Counting::FullRender),
                }
            }
        }
    }
    Ok(Counting::Windowed)
}

/// The conversations [`probe_locality`] tries.
fn probe_conversations() -> Vec<Vec<Message>> {
    let call = |content: &str, calls: usize| {
        let mut message = canonical_message(&Role::Assistant);
        message.content = Some(Content::Text(content.to_owned()));
        let one = message.tool_calls.clone().unwrap_or_default();
        message.tool_calls = Some(one.iter().cycle().take(calls).cloned().collect());
        message
    };
    let tool = |text: &str| Message {
        content: Some(Content::Text(text.to_owned())),
        ..canonical_message(&Role::Tool)
    };
    let thought = "<think>\nLet me see.\n</think>\n\nThe answer is 4.";
    let mut agent = vec![
        Message::system("You are a careful agent."),
        Message::user("Compute 2 + 2, then check it."),
        call("", 1),
        tool("4"),
        Message::assistant(thought),
        call("Checking.", 2),
        tool("4"),
        tool("True"),
        Message::assistant(thought),
        call("", 1),
        tool("ok"),
        call("", 1),
        tool("ok"),
        Message::assistant("Done: 4."),
        Message::user("<tool_response>\nlate\n</tool_response>"),
        Message::assistant(thought),
        Message::user("Thanks. And 3 + 3?"),
        Message::assistant(thought),
        Message::system("Answer briefly."),
        Message::user("Last one."),
        Message::assistant("6."),
    ];
    // A chat that alternates strictly, for templates that accept nothing else.
    let mut chat = vec![Message::system("Be brief.")];
    for turn in 0..6 {
        chat.push(Message::user(format!("Question {turn}?")));
        chat.push(Message::assistant(match turn % 2 {
            0 => format!("Answer {turn}."),
            _ => thought.to_owned(),
        }));
    }
    let without_system = chat[1..].to_vec();
    agent.push(Message::user("Bye."));
    // The same agent with `null` content beside tool calls, as OpenAI sends it: some templates
    // (DeepSeek's) render tool calls only then, others (Qwen3's) reject it.
    let null_calls = agent
        .iter()
        .map(|message| match message.tool_calls().is_empty() {
            true => message.clone(),
            false => Message {
                content: None,
                ..message.clone()
            },
        })
        .collect();
    vec![agent, null_calls, chat, without_system]
}

/// A pre-tokenizer of the shape Qwen's and the GPT-2/GPT-4-style tokenizers use: a regex whose
/// matches, and the text between them, become the pieces (`Split`, `Isolated`), each then
/// mapped byte by byte to GPT-2's printable characters (`ByteLevel` without a prefix space or a
/// regex of its own). Counting through it gives the pre-tokenizer's pieces without building a
/// `NormalizedString` (with its per-byte alignments) for each, which is most of the cost of a
/// count.
struct ByteLevelSplit {
    regex: SysRegex,
    byte_chars: [char; 256],
}

impl ByteLevelSplit {
    /// `Some` only for exactly that shape, read from the pre-tokenizer's own serialised form.
    fn of(tokenizer: &Tokenizer) -> Option<ByteLevelSplit> {
        let config = serde_json::to_value(tokenizer.get_pre_tokenizer()?).ok()?;
        let [split, byte_level] = config.get("pretokenizers")?.as_array()?.as_slice() else {
            return None;
        };
        let is = |value: &serde_json::Value, key: &str, expected: serde_json::Value| value.get(key) == Some(&expected);
        let shape_matches = is(&config, "type", "Sequence".into())
            && is(split, "type", "Split".into())
            && is(split, "behavior", "Isolated".into())
            && is(split, "invert", false.into())
            && is(byte_level, "type", "ByteLevel".into())
            && is(byte_level, "add_prefix_space", false.into())
            && is(byte_level, "use_regex", false.into());
        if !shape_matches {
            return None;
        }
        let pattern = split.get("pattern")?.get("Regex")?.as_str()?;
        let regex = SysRegex::new(pattern).ok()?;
        Some(ByteLevelSplit {
            regex,
            byte_chars: gpt2_byte_chars(),
        })
    }

    /// The model's tokens for `text` (which holds no added token), piece by piece; `mapped` is
    /// scratch space.
    fn count(&self, text: &str, model: &ModelWrapper, mapped: &mut String) -> tokenizers::Result<usize> {
        let mut count = 0;
        let mut piece = |range: std::ops::Range<usize>| -> tokenizers::Result<()> {
            if range.is_empty() {
                return Ok(());
            }
            mapped.clear();
            mapped.extend(
                text.as_bytes()[range]
                    .iter()
                    .map(|&byte| self.byte_chars[byte as usize]),
            );
            count += model.tokenize(mapped)?.len();
            Ok(())
        };
        let mut end_of_last = 0;
        for (start, end) in self.regex.find_iter(text) {
            piece(end_of_last..start)?;
            piece(start..end)?;
            end_of_last = end;
        }
        piece(end_of_last..text.len())?;
        Ok(count)
    }
}

/// GPT-2's byte-to-character table: printable bytes map to themselves, the other 68 to the
/// characters from U+0100 on, in byte order.
fn gpt2_byte_chars() -> [char; 256] {
    let printable = |byte: u8| matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut table = ['\0'; 256];
    let mut next_unprintable = 0x100u32;
    for byte in 0..=255u8 {
        table[byte as usize] = if printable(byte) {
            char::from(byte)
        } else {
            let mapped = char::from_u32(next_unprintable).expect("U+0100 to U+0143 are characters");
            next_unprintable += 1;
            mapped
        };
    }
    table
}
