//! Memory snapshots: a template interpreter captured while idle (between turns, its stack
//! unwound) and restored into new instances of the same module.
//!
//! The template is bootstrapped once per backend and imports the configured preload modules;
//! its linear memory then becomes a sealed memory image ([`super::cow`]). A new slot maps that
//! image copy-on-write under its instance's memory: the bootstrap turn and the preload imports
//! are replaced by one `mmap`, and every slot shares the pages it has not written.
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

use std::sync::Arc;

use super::bootstrap::PREOPENS;
use super::cow::MemoryImage;
use super::interpreter::Interpreter;
use super::module_shape::UnsnapshotableModule;
use crate::slot::Limits;

/// The fresh-slot turn: reseeds the guest's random generators and forgets the template's cells
/// (see `_fresh_slot` in `guest/rollbox_guest.py`). Its door call is the stack probe.
pub(crate) const FRESH_SLOT_CELL: &str = "__import__('rollbox_guest')._fresh_slot()";
/// Descriptors below this are checked for leftovers before a capture. wasmtime-wasi hands out
/// the lowest free number again, so a leftover sits above this only if the template once held
/// over a thousand files open at the same time.
pub(crate) const OPEN_FD_SCAN_LIMIT: u32 = 1024;

/// What new slots start from: the template's memory, and where its stack probe landed.
pub(crate) struct Snapshot {
    /// The template's memory, which every restored slot maps copy-on-write.
    pub(crate) memory: Arc<MemoryImage>,
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
    /// The template's memory could not be put into an image.
    #[error("failed to make a memory image of the template")]
    Image(#[source] std::io::Error),
    /// A setup turn in the template failed or sent no door call.
    #[error("the template's `{cell}` turn failed: {message}")]
    Probe {
        /// The turn's code.
        cell: String,
        /// What happened.
        message: String,
    },
}

/// Takes `template`'s snapshot, after checking that it holds no extra file open and that its
/// stack probe is steady. With `file`, the image is written there (and mapped from there, so
/// that later processes share its pages); without, or when that fails, it is a sealed memfd.
pub(crate) fn capture(
    template: &mut Interpreter,
    limits: &Limits,
    file: Option<&std::path::Path>,
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
    let bytes = template.memory_bytes();
    let kept = file.and_then(|path| {
        MemoryImage::create_file(path, bytes)
            .inspect_err(|error| tracing::debug!(%error, path = %path.display(), "failed to keep the snapshot for later processes"))
            .ok()
    });
    let memory = match kept {
        Some(image) => image,
        None => MemoryImage::from_bytes("rollbox-snapshot", bytes).map_err(SnapshotRefusal::Image)?,
    };
    Ok(Snapshot {
        memory: Arc::new(memory),
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
