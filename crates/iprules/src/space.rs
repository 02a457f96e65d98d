//! The unified address space: every address is a point in `u128`, IPv4
//! addresses living at their IPv4-mapped position `::ffff:a.b.c.d`.

use std::net::IpAddr;

/// First point of the IPv4-mapped block `::ffff:0.0.0.0/96`.
pub(crate) const MAPPED_LO: u128 = 0xffff_u128 << 32;
/// Last point of the IPv4-mapped block.
pub(crate) const MAPPED_HI: u128 = MAPPED_LO | 0xffff_ffff;

/// The point of `addr` in the unified space.
#[inline]
pub(crate) fn key(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(v4) => MAPPED_LO | u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The IPv4 address at point `k`, if `k` is in the mapped block.
#[inline]
pub(crate) fn v4_of(k: u128) -> Option<u32> {
    if k >> 32 == 0xffff {
        Some(k as u32)
    } else {
        None
    }
}
