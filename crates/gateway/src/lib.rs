//! The data plane of ippool.
//!
//! - [`egress`]: the forward proxy. Clients speak HTTP/1.1 (absolute-form
//!   requests and CONNECT tunnels) or SOCKS5 on one port; every upstream
//!   connection leaves from an address of an [`addrpool::Pool`], and every
//!   destination is checked against an [`iprules::Policy`] before it is
//!   dialled.
//! - [`l4`]: the TCP balancer. A listener forwards each connection to an
//!   upstream picked from a pool (random, round robin, least connections,
//!   weighted), never to one benched by its [`health`] state; connect
//!   failures and timeouts feed that state, and a failed dial is retried on
//!   another upstream.
//! - [`guard`]: who may connect: accept-time filtering against a live
//!   [`iprules::Policy`], kernel socket filters, nftables export,
//!   automatic bans and per-client rate limits.
//! - [`access`]: access-log entries in nginx `combined` format.
//! - [`ingress`]: the reverse proxy: HTTP/1.1, HTTP/2, WebSocket and TLS
//!   (SNI, reloadable certificates), routes by host and path prefix changed
//!   at run time, per-route balancing, passive and active backend health.

pub mod access;
mod activity;
pub mod egress;
pub mod guard;
pub mod ingress;
pub mod l4;
mod relay;
mod tasks;
mod wire;
