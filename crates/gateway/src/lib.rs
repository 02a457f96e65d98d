//! The data plane of ippool.
//!
//! - [`egress`]: the forward proxy. Clients speak HTTP/1.1 (absolute-form
//!   requests and CONNECT tunnels) or SOCKS5 on one port; every upstream
//!   connection leaves from an address of an [`addrpool::Pool`], and every
//!   destination is checked against an [`iprules::Policy`] before it is
//!   dialled.
//!
//! The ingress reverse proxy, the L4 TCP proxy and accept-time filtering
//! will live here too.

pub mod egress;
