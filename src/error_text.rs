//! Errors as one line of text, for reports that keep no error value (a trajectory's record, a
//! JSON answer, a log field).

/// `error` and each of its sources, joined with `": "`.
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
