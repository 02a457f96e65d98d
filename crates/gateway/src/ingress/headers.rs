//! Request and response header rewriting: hop-by-hop headers, forwarding
//! headers, `Via`.

use std::net::{IpAddr, SocketAddr};

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::options::Forwarding;

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1), and those that only make sense
/// on one connection.
static HOP_BY_HOP: [&HeaderName; 8] = [
    &header::CONNECTION,
    &KEEP_ALIVE,
    &PROXY_CONNECTION,
    &header::PROXY_AUTHORIZATION,
    &header::TE,
    &header::TRAILER,
    &header::TRANSFER_ENCODING,
    &header::UPGRADE,
];

/// Removes hop-by-hop headers, those named in `Connection` included.
/// With `upgrade`, `Upgrade` is kept and `Connection: upgrade` set.
/// `Transfer-Encoding` goes too (hyper frames bodies itself); with it a
/// `Content-Length` is dropped (a message with both is framed by the
/// former).
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap, upgrade: bool) {
    // The common case (no hop-by-hop header at all) in one pass, without
    // a lookup per name.
    if !upgrade
        && !h
            .keys()
            .any(|k| HOP_BY_HOP.contains(&k) || *k == header::EXPECT)
    {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .map(str::trim)
            .filter(|n| !n.is_empty() && !n.eq_ignore_ascii_case("upgrade"))
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for n in named {
            if n != header::CONTENT_LENGTH && n != header::HOST {
                h.remove(n);
            }
        }
    }
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
    for n in HOP_BY_HOP {
        if upgrade && *n == header::UPGRADE {
            continue;
        }
        h.remove(n);
    }
    if h.contains_key(header::EXPECT) {
        // hyper answers `100-continue` itself when the body is read.
        h.remove(header::EXPECT);
    }
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Whether a request asks for a protocol upgrade the proxy passes through
/// (HTTP/1.1 `Connection: upgrade` with `Upgrade`, except `h2c`).
pub(crate) fn wants_upgrade(version: Version, h: &HeaderMap) -> bool {
    if version != Version::HTTP_11 {
        return false;
    }
    let Some(up) = h.get(header::UPGRADE) else {
        return false;
    };
    if up.as_bytes().eq_ignore_ascii_case(b"h2c") {
        return false;
    }
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .unwrap_or("")
            .split(',')
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
    })
}

/// What the forwarding headers say about one client connection, computed
/// once per connection.
pub(crate) struct ClientInfo {
    /// The client address as `X-Forwarded-For` carries it.
    pub(crate) xff: HeaderValue,
    /// The `for=` node of `Forwarded` (`192.0.2.1`, `"[2001:db8::1]"`).
    pub(crate) node: String,
    /// `http` or `https`.
    pub(crate) proto: &'static str,
    /// Incoming forwarding headers are kept.
    pub(crate) trusted: bool,
}

impl ClientInfo {
    pub(crate) fn new(peer: SocketAddr, tls: bool, trusted: bool) -> ClientInfo {
        let ip = peer.ip().to_canonical();
        let text = ip.to_string();
        let node = match ip {
            IpAddr::V4(_) => text.clone(),
            IpAddr::V6(_) => format!("\"[{text}]\""),
        };
        ClientInfo {
            xff: HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static("unknown")),
            node,
            proto: if tls { "https" } else { "http" },
            trusted,
        }
    }
}

/// The values of every `name` header joined by `", "`.
fn joined(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in h.get_all(name) {
        let Ok(s) = v.to_str() else { continue };
        let s = s.trim();
        if s.is_empty() {
            continue;
        }
        match &mut out {
            None => out = Some(s.to_owned()),
            Some(o) => {
                o.push_str(", ");
                o.push_str(s);
            }
        }
    }
    out
}

