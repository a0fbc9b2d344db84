//! Memory snapshots: a template interpreter captured while idle (between turns, its stack
//! unwound) and restored into new instances of the same module.
//!
//! The template is bootstrapped once per backend, imports the configured preload modules, and
//! has its linear memory compared with a freshly instantiated, never-run instance's: only the
//! host pages that differ are kept, with the memory's size. A new slot instantiates from the
//! module's copy-on-write image as before, grows its memory to that size and copies those
//! pages in, which replaces the bootstrap turn (and the preload imports) with a copy.
//!
//! Memory is all a snapshot carries, so the rest of an instance must be the same in every
//! instance between turns; what makes that so:
//! - globals: the only mutable one is the C stack pointer ([`super::module_shape`]), and a
//!   *stack probe* shows it is at its initial value: the door records where the guest's
//!   out-pointers of its last call sit on the C stack; the template runs the same fresh-slot
//!   turn twice (the address must not move), and each restored slot runs it once more (the
//!   address must match, which can only be if the restored stack pointer, the module's initial
//!   value, equals the template's);
//! - tables: never written by the guest's code, never exported ([`super::module_shape`]);
//! - WASI state: every store gets the same preopens in the same descriptor order, and the
//!   template may hold no other descriptor open (checked through the guest before capture);
//! - host state (door, capture streams, deadline, limiter) is per store, so fresh in each.
//!
//! After the restore, the fresh-slot turn reseeds the guest's random generators from new
//! entropy, so slots never share a random stream. Hash randomisation is the runtime's own and
//! was fixed when the runtime was pre-initialised: every slot shares it, snapshot or not.

use wasmtime::{AsContextMut, Memory};

use super::bootstrap::PREOPENS;
use super::interpreter::{Interpreter, RestoreError, StartError};
use super::module_shape::UnsnapshotableModule;
use crate::slot::Limits;

/// The diff's granularity: a host page, so a restored slot writes (and holds resident) only
/// the pages its template changed.
const CHUNK: usize = 4096;
/// Wasm's page size: memory grows in these.
const WASM_PAGE: usize = 64 << 10;
/// What pages beyond the module's initial memory hold before anyone writes them.
static ZEROES: [u8; CHUNK] = [0; CHUNK];

/// The fresh-slot turn: reseeds the guest's random generators and forgets the template's cells
/// (see `_fresh_slot` in `guest/rollbox_guest.py`). Its door call is the stack probe.
pub(crate) const FRESH_SLOT_CELL: &str = "__import__('rollbox_guest')._fresh_slot()";
/// Descriptors below this are checked for leftovers before a capture. wasmtime-wasi hands out
/// the lowest free number again, so a leftover sits above this only if the template once held
/// over a thousand files open at the same time.
pub(crate) const OPEN_FD_SCAN_LIMIT: u32 = 1024;

/// An idle interpreter's memory, as the pages that differ from the module's initial image.
pub(crate) struct MemorySnapshot {
    /// The template's memory size, in bytes.
    size: usize,
    /// Where the changed pages go, each run's bytes taken from `data`.
    runs: Vec<Run>,
    /// The changed pages' contents, run after run.
    data: Vec<u8>,
}

/// Contiguous changed pages: `len` bytes at guest address `at`, stored at `data[from..]`.
struct Run {
    at: usize,
    len: usize,
    from: usize,
}

impl MemorySnapshot {
    /// The pages of `template` that differ from `pristine` (a never-run instance's memory);
    /// pages past `pristine`'s end are compared with zeroes, which is what growth gives.
    pub(crate) fn capture(pristine: &[u8], template: &[u8]) -> MemorySnapshot {
        let mut runs: Vec<Run> = Vec::new();
        let mut data = Vec::new();
        for (index, chunk) in template.chunks(CHUNK).enumerate() {
            let at = index * CHUNK;
            let before = pristine.get(at..at + chunk.len()).unwrap_or(&ZEROES[..chunk.len()]);
            if chunk == before {
                continue;
            }
            match runs.last_mut() {
                Some(run) if run.at + run.len == at => run.len += chunk.len(),
                _ => runs.push(Run {
                    at,
                    len: chunk.len(),
                    from: data.len(),
                }),
            }
            data.extend_from_slice(chunk);
        }
        MemorySnapshot {
            size: template.len(),
            runs,
            data,
        }
    }

    /// Grows `memory` (a never-run instance's, so at the module's initial size) to the
    /// template's size, through the store's limiter, and writes the changed pages into it.
    pub(crate) fn restore(&self, mut store: impl AsContextMut, memory: Memory) -> Result<(), RestoreError> {
        let current = memory.data_size(&store);
        if current > self.size {
            return Err(RestoreError::Larger {
                current,
                snapshot: self.size,
            });
        }
        if self.size > current {
            let pages = (self.size - current).div_ceil(WASM_PAGE) as u64;
            memory
                .grow(&mut store, pages)
                .map_err(|e| RestoreError::Grow(e.into_boxed_dyn_error()))?;
        }
        let bytes = memory.data_mut(&mut store);
        for run in &self.runs {
            bytes[run.at..run.at + run.len].copy_from_slice(&self.data[run.from..run.from + run.len]);
        }
        Ok(())
    }

