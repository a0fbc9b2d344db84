//! The remote backend's bookkeeping: which servers it holds, how many places each has taken,
//! which slot lives where, and what is down or lost. Plain data behind one mutex, never held
//! across an await.

use std::collections::HashMap;
use std::sync::Arc;

use super::client::ServerClient;
use super::{RemoteSlotInfo, ServerInfo, SlotHealth};
use crate::slot::SlotId;

/// A server's key within the pool, never reused.
pub(crate) type ServerKey = u64;

/// A server the pool holds.
struct ServerEntry {
    key: ServerKey,
    client: Arc<ServerClient>,
    /// Why it is down, if it is.
    down: Option<String>,
    /// Live slots on it plus places reserved for acquires in flight.
    places: usize,
}

/// A live slot of the backend and where it lives.
#[derive(Clone)]
pub(crate) struct SlotEntry {
    pub(crate) server: ServerKey,
    pub(crate) client: Arc<ServerClient>,
    /// The slot's id on its server.
    pub(crate) remote: SlotId,
    /// Why its state is gone, if it is.
    pub(crate) lost: Option<String>,
}

/// Every server and slot the backend holds.
#[derive(Default)]
pub(crate) struct Pool {
    servers: Vec<ServerEntry>,
    slots: HashMap<SlotId, SlotEntry>,
    next_key: ServerKey,
}

impl Pool {
    /// Adds a healthy server with one place already taken (for the acquire that asked for it).
    pub(crate) fn add_server(&mut self, client: Arc<ServerClient>, places: usize) -> ServerKey {
        let key = self.next_key;
        self.next_key += 1;
        self.servers.push(ServerEntry {
            key,
            client,
            down: None,
            places,
        });
        key
    }

    /// How many servers the pool holds, up or down.
    pub(crate) fn server_count(&self) -> usize {
        self.servers.len()
    }

    /// Takes a place on the least-loaded server that is up and has room (the oldest on a tie),
    /// which spreads cells over the servers.
    pub(crate) fn reserve(&mut self, per_server: usize) -> Option<(ServerKey, Arc<ServerClient>)> {
        let entry = self
            .servers
            .iter_mut()
            .filter(|s| s.down.is_none() && s.places < per_server)
            .min_by_key(|s| s.places)?;
        entry.places += 1;
        Some((entry.key, entry.client.clone()))
    }

    /// Takes a place on the server `key`, if it is up and has room: where a fork goes, beside
    /// the slot it copies.
    pub(crate) fn reserve_on(&mut self, key: ServerKey, per_server: usize) -> Option<Arc<ServerClient>> {
        let entry = self
            .servers
            .iter_mut()
            .find(|s| s.key == key && s.down.is_none() && s.places < per_server)?;
        entry.places += 1;
        Some(entry.client.clone())
    }

    /// Takes a place on `key` after it came back up.
    pub(crate) fn revive(&mut self, key: ServerKey, per_server: usize) -> Option<Arc<ServerClient>> {
        let entry = self
            .servers
            .iter_mut()
            .find(|s| s.key == key && s.places < per_server)?;
        entry.down = None;
        entry.places += 1;
        Some(entry.client.clone())
    }

    /// Gives a place back. Returns the server, removed from the pool, when it should be
    /// stopped: it holds nothing any more and is down or beyond the warm minimum.
    pub(crate) fn give_back(&mut self, key: ServerKey, min_servers: usize) -> Option<Arc<ServerClient>> {
        let up = self.servers.iter().filter(|s| s.down.is_none()).count();
        let position = self.servers.iter().position(|s| s.key == key)?;
        let entry = &mut self.servers[position];
        entry.places = entry.places.saturating_sub(1);
        let retire = entry.places == 0 && (entry.down.is_some() || up > min_servers);
        retire.then(|| self.servers.remove(position).client)
    }

    /// Servers that are down but have room, to try again when no server is up with room.
    pub(crate) fn down_with_room(&self, per_server: usize) -> Vec<(ServerKey, Arc<ServerClient>)> {
        self.servers
            .iter()
            .filter(|s| s.down.is_some() && s.places < per_server)
            .map(|s| (s.key, s.client.clone()))
            .collect()
    }

    /// Removes the servers that are down and hold nothing, to be stopped.
    pub(crate) fn take_idle_down(&mut self) -> Vec<Arc<ServerClient>> {
        let (idle_down, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.servers)
            .into_iter()
            .partition(|s| s.down.is_some() && s.places == 0);
        self.servers = kept;
        idle_down.into_iter().map(|s| s.client).collect()
    }

    /// Marks `key` down, and every slot on it lost, for `reason`.
    pub(crate) fn mark_down(&mut self, key: ServerKey, reason: &str) {
        if let Some(entry) = self.servers.iter_mut().find(|s| s.key == key) {
            entry.down = Some(reason.to_string());
        }
        for slot in self.slots.values_mut().filter(|s| s.server == key && s.lost.is_none()) {
            slot.lost = Some(reason.to_string());
        }
    }

