//! Splitting a rendered prompt at the tokenizer's added tokens, as the tokenizer's own
//! `AddedVocabulary::extract_and_normalize` does with no normalizer, without its bookkeeping.
//!
//! The library builds a `NormalizedString` of the whole render, with two offsets for every byte,
//! and copies a slice of it for every piece, only to find where the special tokens are. For a
//! 128k-token conversation that was most of an exact count with a Jinja template (BENCHMARKS.md,
//! issue 19). Here the same two Aho-Corasick passes run over `&str` and hand out borrowed
//! pieces. Used only when the tokenizer's added tokens need none of the library's extra rules
//! (see [`AddedTokenSplit::of`]); otherwise the library's split is used.

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::Tokenizer;

/// The two sets of added tokens, matched as the library matches them.
pub(crate) struct AddedTokenSplit {
    /// Tokens matched on the text as it is (`normalized: false`, special tokens usually),
    /// first.
    raw: AhoCorasick,
    /// Tokens matched on the pieces between those (`normalized: true`), second.
    normalized: AhoCorasick,
}

/// One piece of a split text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Piece<'a> {
    /// Text between added tokens, tokenised on its own.
    Text(&'a str),
    /// One added token (one token).
    Added,
}

impl AddedTokenSplit {
    /// The split of `tokenizer`'s added tokens, or `None` when the library's split must be used:
    /// a token with `lstrip`, `rstrip` or `single_word` (they move a match's edges), an empty
    /// token, special tokens encoded as text, or a normalizer that changes a `normalized`
    /// token's text (its pattern would then be the normalized text, matched in normalized
    /// pieces). Patterns are matched leftmost-longest, as the library builds its tries.
    pub(crate) fn of(tokenizer: &Tokenizer) -> Option<AddedTokenSplit> {
        if tokenizer.get_encode_special_tokens() {
            return None;
        }
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        for token in tokenizer.get_added_vocabulary().get_added_tokens_decoder().values() {
            if token.lstrip || token.rstrip || token.single_word || token.content.is_empty() {
                return None;
            }
            if token.normalized {
                if let Some(normalizer) = tokenizer.get_normalizer() {
                    let mut text = tokenizers::NormalizedString::from(token.content.as_str());
                    tokenizers::Normalizer::normalize(normalizer, &mut text).ok()?;
                    if text.get() != token.content {
                        return None;
                    }
                }
                normalized.push(token.content.clone());
            } else {
                raw.push(token.content.clone());
            }
        }
        let build = |patterns: Vec<String>| {
            AhoCorasick::builder()
                .match_kind(MatchKind::LeftmostLongest)
                .build(patterns)
                .ok()
        };
        Some(AddedTokenSplit {
            raw: build(raw)?,
            normalized: build(normalized)?,
        })
    }

    /// Calls `each` with the pieces of `text` in order: the raw tokens first, then the
    /// normalized ones inside the text between them. Empty text between two tokens is skipped,
    /// as the library skips it.
    pub(crate) fn for_each_piece<E>(
        &self,
        text: &str,
        mut each: impl FnMut(Piece<'_>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut start = 0;
        for found in self.raw.find_iter(text) {
            self.split_normalized(&text[start..found.start()], &mut each)?;
            each(Piece::Added)?;
            start = found.end();
        }
        self.split_normalized(&text[start..], &mut each)
    }

    fn split_normalized<E>(&self, text: &str, each: &mut impl FnMut(Piece<'_>) -> Result<(), E>) -> Result<(), E> {
        let mut start = 0;
        for found in self.normalized.find_iter(text) {
            if start < found.start() {
                each(Piece::Text(&text[start..found.start()]))?;
            }
            each(Piece::Added)?;
            start = found.end();
        }
        if start < text.len() {
            each(Piece::Text(&text[start..]))?;
        }
        Ok(())
    }
}
