//! A cap on what a wasm slot's folders hold in all: bytes ([`Limits::disk_bytes`]) and files
//! ([`Limits::disk_files`]).
//!
//! A slot's workspace and `/tmp` are folders of the host's disk: 32 cells writing 64 MiB each
//! filled 2 GiB in 2.7 s. The host sees every change a guest makes to them, since each goes
//! through a WASI call, so it keeps the slot's totals itself ([`DiskLedger`]), never from
//! anything the guest reports:
//! - writes (`fd_write`, `fd_pwrite`) and truncations (`fd_filestat_set_size`, wrapped in
//!   `file_size.rs`) add what they make a file grow by, worked out before they run;
//! - creations (`path_open` with `O_CREAT` of a name that does not exist, wrapped in
//!   `descriptors.rs`; `path_create_directory`, `path_symlink`, `path_link`, wrapped here) add
//!   one file;
//! - removals, renames and truncations to less only make the totals an over-estimate.
//!
//! A change that would take a total past its cap first makes the ledger measure the folders
//! (when it may be over-estimating), and is refused with `ENOSPC` ("No space left on device")
//! only if the measured total leaves no room; the call then reports [`LimitKind::Disk`] or
//! [`LimitKind::Files`]. So measuring, which reads every entry, happens only near the cap.
//! Bytes are apparent file sizes (a sparse file counts its length); files are every entry,
//! folders and links included. Writes by the host's own file tools are not seen here: after one,
//! the ledger measures again before the guest's next change.
//!
//! [`Limits::disk_bytes`]: crate::Limits::disk_bytes
//! [`Limits::disk_files`]: crate::Limits::disk_files

use std::path::{Path, PathBuf};

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::types::Errno;
use wasmtime_wasi::p1::wasi_snapshot_preview1 as wasi;

use super::host::GuestState;
use crate::slot::{LimitKind, Limits};

/// The errno of a successful call.
const ERRNO_SUCCESS: i32 = 0;

/// How far the ledger's totals can be trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accuracy {
    /// Measured, and every change since counted.
    Exact,
    /// At least what the folders hold: something was removed or shrunk since.
    AtMost,
    /// Unknown: something outside the guest (a file tool) changed the folders.
    Stale,
}

/// What a slot's folders hold, as the host counts it, against the slot's caps.
#[derive(Debug)]
pub(crate) struct DiskLedger {
    folders: Vec<PathBuf>,
    max_bytes: u64,
    max_files: u64,
    bytes: u64,
    files: u64,
    accuracy: Accuracy,
    /// The first cap a change was refused at since the last [`DiskLedger::take_refusal`].
    refused: Option<LimitKind>,
}

impl DiskLedger {
    /// A ledger for `folders` under `limits`, measured now.
    pub(crate) fn measure(folders: &[&Path], limits: &Limits) -> DiskLedger {
        let mut ledger = DiskLedger {
            folders: folders.iter().map(|f| f.to_path_buf()).collect(),
            max_bytes: limits.disk_bytes,
            max_files: limits.disk_files,
            bytes: 0,
            files: 0,
            accuracy: Accuracy::Stale,
            refused: None,
        };
        ledger.remeasure();
        ledger
    }

    /// Whether the folders have room for `bytes` more; if so they are counted. Refusals are
    /// remembered for [`DiskLedger::take_refusal`].
    pub(crate) fn grow(&mut self, bytes: u64) -> bool {
        self.make_room(bytes, 0)
    }

    /// Whether the folders have room for one more file; if so it is counted.
    pub(crate) fn create(&mut self) -> bool {
        self.make_room(0, 1)
    }

    /// Something was removed or shrunk: the totals may now be too high.
    pub(crate) fn shrank(&mut self) {
        if self.accuracy == Accuracy::Exact {
            self.accuracy = Accuracy::AtMost;
        }
    }

    /// Something outside the guest changed the folders: measure again before the next change.
    pub(crate) fn forget(&mut self) {
        self.accuracy = Accuracy::Stale;
    }

    /// The cap a change was refused at since the last call, if any.
    pub(crate) fn take_refusal(&mut self) -> Option<LimitKind> {
        self.refused.take()
    }

