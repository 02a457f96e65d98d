//! Per-route backend selection: the strategies and what they precompute
//! in each route-table snapshot.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::Ordering;

use http::header::{self, HeaderMap, HeaderName};

use super::backend::{InFlight, nanos};
use super::routes::{Admit, NoBackend, RouteRt};

/// What a [`Balance::Hash`] route hashes to pick a backend.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HashKey {
    /// The client's address (the connection's peer).
    ClientIp,
    /// The value of a request header (e.g. `x-user-id`).
    Header(HeaderName),
    /// The value of a cookie (e.g. `session`).
    Cookie(String),
}

/// How a route picks a backend among the available ones.
///
/// Weights apply to every strategy (a weight-0 backend gets nothing).
/// Backends benched by passive health, down by active checks, or draining
/// are never picked; one on probation only while it has a free probe slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub enum Balance {
    /// Smooth weighted round robin (nginx's): with weights 5, 1, 1 the
    /// sequence `a a b a c a a`, with exact counts over every run of
    /// `sum of weights` requests. Weights are divided by their greatest
    /// common divisor; a total still above 4096 is scaled down to it.
    #[default]
    RoundRobin,
    /// The backend with the fewest requests in flight relative to its
    /// weight; ties rotate.
    LeastConnections,
    /// Power of two choices over a peak EWMA of response latency: two
    /// random backends, the one with the lower `latency × (in flight + 1)
    /// / weight` wins. A backend's latency decays toward zero while it is
    /// not picked (10 s time constant), so a slow one is tried again.
    P2cEwma,
    /// A random backend, with probability proportional to its weight.
    Random,
    /// Consistent hashing on a key of the request (weighted rendezvous
    /// hashing): the same key goes to the same backend while it is
    /// available; adding or removing a backend moves only the keys that
    /// go to or came from it (about `1/n`). A request without the key is
    /// balanced round robin.
    Hash(HashKey),
}

impl Balance {
    /// The config name: `round_robin`, `least_connections`, `p2c_ewma`,
    /// `random`, `hash`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConnections => "least_connections",
            Balance::P2cEwma => "p2c_ewma",
            Balance::Random => "random",
            Balance::Hash(_) => "hash",
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Balance::Hash(HashKey::ClientIp) => f.write_str("hash(client_ip)"),
            Balance::Hash(HashKey::Header(h)) => write!(f, "hash(header:{h})"),
            Balance::Hash(HashKey::Cookie(c)) => write!(f, "hash(cookie:{c})"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// A balancing name that is not one of `round_robin`,
/// `least_connections`, `p2c_ewma`, `random`, `hash(client_ip)`,
/// `hash(header:NAME)`, `hash(cookie:NAME)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown balancing `{0}` (expected round_robin, least_connections, p2c_ewma, random, \
     hash(client_ip), hash(header:NAME) or hash(cookie:NAME))"
)]
pub struct UnknownBalance(pub String);

impl FromStr for Balance {
    type Err = UnknownBalance;

    /// Parses the [`Display`](fmt::Display) form.
    fn from_str(s: &str) -> Result<Balance, UnknownBalance> {
        let bad = || UnknownBalance(s.to_owned());
        Ok(match s {
            "round_robin" => Balance::RoundRobin,
            "least_connections" => Balance::LeastConnections,
            "p2c_ewma" => Balance::P2cEwma,
            "random" => Balance::Random,
            "hash(client_ip)" => Balance::Hash(HashKey::ClientIp),
            _ => {
                let inner = s
                    .strip_prefix("hash(")
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(bad)?;
                if let Some(h) = inner.strip_prefix("header:") {
                    Balance::Hash(HashKey::Header(
                        HeaderName::from_bytes(h.as_bytes()).map_err(|_| bad())?,
                    ))
                } else if let Some(c) = inner.strip_prefix("cookie:") {
                    if c.is_empty() || !super::options::is_token(c) {
                        return Err(bad());
                    }
                    Balance::Hash(HashKey::Cookie(c.to_owned()))
                } else {
                    return Err(bad());
                }
            }
        })
    }
}

/// A set of member indices (excluded or tried ones).
#[derive(Clone, Debug)]
pub(crate) enum Mask {
    Small(u64),
    Large(Vec<u64>),
}

impl Mask {
    pub(crate) fn new(n: usize) -> Mask {
        if n <= 64 {
            Mask::Small(0)
        } else {
            Mask::Large(vec![0; n.div_ceil(64)])
        }
    }

    pub(crate) fn has(&self, i: usize) -> bool {
        match self {
            Mask::Small(m) => i < 64 && m & (1 << i) != 0,
            Mask::Large(v) => v.get(i / 64).is_some_and(|w| w & (1 << (i % 64)) != 0),
        }
    }

