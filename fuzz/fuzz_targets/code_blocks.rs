//! Code-block extraction from a model's reply (`rollbox::rollout::code_blocks`), with the
//! default tags and with tags taken from the input. Checks, besides no panic: every line of
//! every block's code is text of the reply, never invented. (Lines, not the whole block: the
//! extractor tidies a block, dropping blank edge lines and trailing whitespace and ending it
//! with one newline, which the first run of this target flagged as invented.)
#![no_main]

use libfuzzer_sys::fuzz_target;
use rollbox::rollout::code_blocks::{CodeTags, extract_code_blocks};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check(&text, &CodeTags::default());
    // "open\0close\0reply": tags of the input's own choosing.
    let mut parts = text.splitn(3, '\0');
    if let (Some(open), Some(close), Some(reply)) = (parts.next(), parts.next(), parts.next()) {
        if !open.is_empty() && !close.is_empty() {
            let tags = CodeTags {
                open: open.to_owned(),
                close: close.to_owned(),
            };
            check(reply, &tags);
        }
    }
});

fn check(reply: &str, tags: &CodeTags) {
    for block in extract_code_blocks(reply, tags) {
        for line in block.code.lines() {
            assert!(reply.contains(line.trim_end()), "invented line {line:?} in {:?}", block.code);
        }
    }
}
