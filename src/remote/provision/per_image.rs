//! One backend per container image, behind one [`Backend`]: each trajectory's slot comes from
//! the backend of its task's image, so slots of different images never share a sandbox (each
//! image has its own pool and its own Modal sandboxes, as SWE-bench's per-instance images
//! need).
//!
//! A slot is routed by its trajectory id, `INSTANCE_ID/...` as the rollout runner names them:
//! the longest `/`-separated prefix that is a routed instance id picks the image; any other id
//! goes to the default image's backend. The router hands out its own slot ids, since every inner
//! backend numbers its slots from 1.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::join_all;

use crate::slot::tools::ToolName;
use crate::slot::{Backend, BackendError, ErrorKind, ExecutionMetadata, ExecutionResult, Slot, SlotId, ToolCall};

/// Slots from one backend per image; see the [module docs](self).
pub struct PerImageBackend {
    /// The image of each routed instance id.
    routes: HashMap<String, String>,
    /// Each image's backend; `default_image`'s serves every unrouted trajectory.
    backends: HashMap<String, Arc<dyn Backend>>,
    default_image: String,
    /// The router's slot id of each live slot, with its image and the inner backend's slot.
    live: Mutex<HashMap<SlotId, (String, Slot)>>,
    next_id: AtomicU64,
}

/// A [`PerImageBackend`] could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum PerImageError {
    /// A route names an image that has no backend.
    #[error("instance `{instance_id}` is routed to image `{image}`, which has no backend; give every image a backend")]
    NoBackend {
        /// The routed instance.
        instance_id: String,
        /// Its image.
        image: String,
    },
}

impl PerImageBackend {
    /// A router over `backends` (one per image), sending each instance of `routes` to its
    /// image's backend and everything else to `default_image`'s.
    pub fn new(
        routes: HashMap<String, String>,
        backends: HashMap<String, Arc<dyn Backend>>,
        default_image: String,
    ) -> Result<PerImageBackend, PerImageError> {
        let unrouted = std::iter::once((&default_image, &default_image)).chain(routes.iter());
        for (instance_id, image) in unrouted {
            if !backends.contains_key(image) {
                return Err(PerImageError::NoBackend {
                    instance_id: instance_id.clone(),
                    image: image.clone(),
                });
            }
        }
        Ok(PerImageBackend {
            routes,
            backends,
            default_image,
            live: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        })
    }

    /// The image a trajectory's slot comes from.
    pub fn image_of(&self, trajectory_id: &str) -> &str {
        let mut prefix = trajectory_id;
        loop {
            if let Some(image) = self.routes.get(prefix) {
                return image;
            }
            match prefix.rsplit_once('/') {
                Some((shorter, _)) => prefix = shorter,
                None => return &self.default_image,
            }
        }
    }

    fn backend(&self, image: &str) -> &Arc<dyn Backend> {
        // Every routed image and the default have a backend (checked in `new`).
        &self.backends[image]
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<SlotId, (String, Slot)>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an inner slot under a new router id.
    fn register(&self, image: &str, inner: Slot) -> Slot {
        let id = SlotId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let outer = Slot { id, ..inner.clone() };
        self.live().insert(id, (image.to_owned(), inner));
        outer
    }

    fn inner(&self, slot: &Slot) -> Result<(String, Slot), BackendError> {
        self.live()
            .get(&slot.id)
            .cloned()
            .ok_or(BackendError::UnknownSlot(slot.id))
    }
}

#[async_trait::async_trait]
impl Backend for PerImageBackend {
    fn name(&self) -> &str {
        self.backend(&self.default_image).name()
    }

    fn tools(&self) -> Vec<ToolName> {
        self.backend(&self.default_image).tools()
    }

    async fn acquire(&self, trajectory_id: &str) -> Result<Slot, BackendError> {
        let image = self.image_of(trajectory_id).to_owned();
        let inner = self.backend(&image).acquire(trajectory_id).await?;
        Ok(self.register(&image, inner))
    }

    async fn acquire_seeded(&self, trajectory_id: &str, seed: u64) -> Result<Slot, BackendError> {
        let image = self.image_of(trajectory_id).to_owned();
        let inner = self.backend(&image).acquire_seeded(trajectory_id, seed).await?;
        Ok(self.register(&image, inner))
    }

