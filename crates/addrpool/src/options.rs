//! Typed options of a pool and its assigner.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::Order;
use crate::addr_health::TransitionSink;
use crate::outcome::OutcomeSink;

/// How a lease picks among the addresses the pool holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// The next address never used yet (the seed's behaviour); when none
    /// can be had, the least recently released one.
    #[default]
    Fresh,
    /// The least recently released address.
    RoundRobin,
    /// A uniformly random available address.
    Random,
    /// The available address with the fewest uses.
    LeastUsed,
    /// The same address for the same session key for the session's TTL
    /// (see [`crate::Session`]); leases without a session behave as `Fresh`.
    Sticky,
}

/// Addresses a pool never hands out. Checked on every address drawn from
/// the source or adopted, and again each time an address is picked (so a
/// [`Exclude::Live`] set changed at run time takes effect at once: a held
/// address that became excluded is retired instead of handed out).
#[derive(Clone)]
pub enum Exclude {
    /// A fixed rule set.
    Rules(Arc<iprules::RuleSet>),
    /// A rule set that may be replaced while the pool runs.
    Live(Arc<iprules::Shared<iprules::RuleSet>>),
    /// Any predicate (true: excluded).
    Fn(Arc<dyn Fn(IpAddr) -> bool + Send + Sync>),
}

impl Exclude {
    /// Whether `ip` is excluded.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match self {
            Exclude::Rules(r) => r.contains(ip),
            Exclude::Live(r) => r.read(|r| r.contains(ip)),
            Exclude::Fn(f) => f(ip),
        }
    }

    /// Excludes the addresses for which `f` returns true.
    pub fn from_fn(f: impl Fn(IpAddr) -> bool + Send + Sync + 'static) -> Exclude {
        Exclude::Fn(Arc::new(f))
    }
}

impl From<iprules::RuleSet> for Exclude {
    fn from(r: iprules::RuleSet) -> Exclude {
        Exclude::Rules(Arc::new(r))
    }
}

impl From<Arc<iprules::Shared<iprules::RuleSet>>> for Exclude {
    fn from(r: Arc<iprules::Shared<iprules::RuleSet>>) -> Exclude {
        Exclude::Live(r)
    }
}

impl fmt::Debug for Exclude {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exclude::Rules(r) => f.debug_tuple("Rules").field(&r.len()).finish(),
            Exclude::Live(r) => f.debug_tuple("Live").field(&r.read(|r| r.len())).finish(),
            Exclude::Fn(_) => f.write_str("Fn(..)"),
        }
    }
}

/// Options of a pool, whatever its assigner. `Default` gives the documented
/// defaults.
#[derive(Clone)]
pub struct PoolOptions {
    /// Order in which the source is drawn. Default: sequential.
    pub order: Order,
    /// How a lease picks its address. Default: fresh.
    pub strategy: Strategy,
    /// An address is retired after this many uses (a use is one lease, or
    /// one sticky session). `None`: never. Default: 1.
    pub max_uses: Option<u64>,
    /// With the `netlink` assigner, an address is retired (removed from
    /// the interface) after this long without use. `None`: never. Static and
    /// freebind addresses cost nothing while idle and are kept.
    /// Default: 10 minutes.
    pub max_idle: Option<Duration>,
    /// How often idle addresses and expired sessions are swept. Default: 10 s.
    pub sweep_interval: Duration,
    /// Addresses kept ready (assigned, unused) ahead of demand. With the
    /// `static` and `freebind` assigners, where assigning costs nothing, this
    /// is the size of the working set that `round_robin`, `random` and
    /// `least_used` rotate over. Default: 10.
    pub keep_assigned: usize,
    /// Never more than this many pool addresses held (assigned, in use, or
    /// being assigned or removed). Default: 50.
    ///
    /// With the `netlink` assigner and IPv6, each add costs the kernel time
    /// proportional to the addresses already on the interface (multicast
    /// bookkeeping): measured p99 per add is ~0.3 ms with 50 held and
    /// ~5 ms with 1,000 (`bench/egress.sh`). Above a few hundred, or for
    /// high churn, prefer the `freebind` assigner.
    pub max_assigned: usize,
    /// How long a sticky session keeps its address when the session gives no
    /// TTL of its own. Default: 10 minutes.
    pub session_ttl: Duration,
    /// How long `lease()` waits for an address when none is available.
    /// Default: 5 s.
    pub lease_timeout: Duration,
    /// Timeout of an outbound TCP connect. Default: 10 s.
    pub connect_timeout: Duration,
    /// Addresses never handed out (see [`Exclude`]). Default: none.
    pub exclude: Option<Exclude>,
    /// Hand out the network and broadcast addresses of IPv4 CIDR sources
    /// (shorter than /31) too. Default: false.
    pub include_network_broadcast: bool,
    /// Receives the outcome of every use of every source address (the hook
    /// for per-address health). Default: none.
    pub outcomes: Option<Arc<dyn OutcomeSink>>,
    /// Per-address health: every address is benched after failures, cooled
    /// down, probed and restored, and never leased while benched (see
    /// [`crate::Pool`], "Health"). `None`: off. Default: off.
    pub health: Option<health::HealthOptions>,
    /// Which outcomes count against an address when `health` is on.
    /// Default: 403, 429, connect errors, timeouts and an EOF right after
    /// connecting; the destination's own 404 or 500 proves the address works.
    pub classifier: health::Classifier,
    /// Receives every health transition (benched, restored, suppressed),
    /// when `health` is on. Default: none.
    pub transitions: Option<Arc<dyn TransitionSink>>,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            order: Order::Sequential,
            strategy: Strategy::Fresh,
            max_uses: Some(1),
            max_idle: Some(Duration::from_secs(600)),
            sweep_interval: Duration::from_secs(10),
            keep_assigned: 10,
            max_assigned: 50,
            session_ttl: Duration::from_secs(600),
            lease_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(10),
            exclude: None,
            include_network_broadcast: false,
            outcomes: None,
            health: None,
            classifier: health::Classifier::default(),
            transitions: None,
        }
    }
}

