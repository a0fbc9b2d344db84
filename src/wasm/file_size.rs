//! A cap on the size of any one file a wasm guest writes ([`Limits::file_bytes`]), and the
//! byte count of the slot's disk ([`super::disk`]), both checked before each write runs.
//!
//! A slot's workspace is a folder of the host's disk: one `os.truncate(f, 2**40)` made a 1 TiB
//! sparse file at once. `fd_write`, `fd_pwrite` and `fd_filestat_set_size` are wrapped here:
//! before delegating to wasmtime-wasi, each works out where the file would end (a plain write
//! at the descriptor's position, or at the end in append mode) and answers `EFBIG` ("File too
//! large") past the cap, as the kernel does at `RLIMIT_FSIZE`, which the process backend uses
//! for the same limit, and `ENOSPC` when the slot's disk has no room for what the file grows
//! by. (`fd_allocate` is not supported by wasmtime-wasi.)
//!
//! The streams (descriptors 1 and 2, captured by the host) are not files: their writes pass
//! through unchecked, to the same wasmtime-wasi call. An earlier `fd_write` wrapper lost the
//! streams' output of restored slots; see [`fd_write`] for why this one does not.
//!
//! [`Limits::file_bytes`]: crate::Limits::file_bytes

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::types::{Errno, Fd, Fdflags, Filetype};
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self as wasi, WasiSnapshotPreview1};
use wasmtime_wasi::runtime::in_tokio;

use super::host::GuestState;

/// The size of one `ciovec` in guest memory: a 32-bit address and a 32-bit length.
const CIOVEC_BYTES: usize = 8;
/// The errno of a successful call.
const ERRNO_SUCCESS: i32 = 0;

/// Puts the size-checking `fd_write`, `fd_pwrite` and `fd_filestat_set_size` in place of
/// wasmtime-wasi's (the linker must allow shadowing).
pub(crate) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.func_wrap("wasi_snapshot_preview1", "fd_write", fd_write)?;
    linker.func_wrap("wasi_snapshot_preview1", "fd_pwrite", fd_pwrite)?;
    linker.func_wrap("wasi_snapshot_preview1", "fd_filestat_set_size", fd_filestat_set_size)?;
    Ok(())
}

/// Where a call would make a file end.
#[derive(Clone, Copy)]
enum Change {
    /// `len` bytes written at `offset`, or at the descriptor's position when `None`.
    Write { offset: Option<u64>, len: u64 },
    /// The file's size set to this.
    SetSize(u64),
}

/// Checks `change` to `fd` against the file-size cap and the slot's disk, counting what the
/// file grows by. Anything that is not a regular file (the streams, a folder) is not checked,
/// and a call that fails here fails the same way in wasmtime-wasi afterwards.
fn admit(state: &mut GuestState, memory: &mut wiggle::GuestMemory<'_>, fd: i32, change: Change) -> Result<(), Errno> {
    let fd = Fd::from(fd as u32);
    let Ok(stat) = in_tokio(state.wasi.fd_filestat_get(memory, fd)) else {
        return Ok(());
    };
    if stat.filetype != Filetype::RegularFile {
        return Ok(());
    }
    let end = match change {
        Change::SetSize(size) => size,
        Change::Write { offset, len } => {
            let append = in_tokio(state.wasi.fd_fdstat_get(memory, fd))
                .is_ok_and(|fdstat| fdstat.fs_flags.contains(Fdflags::APPEND));
            let at = match offset {
                // Linux (and wasmtime-wasi) ignore a positioned write's offset in append mode.
                _ if append => stat.size,
                Some(offset) => offset,
                None => state.wasi.fd_tell(memory, fd).unwrap_or(stat.size),
            };
            at.saturating_add(len)
        }
    };
    if end > state.file_bytes && end > stat.size {
        return Err(Errno::Fbig);
    }
    if end < stat.size {
        state.disk.shrank();
    }
    let growth = end.saturating_sub(stat.size);
    if growth > 0 && !state.disk.grow(growth) {
        return Err(Errno::Nospc);
    }
    Ok(())
}

