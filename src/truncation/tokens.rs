//! Exact token counts: a Hugging Face `tokenizer.json` for the text, plus the fixed cost of the
//! chat template around each message.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::Path;
use std::sync::Mutex;

use tokenizers::parallelism::MaybeParallelIterator;
use tokenizers::utils::SysRegex;
use tokenizers::{Model, ModelWrapper, NormalizerWrapper, OffsetReferential, OffsetType, PreTokenizer, Tokenizer};

use crate::chat::{Content, Message, Role};

use super::TruncationError;
use super::skeleton::SkeletonCache;

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
}

impl std::fmt::Debug for TokenCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCounter")
            .field("template", &self.template)
            .field("role_overhead", &self.role_overhead)
            .finish_non_exhaustive()
    }
}

impl TokenCounter {
    /// Loads `tokenizer.json` from `path` and pairs it with `template`.
    pub fn from_file(path: impl AsRef<Path>, template: ChatTemplate) -> Result<Self, TruncationError> {
        let path = path.as_ref();
        let tokenizer = Tokenizer::from_file(path).map_err(|source| TruncationError::LoadTokenizer {
            path: path.to_owned(),
            source,
        })?;
        TokenCounter::new(tokenizer, template)
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
        };
        counter.generation_prompt_tokens = counter.count_text(&counter.template.generation_prompt)?;
        for role in [Role::System, Role::Developer, Role::User, Role::Assistant, Role::Tool] {
            let overhead = counter.compute_role_overhead(&role)?;
            counter.role_overhead.insert(role, overhead);
        }
        Ok(counter)
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
    pub fn count_message(&self, message: &Message) -> Result<usize, TruncationError> {
        let key = self.cache_key(message);
        if let Some(&count) = self.lock_cache().get(&key) {
            return Ok(count);
        }
        let mut total = self.overhead(&message.role)?;
        for piece in self.pieces(message) {
            total += self.count_text(&piece)?;
        }
        self.remember(&[(key, total)]);
        Ok(total)
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
        let counts = self.count_messages(messages)?;
        Ok(counts.iter().sum::<usize>() + self.generation_prompt_tokens)
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
        // A panic while holding the lock cannot leave a wrong count behind (inserts are single
        // operations), so a poisoned cache is still good.
        self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember(&self, counts: &[(u64, usize)]) {
        let mut cache = self.lock_cache();
        if cache.len() + counts.len() > COUNT_CACHE_CAPACITY {
            cache.clear();
        }
        cache.extend(counts.iter().copied());
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
