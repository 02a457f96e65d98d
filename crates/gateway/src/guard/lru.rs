//! A bounded map that forgets its least recently used entries, in O(1)
//! amortised per operation (a hash map plus a queue of touches with lazy
//! deletion).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

pub(crate) struct Lru<K, V> {
    map: HashMap<K, (V, u64)>,
    /// Touches in order; an entry is current when its stamp matches the map.
    order: VecDeque<(K, u64)>,
    stamp: u64,
    cap: usize,
}

impl<K: Hash + Eq + Copy, V> Lru<K, V> {
    pub(crate) fn new(cap: usize) -> Lru<K, V> {
        Lru {
            map: HashMap::new(),
            order: VecDeque::new(),
            stamp: 0,
            cap: cap.max(1),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    fn next_stamp(&mut self) -> u64 {
        self.stamp += 1;
        self.stamp
    }

    /// The value of `k`, marked as most recently used.
    pub(crate) fn get_mut(&mut self, k: &K) -> Option<&mut V> {
        let stamp = self.next_stamp();
        let entry = self.map.get_mut(k)?;
        entry.1 = stamp;
        self.order.push_back((*k, stamp));
        self.compact();
        self.map.get_mut(k).map(|e| &mut e.0)
    }

    /// The value of `k` without touching it.
    pub(crate) fn peek(&self, k: &K) -> Option<&V> {
        self.map.get(k).map(|e| &e.0)
    }

    /// Inserts (or replaces) `k` as most recently used; evicts the least
    /// recently used entry when full.
    pub(crate) fn insert(&mut self, k: K, v: V) {
        if !self.map.contains_key(&k) && self.map.len() >= self.cap {
            self.pop_oldest();
        }
        let stamp = self.next_stamp();
        self.map.insert(k, (v, stamp));
        self.order.push_back((k, stamp));
        self.compact();
    }

    pub(crate) fn remove(&mut self, k: &K) -> Option<V> {
        self.map.remove(k).map(|e| e.0)
    }

    /// The least recently used entry.
    pub(crate) fn oldest(&mut self) -> Option<(&K, &V)> {
        self.drop_stale_front();
        let (k, _) = self.order.front()?;
        self.map.get_key_value(k).map(|(k, e)| (k, &e.0))
    }

    pub(crate) fn pop_oldest(&mut self) -> Option<(K, V)> {
        self.drop_stale_front();
        let (k, _) = self.order.pop_front()?;
        self.map.remove(&k).map(|e| (k, e.0))
    }

    fn drop_stale_front(&mut self) {
        while let Some((k, s)) = self.order.front() {
            if self.map.get(k).is_some_and(|e| e.1 == *s) {
                break;
            }
            self.order.pop_front();
        }
    }

    /// Keeps the touch queue within a constant factor of the map.
    fn compact(&mut self) {
        if self.order.len() <= 2 * self.map.len() + 64 {
            return;
        }
        let map = &self.map;
        self.order
            .retain(|(k, s)| map.get(k).is_some_and(|e| e.1 == *s));
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn evicts_least_recently_used() {
        let mut l = Lru::new(3);
        l.insert(1, "a");
        l.insert(2, "b");
        l.insert(3, "c");
        assert!(l.get_mut(&1).is_some()); // 2 is now the oldest
        l.insert(4, "d");
        assert_eq!(l.len(), 3);
        assert!(l.peek(&2).is_none());
        assert_eq!(l.oldest().map(|(k, _)| *k), Some(3));
        for _ in 0..1000 {
            l.get_mut(&4);
        }
        assert!(l.order.len() <= 2 * 3 + 64 + 1);
        assert_eq!(l.pop_oldest(), Some((3, "c")));
        assert_eq!(l.remove(&1), Some("a"));
        assert_eq!(l.pop_oldest(), Some((4, "d")));
        assert_eq!(l.pop_oldest(), None);
    }
}
