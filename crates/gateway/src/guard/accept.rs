//! Accept-time filtering: every accepted connection is checked against a
//! live [`Policy`] (and optionally a per-client rate limit) before anything
//! is read from it.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use iprules::{Policy, Reason, Shared};
use socket2::SockRef;
use tokio::net::{TcpListener, TcpStream};

use iprules::Rule;

use super::autoblock::{AutoBlock, Ban, Offense, Recorded};
use super::ratelimit::RateLimit;

/// Called with every ban a [`Guard`]'s [`AutoBlock`] imposes (to persist
/// it, publish an event). Called on the connection's path: keep it short.
pub type BanHook = Arc<dyn Fn(&Ban) + Send + Sync>;

/// Called with every offense a [`Guard`]'s [`AutoBlock`] counted without
/// banning, with the client's key: to add it to a count several instances
/// share (which bans through [`AutoBlock::ban`] when that count reaches
/// the threshold). Called on the connection's path: keep it short (a
/// channel send).
pub type OffenseFeed = Arc<dyn Fn(Rule, Offense) + Send + Sync>;

/// Why [`Guard::check`] refused a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The policy denies the address (a deny rule, a ban, or the default).
    Denied(Reason),
    /// The client opened connections faster than its rate limit allows.
    RateLimited(Duration),
}

/// The accept-time filter of a listener.
///
/// Holds the listener's policy (an `Arc<Shared<Policy>>`, so an admin API,
/// a rules file watcher and an [`AutoBlock`] can change it while it runs),
/// an optional connection [`RateLimit`] per client, and counters. Cheap to
/// share: wrap it in an `Arc` and clone that.
///
/// Integration in an accept loop is one line: `listener.accept()` becomes
/// `guard.accept(&listener)`. A refused connection is reset at once
/// (`SO_LINGER` 0: the client gets an RST, nothing is read from it) and the
/// loop goes on to the next one.
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use std::sync::Arc;
/// use gateway::guard::Guard;
/// let mut policy = iprules::Policy::default();
/// policy.deny.add("203.0.113.0/24".parse().unwrap());
/// let guard = Guard::new(Arc::new(iprules::Shared::new(policy)));
/// let listener = tokio::net::TcpListener::bind("[::]:8080").await?;
/// loop {
///     let (stream, peer) = guard.accept(&listener).await?;
///     // serve `stream`…
/// #   drop((stream, peer));
/// }
/// # }
/// ```
pub struct Guard {
    policy: Arc<Shared<Policy>>,
    rate: Option<Arc<RateLimit>>,
    autoblock: Option<Arc<AutoBlock>>,
    on_ban: Option<BanHook>,
    feed: Option<OffenseFeed>,
    /// Whether the rate limit applies at accept (per connection) or is
    /// left to the protocol (per request, [`Guard::check_request`]).
    rate_at_accept: bool,
    accepted: AtomicU64,
    denied: AtomicU64,
    limited: AtomicU64,
}

