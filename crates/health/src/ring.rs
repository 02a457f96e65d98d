//! A bounded ring buffer (oldest entries dropped first).

use std::collections::VecDeque;

/// A FIFO of at most `cap` items. Grows on demand up to `cap`, then reuses
/// its storage: no allocation once full.
#[derive(Debug, Clone)]
pub(crate) struct Ring<T> {
    items: VecDeque<T>,
}

impl<T> Ring<T> {
    pub(crate) fn new() -> Self {
        Ring {
            items: VecDeque::new(),
        }
    }

    pub(crate) fn push(&mut self, cap: usize, item: T) {
        if cap == 0 {
            return;
        }
        while self.items.len() >= cap {
            self.items.pop_front();
        }
        self.items.push_back(item);
    }

    pub(crate) fn last_mut(&mut self) -> Option<&mut T> {
        self.items.back_mut()
    }

    /// Oldest first.
    pub(crate) fn iter(&self) -> std::collections::vec_deque::Iter<'_, T> {
        self.items.iter()
    }

    /// The newest `n` items, oldest first.
    pub(crate) fn last(
        &self,
        n: usize,
    ) -> std::iter::Skip<std::collections::vec_deque::Iter<'_, T>> {
        self.items.iter().skip(self.items.len().saturating_sub(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest() {
        let mut r = Ring::new();
        for i in 0..5 {
            r.push(3, i);
        }
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(r.last(2).copied().collect::<Vec<_>>(), [3, 4]);
        assert_eq!(r.last(10).count(), 3);
        r.push(0, 9);
        assert_eq!(r.iter().count(), 3);
        // A smaller cap (options changed) shrinks on the next push.
        r.push(1, 7);
        assert_eq!(r.iter().copied().collect::<Vec<_>>(), [7]);
    }
}
