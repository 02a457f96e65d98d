//! Egress address pools: outgoing connections leave from addresses drawn
//! from a range (a whole IPv6 /64, a block of IPv4s, a list, a file, any
//! iterator).
//!
//! - A [`Source`] gives the addresses, in an [`Order`] (sequential, random
//!   without repeats, cycling); ranges are never materialised.
//! - An [`Assigner`] makes them usable: [`Assigner::Netlink`] adds them to an
//!   interface over rtnetlink ahead of demand (`keep_assigned`, at most
//!   `max_assigned`) and removes them when retired; [`Assigner::Freebind`]
//!   binds with IP(V6)_FREEBIND under a `local` route; [`Assigner::Static`]
//!   uses addresses already on the host.
//! - [`Pool::lease`] hands out an address to one user at a time, picked by
//!   a [`Strategy`]; the [`Lease`] is released when dropped. An address is
//!   retired after `max_uses` uses or `max_idle` without use.
//! - [`Pool::connect`] binds a leased address and connects (family-aware:
//!   an IPv6 pool never reaches an IPv4 destination from the host's default
//!   address); [`Pool::connector`] is a `tower::Service<Uri>` for hyper-util.
//! - Every outcome is reported per source address to an [`OutcomeSink`];
//!   [`Pool::metrics`] gives counters.
//! - With [`PoolOptions::health`] on, every address has an availability
//!   state ([`health`]): benched after consecutive failures, cooled down,
//!   probed, restored. A benched address is never leased; at most
//!   `max_benched_percent` of the pool is benched; when nothing can be
//!   leased, [`PoolError::NoneAvailable`]. Outcomes come from the connector,
//!   from [`Lease::report`] / [`Lease::record`] (the proxies) and from
//!   [`Pool::record_outcome`] (client feedback, access logs);
//!   [`Pool::health_snapshot`] shows states and histories. A
//!   [`HealthJournal`] sees every benching and restoration in order, to
//!   keep them across restarts; [`Pool::restore_bench`] puts a saved one
//!   back.
//!
//! All of 127.0.0.0/8 is local on Linux, so a loopback pool works without
//! root or setup:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use addrpool::{Assigner, Pool, PoolOptions, Source};
//!
//! let pool = Pool::start("127.0.0.0/24".parse::<Source>()?, Assigner::Static, PoolOptions::default()).await?;
//! let conn = pool.connect("127.0.0.1:8080".parse()?).await?;
//! println!("connected from {}", conn.source()); // 127.0.0.1, then .2, .3, ...
//! drop(conn); // max_uses = 1: 127.0.0.1 is retired
//! pool.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! A netlink pool over an IPv6 /64 (needs CAP_NET_ADMIN):
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use addrpool::{Assigner, NetlinkOptions, Order, Pool, PoolOptions, Source};
//!
//! let opts = PoolOptions { order: Order::Random, keep_assigned: 10, max_assigned: 50, ..Default::default() };
//! let pool = Pool::start("2001:db8::/64".parse::<Source>()?, Assigner::Netlink(NetlinkOptions::new("eth0")), opts).await?;
//! let conn = pool.connect("[2001:db8:ffff::1]:443".parse()?).await?;
//! # drop(conn);
//! pool.shutdown().await; // removes the addresses it added
//! # Ok(()) }
//! ```
//!
//! Exclusions are `iprules` rule sets (or any predicate), see [`Exclude`];
//! for IPv4 CIDR sources the network and broadcast addresses are skipped by
//! default.

mod addr_health;
mod connect;
mod error;
mod netlink;
mod options;
mod outcome;
mod pool;
mod session;
mod source;

pub use addr_health::{AddressHealth, HealthJournal, HealthSnapshot, TransitionSink};
pub use connect::{PoolConnector, PooledStream};
pub use error::{ConnectError, PoolError};
/// The per-key availability state machine used for per-address health
/// (its options, classifier, outcomes and transitions).
pub use health;
pub use options::{
    Assigner, Exclude, FreebindOptions, Interface, NetlinkOptions, PoolOptions, Strategy,
};
pub use outcome::{ASSIGN_LATENCY_BOUNDS_US, MetricsSnapshot, Outcome, OutcomeSink};
pub use pool::{Lease, Pool};
pub use session::{ProxyUsername, Session, UsernameError, parse_username};
pub use source::{Family, Order, Source, SourceError};