    fn make_room(&mut self, bytes: u64, files: u64) -> bool {
        let fits = |ledger: &DiskLedger| {
            ledger.bytes.saturating_add(bytes) <= ledger.max_bytes
                && ledger.files.saturating_add(files) <= ledger.max_files
        };
        if self.accuracy == Accuracy::Stale || (!fits(self) && self.accuracy == Accuracy::AtMost) {
            self.remeasure();
        }
        if !fits(self) {
            let over = if self.files.saturating_add(files) > self.max_files {
                LimitKind::Files
            } else {
                LimitKind::Disk
            };
            self.refused.get_or_insert(over);
            return false;
        }
        self.bytes += bytes;
        self.files += files;
        true
    }

    /// Reads every entry of the folders: bytes are regular files' lengths, files every entry.
    fn remeasure(&mut self) {
        let (mut bytes, mut files) = (0u64, 0u64);
        let mut pending: Vec<PathBuf> = self.folders.clone();
        while let Some(folder) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&folder) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(meta) = entry.path().symlink_metadata() else {
                    continue;
                };
                files += 1;
                if meta.is_dir() {
                    pending.push(entry.path());
                } else if meta.is_file() {
                    bytes = bytes.saturating_add(meta.len());
                }
            }
        }
        (self.bytes, self.files, self.accuracy) = (bytes, files, Accuracy::Exact);
    }
}

/// The message a call that reached `limit` carries, naming the cap and the flag that raises it.
pub(crate) fn refusal_message(limit: LimitKind, limits: &Limits) -> String {
    match limit {
        LimitKind::Files => format!(
            "the slot's folders reached their limit of {} files (--max-disk-files); creating more failed with ENOSPC",
            limits.disk_files
        ),
        _ => format!(
            "the slot's folders reached their limit of {} bytes (--max-disk-bytes); a write failed with ENOSPC",
            limits.disk_bytes
        ),
    }
}

/// Puts the counting `path_create_directory`, `path_symlink` and `path_link`, and the
/// `path_unlink_file`, `path_remove_directory` and `path_rename` that mark the totals as
/// over-estimates, in place of wasmtime-wasi's (the linker must allow shadowing).
pub(crate) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.func_wrap("wasi_snapshot_preview1", "path_create_directory", path_create_directory)?;
    linker.func_wrap("wasi_snapshot_preview1", "path_symlink", path_symlink)?;
    linker.func_wrap("wasi_snapshot_preview1", "path_link", path_link)?;
    linker.func_wrap("wasi_snapshot_preview1", "path_unlink_file", path_unlink_file)?;
    linker.func_wrap("wasi_snapshot_preview1", "path_remove_directory", path_remove_directory)?;
    linker.func_wrap("wasi_snapshot_preview1", "path_rename", path_rename)?;
    Ok(())
}

