//! Idle upstream HTTP connections, keyed by (source address, destination
//! authority).
//!
//! Per request on a kept-alive path this costs one hash of the borrowed
//! key and one uncontended lock of one of [`SHARDS`] shards: no key is
//! allocated (a connection carries its owned [`Key`] and its ready-made
//! headers from one exchange to the next).

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use http::HeaderValue;
use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use super::body::UpBody;
use super::options::KeepAlive;

/// Locks (idle connections are spread by key hash).
const SHARDS: usize = 8;

/// Which connections may serve a request: same source, same destination
/// host (lowercase, IPv6 in brackets) and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Key {
    pub(crate) src: IpAddr,
    pub(crate) host: Arc<str>,
    pub(crate) port: u16,
}

/// A [`Key`] borrowed from a request.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyRef<'a> {
    pub(crate) src: IpAddr,
    pub(crate) host: &'a str,
    pub(crate) port: u16,
}

impl Key {
    pub(crate) fn borrow(&self) -> KeyRef<'_> {
        KeyRef {
            src: self.src,
            host: &self.host,
            port: self.port,
        }
    }
}

impl KeyRef<'_> {
    fn matches(&self, k: &Key) -> bool {
        self.src == k.src && self.port == k.port && *self.host == *k.host
    }
}

/// An upstream HTTP/1.1 connection with what every exchange on it needs.
pub(crate) struct Conn {
    pub(crate) sender: SendRequest<UpBody>,
    /// The destination address it is connected to.
    pub(crate) dest: IpAddr,
    pub(crate) key: Key,
    /// `Host` of requests sent on it.
    pub(crate) host_header: HeaderValue,
    /// [`super::SOURCE_HEADER`] of responses read from it.
    pub(crate) source_header: HeaderValue,
}

/// What the pool needs of a connection.
pub(crate) trait Pooled {
    /// Which requests it may serve.
    fn key(&self) -> &Key;
    /// The destination address it is connected to.
    fn dest(&self) -> IpAddr;
    /// Known to be closed (or unusable).
    fn closed(&self) -> bool;
    /// Whether, taken from the pool, it can take a request now.
    async fn ready(&mut self) -> bool {
        true
    }
}

impl Pooled for Conn {
    fn key(&self) -> &Key {
        &self.key
    }
    fn dest(&self) -> IpAddr {
        self.dest
    }
    fn closed(&self) -> bool {
        self.sender.is_closed()
    }
    /// Ready to send (without a timer when it already is; at most a
    /// second otherwise).
    async fn ready(&mut self) -> bool {
        if self.sender.is_ready() {
            return true;
        }
        tokio::time::timeout(std::time::Duration::from_secs(1), self.sender.ready())
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

struct Idle<C> {
    conn: C,
    since: Instant,
}

struct Bucket<C> {
    key: Key,
    list: Vec<Idle<C>>,
}

/// Hashes a `u64` that is already a hash.
#[derive(Default)]
struct PreHashed(u64);

impl std::hash::Hasher for PreHashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Buckets by key hash (equal hashes share the entry's list of buckets).
type Shard<C> = HashMap<u64, Vec<Bucket<C>>, BuildHasherDefault<PreHashed>>;

/// The idle connections of one listener. Dropping an entry closes its
/// connection (hyper ends a client connection when its last sender goes).
/// Buckets emptied by [`IdlePool::take`] stay (ready for the connection's
/// return) until the next [`IdlePool::sweep`].
pub(crate) struct IdlePool<C = Conn> {
    shards: Box<[Mutex<Shard<C>>]>,
    count: AtomicUsize,
    hasher: std::hash::RandomState,
    cfg: KeepAlive,
    ttl: Duration,
}

impl<C: Pooled> IdlePool<C> {
    pub(crate) fn new(cfg: KeepAlive, ttl: Duration) -> IdlePool<C> {
        IdlePool {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            count: AtomicUsize::new(0),
            hasher: std::hash::RandomState::new(),
            cfg,
            ttl,
        }
    }

    fn hash(&self, k: KeyRef<'_>) -> u64 {
        self.hasher.hash_one((k.src, k.port, k.host))
    }

    fn shard(&self, hash: u64) -> MutexGuard<'_, Shard<C>> {
        let i = (hash >> 48) as usize % SHARDS;
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `conn` (its last exchange is done).
    pub(crate) fn put(&self, conn: C) {
        if self.cfg.max_idle == 0 || conn.closed() {
            return;
        }
        let k = conn.key().borrow();
        let hash = self.hash(k);
        let mut m = self.shard(hash);
        if self.count.fetch_add(1, Ordering::Relaxed) >= self.cfg.max_idle {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        let buckets = m.entry(hash).or_default();
        let i = match buckets.iter().position(|b| k.matches(&b.key)) {
            Some(i) => i,
            None => {
                buckets.push(Bucket {
                    key: conn.key().clone(),
                    list: Vec::with_capacity(1),
                });
                buckets.len() - 1
            }
        };
        let list = &mut buckets[i].list;
        if list.len() >= self.cfg.max_idle_per_key {
            self.count.fetch_sub(1, Ordering::Relaxed);
            return;
        }
        list.push(Idle {
            conn,
            since: Instant::now(),
        });
    }

    /// The most recently used live connection for `key` to one of `dests`.
    pub(crate) fn take(&self, key: KeyRef<'_>, dests: &[IpAddr]) -> Option<C> {
        let hash = self.hash(key);
        let mut m = self.shard(hash);
        let list = &mut m
            .get_mut(&hash)?
            .iter_mut()
            .find(|b| key.matches(&b.key))?
            .list;
        let now = Instant::now();
        let mut found = None;
        let mut removed = 0;
        while let Some(idle) = list.pop() {
            removed += 1;
            if now.duration_since(idle.since) < self.ttl
                && !idle.conn.closed()
                && dests.contains(&idle.conn.dest())
            {
                found = Some(idle.conn);
                break;
            }
        }
        self.count.fetch_sub(removed, Ordering::Relaxed);
        found
    }

    /// Drops expired and closed connections, and empty buckets.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let ttl = self.ttl;
        for shard in &self.shards {
            let mut m = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let mut removed = 0;
            m.retain(|_, buckets| {
                buckets.retain_mut(|b| {
                    let before = b.list.len();
                    b.list
                        .retain(|i| now.duration_since(i.since) < ttl && !i.conn.closed());
                    removed += before - b.list.len();
                    !b.list.is_empty()
                });
                !buckets.is_empty()
            });
            self.count.fetch_sub(removed, Ordering::Relaxed);
        }
    }

    /// Drops every idle connection.
    pub(crate) fn clear(&self) {
        for shard in &self.shards {
            let mut m = shard.lock().unwrap_or_else(PoisonError::into_inner);
            let removed: usize = m.values().flatten().map(|b| b.list.len()).sum();
            m.clear();
            self.count.fetch_sub(removed, Ordering::Relaxed);
        }
    }
}