/// A [`Guard`]'s counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuardMetrics {
    /// Connections let through.
    pub accepted_total: u64,
    /// Connections refused by the policy.
    pub denied_total: u64,
    /// Connections refused by the rate limit.
    pub rate_limited_total: u64,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("metrics", &self.metrics())
            .field("rate_limit", &self.rate.is_some())
            .field("autoblock", &self.autoblock.is_some())
            .field("ban_hook", &self.on_ban.is_some())
            .field("offense_feed", &self.feed.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for Guard {
    /// A guard that lets everyone through (an empty, default-allow policy).
    fn default() -> Guard {
        Guard::new(Arc::new(Shared::new(Policy::default())))
    }
}

impl Guard {
    /// A guard enforcing `policy`.
    pub fn new(policy: Arc<Shared<Policy>>) -> Guard {
        Guard {
            policy,
            rate: None,
            autoblock: None,
            on_ban: None,
            feed: None,
            rate_at_accept: true,
            accepted: AtomicU64::new(0),
            denied: AtomicU64::new(0),
            limited: AtomicU64::new(0),
        }
    }

    /// Also limits how fast each client (see
    /// [`client_key`](super::client_key)) may open connections.
    pub fn with_rate_limit(mut self, limit: Arc<RateLimit>) -> Guard {
        self.rate = Some(limit);
        self
    }

    /// Reports every rate-limited connection to `autoblock` as
    /// [`Offense::RateExceeded`].
    pub fn with_autoblock(mut self, autoblock: Arc<AutoBlock>) -> Guard {
        self.autoblock = Some(autoblock);
        self
    }

    /// Applies the rate limit per request instead of per connection: the
    /// protocol calls [`Guard::check_request`] for each request (an HTTP
    /// proxy answers 429 with `Retry-After`), so a client cannot escape the
    /// limit by keeping one connection alive.
    pub fn rate_per_request(mut self) -> Guard {
        self.rate_at_accept = false;
        self
    }

    /// For a guard in [`rate_per_request`](Guard::rate_per_request) mode:
    /// whether client `ip` may make one more request now; otherwise how
    /// long to wait (counted, and reported as [`Offense::RateExceeded`]).
    /// Always `Ok` without a rate limit or in per-connection mode.
    pub fn check_request(&self, ip: IpAddr) -> Result<(), Duration> {
        if self.rate_at_accept {
            return Ok(());
        }
        let Some(rate) = &self.rate else {
            return Ok(());
        };
        rate.check(ip, Instant::now()).map_err(|wait| {
            self.limited.fetch_add(1, Ordering::Relaxed);
            self.offense(ip, Offense::RateExceeded);
            wait.0
        })
    }

    /// Calls `hook` with every ban the guard's [`AutoBlock`] imposes.
    pub fn with_ban_hook(mut self, hook: BanHook) -> Guard {
        self.on_ban = Some(hook);
        self
    }

    /// Calls `feed` with every offense the guard's [`AutoBlock`] counted
    /// without banning.
    pub fn with_offense_feed(mut self, feed: OffenseFeed) -> Guard {
        self.feed = Some(feed);
        self
    }

    /// The [`AutoBlock`] offenses are reported to, if any.
    pub fn autoblock(&self) -> Option<&Arc<AutoBlock>> {
        self.autoblock.as_ref()
    }

    /// Reports misbehaviour of client `ip` (failed authentication, a
    /// malformed request, …) to the [`AutoBlock`], if there is one; returns
    /// the ban it caused. The ban applies from the next accept.
    pub fn offense(&self, ip: IpAddr, offense: Offense) -> Option<Ban> {
        match self.autoblock.as_ref()?.count(ip, offense, Instant::now()) {
            Recorded::Banned(ban) => {
                if let Some(hook) = &self.on_ban {
                    hook(&ban);
                }
                Some(ban)
            }
            Recorded::Counted(key) => {
                if let Some(feed) = &self.feed {
                    feed(key, offense);
                }
                None
            }
            Recorded::NotCounted => None,
        }
    }

    /// The policy it enforces (update it to change who gets in).
    pub fn policy(&self) -> &Arc<Shared<Policy>> {
        &self.policy
    }

    /// The counters.
    pub fn metrics(&self) -> GuardMetrics {
        GuardMetrics {
            accepted_total: self.accepted.load(Ordering::Relaxed),
            denied_total: self.denied.load(Ordering::Relaxed),
            rate_limited_total: self.limited.load(Ordering::Relaxed),
        }
    }

    /// Decides about a new connection from `peer` and counts the outcome.
    /// IPv4-mapped peers (from a dual-stack socket) match IPv4 rules.
    pub fn check(&self, peer: SocketAddr) -> Result<(), Refusal> {
        let ip = peer.ip();
        let decision = self.policy.read(|p| p.decide(ip));
        if !decision.is_allowed() {
            self.denied.fetch_add(1, Ordering::Relaxed);
            return Err(Refusal::Denied(decision.reason));
        }
        if let Some(rate) = self.rate.as_ref().filter(|_| self.rate_at_accept) {
            let now = Instant::now();
            if let Err(wait) = rate.check(ip, now) {
                self.limited.fetch_add(1, Ordering::Relaxed);
                self.offense(ip, Offense::RateExceeded);
                return Err(Refusal::RateLimited(wait.0));
            }
        }
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Whether a new connection from `peer` may proceed (counted, like
    /// [`check`](Guard::check)).
    pub fn admit(&self, peer: SocketAddr) -> bool {
        self.check(peer).is_ok()
    }

    /// Accepts the next connection the guard lets through. Refused ones are
    /// reset (RST, nothing read) and counted; errors of `accept` itself are
    /// returned as they are (back off on `EMFILE`).
    ///
    /// Cancel safe: dropping the future loses no admitted connection.
    pub async fn accept(&self, listener: &TcpListener) -> io::Result<(TcpStream, SocketAddr)> {
        loop {
            let (stream, peer) = listener.accept().await?;
            match self.check(peer) {
                Ok(()) => return Ok((stream, peer)),
                Err(why) => {
                    tracing::debug!(%peer, ?why, "connection refused at accept");
                    reset(stream);
                }
            }
        }
    }
}

/// Closes `stream` with an RST instead of a FIN.
pub(crate) fn reset(stream: TcpStream) {
    // Linger 0 never blocks: the close discards and resets.
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}
