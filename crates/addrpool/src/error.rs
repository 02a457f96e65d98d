//! Errors of the pool and of the connector.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::{Family, Interface, SourceError};

/// Why a pool could not start or hand out an address.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The address source is invalid.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// Options that contradict each other.
    #[error("invalid pool options: {0}")]
    Options(String),
    /// The rtnetlink socket could not be opened.
    #[error("cannot open an rtnetlink socket: {0}")]
    NetlinkSocket(#[source] std::io::Error),
    /// No interface with this name or index (in this network namespace).
    #[error("network interface {interface} not found")]
    InterfaceNotFound {
        /// The interface asked for.
        interface: Interface,
    },
    /// An rtnetlink request failed.
    #[error("rtnetlink: {what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// The freebind assigner found no `local` route covering the range.
    #[error(
        "no local route covers {uncovered}; IP_FREEBIND sources need one: run `{commands}` \
         (or set add_local_route = true)"
    )]
    NoLocalRoute {
        /// The uncovered CIDR blocks, comma separated.
        uncovered: String,
        /// The command(s) that would fix it, joined with ` && `.
        commands: String,
    },
    /// Adding the local route failed.
    #[error("adding the local route failed (`{command}`): {source}")]
    AddRoute {
        /// The equivalent `ip` command.
        command: String,
        /// The netlink error.
        #[source]
        source: rtnetlink::Error,
    },
    /// Every address of the source has been used and none is left.
    #[error("the address source is exhausted: every address has been used")]
    Exhausted,
    /// No address became available in time.
    #[error(
        "no source address available after {waited:?}: {held} held, all in use or being \
         assigned (max_assigned reached, or assignments keep failing)"
    )]
    NoAddressAvailable {
        /// How long the lease waited.
        waited: Duration,
        /// Addresses the pool held at that moment.
        held: usize,
    },
    /// The pool has been shut down.
    #[error("the address pool is shut down")]
    Closed,
    /// Per-address health is on and no held address can take a lease: they
    /// are benched, or on probation with every probe slot in use, and
    /// waiting would not help (or did not, within `lease_timeout`).
    /// Proxies answer 503 with this message.
    #[error(
        "no source address available: {benched} of {held} held addresses benched, \
         {probation_full} on probation with every probe slot in use"
    )]
    NoneAvailable {
        /// Addresses the pool held.
        held: usize,
        /// Held addresses benched (cooldown not elapsed).
        benched: usize,
        /// Unleased addresses on probation with every probe slot in use.
        probation_full: usize,
    },
    /// An outcome was recorded for an address the pool's health tracker
    /// does not know (never held, or retired and forgotten).
    #[error("address {ip} is not in this pool")]
    UnknownAddress {
        /// The address.
        ip: IpAddr,
    },
    /// Per-address health is off for this pool (`PoolOptions::health`).
    #[error("per-address health is not enabled for this pool")]
    HealthDisabled,
    /// An invalid `health` option; [`health::InvalidOption::field`] names it.
    #[error("invalid health option: {0}")]
    Health(#[from] health::InvalidOption),
}

/// Why an outbound connection was not made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// No source address could be leased.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// The destination is of the other family than the pool; connecting
    /// would leave from the host's default address, so the pool refuses.
    #[error(
        "a pool of {pool} addresses cannot reach {dest}; refusing to connect from the host's default address"
    )]
    FamilyMismatch {
        /// The pool's family.
        pool: Family,
        /// The destination.
        dest: SocketAddr,
    },
    /// The host name resolves to no address of the pool's family.
    #[error(
        "{host} has no {family} address (it resolves to {found}); refusing to connect from the host's default address"
    )]
    NoAddressOfFamily {
        /// The host name.
        host: String,
        /// The pool's family.
        family: Family,
        /// What it resolved to.
        found: String,
    },
    /// A URI the connector cannot use.
    #[error("cannot connect to URI {uri}: {reason}")]
    Uri {
        /// The URI.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Name resolution failed.
    #[error("cannot resolve {host}: {error}")]
    Resolve {
        /// The host name.
        host: String,
        /// The resolver error.
        error: std::io::Error,
    },
    /// Binding the source address failed (the address is retired).
    #[error("cannot bind source address {src}: {error}")]
    Bind {
        /// The source address.
        src: IpAddr,
        /// The socket error.
        error: std::io::Error,
    },
    /// The TCP connect failed.
    #[error("connecting from {src} to {dest} failed: {error}")]
    Connect {
        /// The source address.
        src: IpAddr,
        /// The destination.
        dest: SocketAddr,
        /// The socket error.
        error: std::io::Error,
    },
    /// The TCP connect timed out.
    #[error("connecting from {src} to {dest} timed out after {timeout:?}")]
    Timeout {
        /// The source address.
        src: IpAddr,
        /// The destination.
        dest: SocketAddr,
        /// The timeout.
        timeout: Duration,
    },
}
