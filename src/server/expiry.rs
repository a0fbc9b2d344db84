//! Idle-slot expiry: a client that disappears without releasing its slots does not leak them.

use std::sync::Weak;
use std::time::Duration;

use super::Shared;

/// The reaper looks this many times per idle timeout, so a slot outlives its timeout by at
/// most a quarter of it.
const CHECKS_PER_TIMEOUT: u32 = 4;
/// Never check more often than this, however short the timeout.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(10);
/// Never check less often than this, however long the timeout.
const MAX_CHECK_INTERVAL: Duration = Duration::from_secs(30);

/// Releases (workspace included) every slot idle for the server's idle timeout with no call
/// running, until the server's state is gone. Later calls to an expired slot get
/// `unknown_slot` results, as for any slot the server does not hold.
pub(super) async fn reap_idle_slots(shared: Weak<Shared>) {
    let interval = match shared.upgrade() {
        Some(shared) => (shared.config.idle_timeout / CHECKS_PER_TIMEOUT).clamp(MIN_CHECK_INTERVAL, MAX_CHECK_INTERVAL),
        None => return,
    };
    loop {
        tokio::time::sleep(interval).await;
        let Some(shared) = shared.upgrade() else { return };
        let expired = shared.slots.take_idle(shared.config.idle_timeout);
        // Counted as they leave the table, so the metric never lags the slot count.
        shared.metrics.count_expired(expired.len());
        for slot in &expired {
            tracing::info!(slot = %slot.id, trajectory = %slot.trajectory_id, "released an idle slot");
            if let Err(error) = shared.backend.release(slot, true).await {
                tracing::warn!(slot = %slot.id, %error, "failed to release an idle slot");
            }
        }
    }
}
