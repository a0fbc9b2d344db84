//! A deadline-aware `poll_oneoff`, shadowing wasmtime-wasi's.
//!
//! Epoch interruption stops guest code only while wasm runs; a `time.sleep(1000)` blocks in
//! the host's `poll_oneoff` where no epoch is checked. This version never sleeps past the
//! call's deadline: at the deadline it interrupts the cell (`host::interrupt_guest`) and ends
//! the sleep, or, once the grace period is over too, traps with [`DeadlineExceeded`], which the
//! interpreter reports as the time limit. Descriptor subscriptions are reported ready at once:
//! stdout and stderr are in-memory and stdin is empty, so nothing a guest can poll ever blocks.
//!
//! In a seeded slot (`world.rs`) clock subscriptions are measured in virtual time, and a sleep
//! moves virtual time to its wake-up at once instead of waiting: `time.sleep(5)` returns at once
//! and the guest's clocks read 5 s later.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use wasmtime::{Caller, Memory};

use super::host::{GuestState, fits_in_memory, interrupt_guest};
use super::world::VirtualClock;

/// The trap a sleeping guest gets at its call's deadline.
#[derive(Debug)]
pub(crate) struct DeadlineExceeded;

impl std::fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the call's wall-clock deadline passed while the guest slept")
    }
}

impl std::error::Error for DeadlineExceeded {}

const SUBSCRIPTION_SIZE: usize = 48;
const EVENT_SIZE: usize = 32;
const EVENTTYPE_CLOCK: u8 = 0;
const CLOCK_REALTIME: u32 = 0;
const SUBCLOCKFLAG_ABSTIME: u16 = 1;
/// Longer than any deadline: a sleep this long always ends at the deadline.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 86_400);
const ERRNO_SUCCESS: i32 = 0;
const ERRNO_FAULT: i32 = 21;
const ERRNO_INVAL: i32 = 28;

/// The monotonic clock the guest sees, so absolute monotonic timeouts can be converted.
pub(crate) fn monotonic_origin() -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// The guest's monotonic clock: nanoseconds since [`monotonic_origin`].
pub(crate) struct GuestMonotonicClock;

impl wasmtime_wasi::HostMonotonicClock for GuestMonotonicClock {
    fn resolution(&self) -> u64 {
        1
    }
    fn now(&self) -> u64 {
        monotonic_origin().elapsed().as_nanos() as u64
    }
}

struct Subscription {
    userdata: u64,
    kind: u8,
    clock_id: u32,
    timeout: u64,
    flags: u16,
}

/// `wasi_snapshot_preview1::poll_oneoff(in, out, nsubscriptions, nevents_ptr) -> errno`.
pub(crate) fn poll_oneoff(
    mut caller: Caller<'_, GuestState>,
    subscriptions_ptr: i32,
    events_ptr: i32,
    count: i32,
    nevents_ptr: i32,
) -> wasmtime::Result<i32> {
    let Some(memory) = caller.get_export("memory").and_then(|e| e.into_memory()) else {
        return Ok(ERRNO_FAULT);
    };
    let count = count as u32 as usize;
    if count == 0 {
        return Ok(ERRNO_INVAL);
    }
    let (subs_at, events_at, nevents_at) = (
        subscriptions_ptr as u32 as usize,
        events_ptr as u32 as usize,
        nevents_ptr as u32 as usize,
    );
    let size = memory.data_size(&caller);
    let fits = |at, len| fits_in_memory(size, at, len);
    if !fits(subs_at, count * SUBSCRIPTION_SIZE) || !fits(events_at, count * EVENT_SIZE) || !fits(nevents_at, 4) {
        return Ok(ERRNO_FAULT);
    }
    let subscriptions = read_subscriptions(&memory, &caller, subs_at, count);
    if let Some(clock) = caller.data().virtual_clock.clone() {
        let fired = sleep_virtually(&clock, &subscriptions);
        return write_events(&mut caller, &memory, events_at, nevents_at, &subscriptions, &fired);
    }
    let now = Instant::now();
    // When each clock subscription fires; descriptor subscriptions are ready now.
    let wake_at: Vec<Instant> = subscriptions
        .iter()
        .map(|s| {
            if s.kind == EVENTTYPE_CLOCK {
                clock_wake(s, now)
            } else {
                now
            }
        })
        .collect();
    let soonest = wake_at.iter().copied().min().unwrap_or(now);
    if soonest > now {
        match caller.data().deadline {
            Some(deadline) if deadline < soonest => {
                std::thread::sleep(deadline.saturating_duration_since(now));
                // Interrupted first, and the grace period starts now. The sleep ends as if it
                // were over (wasi-libc turns any poll error into ENOTSUP, which CPython would
                // raise), and CPython raises `KeyboardInterrupt` at its next check.
                if interrupt_guest(&mut caller)?.is_some() {
                    let fired = vec![true; subscriptions.len()];
                    return write_events(&mut caller, &memory, events_at, nevents_at, &subscriptions, &fired);
                }
                return Err(wasmtime::Error::new(DeadlineExceeded));
            }
            _ => std::thread::sleep(soonest - now),
        }
    }
    let now = Instant::now();
    let fired: Vec<bool> = wake_at.iter().map(|wake| *wake <= now).collect();
    write_events(&mut caller, &memory, events_at, nevents_at, &subscriptions, &fired)
}

