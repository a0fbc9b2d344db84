//! What a seeded slot sees of the world ([`SeededWorld`]): an entropy stream from its seed in
//! place of the host's, and a virtual clock in place of the host's clocks.
//!
//! A wasm guest observes time and entropy only through WASI imports (`random_get`,
//! `clock_time_get`, `poll_oneoff`), so replacing those makes every observation repeatable:
//! - `random_get` reads a ChaCha20 stream keyed by the slot seed (`chacha20`'s `ChaCha20Rng`, the
//!   generator behind `rand`'s `StdRng`, named directly so its output cannot change under us);
//! - both clocks read one virtual time that starts at a fixed instant and moves [`CLOCK_STEP`]
//!   per read, so two reads never return the same instant and a busy wait still ends;
//! - a sleep (`poll_oneoff` on a clock) moves virtual time to its wake-up at once (`poll.rs`).
//!
//! The host's own deadlines stay in real time: a guest that loops forever still hits its limit.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chacha20::ChaCha20Rng;
use chacha20::rand_core::{Rng, SeedableRng, TryCryptoRng, TryRng};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock, WasiCtxBuilder};

use crate::seed::{DEFAULT_VIRTUAL_EPOCH_SECS, stream_key};

/// How far virtual time moves on each clock read: small enough that measured durations stay
/// plausible, large enough that a `while time.time() < end` loop ends in a million reads per
/// virtual second.
pub(crate) const CLOCK_STEP: Duration = Duration::from_micros(1);

/// The seed the template interpreter (the one memory snapshots are taken from) runs under, so
/// that the snapshot every slot restores is the same in every process. A slot never keeps it:
/// seeded slots rewind to their own seed, unseeded ones reseed from host entropy.
pub(crate) const TEMPLATE_SEED: u64 = 0;

/// The turn a booted seeded slot runs once its world is rewound: the guest reseeds every
/// generator a module keeps (`random`, numpy's legacy global one, sympy's, `tempfile`'s names)
/// from the slot's stream (`_seed_slot` in `guest/rollbox_guest.py`). A restored slot needs no
/// extra turn: its fresh-slot turn does the same reseeding, after the rewind.
pub(crate) const SEEDED_SLOT_CELL: &str = "__import__('rollbox_guest')._seed_slot()";

/// A seeded slot's entropy stream and virtual clock, shared by its WASI context and its
/// `poll_oneoff`. Cheap to clone: clones are the same world.
#[derive(Clone)]
pub(crate) struct SeededWorld {
    seed: u64,
    random: SharedStream,
    clock: Arc<VirtualClock>,
}

impl SeededWorld {
    /// A world for a slot seeded with `seed`, its wall clock starting at `epoch`.
    pub(crate) fn new(seed: u64, epoch: SystemTime) -> Self {
        SeededWorld {
            seed,
            random: SharedStream(Arc::new(Mutex::new(ChaCha20Rng::from_seed(stream_key(seed))))),
            clock: Arc::new(VirtualClock {
                epoch_ns: epoch.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
                elapsed_ns: AtomicU64::new(0),
            }),
        }
    }

    /// The template interpreter's world (see [`TEMPLATE_SEED`]).
    pub(crate) fn template() -> Self {
        SeededWorld::new(
            TEMPLATE_SEED,
            UNIX_EPOCH + Duration::from_secs(DEFAULT_VIRTUAL_EPOCH_SECS),
        )
    }

    /// Puts the stream and the clock back at the slot's start: whatever the start-up consumed
    /// (a bootstrap or a restore, which differ), the slot's first cell sees the same world.
    pub(crate) fn rewind(&self) {
        *lock(&self.random.0) = ChaCha20Rng::from_seed(stream_key(self.seed));
        self.clock.elapsed_ns.store(0, Ordering::Relaxed);
    }

    /// The virtual clock, for `poll_oneoff`.
    pub(crate) fn clock(&self) -> Arc<VirtualClock> {
        self.clock.clone()
    }

