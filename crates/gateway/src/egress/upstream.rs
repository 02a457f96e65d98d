//! Idle upstream HTTP connections, keyed by (source address, destination
//! authority).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use tokio::time::Instant;

use super::body::UpBody;
use super::options::KeepAlive;

/// (source address, `host:port` of the destination, lowercase).
pub(crate) type Key = (IpAddr, String);

struct Idle {
    sender: SendRequest<UpBody>,
    dest: IpAddr,
    since: Instant,
}

#[derive(Default)]
struct Map {
    by_key: HashMap<Key, Vec<Idle>>,
    count: usize,
}

/// The idle connections of one listener. Dropping an entry closes its
/// connection (hyper ends a client connection when its last sender goes).
pub(crate) struct IdlePool {
    map: Mutex<Map>,
    cfg: KeepAlive,
    ttl: Duration,
}

impl IdlePool {
    pub(crate) fn new(cfg: KeepAlive, ttl: Duration) -> IdlePool {
        IdlePool {
            map: Mutex::new(Map::default()),
            cfg,
            ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Map> {
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps `sender` (a connection to `dest` whose last exchange is done).
    pub(crate) fn put(&self, key: Key, sender: SendRequest<UpBody>, dest: IpAddr) {
        if self.cfg.max_idle == 0 || sender.is_closed() {
            return;
        }
        let mut m = self.lock();
        if m.count >= self.cfg.max_idle {
            return;
        }
        let list = m.by_key.entry(key).or_default();
        if list.len() >= self.cfg.max_idle_per_key {
            return;
        }
        list.push(Idle {
            sender,
            dest,
            since: Instant::now(),
        });
        m.count += 1;
    }

    /// The most recently used live connection for `key` to one of `dests`.
    pub(crate) fn take(
        &self,
        key: &Key,
        dests: &[IpAddr],
    ) -> Option<(SendRequest<UpBody>, IpAddr)> {
        let now = Instant::now();
        let mut m = self.lock();
        let list = m.by_key.get_mut(key)?;
        let mut found = None;
        let mut removed = 0;
        while let Some(idle) = list.pop() {
            removed += 1;
            if now.duration_since(idle.since) < self.ttl
                && !idle.sender.is_closed()
                && dests.contains(&idle.dest)
            {
                found = Some((idle.sender, idle.dest));
                break;
            }
        }
        if list.is_empty() {
            m.by_key.remove(key);
        }
        m.count -= removed;
        found
    }

    /// Drops expired and closed connections.
    pub(crate) fn sweep(&self) {
        let now = Instant::now();
        let ttl = self.ttl;
        let mut m = self.lock();
        let mut count = 0;
        m.by_key.retain(|_, list| {
            list.retain(|i| now.duration_since(i.since) < ttl && !i.sender.is_closed());
            count += list.len();
            !list.is_empty()
        });
        m.count = count;
    }

    /// Drops every idle connection.
    pub(crate) fn clear(&self) {
        let mut m = self.lock();
        m.by_key.clear();
        m.count = 0;
    }
}