/// Writes one event per fired subscription, and their count.
fn write_events(
    caller: &mut Caller<'_, GuestState>,
    memory: &Memory,
    events_at: usize,
    nevents_at: usize,
    subscriptions: &[Subscription],
    fired: &[bool],
) -> wasmtime::Result<i32> {
    let mut written = 0usize;
    for (subscription, _) in subscriptions.iter().zip(fired).filter(|(_, fired)| **fired) {
        let mut event = [0u8; EVENT_SIZE];
        event[0..8].copy_from_slice(&subscription.userdata.to_le_bytes());
        event[10] = subscription.kind;
        memory.write(&mut *caller, events_at + written * EVENT_SIZE, &event)?;
        written += 1;
    }
    memory.write(&mut *caller, nevents_at, &(written as u32).to_le_bytes())?;
    Ok(ERRNO_SUCCESS)
}

/// A seeded slot's poll: moves virtual time to the soonest wake-up at once (a descriptor
/// subscription is ready now, so time does not move) and says which subscriptions fired.
fn sleep_virtually(clock: &VirtualClock, subscriptions: &[Subscription]) -> Vec<bool> {
    let now = clock.elapsed_ns();
    let wake_at: Vec<u64> = subscriptions
        .iter()
        .map(|s| {
            if s.kind == EVENTTYPE_CLOCK {
                virtual_wake(clock, s, now)
            } else {
                now
            }
        })
        .collect();
    let soonest = wake_at.iter().copied().min().unwrap_or(now);
    clock.advance_to(soonest);
    wake_at.iter().map(|wake| *wake <= soonest.max(now)).collect()
}

/// When a clock subscription fires, in virtual nanoseconds since the slot started. The
/// monotonic clock reads elapsed virtual time; the wall clock reads it plus the start instant.
fn virtual_wake(clock: &VirtualClock, s: &Subscription, now: u64) -> u64 {
    if s.flags & SUBCLOCKFLAG_ABSTIME == 0 {
        return now.saturating_add(s.timeout);
    }
    if s.clock_id == CLOCK_REALTIME {
        s.timeout.saturating_sub(clock.epoch_ns())
    } else {
        s.timeout
    }
}

fn read_subscriptions(memory: &Memory, caller: &Caller<'_, GuestState>, at: usize, count: usize) -> Vec<Subscription> {
    let data = &memory.data(caller)[at..at + count * SUBSCRIPTION_SIZE];
    data.chunks_exact(SUBSCRIPTION_SIZE)
        .map(|raw| {
            let u64_at = |i: usize| u64::from_le_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
            Subscription {
                userdata: u64_at(0),
                kind: raw[8],
                clock_id: u32::from_le_bytes(raw[16..20].try_into().expect("4 bytes")),
                timeout: u64_at(24),
                flags: u16::from_le_bytes(raw[40..42].try_into().expect("2 bytes")),
            }
        })
        .collect()
}

fn clock_wake(s: &Subscription, now: Instant) -> Instant {
    // The guest picks the timeout: saturate instead of overflowing `Instant`.
    let after = |d: Duration| now.checked_add(d).unwrap_or(now + FOREVER);
    if s.flags & SUBCLOCKFLAG_ABSTIME == 0 {
        return after(Duration::from_nanos(s.timeout));
    }
    let remaining = if s.clock_id == CLOCK_REALTIME {
        let target = UNIX_EPOCH + Duration::from_nanos(s.timeout);
        target.duration_since(SystemTime::now()).unwrap_or_default()
    } else {
        let target = monotonic_origin().checked_add(Duration::from_nanos(s.timeout));
        target.map_or(FOREVER, |t| t.saturating_duration_since(now))
    };
    after(remaining)
}