    /// How many bytes a restore copies.
    pub(crate) fn changed_bytes(&self) -> usize {
        self.data.len()
    }

    /// The template's memory size, in bytes.
    pub(crate) fn size(&self) -> usize {
        self.size
    }
}

/// What new slots start from: the template's memory, and where its stack probe landed.
pub(crate) struct Snapshot {
    /// The template's memory.
    pub(crate) memory: MemorySnapshot,
    /// The guest stack address the fresh-slot turn's door call used in the template.
    pub(crate) stack_probe: u32,
}

/// Why a backend bootstraps every slot instead of restoring a snapshot. Each is logged once as
/// a warning; slots still work, only slower to start.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SnapshotRefusal {
    /// The module keeps state outside linear memory.
    #[error(transparent)]
    Module(#[from] UnsnapshotableModule),
    /// The template holds file descriptors a new instance would not have.
    #[error("the template interpreter holds file descriptors {open} open beyond the preopened folders {expected}")]
    OpenFiles {
        /// The open descriptors from 3 up, as the guest listed them.
        open: String,
        /// The preopened folders' descriptors.
        expected: String,
    },
    /// The stack probe moved between two identical turns: the stack pointer does not return to
    /// where it was, so it cannot be assumed to be at its initial value.
    #[error("the stack probe moved between two identical turns ({first:#x}, then {second:#x})")]
    StackMoved {
        /// The first turn's probe address.
        first: u32,
        /// The second's.
        second: u32,
    },
    /// The never-run instance the template is compared with could not be made.
    #[error("failed to instantiate a pristine interpreter to compare the template with")]
    Pristine(#[source] StartError),
    /// A setup turn in the template failed or sent no door call.
    #[error("the template's `{cell}` turn failed: {message}")]
    Probe {
        /// The turn's code.
        cell: String,
        /// What happened.
        message: String,
    },
}

/// Takes `template`'s snapshot, relative to `pristine` (a never-run instance of the same
/// module), after checking that it holds no extra file open and that its stack probe is steady.
pub(crate) fn capture(
    template: &mut Interpreter,
    pristine: &Interpreter,
    limits: &Limits,
) -> Result<Snapshot, SnapshotRefusal> {
    check_open_files(template, limits)?;
    let probe = |template: &mut Interpreter| {
        template
            .stack_probe(FRESH_SLOT_CELL, limits)
            .map_err(|message| SnapshotRefusal::Probe {
                cell: FRESH_SLOT_CELL.into(),
                message,
            })
    };
    let first = probe(template)?;
    let second = probe(template)?;
    if first != second {
        return Err(SnapshotRefusal::StackMoved { first, second });
    }
    Ok(Snapshot {
        memory: MemorySnapshot::capture(pristine.memory_bytes(), template.memory_bytes()),
        stack_probe: second,
    })
}

fn check_open_files(template: &mut Interpreter, limits: &Limits) -> Result<(), SnapshotRefusal> {
    let cell = format!("__import__('rollbox_guest')._open_fds({OPEN_FD_SCAN_LIMIT})");
    let open = template
        .setup_cell(&cell, limits)
        .map_err(|message| SnapshotRefusal::Probe {
            cell: cell.clone(),
            message,
        })?;
    let preopens: Vec<u32> = (3..3 + PREOPENS).collect();
    // Python prints a list of ints as Rust's Debug does: `[3, 4, 5, 6]`.
    let expected = format!("{preopens:?}");
    match open {
        Some(open) if open == expected => Ok(()),
        open => Err(SnapshotRefusal::OpenFiles {
            open: open.unwrap_or_else(|| "(no answer)".into()),
            expected,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_changed_pages_in_runs_and_grown_pages_only_when_non_zero() {
        let pristine = vec![1u8; 4 * CHUNK];
        let mut template = pristine.clone();
        template.extend(vec![0u8; 4 * CHUNK]);
        template[CHUNK + 5] = 9; // page 1
        template[2 * CHUNK] = 9; // page 2, joining page 1's run
        template[6 * CHUNK + 1] = 7; // a grown page
        let snapshot = MemorySnapshot::capture(&pristine, &template);
        assert_eq!(snapshot.size(), 8 * CHUNK);
        assert_eq!(snapshot.changed_bytes(), 3 * CHUNK);
        let runs: Vec<(usize, usize)> = snapshot.runs.iter().map(|r| (r.at, r.len)).collect();
        assert_eq!(runs, vec![(CHUNK, 2 * CHUNK), (6 * CHUNK, CHUNK)]);
        assert_eq!(snapshot.data[5], 9);
        assert_eq!(snapshot.data[2 * CHUNK + 1], 7);
    }

    #[test]
    fn an_unchanged_memory_keeps_nothing() {
        let memory = vec![3u8; 2 * CHUNK];
        let snapshot = MemorySnapshot::capture(&memory, &memory);
        assert_eq!(snapshot.changed_bytes(), 0);
        assert!(snapshot.runs.is_empty());
    }
}