/// The length of the first non-empty buffer of the `count` described at `iovs` in guest
/// memory, which is all wasmtime-wasi writes in one call, or `None` if they do not fit.
fn first_buffer_length(bytes: &[u8], iovs: i32, count: i32) -> Option<u64> {
    let start = iovs as u32 as usize;
    let end = start.checked_add((count as u32 as usize).checked_mul(CIOVEC_BYTES)?)?;
    let table = bytes.get(start..end)?;
    Some(
        table
            .chunks_exact(CIOVEC_BYTES)
            .map(|iov| u64::from(u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]])))
            .find(|&len| len > 0)
            .unwrap_or(0),
    )
}

/// [`first_buffer_length`] in `memory`; the guest's memory is never shared.
fn iovec_length(memory: &wiggle::GuestMemory<'_>, iovs: i32, count: i32) -> Option<u64> {
    match memory {
        wiggle::GuestMemory::Unshared(bytes) => first_buffer_length(bytes, iovs, count),
        wiggle::GuestMemory::Shared(_) => None,
    }
}

/// Runs `call` on the caller's WASI context and memory, first refusing with the errno `check`
/// returns. `EFAULT` when the guest exports no memory. A call that then fails leaves the disk's
/// count as an over-estimate.
fn checked<C, F>(caller: &mut Caller<'_, GuestState>, check: C, call: F) -> wasmtime::Result<i32>
where
    C: FnOnce(&mut GuestState, &mut wiggle::GuestMemory<'_>) -> Result<(), Errno>,
    F: FnOnce(&mut GuestState, &mut wiggle::GuestMemory<'_>) -> wasmtime::Result<i32>,
{
    let Some((mut memory, state)) = super::host::wasi_call_context(caller) else {
        return Ok(Errno::Fault as i32);
    };
    if let Err(errno) = check(state, &mut memory) {
        return Ok(errno as i32);
    }
    let errno = call(state, &mut memory)?;
    if errno != ERRNO_SUCCESS {
        state.disk.shrank();
    }
    Ok(errno)
}

/// A write at the descriptor's position: what `print` to a file, `f.write` and `shutil.copy`
/// use, so the one that matters most. Writes to the streams go to the same wasmtime-wasi
/// call as before (its `fd_write` reaches them through the WASI context's stdout and stderr,
/// the host's capture buffers), after one `fd_filestat_get` that finds they are not files.
fn fd_write(mut caller: Caller<'_, GuestState>, fd: i32, iovs: i32, count: i32, written: i32) -> wasmtime::Result<i32> {
    checked(
        &mut caller,
        |state, memory| match iovec_length(memory, iovs, count) {
            Some(len) => admit(state, memory, fd, Change::Write { offset: None, len }),
            None => Ok(()),
        },
        |state, memory| in_tokio(wasi::fd_write(&mut state.wasi, memory, fd, iovs, count, written)),
    )
}

fn fd_pwrite(
    mut caller: Caller<'_, GuestState>,
    fd: i32,
    iovs: i32,
    count: i32,
    offset: i64,
    written: i32,
) -> wasmtime::Result<i32> {
    checked(
        &mut caller,
        |state, memory| match iovec_length(memory, iovs, count) {
            Some(len) => admit(
                state,
                memory,
                fd,
                Change::Write {
                    offset: Some(offset as u64),
                    len,
                },
            ),
            None => Ok(()),
        },
        |state, memory| {
            in_tokio(wasi::fd_pwrite(
                &mut state.wasi,
                memory,
                fd,
                iovs,
                count,
                offset,
                written,
            ))
        },
    )
}

fn fd_filestat_set_size(mut caller: Caller<'_, GuestState>, fd: i32, size: i64) -> wasmtime::Result<i32> {
    checked(
        &mut caller,
        |state, memory| admit(state, memory, fd, Change::SetSize(size as u64)),
        |state, memory| in_tokio(wasi::fd_filestat_set_size(&mut state.wasi, memory, fd, size)),
    )
}
