//! Text for people and models: output capped with a visible marker, and errors with their
//! causes on one line.

/// `text` cut to at most `max_bytes` (at a character boundary), followed by a marker saying how
/// many bytes were dropped; and whether it was cut.
pub fn cap_text(text: &str, max_bytes: usize) -> (String, bool) {
    if text.len() <= max_bytes {
        return (text.to_string(), false);
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut capped = String::with_capacity(end + 64);
    capped.push_str(&text[..end]);
    capped.push_str(&truncation_marker(text.len() - end));
    (capped, true)
}

/// The visible marker that replaces `dropped` bytes of output.
pub fn truncation_marker(dropped: usize) -> String {
    format!("{MARKER_HEAD}{dropped}{MARKER_TAIL}")
}

/// The marker's text before and after its byte count.
const MARKER_HEAD: &str = "\n[rollbox: output truncated, ";
const MARKER_TAIL: &str = " more bytes not shown]\n";

/// `text` without the [`truncation_marker`]s in it, and the bytes they said were dropped. For
/// callers that report truncation beside a stream instead of inside it (SandboxFusion's
/// `/run_code`, whose clients compare stdout byte for byte). Only call it on a stream the
/// backend said it truncated: a program may print marker-like text itself.
pub fn strip_truncation_markers(text: &str) -> (String, usize) {
    let mut kept = String::with_capacity(text.len());
    let mut dropped = 0usize;
    let mut rest = text;
    while let Some(at) = rest.find(MARKER_HEAD) {
        let after = &rest[at + MARKER_HEAD.len()..];
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[digits..]
            .starts_with(MARKER_TAIL)
            .then(|| after[..digits].parse::<usize>())
        {
            Some(Ok(count)) => {
                kept.push_str(&rest[..at]);
                dropped = dropped.saturating_add(count);
                rest = &after[digits + MARKER_TAIL.len()..];
            }
            _ => {
                // Not a marker after all: keep its first byte (a newline) and look further on.
                kept.push_str(&rest[..at + 1]);
                rest = &rest[at + 1..];
            }
        }
    }
    kept.push_str(rest);
    (kept, dropped)
}

/// `error` and each of its sources, joined with `": "`, for reports that keep no error value.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_are_stripped_and_their_counts_added_up() {
        let text = format!("abc{}tail{}", truncation_marker(12), truncation_marker(3));
        assert_eq!(strip_truncation_markers(&text), ("abctail".to_string(), 15));
        let lookalike = "x\n[rollbox: output truncated, many more bytes not shown]\n";
        assert_eq!(strip_truncation_markers(lookalike), (lookalike.to_string(), 0));
        let (capped, cut) = cap_text("hello world", 5);
        assert!(cut);
        assert_eq!(strip_truncation_markers(&capped), ("hello".to_string(), 6));
    }

    #[test]
    fn cap_text_cuts_at_a_char_boundary_and_says_how_much() {
        let (s, cut) = cap_text("héllo", 2);
        assert!(cut);
        assert!(s.starts_with('h') && !s.starts_with("hé"));
        assert!(s.contains("5 more bytes"));
        assert_eq!(cap_text("abc", 3), ("abc".to_string(), false));
    }
}
