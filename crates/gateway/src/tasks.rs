//! The tasks of a listener (client connections and what they start), so
//! that shutting the listener down can drain them: wait for them up to a
//! deadline, then abort what is left. Every proxy (egress, ingress, L4)
//! keeps its connections here (and aborts them if its `serve` future is
//! dropped mid-drain, through [`Tasks::abort_on_drop`]), and the ingress
//! route table its upstream connections (aborted when the table drops).
//!
//! Spawning costs one counter increment and one entry in a sharded lock
//! (no set to reap, no single lock for every connection of the listener).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::future::Future;
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::AbortHandle;
use tokio_util::task::TaskTracker;

/// Locks of the abort registry of [`Tasks`] (tasks are spread over them).
const TASK_SHARDS: usize = 8;

/// The tasks of one listener: client connections, tunnels, upstream
/// connections. Counted by a [`TaskTracker`] (a counter: no lock, nothing
/// to reap); each can be aborted through its entry in a sharded registry
/// that the task removes itself from when it ends.
pub(crate) struct Tasks {
    tracker: TaskTracker,
    registry: Arc<Registry>,
}

/// Abort handles by task id. The spawner inserts a task's handle after the
/// spawn and the task removes it when it ends, whichever comes first
/// leaving `None` (a tombstone) for the other to remove: no lock is held
/// across a spawn (a runtime shutting down drops the future inside
/// `spawn`, and with it the task's [`Registered`]).
type Handles = HashMap<u64, Option<AbortHandle>, BuildHasherDefault<IdHasher>>;

#[derive(Default)]
struct Registry {
    next: AtomicU64,
    shards: [Mutex<Handles>; TASK_SHARDS],
}

/// Hashes sequential ids (Fibonacci hashing: the high bits vary too).
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

impl Registry {
    fn shard(&self, id: u64) -> std::sync::MutexGuard<'_, Handles> {
        self.shards[id as usize % TASK_SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The spawner (`Some`: the handle) or the ended task (`None`) for
    /// task `id`: the first leaves its value, the second removes it.
    fn meet(&self, id: u64, handle: Option<AbortHandle>) {
        match self.shard(id).entry(id) {
            Entry::Occupied(e) => {
                e.remove();
            }
            Entry::Vacant(e) => {
                e.insert(handle);
            }
        }
    }

    /// Aborts every task registered now (outside the locks: an abort may
    /// drop a task, which takes its shard's lock).
    fn abort_all(&self) {
        let mut handles = Vec::new();
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            handles.extend(shard.values().flatten().cloned());
        }
        for h in handles {
            h.abort();
        }
    }
}

/// Aborts the tasks of a [`Tasks`] when dropped ([`Tasks::abort_on_drop`]).
pub(crate) struct AbortOnDrop(Arc<Registry>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort_all();
    }
}

/// Removes a task from the registry when it ends (or is aborted).
struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.meet(self.id, None);
    }
}

impl Default for Tasks {
    fn default() -> Tasks {
        Tasks {
            tracker: TaskTracker::new(),
            registry: Arc::default(),
        }
    }
}

