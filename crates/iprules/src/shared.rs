//! `Shared<T>`: many lock-free readers, one writer at a time.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

/// A value read on hot paths and written rarely.
///
/// Readers never wait: [`read`](Shared::read) loads the current snapshot
/// (an atomic pointer load, no lock, no reference-count traffic in the
/// common case). A writer clones the current value (cheap for
/// [`RuleSet`](crate::RuleSet) and [`Policy`](crate::Policy): a few `Arc`
/// copies), changes its copy, and publishes it with one pointer swap.
/// Writers are serialised by a mutex so that no update is lost.
///
/// ```
/// use iprules::{Policy, Shared};
/// let live = Shared::new(Policy::default());
/// live.update(|p| { p.deny.add("203.0.113.0/24".parse().unwrap()); });
/// assert!(!live.read(|p| p.allows("203.0.113.9".parse().unwrap())));
/// ```
#[derive(Debug)]
pub struct Shared<T> {
    current: ArcSwap<T>,
    writer: Mutex<()>,
}

impl<T: Clone> Shared<T> {
    /// Wraps a value.
    pub fn new(value: T) -> Shared<T> {
        Shared {
            current: ArcSwap::from_pointee(value),
            writer: Mutex::new(()),
        }
    }

    /// Runs `f` on the current snapshot.
    #[inline]
    pub fn read<R>(&self, f: impl FnOnce(&T) -> R) -> R {
        f(&self.current.load())
    }

    /// The current snapshot, to keep beyond one call.
    pub fn snapshot(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Changes the value: `f` works on a private copy which is then
    /// published atomically. Returns what `f` returned.
    pub fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut next = T::clone(&self.current.load());
        let out = f(&mut next);
        self.current.store(Arc::new(next));
        out
    }

    /// Replaces the value.
    pub fn replace(&self, value: T) {
        let _guard = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        self.current.store(Arc::new(value));
    }
}

impl<T: Clone + Default> Default for Shared<T> {
    fn default() -> Shared<T> {
        Shared::new(T::default())
    }
}
