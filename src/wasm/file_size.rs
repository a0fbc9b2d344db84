//! A cap on the size of any one file a wasm guest writes ([`Limits::file_bytes`]).
//!
//! A slot's workspace is a folder of the host's disk: one `os.truncate(f, 2**40)` made a 1 TiB
//! sparse file at once. `fd_pwrite` and `fd_filestat_set_size` are wrapped here: before
//! delegating to wasmtime-wasi, each works out where the file would end and answers `EFBIG`
//! ("File too large") past the cap, as the kernel does at `RLIMIT_FSIZE`, which the process
//! backend uses for the same limit. (`fd_allocate` is not supported by wasmtime-wasi.)
//!
//! **Not covered: `fd_write`**, the plain write at the descriptor's position, so a seek far past
//! the end and one byte written still makes a sparse file. A wrapper that delegated `fd_write`
//! to wasmtime-wasi's preview-1 call, like the two here, lost the streams' output of cells in
//! slots restored from the snapshot (`wasm::a_cell_reports_stdout_stderr_value_and_error_apart`
//! failed in its module's run, not alone); the cause was not found in time.
//!
//! [`Limits::file_bytes`]: crate::Limits::file_bytes

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::types::{Errno, Fd, Filetype};
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self as wasi, WasiSnapshotPreview1};
use wasmtime_wasi::runtime::in_tokio;

use super::host::GuestState;

/// The size of one `ciovec` in guest memory: a 32-bit address and a 32-bit length.
const CIOVEC_BYTES: usize = 8;

/// Puts the size-checking `fd_pwrite` and `fd_filestat_set_size` in place of wasmtime-wasi's
/// (the linker must allow shadowing).
pub(crate) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.func_wrap("wasi_snapshot_preview1", "fd_pwrite", fd_pwrite)?;
    linker.func_wrap("wasi_snapshot_preview1", "fd_filestat_set_size", fd_filestat_set_size)?;
    Ok(())
}

/// Whether writing `len` bytes at `offset` of `fd` (`len` 0: setting its size to `offset`) would
/// make a regular file longer than the cap. Anything that is not a
/// regular file (the streams, a folder) is not checked, and a call that fails here fails the
/// same way in wasmtime-wasi afterwards.
fn would_exceed(state: &mut GuestState, memory: &mut wiggle::GuestMemory<'_>, fd: i32, offset: u64, len: u64) -> bool {
    let cap = state.file_bytes;
    let fd = Fd::from(fd as u32);
    let Ok(stat) = in_tokio(state.wasi.fd_filestat_get(memory, fd)) else {
        return false;
    };
    if stat.filetype != Filetype::RegularFile {
        return false;
    }
    let end = offset.saturating_add(len);
    end > cap && end > stat.size
}

/// The total length of the `count` buffers described at `iovs` in guest memory (an over-estimate
/// of what wasmtime-wasi writes, which is the first non-empty one), or `None` if they do not fit.
fn total_length(bytes: &[u8], iovs: i32, count: i32) -> Option<u64> {
    let start = iovs as u32 as usize;
    let end = start.checked_add((count as u32 as usize).checked_mul(CIOVEC_BYTES)?)?;
    let table = bytes.get(start..end)?;
    Some(
        table
            .chunks_exact(CIOVEC_BYTES)
            .map(|iov| u64::from(u32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]])))
            .sum(),
    )
}

/// [`total_length`] in `memory`; the guest's memory is never shared.
fn iovec_length(memory: &wiggle::GuestMemory<'_>, iovs: i32, count: i32) -> Option<u64> {
    match memory {
        wiggle::GuestMemory::Unshared(bytes) => total_length(bytes, iovs, count),
        wiggle::GuestMemory::Shared(_) => None,
    }
}

/// Runs `call` on the caller's WASI context and memory, first refusing with `EFBIG` when
/// `check` finds the write too long. `EFAULT` when the guest exports no memory.
fn checked<C, F>(caller: &mut Caller<'_, GuestState>, check: C, call: F) -> wasmtime::Result<i32>
where
    C: FnOnce(&mut GuestState, &mut wiggle::GuestMemory<'_>) -> bool,
    F: FnOnce(&mut GuestState, &mut wiggle::GuestMemory<'_>) -> wasmtime::Result<i32>,
{
    let Some(memory) = caller.get_export("memory").and_then(|export| export.into_memory()) else {
        return Ok(Errno::Fault as i32);
    };
    let (bytes, state) = memory.data_and_store_mut(caller);
    let mut memory = wiggle::GuestMemory::Unshared(bytes);
    if check(state, &mut memory) {
        return Ok(Errno::Fbig as i32);
    }
    call(state, &mut memory)
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
        |state, memory| {
            iovec_length(memory, iovs, count).is_some_and(|len| would_exceed(state, memory, fd, offset as u64, len))
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
        |state, memory| would_exceed(state, memory, fd, size as u64, 0),
        |state, memory| in_tokio(wasi::fd_filestat_set_size(&mut state.wasi, memory, fd, size)),
    )
}