    /// Gives `builder` this world's entropy and clocks, in place of the host's.
    pub(crate) fn install(&self, builder: &mut WasiCtxBuilder) {
        let mut seed_bytes = [0u8; 16];
        lock(&self.random.0).fill_bytes(&mut seed_bytes);
        builder
            .secure_random(self.random.clone())
            .insecure_random(self.random.clone())
            .insecure_random_seed(u128::from_le_bytes(seed_bytes))
            .wall_clock(VirtualWallClock(self.clock.clone()))
            .monotonic_clock(VirtualMonotonicClock(self.clock.clone()));
    }
}

fn lock(stream: &Mutex<ChaCha20Rng>) -> std::sync::MutexGuard<'_, ChaCha20Rng> {
    // A generator has no invariant a panic could break halfway: keep using it.
    stream.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The slot's ChaCha20 stream, shared between its WASI context and [`SeededWorld::rewind`].
#[derive(Clone)]
struct SharedStream(Arc<Mutex<ChaCha20Rng>>);

impl TryRng for SharedStream {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        lock(&self.0).try_next_u32()
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        lock(&self.0).try_next_u64()
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        lock(&self.0).try_fill_bytes(dst)
    }
}

impl TryCryptoRng for SharedStream {}

/// Virtual time: a fixed start, and how far the slot has moved from it.
pub(crate) struct VirtualClock {
    epoch_ns: u64,
    elapsed_ns: AtomicU64,
}

impl VirtualClock {
    /// Virtual nanoseconds since the slot started, after one more [`CLOCK_STEP`].
    fn tick(&self) -> u64 {
        let step = CLOCK_STEP.as_nanos() as u64;
        self.elapsed_ns.fetch_add(step, Ordering::Relaxed).saturating_add(step)
    }

    /// Virtual nanoseconds since the slot started, without moving.
    pub(crate) fn elapsed_ns(&self) -> u64 {
        self.elapsed_ns.load(Ordering::Relaxed)
    }

    /// The wall-clock start, as nanoseconds since the Unix epoch.
    pub(crate) fn epoch_ns(&self) -> u64 {
        self.epoch_ns
    }

    /// Moves virtual time forward to `elapsed_ns` (never back): a sleep that ends at once.
    pub(crate) fn advance_to(&self, elapsed_ns: u64) {
        self.elapsed_ns.fetch_max(elapsed_ns, Ordering::Relaxed);
    }
}

/// The guest's wall clock: the start instant plus virtual elapsed time.
struct VirtualWallClock(Arc<VirtualClock>);

impl HostWallClock for VirtualWallClock {
    fn resolution(&self) -> Duration {
        CLOCK_STEP
    }

    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.epoch_ns.saturating_add(self.0.tick()))
    }
}

/// The guest's monotonic clock: virtual elapsed time, from 0 at the slot's start.
struct VirtualMonotonicClock(Arc<VirtualClock>);

impl HostMonotonicClock for VirtualMonotonicClock {
    fn resolution(&self) -> u64 {
        CLOCK_STEP.as_nanos() as u64
    }

    fn now(&self) -> u64 {
        self.0.tick()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewound_world_repeats_its_stream_and_clock() {
        let world = SeededWorld::new(7, UNIX_EPOCH);
        let mut stream = world.random.clone();
        let first = stream.next_u64();
        let clock = VirtualWallClock(world.clock());
        let t0 = clock.now();
        world.clock().advance_to(5_000_000_000);
        assert_eq!(
            clock.now(),
            t0 + Duration::from_secs(5),
            "a sleep moves virtual time by its length"
        );
        world.rewind();
        assert_eq!(stream.next_u64(), first);
        assert_eq!(clock.now(), t0);
        assert_ne!(SeededWorld::new(8, UNIX_EPOCH).random.clone().next_u64(), first);
    }
}