    pub(crate) fn set(&mut self, i: usize) {
        match self {
            Mask::Small(m) if i < 64 => *m |= 1 << i,
            Mask::Small(m) => {
                let mut v = vec![0; i / 64 + 1];
                v[0] = *m;
                v[i / 64] |= 1 << (i % 64);
                *self = Mask::Large(v);
            }
            Mask::Large(v) => {
                if v.len() <= i / 64 {
                    v.resize(i / 64 + 1, 0);
                }
                v[i / 64] |= 1 << (i % 64);
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        match self {
            Mask::Small(m) => *m == 0,
            Mask::Large(v) => v.iter().all(|w| *w == 0),
        }
    }
}

/// The largest round-robin schedule.
const MAX_SCHEDULE: u64 = 4096;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The smooth weighted round-robin sequence of one cycle, as member
/// indices (every weight > 0).
pub(crate) fn schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights
        .iter()
        .fold(0u64, |g, &w| gcd(g, u64::from(w)))
        .max(1);
    let mut w: Vec<u64> = weights.iter().map(|&x| u64::from(x) / g).collect();
    let total: u64 = w.iter().sum();
    if total > MAX_SCHEDULE {
        for x in &mut w {
            *x = (*x * MAX_SCHEDULE / total).max(1);
        }
    }
    let total: i64 = w.iter().map(|&x| x as i64).sum();
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

/// FNV-1a, 64 bits: a stable hash (the same in every process, so that
/// several proxies agree).
pub(crate) fn fnv(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64's finaliser.
pub(crate) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The value of cookie `name` in `Cookie` header values.
pub(crate) fn cookie<'h>(
    values: impl IntoIterator<Item = &'h [u8]>,
    name: &str,
) -> Option<&'h [u8]> {
    for v in values {
        for pair in v.split(|&b| b == b';') {
            let pair = pair.trim_ascii();
            if let Some(rest) = pair.strip_prefix(name.as_bytes())
                && let Some(value) = rest.strip_prefix(b"=")
            {
                return Some(value);
            }
        }
    }
    None
}

/// The hash of a request's key, for a [`Balance::Hash`] route.
pub(crate) fn request_key(balance: &Balance, peer: IpAddr, headers: &HeaderMap) -> Option<u64> {
    key_of(
        balance,
        peer,
        |name| headers.get(name).map(|v| v.as_bytes()),
        || headers.get_all(header::COOKIE).iter().map(|v| v.as_bytes()),
    )
}

/// [`request_key`] over any header representation: `header` gives the
/// first value of a header, `cookies` every `Cookie` value.
pub(crate) fn key_of<'h, C>(
    balance: &Balance,
    peer: IpAddr,
    header: impl FnOnce(&HeaderName) -> Option<&'h [u8]>,
    cookies: impl FnOnce() -> C,
) -> Option<u64>
where
    C: IntoIterator<Item = &'h [u8]>,
{
    let Balance::Hash(key) = balance else {
        return None;
    };
    match key {
        HashKey::ClientIp => Some(match peer.to_canonical() {
            IpAddr::V4(a) => fnv(&a.octets()),
            IpAddr::V6(a) => fnv(&a.octets()),
        }),
        HashKey::Header(name) => header(name).map(fnv),
        HashKey::Cookie(name) => cookie(cookies(), name).map(fnv),
    }
}

/// A backend picked for one attempt.
pub(crate) struct Picked {
    pub(crate) idx: usize,
    pub(crate) permit: Option<health::Permit<std::sync::Arc<str>>>,
    pub(crate) guard: InFlight,
}

impl RouteRt {
    /// Picks an available member not in `tried`, by the route's strategy.
    pub(crate) fn pick(&self, tried: &Mask, key: Option<u64>) -> Result<Picked, NoBackend> {
        let mut excl = tried.clone();
        // Why candidates were refused (built into a `NoBackend` only when
        // nothing is left).
        let mut refused: Vec<Admit> = Vec::new();
        loop {
            let idx = match &self.balance {
                Balance::RoundRobin => self.next_rr(&excl),
                Balance::LeastConnections => self.least(&excl),
                Balance::P2cEwma => self.p2c(&excl),
                Balance::Random => self.random(&excl),
                Balance::Hash(_) => match key {
                    Some(k) => self.rendezvous(&excl, k),
                    None => self.next_rr(&excl),
                },
            };
            let Some(i) = idx else {
                let mut why = NoBackend::new(self, tried);
                for w in refused {
                    why.count(w);
                }
                return Err(why);
            };
            match self.admit(i) {
                Ok(permit) => {
                    return Ok(Picked {
                        idx: i,
                        permit,
                        guard: InFlight::new(&self.members[i].rt),
                    });
                }
                Err(w) => {
                    refused.push(w);
                    excl.set(i);
                }
            }
        }
    }

    fn admit(&self, i: usize) -> Result<Option<health::Permit<std::sync::Arc<str>>>, Admit> {
        let rt = &self.members[i].rt;
        if self.check.is_some() && !rt.check_up.load(Ordering::Relaxed) {
            return Err(Admit::CheckDown);
        }
        if rt.clean.load(Ordering::Relaxed) {
            return Ok(None);
        }
        self.state.acquire(rt).map(Some)
    }