    async fn execute_batch(&self, calls: Vec<(Slot, ToolCall)>) -> Vec<ExecutionResult> {
        let mut results: Vec<Option<ExecutionResult>> = Vec::new();
        let mut by_image: HashMap<String, Vec<(usize, Slot, ToolCall)>> = HashMap::new();
        for (index, (slot, call)) in calls.into_iter().enumerate() {
            results.push(None);
            match self.inner(&slot) {
                Ok((image, inner)) => by_image.entry(image).or_default().push((index, inner, call)),
                Err(error) => {
                    let metadata = ExecutionMetadata {
                        slot_id: Some(slot.id),
                        ..Default::default()
                    };
                    results[index] = Some(ExecutionResult::failure(
                        ErrorKind::Backend,
                        error.to_string(),
                        metadata,
                    ));
                }
            }
        }
        let batches = by_image.into_iter().map(|(image, batch)| async move {
            let (indices, calls): (Vec<usize>, Vec<(Slot, ToolCall)>) = batch
                .into_iter()
                .map(|(index, slot, call)| (index, (slot, call)))
                .unzip();
            (indices, self.backend(&image).execute_batch(calls).await)
        });
        for (indices, batch_results) in join_all(batches).await {
            for (index, result) in indices.into_iter().zip(batch_results) {
                results[index] = Some(result);
            }
        }
        results
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| {
                    ExecutionResult::failure(
                        ErrorKind::Backend,
                        "the image's backend returned no result for the call",
                        ExecutionMetadata::default(),
                    )
                })
            })
            .collect()
    }

    async fn fork(&self, slot: &Slot, trajectory_id: &str) -> Result<Slot, BackendError> {
        // A fork stays on its parent's image (and server): it is a copy of that slot.
        let (image, inner) = self.inner(slot)?;
        let forked = self.backend(&image).fork(&inner, trajectory_id).await?;
        Ok(self.register(&image, forked))
    }

    async fn release(&self, slot: &Slot, reset_workspace: bool) -> Result<(), BackendError> {
        let (image, inner) = self.inner(slot)?;
        let released = self.backend(&image).release(&inner, reset_workspace).await;
        self.live().remove(&slot.id);
        released
    }

    async fn shutdown(&self) -> Result<(), BackendError> {
        let mut first_error = None;
        for backend in self.backends.values() {
            if let Err(error) = backend.shutdown().await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that is never called: routing alone is under test here.
    struct Unused;

    #[async_trait::async_trait]
    impl Backend for Unused {
        fn name(&self) -> &str {
            "unused"
        }
        fn tools(&self) -> Vec<ToolName> {
            Vec::new()
        }
        async fn acquire(&self, _: &str) -> Result<Slot, BackendError> {
            unreachable!("routing only")
        }
        async fn execute_batch(&self, _: Vec<(Slot, ToolCall)>) -> Vec<ExecutionResult> {
            unreachable!("routing only")
        }
        async fn release(&self, _: &Slot, _: bool) -> Result<(), BackendError> {
            unreachable!("routing only")
        }
    }

    fn router(routes: &[(&str, &str)], images: &[&str]) -> Result<PerImageBackend, PerImageError> {
        let routes = routes.iter().map(|(i, m)| ((*i).to_owned(), (*m).to_owned())).collect();
        let backends = images
            .iter()
            .map(|m| ((*m).to_owned(), Arc::new(Unused) as Arc<dyn Backend>))
            .collect();
        PerImageBackend::new(routes, backends, "default".to_owned())
    }

    #[test]
    fn trajectories_go_to_their_instances_image_by_the_longest_prefix() {
        let router = router(&[("a", "img-a"), ("a/b", "img-b")], &["default", "img-a", "img-b"]).expect("router");
        assert_eq!(router.image_of("a/3"), "img-a");
        assert_eq!(router.image_of("a/3/reward"), "img-a");
        assert_eq!(router.image_of("a/b/0"), "img-b");
        assert_eq!(router.image_of("ab/0"), "default");
        assert_eq!(router.image_of("c/0"), "default");
    }

    #[test]
    fn a_route_to_an_image_without_a_backend_is_refused() {
        let error = router(&[("a", "img-a")], &["default"]).err().expect("refused");
        assert!(error.to_string().contains("`img-a`"), "{error}");
    }
}
