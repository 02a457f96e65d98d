//! Sliding-window success/failure counters for [`Strategy::Rate`](crate::Strategy::Rate).

use std::time::{Duration, Instant};

/// Number of buckets a window is split into.
pub(crate) const BUCKETS: usize = 10;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    index: u64,
    successes: u32,
    failures: u32,
}

/// Ten time buckets of `window / 10`; fixed size, no allocation.
///
/// Bucket indices count whole bucket lengths since `origin`, the time of the
/// key's first sample. The window at index `i` is the buckets `i-9..=i`.
#[derive(Debug, Clone)]
pub(crate) struct RateWindow {
    origin: Option<Instant>,
    buckets: [Bucket; BUCKETS],
}

impl RateWindow {
    pub(crate) fn new() -> Self {
        RateWindow {
            origin: None,
            buckets: [Bucket::default(); BUCKETS],
        }
    }

    fn bucket_nanos(window: Duration) -> u128 {
        (window.as_nanos() / BUCKETS as u128).max(1)
    }

    fn index(&self, window: Duration, now: Instant) -> u64 {
        let Some(origin) = self.origin else { return 0 };
        let elapsed = now.saturating_duration_since(origin).as_nanos();
        u64::try_from(elapsed / Self::bucket_nanos(window)).unwrap_or(u64::MAX)
    }

    /// Counts one sample at `now`.
    pub(crate) fn add(&mut self, window: Duration, now: Instant, failure: bool) {
        if self.origin.is_none() {
            self.origin = Some(now);
        }
        let index = self.index(window, now);
        let slot = (index % BUCKETS as u64) as usize;
        if let Some(b) = self.buckets.get_mut(slot) {
            if b.index != index {
                *b = Bucket {
                    index,
                    ..Bucket::default()
                };
            }
            if failure {
                b.failures = b.failures.saturating_add(1);
            } else {
                b.successes = b.successes.saturating_add(1);
            }
        }
    }

    /// `(failures, requests)` in the window ending at `now`.
    pub(crate) fn counts(&self, window: Duration, now: Instant) -> (u32, u32) {
        let current = self.index(window, now);
        let (mut failures, mut successes) = (0u32, 0u32);
        for b in &self.buckets {
            if b.index <= current && b.index.saturating_add(BUCKETS as u64) > current {
                failures = failures.saturating_add(b.failures);
                successes = successes.saturating_add(b.successes);
            }
        }
        (failures, failures.saturating_add(successes))
    }

    /// Forgets every sample (the origin stays).
    pub(crate) fn clear(&mut self) {
        self.buckets = [Bucket::default(); BUCKETS];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slides_in_tenths() {
        let t0 = Instant::now();
        let w = Duration::from_secs(10);
        let mut r = RateWindow::new();
        r.add(w, t0, true);
        r.add(w, t0 + Duration::from_millis(500), false);
        assert_eq!(r.counts(w, t0), (1, 2));
        r.add(w, t0 + Duration::from_secs(5), true);
        assert_eq!(r.counts(w, t0 + Duration::from_secs(9)), (2, 3));
        // At 10 s the first bucket (0..1 s) has left the window.
        assert_eq!(r.counts(w, t0 + Duration::from_secs(10)), (1, 1));
        assert_eq!(r.counts(w, t0 + Duration::from_secs(15)), (0, 0));
        // A bucket slot reused by a later index is reset.
        r.add(w, t0 + Duration::from_secs(20), false);
        assert_eq!(r.counts(w, t0 + Duration::from_secs(20)), (0, 1));
        r.clear();
        assert_eq!(r.counts(w, t0 + Duration::from_secs(20)), (0, 0));
    }

    #[test]
    fn tiny_window_does_not_divide_by_zero() {
        let t0 = Instant::now();
        let w = Duration::from_nanos(1);
        let mut r = RateWindow::new();
        r.add(w, t0, true);
        assert_eq!(r.counts(w, t0), (1, 1));
    }
}