/// Runs one of wasmtime-wasi's preview-1 calls on the caller's memory and WASI context, as its
/// own synchronous linker does; `EFAULT` when the guest exports no memory.
fn delegate<F>(caller: &mut Caller<'_, GuestState>, call: F) -> wasmtime::Result<i32>
where
    F: for<'a> FnOnce(&'a mut GuestState, &mut wiggle::GuestMemory<'a>) -> wasmtime::Result<i32>,
{
    let Some((mut memory, state)) = super::host::wasi_call_context(caller) else {
        return Ok(Errno::Fault as i32);
    };
    call(state, &mut memory)
}

/// A call that makes one entry: refused with `ENOSPC` when the slot has no room for a file;
/// counted, and left counted if it then fails (an over-estimate, corrected near the cap).
fn creating<F>(mut caller: Caller<'_, GuestState>, call: F) -> wasmtime::Result<i32>
where
    F: for<'a> FnOnce(&'a mut GuestState, &mut wiggle::GuestMemory<'a>) -> wasmtime::Result<i32>,
{
    if !caller.data_mut().disk.create() {
        return Ok(Errno::Nospc as i32);
    }
    let errno = delegate(&mut caller, call)?;
    if errno != ERRNO_SUCCESS {
        caller.data_mut().disk.shrank();
    }
    Ok(errno)
}

/// A call that removes or renames: the totals may be too high after it.
fn removing<F>(mut caller: Caller<'_, GuestState>, call: F) -> wasmtime::Result<i32>
where
    F: for<'a> FnOnce(&'a mut GuestState, &mut wiggle::GuestMemory<'a>) -> wasmtime::Result<i32>,
{
    let errno = delegate(&mut caller, call)?;
    if errno == ERRNO_SUCCESS {
        caller.data_mut().disk.shrank();
    }
    Ok(errno)
}

fn in_tokio<F: std::future::Future>(future: F) -> F::Output {
    wasmtime_wasi::runtime::in_tokio(future)
}

fn path_create_directory(caller: Caller<'_, GuestState>, fd: i32, path: i32, len: i32) -> wasmtime::Result<i32> {
    creating(caller, |state, memory| {
        in_tokio(wasi::path_create_directory(&mut state.wasi, memory, fd, path, len))
    })
}

fn path_symlink(
    caller: Caller<'_, GuestState>,
    old_path: i32,
    old_len: i32,
    fd: i32,
    new_path: i32,
    new_len: i32,
) -> wasmtime::Result<i32> {
    creating(caller, |state, memory| {
        in_tokio(wasi::path_symlink(
            &mut state.wasi,
            memory,
            old_path,
            old_len,
            fd,
            new_path,
            new_len,
        ))
    })
}

#[allow(clippy::too_many_arguments)] // preview 1's own signature
fn path_link(
    caller: Caller<'_, GuestState>,
    old_fd: i32,
    old_flags: i32,
    old_path: i32,
    old_len: i32,
    new_fd: i32,
    new_path: i32,
    new_len: i32,
) -> wasmtime::Result<i32> {
    creating(caller, |state, memory| {
        in_tokio(wasi::path_link(
            &mut state.wasi,
            memory,
            old_fd,
            old_flags,
            old_path,
            old_len,
            new_fd,
            new_path,
            new_len,
        ))
    })
}

fn path_unlink_file(caller: Caller<'_, GuestState>, fd: i32, path: i32, len: i32) -> wasmtime::Result<i32> {
    removing(caller, |state, memory| {
        in_tokio(wasi::path_unlink_file(&mut state.wasi, memory, fd, path, len))
    })
}

fn path_remove_directory(caller: Caller<'_, GuestState>, fd: i32, path: i32, len: i32) -> wasmtime::Result<i32> {
    removing(caller, |state, memory| {
        in_tokio(wasi::path_remove_directory(&mut state.wasi, memory, fd, path, len))
    })
}

fn path_rename(
    caller: Caller<'_, GuestState>,
    old_fd: i32,
    old_path: i32,
    old_len: i32,
    new_fd: i32,
    new_path: i32,
    new_len: i32,
) -> wasmtime::Result<i32> {
    removing(caller, |state, memory| {
        in_tokio(wasi::path_rename(
            &mut state.wasi,
            memory,
            old_fd,
            old_path,
            old_len,
            new_fd,
            new_path,
            new_len,
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_measures_near_the_cap_and_refuses_only_what_does_not_fit() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a"), vec![0u8; 100]).expect("write");
        let limits = Limits {
            disk_bytes: 150,
            disk_files: 3,
            ..Limits::default()
        };
        let mut ledger = DiskLedger::measure(&[dir.path()], &limits);
        assert_eq!((ledger.bytes, ledger.files), (100, 1));
        assert!(ledger.grow(50));
        assert!(!ledger.grow(1), "150 of 150 bytes");
        assert_eq!(ledger.take_refusal(), Some(LimitKind::Disk));
        // The file shrinks outside the ledger's sight; a removal marks the totals too high.
        std::fs::write(dir.path().join("a"), vec![0u8; 10]).expect("write");
        ledger.shrank();
        assert!(ledger.grow(100), "measured again: 10 bytes held");
        assert!(
            ledger.create() && ledger.create() && !ledger.create(),
            "a, and two more, of 3 files"
        );
        assert_eq!(ledger.take_refusal(), Some(LimitKind::Files));
        assert_eq!(ledger.take_refusal(), None);
    }
}
