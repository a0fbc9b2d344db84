//! A per-slot cap on the files a wasm guest holds open ([`Limits::open_files`]).
//!
//! Every file a guest opens through WASI is a real descriptor of the host process, and every
//! slot of a server shares that process's table: one slot holding 20,000 `os.open` descriptors
//! made every other slot's acquire fail with "Too many open files". wasmtime-wasi has no such
//! limit, so the calls that open and close files (`path_open`, `fd_close`) are wrapped here:
//! each delegates to wasmtime-wasi's own implementation and keeps the count in the store's
//! [`GuestState`]. Past the cap `path_open` answers `EMFILE`, which the guest's Python raises as
//! `OSError` with `errno.EMFILE` ("No file descriptors available", in wasi-libc's words); the
//! slot goes on, and closing a file makes room again.
//!
//! [`Limits::open_files`]: crate::Limits::open_files

use wasmtime::{Caller, Linker};
use wasmtime_wasi::p1::types::{Errno, Fd, Lookupflags, Oflags};
use wasmtime_wasi::p1::wasi_snapshot_preview1::{self as wasi, WasiSnapshotPreview1};

use super::host::GuestState;

/// The errno of a successful call.
const ERRNO_SUCCESS: i32 = 0;

/// How many files a guest opened and has not closed, and how many it may hold.
#[derive(Debug)]
pub(crate) struct OpenFiles {
    open: u32,
    max: u32,
}

impl OpenFiles {
    /// None open yet; at most `max`. The descriptors WASI starts with (stdio, preopened
    /// folders) are not counted: the guest cannot add to them.
    pub(crate) fn new(max: u32) -> OpenFiles {
        OpenFiles { open: 0, max }
    }

    /// How many files the guest holds open now.
    pub(crate) fn open(&self) -> u32 {
        self.open
    }
}

/// Puts the counting `path_open` and `fd_close` in place of wasmtime-wasi's (the linker must
/// allow shadowing), and an `fd_renumber` that keeps the standard streams. `fd_renumber` also
/// closes a descriptor but is not counted: that only makes the cap stricter, and CPython on WASI
/// never calls it (`os.dup2` is not supported there).
pub(crate) fn add_to_linker(linker: &mut Linker<GuestState>) -> wasmtime::Result<()> {
    linker.func_wrap("wasi_snapshot_preview1", "path_open", path_open)?;
    linker.func_wrap("wasi_snapshot_preview1", "fd_close", fd_close)?;
    linker.func_wrap("wasi_snapshot_preview1", "fd_renumber", fd_renumber)?;
    Ok(())
}

/// Whether `fd` is one of the standard streams (0, 1, 2). They are the host's pipes for the
/// slot's whole life: each cell's stdout and stderr are read from them. A guest that closed
/// them (`os.close(1)`) made every later cell of its slot report success with empty streams,
/// its output lost; so closing or renumbering over them is refused with `EPERM`, which Python
/// raises as `PermissionError` at the call. Native CPython allows it (docs/parity.md).
fn is_standard_stream(fd: i32) -> bool {
    (0..=2).contains(&fd)
}

/// Runs one of wasmtime-wasi's preview-1 calls on the caller's memory and WASI context, as its
/// own synchronous linker does. `None` when the guest exports no memory.
fn delegate<F>(caller: &mut Caller<'_, GuestState>, call: F) -> Option<wasmtime::Result<i32>>
where
    F: for<'a> FnOnce(&'a mut GuestState, wiggle::GuestMemory<'a>) -> wasmtime::Result<i32>,
{
    let (memory, state) = super::host::wasi_call_context(caller)?;
    Some(call(state, memory))
}

#[allow(clippy::too_many_arguments)] // preview 1's own signature
fn path_open(
    mut caller: Caller<'_, GuestState>,
    dirfd: i32,
    dirflags: i32,
    path: i32,
    path_len: i32,
    oflags: i32,
    rights_base: i64,
    rights_inheriting: i64,
    fdflags: i32,
    opened_fd: i32,
) -> wasmtime::Result<i32> {
    let files = &caller.data().open_files;
    if files.open >= files.max {
        return Ok(Errno::Mfile as i32);
    }
    // A file this open creates counts against the slot's disk (`disk.rs`): it creates one when
    // it may and the name does not exist yet.
    let creates = oflags as u16 & Oflags::CREAT.bits() != 0
        && delegate(&mut caller, |state, mut memory| {
            let path = wiggle::GuestPtr::<str>::new((path as u32, path_len as u32));
            let flags = Lookupflags::from_bits_truncate(dirflags as u32);
            let exists = wasmtime_wasi::runtime::in_tokio(state.wasi.path_filestat_get(
                &mut memory,
                Fd::from(dirfd as u32),
                flags,
                path,
            ));
            Ok(i32::from(exists.is_err()))
        })
        .is_some_and(|absent| absent.is_ok_and(|absent| absent == 1));
    if creates && !caller.data_mut().disk.create() {
        return Ok(Errno::Nospc as i32);
    }
    let errno = delegate(&mut caller, |state, mut memory| {
        wasmtime_wasi::runtime::in_tokio(wasi::path_open(
            &mut state.wasi,
            &mut memory,
            dirfd,
            dirflags,
            path,
            path_len,
            oflags,
            rights_base,
            rights_inheriting,
            fdflags,
            opened_fd,
        ))
    })
    .unwrap_or(Ok(Errno::Fault as i32))?;
    if errno == ERRNO_SUCCESS {
        caller.data_mut().open_files.open += 1;
    }
    // A failed creation, or a truncation, leaves the disk's count too high.
    if (creates && errno != ERRNO_SUCCESS) || oflags as u16 & Oflags::TRUNC.bits() != 0 {
        caller.data_mut().disk.shrank();
    }
    Ok(errno)
}

fn fd_close(mut caller: Caller<'_, GuestState>, fd: i32) -> wasmtime::Result<i32> {
    if is_standard_stream(fd) {
        return Ok(Errno::Perm as i32);
    }
    let errno = delegate(&mut caller, |state, mut memory| {
        wasmtime_wasi::runtime::in_tokio(wasi::fd_close(&mut state.wasi, &mut memory, fd))
    })
    .unwrap_or(Ok(Errno::Fault as i32))?;
    if errno == ERRNO_SUCCESS {
        forget_one(&mut caller);
    }
    Ok(errno)
}

fn fd_renumber(mut caller: Caller<'_, GuestState>, from: i32, to: i32) -> wasmtime::Result<i32> {
    if is_standard_stream(from) || is_standard_stream(to) {
        return Ok(Errno::Perm as i32);
    }
    delegate(&mut caller, |state, mut memory| {
        wasmtime_wasi::runtime::in_tokio(wasi::fd_renumber(&mut state.wasi, &mut memory, from, to))
    })
    .unwrap_or(Ok(Errno::Fault as i32))
}

/// One descriptor fewer. Saturating: closing a descriptor WASI started with (not counted)
/// frees no room beyond the cap's.
fn forget_one(caller: &mut Caller<'_, GuestState>) {
    let files = &mut caller.data_mut().open_files;
    files.open = files.open.saturating_sub(1);
}
