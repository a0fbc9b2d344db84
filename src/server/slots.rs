//! [`SlotTable`]: the slots this server handed out, when each was last used, and which are
//! busy, so idle ones can expire and busy ones never do. `/run_code` waits here for a place
//! when the table is full ([`SlotTable::reserve_within`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::api::SlotStatus;
use crate::slot::{Slot, SlotId};

/// The live slots, and the places reserved for slots being started.
pub(crate) struct SlotTable {
    state: Mutex<TableState>,
    max_slots: usize,
    /// The memory budget, when the server has one.
    memory: Option<MemoryBudget>,
    /// Woken whenever a place may have come free (a slot left, a reservation was given back).
    freed: Notify,
}

#[derive(Default)]
struct TableState {
    live: HashMap<SlotId, Entry>,
    /// Places held by acquires in progress and by `/run_code`'s private slots.
    reserved: usize,
}

struct Entry {
    slot: Slot,
    acquired: Instant,
    last_used: Instant,
    /// Requests running calls in the slot now.
    busy: usize,
}

/// A server-wide memory budget: each slot is charged its backend's memory limit, the most it
/// may hold, whether it holds it yet or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemoryBudget {
    /// The budget, in bytes.
    pub(crate) budget_bytes: u64,
    /// What one slot is charged: its memory limit.
    pub(crate) slot_bytes: u64,
}

impl MemoryBudget {
    /// How many slots fit in the budget.
    fn slots(&self) -> usize {
        usize::try_from(self.budget_bytes / self.slot_bytes.max(1)).unwrap_or(usize::MAX)
    }
}

/// The table is full: why, and what to raise.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Full {
    /// `--max-slots` slots are live or starting.
    Slots { capacity: usize },
    /// The slots' memory limits add up to the memory budget.
    Memory(MemoryBudget),
}

impl Full {
    /// Why no slot can start, and what to raise, for the client.
    pub(crate) fn reason(&self) -> String {
        match self {
            Full::Slots { capacity } => format!("all {capacity} slots are in use (--max-slots)"),
            Full::Memory(budget) => format!(
                "the server's memory budget is full: {} slots with a {} MiB memory limit each use all of its {} MiB \
                 (--memory-budget; lower the slots' --memory to fit more)",
                budget.slots(),
                budget.slot_bytes >> 20,
                budget.budget_bytes >> 20
            ),
        }
    }
}

impl SlotTable {
    /// A table of at most `max_slots` slots, and at most as many as `memory` has room for.
    pub(crate) fn new(max_slots: usize, memory: Option<MemoryBudget>) -> Self {
        SlotTable {
            state: Mutex::new(TableState::default()),
            max_slots,
            memory,
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many slots are live.
    pub(crate) fn live(&self) -> usize {
        self.lock().live.len()
    }

    /// Holds a place for a slot about to start, so concurrent acquires cannot overshoot.
    pub(crate) fn reserve(self: &Arc<Self>) -> Result<Reservation, Full> {
        let mut state = self.lock();
        let taken = state.live.len() + state.reserved;
        if taken >= self.max_slots {
            return Err(Full::Slots {
                capacity: self.max_slots,
            });
        }
        if let Some(budget) = self.memory
            && taken >= budget.slots()
        {
            return Err(Full::Memory(budget));
        }
        state.reserved += 1;
        Ok(Reservation {
            table: self.clone(),
            filled: false,
        })
    }

    /// Holds a place like [`SlotTable::reserve`], waiting for one to come free until
    /// `deadline` when the table is full. The waiters form the bounded queue SandboxFusion
    /// clients expect: they are the requests the server's admission limit let in, and each
    /// wakes when a place may be free and tries again (whoever gets there first wins).
    pub(crate) async fn reserve_within(self: &Arc<Self>, deadline: tokio::time::Instant) -> Result<Reservation, Full> {
        loop {
            // Registered before the attempt, so a place freed in between still wakes us.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.reserve() {
                Ok(reservation) => return Ok(reservation),
                Err(full) => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(full);
                    }
                }
            }
        }
    }

    /// Wakes the requests waiting for a place.
    fn announce_free_place(&self) {
        self.freed.notify_waiters();
    }

    /// Every live slot, oldest first.
    pub(crate) fn list(&self) -> Vec<SlotStatus> {
        let state = self.lock();
        let mut entries: Vec<&Entry> = state.live.values().collect();
        entries.sort_by_key(|e| (e.acquired, e.slot.id));
        let now = Instant::now();
        entries
            .into_iter()
            .map(|e| SlotStatus {
                slot: e.slot.clone(),
                idle_secs: idle_for(e, now).as_secs_f64(),
                busy: e.busy > 0,
            })
            .collect()
    }

    /// Marks the live slots among `ids` busy until the guard is dropped, and returns them.
    pub(crate) fn check_out(self: &Arc<Self>, ids: impl IntoIterator<Item = SlotId>) -> (HashMap<SlotId, Slot>, Busy) {
        let mut state = self.lock();
        let mut found = HashMap::new();
        for id in ids {
            if found.contains_key(&id) {
                continue;
            }
            if let Some(entry) = state.live.get_mut(&id) {
                entry.busy += 1;
                found.insert(id, entry.slot.clone());
            }
        }
        let busy = Busy {
            table: self.clone(),
            ids: found.keys().copied().collect(),
        };
        (found, busy)
    }

    /// Takes `id` out of the table, busy or not.
    pub(crate) fn remove(&self, id: SlotId) -> Option<Slot> {
        let removed = self.lock().live.remove(&id).map(|e| e.slot);
        self.announce_free_place();
        removed
    }

    /// Takes out every slot idle for at least `idle_timeout` with nothing running in it.
    pub(crate) fn take_idle(&self, idle_timeout: Duration) -> Vec<Slot> {
        let mut state = self.lock();
        let now = Instant::now();
        let expired: Vec<SlotId> = state
            .live
            .values()
            .filter(|e| e.busy == 0 && idle_for(e, now) >= idle_timeout)
            .map(|e| e.slot.id)
            .collect();
        let taken: Vec<Slot> = expired
            .iter()
            .filter_map(|id| state.live.remove(id))
            .map(|e| e.slot)
            .collect();
        drop(state);
        if !taken.is_empty() {
            self.announce_free_place();
        }
        taken
    }

    /// Takes out every slot.
    pub(crate) fn take_all(&self) -> Vec<Slot> {
        let taken = self.lock().live.drain().map(|(_, e)| e.slot).collect();
        self.announce_free_place();
        taken
    }
}

