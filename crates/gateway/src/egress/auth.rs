//! Proxy authentication: Basic credentials and constant-time comparison.

use std::collections::HashMap;
use std::sync::Arc;

use addrpool::{Session, parse_username};

/// Who a client is, once authenticated (or when no users are configured).
#[derive(Debug, Clone, Default)]
pub(crate) struct Identity {
    /// The account (the user part of the username), if one was given.
    pub(crate) user: Option<String>,
    /// The sticky session the username asks for.
    pub(crate) session: Option<Session>,
}

/// Why credentials were not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthError {
    /// None given while users are configured.
    Missing,
    /// Not `Basic` or not valid base64 / UTF-8 / `user:pass`.
    Malformed,
    /// Unknown user or wrong password.
    Invalid,
    /// The username does not follow `USER-session-ID[-ttl-N]`.
    BadSession,
}

impl AuthError {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "proxy authentication required",
            AuthError::Malformed => "malformed Proxy-Authorization (expected Basic)",
            AuthError::Invalid => "invalid proxy credentials",
            AuthError::BadSession => "username does not follow USER-session-ID[-ttl-SECONDS]",
        }
    }
}

/// Checks `user`/`pass` against `users` (no users: anyone, the username
/// only names a session).
pub(crate) fn check(
    users: &HashMap<String, String>,
    creds: Option<(&str, &str)>,
) -> Result<Identity, AuthError> {
    let Some((name, pass)) = creds else {
        return if users.is_empty() {
            Ok(Identity::default())
        } else {
            Err(AuthError::Missing)
        };
    };
    let parsed = parse_username(name).map_err(|_| AuthError::BadSession)?;
    if !users.is_empty() {
        // Compare against something even for unknown users, so that timing
        // does not tell which users exist.
        let expected = users.get(parsed.user);
        let ok = ct_eq(
            expected.map_or(b"\0unknown-user".as_slice(), |p| p.as_bytes()),
            pass.as_bytes(),
        );
        if !(ok && expected.is_some()) {
            return Err(AuthError::Invalid);
        }
    }
    Ok(Identity {
        user: Some(parsed.user.to_owned()),
        session: parsed.session(),
    })
}

/// Constant-time equality (in the length of `b`; lengths may leak).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for (i, y) in b.iter().enumerate() {
        let x = a.get(i).copied().unwrap_or(0);
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

/// Who a `Proxy-Authorization` value (or its absence) names, against
/// `users`.
pub(crate) fn identify(
    users: &HashMap<String, String>,
    value: Option<&[u8]>,
) -> Result<Identity, AuthError> {
    let creds = match value {
        Some(v) => Some(parse_basic(v)?),
        None => None,
    };
    check(users, creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str())))
}

/// The last `Proxy-Authorization` a connection had accepted (`None`: none
/// given) and who it names: a keep-alive client sends the same one with
/// every request, so it is checked once per connection (the users do not
/// change while the listener runs).
#[derive(Default)]
pub(crate) struct Remembered {
    value: Option<Box<[u8]>>,
    id: Option<Arc<Identity>>,
}

impl Remembered {
    /// Who sent `value`: the remembered identity when it is the same
    /// value, else [`identify`] (and remembered if accepted).
    pub(crate) fn identify(
        &mut self,
        users: &HashMap<String, String>,
        value: Option<&[u8]>,
    ) -> Result<Arc<Identity>, AuthError> {
        if let Some(id) = &self.id
            && self.value.as_deref() == value
        {
            return Ok(id.clone());
        }
        let id = Arc::new(identify(users, value)?);
        self.value = value.map(Box::from);
        self.id = Some(id.clone());
        Ok(id)
    }
}

/// `Basic dXNlcjpwYXNz` → ("user", "pass").
pub(crate) fn parse_basic(value: &[u8]) -> Result<(String, String), AuthError> {
    let value = std::str::from_utf8(value).map_err(|_| AuthError::Malformed)?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(AuthError::Malformed)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(AuthError::Malformed);
    }
    let raw = base64_decode(token.trim()).ok_or(AuthError::Malformed)?;
    let text = String::from_utf8(raw).map_err(|_| AuthError::Malformed)?;
    let (u, p) = text.split_once(':').ok_or(AuthError::Malformed)?;
    Ok((u.to_owned(), p.to_owned()))
}

/// Standard base64 (RFC 4648, padding optional).
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.trim_end_matches('=').as_bytes();
    if s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_remembers_accepted_credentials_only() {
        let users = HashMap::from([("alice".to_owned(), "secret".to_owned())]);
        let good: &[u8] = b"Basic YWxpY2Utc2Vzc2lvbi14OnNlY3JldA=="; // alice-session-x:secret
        let bad: &[u8] = b"Basic YWxpY2U6d3Jvbmc="; // alice:wrong
        let mut r = Remembered::default();
        assert_eq!(r.identify(&users, None).unwrap_err(), AuthError::Missing);
        let first = r.identify(&users, Some(good)).unwrap();
        assert_eq!(first.user.as_deref(), Some("alice"));
        assert!(first.session.is_some());
        // The same value again: the same identity, not checked anew.
        assert!(Arc::ptr_eq(
            &first,
            &r.identify(&users, Some(good)).unwrap()
        ));
        // A different value is checked, and a refused one is not remembered.
        assert_eq!(
            r.identify(&users, Some(bad)).unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(r.identify(&users, None).unwrap_err(), AuthError::Missing);
        assert!(Arc::ptr_eq(
            &first,
            &r.identify(&users, Some(good)).unwrap()
        ));
    }

    #[test]
    fn base64() {
        assert_eq!(base64_decode("dXNlcjpwYXNz").unwrap(), b"user:pass");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YWI=").unwrap(), b"ab");
        assert_eq!(base64_decode("YWJj").unwrap(), b"abc");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(base64_decode("Y").is_none());
        assert!(base64_decode("Y!==").is_none());
        assert_eq!(
            parse_basic(b"basic dXNlcjpwYXNz").unwrap(),
            ("user".into(), "pass".into())
        );
        assert_eq!(parse_basic(b"Bearer x"), Err(AuthError::Malformed));
        assert_eq!(parse_basic(b"Basic \xff"), Err(AuthError::Malformed));
    }

    #[test]
    fn checks_users() {
        let users: HashMap<String, String> = [("u".to_owned(), "pw".to_owned())].into();
        assert!(ct_eq(b"pw", b"pw"));
        assert!(!ct_eq(b"pw", b"pW"));
        assert!(!ct_eq(b"pw", b"pw2"));
        assert!(!ct_eq(b"pw2", b"pw"));
        let id = check(&users, Some(("u-session-x1", "pw"))).unwrap();
        assert_eq!(id.user.as_deref(), Some("u"));
        assert_eq!(id.session.unwrap().key, "u-session-x1");
        assert_eq!(
            check(&users, Some(("u", "no"))).unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(
            check(&users, Some(("x", "pw"))).unwrap_err(),
            AuthError::Invalid
        );
        assert_eq!(check(&users, None).unwrap_err(), AuthError::Missing);
        assert_eq!(
            check(&users, Some(("u-session-", "pw"))).unwrap_err(),
            AuthError::BadSession
        );
        assert!(check(&HashMap::new(), None).unwrap().user.is_none());
        assert!(
            check(&HashMap::new(), Some(("any-session-s", "")))
                .unwrap()
                .session
                .is_some()
        );
    }
}