/// A `Forwarded` parameter value: a token as is, anything else quoted.
pub(crate) fn push_param(out: &mut String, v: &str) {
    if super::options::is_token(v) {
        out.push_str(v);
    } else {
        out.push('"');
        for c in v.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
}

/// Sets `X-Forwarded-*`, `Forwarded` and `Via` on a request going to a
/// backend. `host` is the host the client asked for.
pub(crate) fn add_forwarding(
    h: &mut HeaderMap,
    client: &ClientInfo,
    host: &HeaderValue,
    opts: &Forwarding,
    via: Option<&HeaderValue>,
) {
    let trusted = client.trusted;
    if opts.x_forwarded {
        let xff = if trusted {
            joined(h, &X_FORWARDED_FOR)
                .and_then(|prev| {
                    HeaderValue::from_str(&format!(
                        "{prev}, {}",
                        client.xff.to_str().unwrap_or("unknown")
                    ))
                    .ok()
                })
                .unwrap_or_else(|| client.xff.clone())
        } else {
            client.xff.clone()
        };
        h.insert(X_FORWARDED_FOR.clone(), xff);
        if !(trusted && h.contains_key(&X_FORWARDED_PROTO)) {
            h.insert(
                X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static(client.proto),
            );
        }
        if !(trusted && h.contains_key(&X_FORWARDED_HOST)) {
            h.insert(X_FORWARDED_HOST.clone(), host.clone());
        }
    } else if !trusted {
        h.remove(&X_FORWARDED_FOR);
        h.remove(&X_FORWARDED_PROTO);
        h.remove(&X_FORWARDED_HOST);
    }
    if opts.forwarded {
        let prev = if trusted {
            joined(h, &header::FORWARDED)
        } else {
            None
        };
        let mut s = String::with_capacity(prev.as_ref().map_or(0, |p| p.len() + 2) + 64);
        if let Some(p) = prev {
            s.push_str(&p);
            s.push_str(", ");
        }
        s.push_str("for=");
        s.push_str(&client.node);
        if let Ok(host) = host.to_str() {
            s.push_str(";host=");
            push_param(&mut s, host);
        }
        s.push_str(";proto=");
        s.push_str(client.proto);
        if let Ok(v) = HeaderValue::try_from(s) {
            h.insert(header::FORWARDED, v);
        }
    } else if !trusted {
        h.remove(header::FORWARDED);
    }
    if let Some(via) = via {
        h.append(header::VIA, via.clone());
    }
}

/// `Via` values for HTTP/1.0, 1.1 and 2 requests.
pub(crate) struct ViaValues([HeaderValue; 3]);

impl ViaValues {
    pub(crate) fn new(pseudonym: &str) -> Option<ViaValues> {
        Some(ViaValues([
            HeaderValue::from_str(&format!("1.0 {pseudonym}")).ok()?,
            HeaderValue::from_str(&format!("1.1 {pseudonym}")).ok()?,
            HeaderValue::from_str(&format!("2 {pseudonym}")).ok()?,
        ]))
    }

    pub(crate) fn get(&self, v: Version) -> &HeaderValue {
        match v {
            Version::HTTP_09 | Version::HTTP_10 => &self.0[0],
            Version::HTTP_2 | Version::HTTP_3 => &self.0[2],
            _ => &self.0[1],
        }
    }
}

/// HTTP/2 splits `Cookie` into several fields; HTTP/1.1 wants one.
pub(crate) fn join_cookies(h: &mut HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let joined: Vec<&[u8]> = h
        .get_all(header::COOKIE)
        .iter()
        .map(|v| v.as_bytes())
        .collect();
    if let Ok(v) = HeaderValue::from_bytes(&joined.join(&b"; "[..])) {
        h.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_and_connection_named() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(Version::HTTP_11, &h));
        assert!(!wants_upgrade(Version::HTTP_10, &h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert!(!wants_upgrade(
            Version::HTTP_11,
            &map(&[("connection", "upgrade"), ("upgrade", "h2c")])
        ));
    }

    #[test]
    fn forwarding_untrusted_replaces() {
        let peer: SocketAddr = "[2001:db8::7]:1234".parse().unwrap();
        let client = ClientInfo::new(peer, true, false);
        let mut h = map(&[
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-proto", "gopher"),
            ("forwarded", "for=6.6.6.6"),
        ]);
        let via = ViaValues::new("ippool").unwrap();
        add_forwarding(
            &mut h,
            &client,
            &HeaderValue::from_static("a.test:8443"),
            &Forwarding::default(),
            Some(via.get(Version::HTTP_2)),
        );
        assert_eq!(h["x-forwarded-for"], "2001:db8::7");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.test:8443");
        assert_eq!(
            h["forwarded"],
            "for=\"[2001:db8::7]\";host=\"a.test:8443\";proto=https"
        );
        assert_eq!(h["via"], "2 ippool");
    }

    #[test]
    fn forwarding_trusted_appends() {
        let peer: SocketAddr = "[::ffff:10.0.0.2]:1234".parse().unwrap();
        let client = ClientInfo::new(peer, false, true);
        let mut h = map(&[
            ("x-forwarded-for", "192.0.2.1"),
            ("x-forwarded-for", "192.0.2.9"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=192.0.2.1;proto=https"),
            ("via", "1.1 edge"),
        ]);
        add_forwarding(
            &mut h,
            &client,
            &HeaderValue::from_static("a.test"),
            &Forwarding::default(),
            None,
        );
        assert_eq!(h["x-forwarded-for"], "192.0.2.1, 192.0.2.9, 10.0.0.2");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.test");
        assert_eq!(
            h["forwarded"],
            "for=192.0.2.1;proto=https, for=10.0.0.2;host=a.test;proto=http"
        );
        assert_eq!(h["via"], "1.1 edge");
    }

    #[test]
    fn cookies_joined() {
        let mut h = map(&[("cookie", "a=1"), ("cookie", "b=2")]);
        join_cookies(&mut h);
        assert_eq!(h.get_all("cookie").iter().count(), 1);
        assert_eq!(h["cookie"], "a=1; b=2");
    }
}