fn idle_for(entry: &Entry, now: Instant) -> Duration {
    if entry.busy > 0 {
        Duration::ZERO
    } else {
        now.saturating_duration_since(entry.last_used)
    }
}

/// A place in the table, given back on drop unless a live slot took it.
pub(crate) struct Reservation {
    table: Arc<SlotTable>,
    filled: bool,
}

impl Reservation {
    /// The slot started: it is live from now, and its place stays taken until it leaves.
    pub(crate) fn fill(mut self, slot: Slot) {
        let now = Instant::now();
        let mut state = self.table.lock();
        // One step under the lock: the place passes from the reservation to the entry.
        state.reserved = state.reserved.saturating_sub(1);
        state.live.insert(
            slot.id,
            Entry {
                slot,
                acquired: now,
                last_used: now,
                busy: 0,
            },
        );
        self.filled = true;
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.filled {
            let mut state = self.table.lock();
            state.reserved = state.reserved.saturating_sub(1);
            drop(state);
            self.table.announce_free_place();
        }
    }
}

/// Slots with calls running; each becomes idle again, from now, when this is dropped.
pub(crate) struct Busy {
    table: Arc<SlotTable>,
    ids: Vec<SlotId>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut state = self.table.lock();
        for id in &self.ids {
            if let Some(entry) = state.live.get_mut(id) {
                entry.busy = entry.busy.saturating_sub(1);
                entry.last_used = now;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn slot(id: u64) -> Slot {
        Slot {
            id: SlotId(id),
            trajectory_id: format!("t{id}"),
            backend: "test".into(),
            workspace: PathBuf::from("/nowhere"),
        }
    }

    #[test]
    fn reservations_bound_the_table_and_come_back_when_dropped() {
        let table = Arc::new(SlotTable::new(2, None));
        let first = table.reserve().expect("room for one");
        let second = table.reserve().expect("room for two");
        assert!(table.reserve().is_err(), "a third place does not fit");
        first.fill(slot(1));
        drop(second);
        assert_eq!(table.live(), 1);
        table
            .reserve()
            .expect("the dropped reservation's place is free again")
            .fill(slot(2));
        assert!(table.reserve().is_err());
    }

    #[test]
    fn busy_slots_never_expire_and_idle_ones_do() {
        let table = Arc::new(SlotTable::new(10, None));
        table.reserve().expect("room").fill(slot(1));
        table.reserve().expect("room").fill(slot(2));
        let (found, busy) = table.check_out([SlotId(1), SlotId(1), SlotId(9)]);
        assert_eq!(
            found.len(),
            1,
            "a repeated id counts once and an unknown one is skipped"
        );
        let expired = table.take_idle(Duration::ZERO);
        assert_eq!(expired.iter().map(|s| s.id).collect::<Vec<_>>(), vec![SlotId(2)]);
        assert!(table.list()[0].busy);
        drop(busy);
        assert!(!table.list()[0].busy);
        assert_eq!(table.take_idle(Duration::ZERO).len(), 1);
        assert_eq!(table.live(), 0);
    }
}
