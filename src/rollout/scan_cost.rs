//! A count of the bytes the parsers of model output look at, so tests can check that their cost
//! grows linearly with a reply by an operation count, never by a clock.
//!
//! Every parser of model output ([`crate::rollout::answer`], [`crate::rollout::code_blocks`],
//! the oracle's `<tool_call>` blocks) charges the bytes of each pass it makes over the text. The
//! count is per thread, so tests running in parallel do not see each other's work; charging is
//! one thread-local add per pass (not per byte), which costs nothing next to the pass itself.

use std::cell::Cell;

thread_local! {
    static SCANNED: Cell<u64> = const { Cell::new(0) };
}

/// Records that a parser looked at `bytes` bytes.
pub(crate) fn charge(bytes: usize) {
    SCANNED.with(|scanned| scanned.set(scanned.get().saturating_add(bytes as u64)));
}

/// Runs `work` and returns its result with the bytes the parsers looked at meanwhile, on this
/// thread.
pub fn measure<R>(work: impl FnOnce() -> R) -> (R, u64) {
    let before = SCANNED.with(Cell::get);
    let result = work();
    let after = SCANNED.with(Cell::get);
    (result, after.saturating_sub(before))
}
