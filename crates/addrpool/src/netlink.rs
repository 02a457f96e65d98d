//! rtnetlink plumbing: interface lookup, address add/remove/list, local
//! routes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressProtocol,
};
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteScope, RouteType,
};
use rtnetlink::{AddressMessageBuilder, Handle, RouteMessageBuilder};

use crate::Interface;
use crate::error::PoolError;
use crate::source::{Family, Segment};

/// IFA_PROTO value marking addresses added by this crate, so a restarted
/// pool can tell its own leftovers from addresses an operator configured.
const OUR_PROTO: u8 = 0x69;
/// The kernel's `local` routing table.
const RT_TABLE_LOCAL: u32 = 255;
const EEXIST: i32 = 17;
const ENOENT: i32 = 2;
const EADDRNOTAVAIL: i32 = 99;
const ESRCH: i32 = 3;

/// An open rtnetlink handle plus the task driving its socket.
pub(crate) fn connect() -> Result<(Handle, tokio::task::JoinHandle<()>), PoolError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(PoolError::NetlinkSocket)?;
    Ok((handle, tokio::spawn(conn)))
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

pub(crate) async fn link_index(handle: &Handle, iface: &Interface) -> Result<u32, PoolError> {
    let req = match iface {
        Interface::Name(n) => handle.link().get().match_name(n.clone()),
        Interface::Index(i) => handle.link().get().match_index(*i),
    };
    match req.execute().try_next().await {
        Ok(Some(msg)) => Ok(msg.header.index),
        Ok(None) => Err(PoolError::InterfaceNotFound {
            interface: iface.clone(),
        }),
        Err(e) if matches!(errno(&e), Some(19) | Some(ENOENT)) => {
            Err(PoolError::InterfaceNotFound {
                interface: iface.clone(),
            })
        }
        Err(e) => Err(PoolError::Netlink {
            what: format!("looking up interface {iface}"),
            source: e,
        }),
    }
}

/// Name of the interface with `index` (for messages), or `#index`.
pub(crate) async fn link_name(handle: &Handle, index: u32) -> String {
    if let Ok(Some(msg)) = handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_next()
        .await
    {
        for a in msg.attributes {
            if let LinkAttribute::IfName(n) = a {
                return n;
            }
        }
    }
    format!("#{index}")
}

/// An address found on an interface.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Present {
    pub(crate) ip: IpAddr,
    /// Added by this crate (carries our IFA_PROTO mark).
    pub(crate) ours: bool,
    pub(crate) tentative: bool,
    pub(crate) dad_failed: bool,
}

pub(crate) async fn list(handle: &Handle, index: u32) -> Result<Vec<Present>, rtnetlink::Error> {
    let mut out = Vec::new();
    let mut s = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute();
    while let Some(msg) = s.try_next().await? {
        let mut ip = None;
        let mut ours = false;
        let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
        for a in &msg.attributes {
            match a {
                AddressAttribute::Local(x) => ip = Some(*x),
                AddressAttribute::Address(x) if ip.is_none() => ip = Some(*x),
                AddressAttribute::Protocol(AddressProtocol::Other(p)) => ours = *p == OUR_PROTO,
                AddressAttribute::Flags(f) => flags = *f,
                _ => {}
            }
        }
        if let Some(ip) = ip {
            out.push(Present {
                ip,
                ours,
                tentative: flags.contains(AddressFlags::Tentative),
                dad_failed: flags.contains(AddressFlags::Dadfailed),
            });
        }
    }
    Ok(out)
}

fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

fn message(
    index: u32,
    ip: IpAddr,
    prefix_len: Option<u8>,
) -> rtnetlink::packet_route::address::AddressMessage {
    let len = prefix_len.unwrap_or(host_len(ip)).min(host_len(ip));
    match ip {
        IpAddr::V4(a) => AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(a, len)
            .build(),
        IpAddr::V6(a) => AddressMessageBuilder::<Ipv6Addr>::new()
            .index(index)
            .address(a, len)
            .build(),
    }
}

/// Result of adding one address.
#[derive(Debug)]
pub(crate) enum Added {
    /// Added by us.
    New,
    /// Was already there (accepted because `use_existing`).
    Existing,
}

/// Why an address could not be assigned.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AssignError {
    #[error("{0} is already on the interface and use_existing is false")]
    Exists(IpAddr),
    #[error("adding {ip}: {source}")]
    Netlink {
        ip: IpAddr,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("duplicate address detection failed for {0}")]
    DadFailed(IpAddr),
    #[error("assigning {0} timed out")]
    Timeout(IpAddr),
}