impl Tasks {
    /// Spawns `f` (boxed: connection futures are large, and moving them by
    /// value through the layers of a spawn costs more than one box).
    pub(crate) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        self.spawn_boxed(Box::pin(f));
    }

    fn spawn_boxed(&self, f: Pin<Box<dyn Future<Output = ()> + Send>>) {
        let id = self.registry.next.fetch_add(1, Ordering::Relaxed);
        let registered = Registered {
            registry: self.registry.clone(),
            id,
        };
        let handle = self.tracker.spawn(async move {
            let _registered = registered;
            f.await;
        });
        self.registry.meet(id, Some(handle.abort_handle()));
    }

    /// Aborts every task registered now.
    fn abort_all(&self) {
        self.registry.abort_all();
    }

    /// A guard that aborts every task of this set when it drops (a
    /// listener's `serve` holds one: its connections hold the set, so it
    /// would never drop while they run).
    pub(crate) fn abort_on_drop(&self) -> AbortOnDrop {
        AbortOnDrop(Arc::clone(&self.registry))
    }

    /// Waits for every task (also those spawned meanwhile) until
    /// `timeout`, then aborts what is left.
    pub(crate) async fn drain(&self, timeout: Duration) {
        self.tracker.close();
        if tokio::time::timeout(timeout, self.tracker.wait())
            .await
            .is_ok()
        {
            return;
        }
        tracing::info!(
            left = self.tracker.len(),
            "drain timeout: aborting open connections"
        );
        // Aborted tasks may still spawn (an upstream connection) before
        // they are next polled: abort until none is left.
        loop {
            self.abort_all();
            if tokio::time::timeout(Duration::from_millis(100), self.tracker.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
    }
}

impl Drop for Tasks {
    /// The owner is gone (a listener, a route table): so are its tasks.
    fn drop(&mut self) {
        self.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::time::Instant;

    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tasks_and_for_those_they_spawn_meanwhile() {
        let tasks = Arc::new(Tasks::default());
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let (tasks2, done) = (tasks.clone(), done.clone());
            tasks.spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                // A connection starting an upstream task while draining.
                let done2 = done.clone();
                tasks2.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    done2.fetch_add(1, Ordering::Relaxed);
                });
                done.fetch_add(1, Ordering::Relaxed);
            });
        }
        let t0 = Instant::now();
        tasks.drain(Duration::from_secs(10)).await;
        assert_eq!(done.load(Ordering::Relaxed), 6);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    #[tokio::test]
    async fn drain_aborts_what_is_left_at_the_deadline() {
        let tasks = Tasks::default();
        let finished = Arc::new(AtomicUsize::new(0));
        let f = finished.clone();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            f.fetch_add(1, Ordering::Relaxed);
        });
        let t0 = Instant::now();
        tasks.drain(Duration::from_millis(100)).await;
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert_eq!(tasks.tracker.len(), 0, "the task is gone");
        assert_eq!(finished.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn dropping_the_owner_aborts_its_tasks_and_finished_ones_leave_the_registry() {
        let tasks = Tasks::default();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async {});
        tasks.spawn(async move {
            let _tx = tx; // dropped when the task is aborted
            std::future::pending::<()>().await;
        });
        // The finished task removed itself; the pending one is registered.
        let deadline = Instant::now() + Duration::from_secs(5);
        while entries(&tasks) != 1 {
            assert!(
                Instant::now() < deadline,
                "finished task never left the registry"
            );
            tokio::task::yield_now().await;
        }
        drop(tasks);
        let r = tokio::time::timeout(Duration::from_secs(5), rx).await;
        assert!(matches!(r, Ok(Err(_))), "the task was aborted: {r:?}");
    }

    /// Entries in the registry (handles and tombstones).
    fn entries(tasks: &Tasks) -> usize {
        tasks
            .registry
            .shards
            .iter()
            .map(|s| s.lock().unwrap().len())
            .sum()
    }

    #[test]
    fn spawning_on_a_runtime_that_is_shut_down_returns_and_leaves_nothing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handle = rt.handle().clone();
        drop(rt);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _in = handle.enter();
            let tasks = Tasks::default();
            // Tokio drops the future inside spawn: its Registered too.
            tasks.spawn(async {});
            tx.send(entries(&tasks)).unwrap();
        });
        let left = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("spawn returned (no lock held across it)");
        assert_eq!(left, 0, "no entry left behind");
    }

    #[tokio::test]
    async fn the_abort_guard_aborts_tasks_that_hold_their_own_set() {
        // As a listener's connections hold its context, and with it the set.
        let tasks = Arc::new(Tasks::default());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let held = tasks.clone();
        tasks.spawn(async move {
            let _set = held;
            let _tx = tx;
            std::future::pending::<()>().await;
        });
        let guard = tasks.abort_on_drop();
        drop(tasks); // not the last reference: nothing happens
        tokio::task::yield_now().await;
        drop(guard);
        let r = tokio::time::timeout(Duration::from_secs(5), rx).await;
        assert!(matches!(r, Ok(Err(_))), "the task was aborted: {r:?}");
    }
}