    /// Records a live slot.
    pub(crate) fn insert_slot(&mut self, id: SlotId, entry: SlotEntry) {
        self.slots.insert(id, entry);
    }

    /// A live slot's entry.
    pub(crate) fn slot(&self, id: SlotId) -> Option<&SlotEntry> {
        self.slots.get(&id)
    }

    /// Forgets a slot.
    pub(crate) fn remove_slot(&mut self, id: SlotId) -> Option<SlotEntry> {
        self.slots.remove(&id)
    }

    /// Marks one slot lost.
    pub(crate) fn mark_lost(&mut self, id: SlotId, reason: &str) {
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.lost.get_or_insert_with(|| reason.to_string());
        }
    }

    /// Empties the pool: every slot and every server.
    pub(crate) fn drain(&mut self) -> (Vec<SlotEntry>, Vec<Arc<ServerClient>>) {
        let slots = self.slots.drain().map(|(_, s)| s).collect();
        let servers = self.servers.drain(..).map(|s| s.client).collect();
        (slots, servers)
    }

    /// Where slot `id` lives and whether it is alive.
    pub(crate) fn slot_info(&self, id: SlotId) -> Option<RemoteSlotInfo> {
        let slot = self.slots.get(&id)?;
        let endpoint = slot.client.endpoint();
        Some(RemoteSlotInfo {
            slot_id: id,
            server_id: endpoint.id.clone(),
            server_url: endpoint.url.clone(),
            server_slot_id: slot.remote,
            health: match &slot.lost {
                None => SlotHealth::Alive,
                Some(reason) => SlotHealth::Lost { reason: reason.clone() },
            },
        })
    }

    /// Every server, oldest first.
    pub(crate) fn server_infos(&self) -> Vec<ServerInfo> {
        self.servers
            .iter()
            .map(|s| ServerInfo {
                id: s.client.endpoint().id.clone(),
                url: s.client.endpoint().url.clone(),
                down: s.down.clone(),
                slots: self.slots.values().filter(|slot| slot.server == s.key).count(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::provision::ServerEndpoint;

    fn client(name: &str) -> Arc<ServerClient> {
        let endpoint = ServerEndpoint {
            id: name.into(),
            url: format!("http://{name}"),
            token: None,
        };
        Arc::new(ServerClient::new(endpoint, reqwest::Client::new()))
    }

    fn slot_on(server: ServerKey, client: &Arc<ServerClient>) -> SlotEntry {
        SlotEntry {
            server,
            client: client.clone(),
            remote: SlotId(1),
            lost: None,
        }
    }

    #[test]
    fn places_go_to_the_least_loaded_server_with_room() {
        let mut pool = Pool::default();
        let a = pool.add_server(client("a"), 1);
        let b = pool.add_server(client("b"), 0);
        assert_eq!(pool.reserve(2).map(|(key, _)| key), Some(b));
        assert_eq!(pool.reserve(2).map(|(key, _)| key), Some(a), "a tie goes to the oldest");
        assert_eq!(pool.reserve(2).map(|(key, _)| key), Some(b));
        assert!(pool.reserve(2).is_none(), "both are full");
    }

    #[test]
    fn a_server_is_stopped_with_its_last_slot_only_beyond_the_minimum_or_when_down() {
        let mut pool = Pool::default();
        let a = pool.add_server(client("a"), 1);
        let b = pool.add_server(client("b"), 1);
        assert!(pool.give_back(a, 1).is_some(), "two up, one kept warm: a goes");
        assert!(pool.give_back(b, 1).is_none(), "b is the warm minimum");
        pool.reserve(1);
        pool.mark_down(b, "gone");
        assert!(
            pool.give_back(b, 1).is_some(),
            "a down server goes even when it was the minimum"
        );
        assert_eq!(pool.server_count(), 0);
    }

    #[test]
    fn a_down_server_loses_its_slots_and_can_come_back() {
        let mut pool = Pool::default();
        let a_client = client("a");
        let a = pool.add_server(a_client.clone(), 1);
        pool.insert_slot(SlotId(10), slot_on(a, &a_client));
        pool.mark_down(a, "connection refused");
        assert_eq!(
            pool.slot_info(SlotId(10)).map(|i| i.health),
            Some(SlotHealth::Lost {
                reason: "connection refused".into()
            })
        );
        assert!(pool.reserve(2).is_none(), "a down server takes no new slots");
        assert_eq!(pool.down_with_room(2).len(), 1);
        assert!(pool.revive(a, 2).is_some());
        assert!(pool.server_infos()[0].down.is_none());
        assert!(
            matches!(
                pool.slot_info(SlotId(10)).map(|i| i.health),
                Some(SlotHealth::Lost { .. })
            ),
            "its old slots stay lost"
        );
    }
}
