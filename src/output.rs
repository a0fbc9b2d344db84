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
    format!("\n[rollbox: output truncated, {dropped} more bytes not shown]\n")
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
    fn cap_text_cuts_at_a_char_boundary_and_says_how_much() {
        let (s, cut) = cap_text("héllo", 2);
        assert!(cut);
        assert!(s.starts_with('h') && !s.starts_with("hé"));
        assert!(s.contains("5 more bytes"));
        assert_eq!(cap_text("abc", 3), ("abc".to_string(), false));
    }
}