/// Adds `ip` to interface `index`; waits for DAD when `!skip_dad`.
/// Not bounded in time: the caller wraps it in a timeout.
pub(crate) async fn add(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    prefix_len: Option<u8>,
    skip_dad: bool,
    use_existing: bool,
) -> Result<Added, AssignError> {
    let mut req = handle.address().add(index, ip, 0);
    let msg = req.message_mut();
    *msg = message(index, ip, prefix_len);
    if skip_dad {
        msg.header.flags |= AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    msg.attributes
        .push(AddressAttribute::Protocol(AddressProtocol::Other(
            OUR_PROTO,
        )));
    match req.execute().await {
        Ok(()) => {}
        Err(e) if errno(&e) == Some(EEXIST) => {
            return if use_existing {
                Ok(Added::Existing)
            } else {
                Err(AssignError::Exists(ip))
            };
        }
        Err(source) => return Err(AssignError::Netlink { ip, source }),
    }
    if !skip_dad && ip.is_ipv6() {
        loop {
            let present = list(handle, index)
                .await
                .map_err(|source| AssignError::Netlink { ip, source })?;
            match present.iter().find(|p| p.ip == ip) {
                Some(p) if p.dad_failed => return Err(AssignError::DadFailed(ip)),
                Some(p) if !p.tentative => break,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
    Ok(Added::New)
}

/// Removes `ip` from interface `index` (already gone counts as removed).
pub(crate) async fn remove(
    handle: &Handle,
    index: u32,
    ip: IpAddr,
    prefix_len: Option<u8>,
) -> Result<(), rtnetlink::Error> {
    match handle
        .address()
        .del(message(index, ip, prefix_len))
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(EADDRNOTAVAIL) | Some(ENOENT) | Some(ESRCH)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The `local` routes of `family` (prefixes of table local, type local).
async fn local_routes(handle: &Handle, family: Family) -> Result<Vec<IpNet>, rtnetlink::Error> {
    let msg = match family {
        Family::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        Family::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    let mut out = Vec::new();
    let mut s = handle.route().get(msg).execute();
    while let Some(r) = s.try_next().await? {
        if r.header.kind != RouteType::Local || route_table(&r) != RT_TABLE_LOCAL {
            continue;
        }
        let len = r.header.destination_prefix_length;
        let dst = r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
            _ => None,
        });
        let dst = dst.unwrap_or(match family {
            Family::V4 => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        });
        if let Ok(net) = IpNet::new(dst, len) {
            out.push(net);
        }
    }
    Ok(out)
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// The `ip route add local … dev lo` command for `net`.
pub(crate) fn route_command(net: &IpNet) -> String {
    format!("ip route add local {net} dev lo")
}

/// The CIDR blocks of `segs` not covered by a local route.
pub(crate) async fn uncovered(
    handle: &Handle,
    family: Family,
    segs: &[Segment],
) -> Result<Vec<IpNet>, PoolError> {
    let routes = local_routes(handle, family)
        .await
        .map_err(|source| PoolError::Netlink {
            what: "listing local routes".into(),
            source,
        })?;
    Ok(segs
        .iter()
        .flat_map(Segment::subnets)
        .filter(|n| !routes.iter().any(|r| r.contains(n)))
        .collect())
}

fn local_route_message(net: &IpNet, lo: u32) -> RouteMessage {
    let b = match net {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.network(), n.prefix_len())
            .build(),
    };
    let mut m = b;
    m.header.table = RT_TABLE_LOCAL as u8;
    m.header.kind = RouteType::Local;
    m.header.scope = RouteScope::Host;
    m.attributes.push(RouteAttribute::Oif(lo));
    m
}

/// `ip route add local NET dev lo`.
pub(crate) async fn add_local_route(handle: &Handle, net: &IpNet) -> Result<(), PoolError> {
    let lo = link_index(handle, &Interface::Name("lo".into())).await?;
    handle
        .route()
        .add(local_route_message(net, lo))
        .execute()
        .await
        .map_err(|source| PoolError::AddRoute {
            command: route_command(net),
            source,
        })
}

/// `ip route del local NET dev lo` (already gone counts as removed).
pub(crate) async fn del_local_route(handle: &Handle, net: &IpNet) -> Result<(), rtnetlink::Error> {
    let lo = match link_index(handle, &Interface::Name("lo".into())).await {
        Ok(i) => i,
        Err(_) => return Ok(()),
    };
    match handle
        .route()
        .del(local_route_message(net, lo))
        .execute()
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if matches!(errno(&e), Some(ESRCH) | Some(ENOENT)) => Ok(()),
        Err(e) => Err(e),
    }
}