impl fmt::Debug for PoolOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolOptions")
            .field("order", &self.order)
            .field("strategy", &self.strategy)
            .field("max_uses", &self.max_uses)
            .field("max_idle", &self.max_idle)
            .field("sweep_interval", &self.sweep_interval)
            .field("keep_assigned", &self.keep_assigned)
            .field("max_assigned", &self.max_assigned)
            .field("session_ttl", &self.session_ttl)
            .field("lease_timeout", &self.lease_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("exclude", &self.exclude)
            .field("include_network_broadcast", &self.include_network_broadcast)
            .field("outcomes", &self.outcomes.as_ref().map(|_| "<sink>"))
            .field("health", &self.health)
            .field("classifier", &self.classifier)
            .field("transitions", &self.transitions.as_ref().map(|_| "<sink>"))
            .finish()
    }
}

/// How a pool makes its addresses usable as sources.
#[derive(Debug, Clone)]
pub enum Assigner {
    /// The addresses are already on the host; used as they are.
    Static,
    /// Nothing is assigned: sockets bind with IP_FREEBIND / IPV6_FREEBIND,
    /// and a `local` route must cover the range.
    Freebind(FreebindOptions),
    /// Addresses are added to and removed from an interface over rtnetlink.
    Netlink(NetlinkOptions),
}

/// A network interface, by name or index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Interface {
    /// By name, e.g. `eth0`.
    Name(String),
    /// By index.
    Index(u32),
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Interface::Name(n) => f.write_str(n),
            Interface::Index(i) => write!(f, "#{i}"),
        }
    }
}

impl From<&str> for Interface {
    fn from(s: &str) -> Self {
        Interface::Name(s.to_owned())
    }
}

impl From<String> for Interface {
    fn from(s: String) -> Self {
        Interface::Name(s)
    }
}

impl From<u32> for Interface {
    fn from(i: u32) -> Self {
        Interface::Index(i)
    }
}

/// Options of the `freebind` assigner.
#[derive(Debug, Clone)]
pub struct FreebindOptions {
    /// Add the missing `local` route (`ip route add local … dev lo`) at
    /// start instead of failing. Default: false.
    pub add_local_route: bool,
    /// Remove, on shutdown, the route this pool added. Default: true.
    pub remove_on_exit: bool,
}

impl Default for FreebindOptions {
    fn default() -> Self {
        FreebindOptions {
            add_local_route: false,
            remove_on_exit: true,
        }
    }
}

/// Options of the `netlink` assigner. [`NetlinkOptions::new`] gives the
/// documented defaults.
#[derive(Debug, Clone)]
pub struct NetlinkOptions {
    /// The interface the addresses are added to.
    pub interface: Interface,
    /// Add addresses with IFA_F_NODAD (usable at once). When false, wait for
    /// IPv6 duplicate address detection to finish within `assign_timeout`.
    /// Default: true.
    pub skip_dad: bool,
    /// Timeout for adding one address. Default: 1 s.
    pub assign_timeout: Duration,
    /// Timeout for removing one address. Default: 1 s.
    pub remove_timeout: Duration,
    /// Accept an address of the source that is already on the interface
    /// (it is used but never removed). Default: true.
    pub use_existing: bool,
    /// On shutdown, remove the addresses this pool added. Default: true.
    pub remove_on_exit: bool,
    /// Prefix length the addresses are added with. Default: host (/32, /128).
    pub prefix_len: Option<u8>,
}

impl NetlinkOptions {
    /// Defaults for `interface`.
    pub fn new(interface: impl Into<Interface>) -> Self {
        NetlinkOptions {
            interface: interface.into(),
            skip_dad: true,
            assign_timeout: Duration::from_secs(1),
            remove_timeout: Duration::from_secs(1),
            use_existing: true,
            remove_on_exit: true,
            prefix_len: None,
        }
    }
}
