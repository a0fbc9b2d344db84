//! What every in-process backend does the same way around a batch: keep its live slots by id,
//! group the calls by slot (each slot's calls in order), answer calls to unknown slots, make
//! sure every call gets exactly one result, and lock a slot's interpreter so that a panic never
//! leaves a half-run interpreter in use.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::slot::{BackendError, ErrorKind, ExecutionMetadata, ExecutionResult, Slot, SlotId, ToolCall};

/// A backend's live slots by id. Every change is one insert or remove, so the map is whole
/// even when a panic elsewhere poisoned the lock, and it stays usable.
pub(crate) struct LiveSlots<L>(RwLock<HashMap<SlotId, Arc<L>>>);

impl<L> LiveSlots<L> {
    /// No slots.
    pub(crate) fn new() -> Self {
        LiveSlots(RwLock::new(HashMap::new()))
    }

    /// The map, for reading.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, HashMap<SlotId, Arc<L>>> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The map, for changing.
    pub(crate) fn write(&self) -> RwLockWriteGuard<'_, HashMap<SlotId, Arc<L>>> {
        self.0.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The slot `id`, if it is live.
    pub(crate) fn get(&self, id: SlotId) -> Option<Arc<L>> {
        self.read().get(&id).cloned()
    }
}

/// One slot's calls in a batch, each with its index in the batch, in order.
pub(crate) type SlotCalls<L> = (Arc<L>, Vec<(usize, ToolCall)>);

/// Groups `calls` by slot, keeping each slot's calls in batch order, and looks each slot up
/// with `find`. Calls to slots `find` does not know get their `unknown_slot` result in
/// `results`, which must have one entry per call.
pub(crate) fn group_by_slot<L>(
    calls: Vec<(Slot, ToolCall)>,
    results: &mut [Option<ExecutionResult>],
    find: impl Fn(SlotId) -> Option<Arc<L>>,
) -> Vec<SlotCalls<L>> {
    let mut groups: Vec<(SlotId, Vec<(usize, ToolCall)>)> = Vec::new();
    let mut group_of: HashMap<SlotId, usize> = HashMap::new();
    for (index, (slot, call)) in calls.into_iter().enumerate() {
        let g = *group_of.entry(slot.id).or_insert_with(|| {
            groups.push((slot.id, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push((index, call));
    }
    let mut runnable = Vec::with_capacity(groups.len());
    for (slot_id, group) in groups {
        match find(slot_id) {
            Some(live) => runnable.push((live, group)),
            None => group
                .into_iter()
                .for_each(|(index, call)| results[index] = Some(unknown_slot(slot_id, &call))),
        }
    }
    runnable
}

/// The result for a call to a slot the backend does not have.
pub(crate) fn unknown_slot(slot_id: SlotId, call: &ToolCall) -> ExecutionResult {
    ExecutionResult::failure(
        ErrorKind::UnknownSlot,
        BackendError::UnknownSlot(slot_id).to_string(),
        ExecutionMetadata {
            tool: call.name.clone(),
            slot_id: Some(slot_id),
            ..Default::default()
        },
    )
}

/// Every call's result, in batch order; a call whose result was lost (its worker panicked in
/// the host) gets a `backend` error rather than going missing.
pub(crate) fn every_result(results: Vec<Option<ExecutionResult>>) -> Vec<ExecutionResult> {
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| {
                ExecutionResult::failure(
                    ErrorKind::Backend,
                    "no result was produced for this call",
                    ExecutionMetadata::default(),
                )
            })
        })
        .collect()
}

/// Locks a slot's interpreter. A panic while the lock was held may have left the interpreter
/// mid-call, so it is thrown away (the slot starts a fresh one) rather than reused.
pub(crate) fn lock_interpreter<T>(interpreter: &Mutex<Option<T>>) -> MutexGuard<'_, Option<T>> {
    match interpreter.lock() {
        Ok(guard) => guard,
        Err(poisoned) => {
            let mut guard = poisoned.into_inner();
            *guard = None;
            interpreter.clear_poison();
            guard
        }
    }
}