    fn next_rr(&self, excl: &Mask) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let start = self.state.rr.fetch_add(1, Ordering::Relaxed);
        (0..len)
            .map(|k| self.schedule[(start.wrapping_add(k)) % len] as usize)
            .find(|&m| !excl.has(m))
    }

    fn least(&self, excl: &Mask) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let off = self.state.rr.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, u128, u128)> = None;
        for k in 0..n {
            let i = (off + k) % n;
            if excl.has(i) {
                continue;
            }
            let m = &self.members[i];
            let (load, w) = (u128::from(m.rt.in_flight()), u128::from(m.weight));
            match best {
                // load / w < best_load / best_w
                Some((_, bl, bw)) if load * bw >= bl * w => {}
                _ => best = Some((i, load, w)),
            }
        }
        best.map(|b| b.0)
    }

    fn p2c(&self, excl: &Mask) -> Option<usize> {
        let n = self.members.len();
        let (a, b) = if excl.is_empty() {
            match n {
                0 => return None,
                1 => return Some(0),
                _ => {
                    let a = rand::random_range(0..n);
                    let mut b = rand::random_range(0..n - 1);
                    if b >= a {
                        b += 1;
                    }
                    (a, b)
                }
            }
        } else {
            let cands: Vec<usize> = (0..n).filter(|&i| !excl.has(i)).collect();
            match cands.len() {
                0 => return None,
                1 => return Some(cands[0]),
                c => {
                    let a = rand::random_range(0..c);
                    let mut b = rand::random_range(0..c - 1);
                    if b >= a {
                        b += 1;
                    }
                    (cands[a], cands[b])
                }
            }
        };
        let now = nanos();
        let (ma, mb) = (&self.members[a], &self.members[b]);
        if ma.rt.cost(now, ma.weight) <= mb.rt.cost(now, mb.weight) {
            Some(a)
        } else {
            Some(b)
        }
    }

    fn random(&self, excl: &Mask) -> Option<usize> {
        let total: u64 = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| !excl.has(*i))
            .map(|(_, m)| u64::from(m.weight))
            .sum();
        if total == 0 {
            return None;
        }
        let mut r = rand::random_range(0..total);
        for (i, m) in self.members.iter().enumerate() {
            if excl.has(i) {
                continue;
            }
            let w = u64::from(m.weight);
            if r < w {
                return Some(i);
            }
            r -= w;
        }
        None
    }

    /// Weighted rendezvous hashing: the highest `weight / -ln(u)` where `u`
    /// is a uniform hash of (key, member); with equal weights, the highest
    /// hash.
    fn rendezvous(&self, excl: &Mask, key: u64) -> Option<usize> {
        let mut best: Option<(usize, f64)> = None;
        for (i, m) in self.members.iter().enumerate() {
            if excl.has(i) {
                continue;
            }
            let h = mix(key ^ m.key);
            let score = if self.uniform {
                h as f64
            } else {
                // u in (0, 1]
                let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                f64::from(m.weight) / -u.ln().min(-f64::MIN_POSITIVE)
            };
            if best.is_none_or(|(_, s)| score > s) {
                best = Some((i, score));
            }
        }
        best.map(|b| b.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smooth_weighted_schedule() {
        assert_eq!(schedule(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(schedule(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(schedule(&[10, 20]), [1, 0, 1]);
        assert_eq!(schedule(&[]), Vec::<u32>::new());
        let big = schedule(&[1_000_000, 1, 3_000_000]);
        assert!(big.len() <= 4096 + 3, "{}", big.len());
        assert!(big.contains(&1));
        let c0 = big.iter().filter(|&&i| i == 0).count() as f64;
        let c2 = big.iter().filter(|&&i| i == 2).count() as f64;
        assert!((c2 / c0 - 3.0).abs() < 0.01);
    }

    #[test]
    fn balance_names_round_trip() {
        for b in [
            Balance::RoundRobin,
            Balance::LeastConnections,
            Balance::P2cEwma,
            Balance::Random,
            Balance::Hash(HashKey::ClientIp),
            Balance::Hash(HashKey::Header(HeaderName::from_static("x-user"))),
            Balance::Hash(HashKey::Cookie("sid".into())),
        ] {
            assert_eq!(b.to_string().parse::<Balance>(), Ok(b));
        }
        for bad in ["rr", "hash", "hash()", "hash(cookie:)", "hash(header:a b)"] {
            assert!(bad.parse::<Balance>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cookies_are_found() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, "a=1; sid=xyz".parse().unwrap());
        h.append(header::COOKIE, "other=2".parse().unwrap());
        let values = || h.get_all(header::COOKIE).iter().map(|v| v.as_bytes());
        assert_eq!(cookie(values(), "sid"), Some(&b"xyz"[..]));
        assert_eq!(cookie(values(), "other"), Some(&b"2"[..]));
        assert_eq!(cookie(values(), "si"), None);
        assert_eq!(cookie(values(), "missing"), None);
    }

    #[test]
    fn masks() {
        let mut m = Mask::new(3);
        assert!(m.is_empty());
        m.set(2);
        assert!(m.has(2) && !m.has(1));
        m.set(100);
        assert!(m.has(100) && m.has(2) && !m.has(99));
        let mut l = Mask::new(200);
        l.set(150);
        assert!(l.has(150) && !l.is_empty());
    }
}
