//! A token bucket per client.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use iprules::Rule;

use super::lru::Lru;
use super::space::client_key;

/// How fast each client may go.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimitOptions {
    /// Sustained rate, in events per second (> 0). Default: 10.
    pub rate: f64,
    /// Events allowed at once after a quiet spell (at least 1).
    /// Default: 20.
    pub burst: u32,
    /// IPv6 clients share one bucket per network of this prefix length.
    /// Default: 64.
    pub ipv6_prefix: u8,
    /// Most buckets kept. Idle buckets (full again) are dropped first; when
    /// every bucket is busy the least recently used goes, which gives that
    /// client a fresh, full bucket. Default: 100,000.
    pub max_tracked: usize,
}

impl Default for RateLimitOptions {
    fn default() -> RateLimitOptions {
        RateLimitOptions {
            rate: 10.0,
            burst: 20,
            ipv6_prefix: 64,
            max_tracked: 100_000,
        }
    }
}

/// A refused event: try again after this long.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RetryAfter(pub Duration);

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets per client key (see [`client_key`]), with bounded memory.
///
/// Each client starts with `burst` tokens; an event takes one; tokens come
/// back at `rate` per second up to `burst`. A bucket that has been idle
/// long enough to be full again is the same as no bucket, so it is dropped.
///
/// ```
/// use std::time::{Duration, Instant};
/// use gateway::guard::{RateLimit, RateLimitOptions, RetryAfter};
/// let rl = RateLimit::new(RateLimitOptions { rate: 2.0, burst: 2, ..Default::default() });
/// let (ip, t) = ("192.0.2.1".parse()?, Instant::now());
/// assert!(rl.check(ip, t).is_ok());
/// assert!(rl.check(ip, t).is_ok());
/// assert_eq!(rl.check(ip, t), Err(RetryAfter(Duration::from_millis(500))));
/// assert!(rl.check(ip, t + Duration::from_millis(500)).is_ok());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct RateLimit {
    rate: f64,
    burst: f64,
    /// How long an emptied bucket takes to fill up.
    refill: Duration,
    prefix: u8,
    buckets: Mutex<Lru<Rule, Bucket>>,
}

impl fmt::Debug for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("rate", &self.rate)
            .field("burst", &self.burst)
            .field("tracked", &self.tracked())
            .finish_non_exhaustive()
    }
}

impl RateLimit {
    /// Buckets with the given options (a rate that is not a positive number
    /// is taken as one event per hour, so a typo fails closed).
    pub fn new(opts: RateLimitOptions) -> RateLimit {
        let rate = if opts.rate.is_finite() && opts.rate > 0.0 {
            opts.rate
        } else {
            1.0 / 3600.0
        };
        let burst = f64::from(opts.burst.max(1));
        RateLimit {
            rate,
            burst,
            refill: Duration::try_from_secs_f64(burst / rate).unwrap_or(Duration::MAX),
            prefix: opts.ipv6_prefix,
            buckets: Mutex::new(Lru::new(opts.max_tracked)),
        }
    }

    /// Takes one token from `ip`'s bucket at `now`, or says how long until
    /// one is available.
    pub fn check(&self, ip: IpAddr, now: Instant) -> Result<(), RetryAfter> {
        let key = client_key(ip, self.prefix);
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        // Drop buckets idle long enough to be full again.
        while let Some((_, b)) = buckets.oldest() {
            if now.saturating_duration_since(b.last) < self.refill {
                break;
            }
            buckets.pop_oldest();
        }
        let bucket = match buckets.get_mut(&key) {
            Some(b) => {
                let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
                b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
                b.last = b.last.max(now);
                b
            }
            None => {
                buckets.insert(
                    key,
                    Bucket {
                        tokens: self.burst,
                        last: now,
                    },
                );
                match buckets.get_mut(&key) {
                    Some(b) => b,
                    None => return Ok(()),
                }
            }
        };
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.rate;
            Err(RetryAfter(
                Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX),
            ))
        }
    }

    /// Buckets currently kept.
    pub fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}
