//! Sticky sessions and the rotating-proxy username convention.

use std::time::Duration;

/// A sticky session: leases with the same key get the same source address
/// for the session's TTL (with [`crate::Strategy::Sticky`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Session {
    /// The session key.
    pub key: String,
    /// How long the session keeps its address; `None`: the pool's
    /// `session_ttl`.
    pub ttl: Option<Duration>,
}

impl Session {
    /// A session with the pool's default TTL.
    pub fn new(key: impl Into<String>) -> Session {
        Session {
            key: key.into(),
            ttl: None,
        }
    }
}

/// A proxy username in the convention of commercial rotating proxies:
/// `USER`, `USER-session-ID` or `USER-session-ID-ttl-SECONDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyUsername<'a> {
    /// The account name (what the password is checked against).
    pub user: &'a str,
    /// The session id, if any.
    pub session: Option<&'a str>,
    /// The session TTL, if given.
    pub ttl: Option<Duration>,
}

impl ProxyUsername<'_> {
    /// The sticky session this username asks for: the key is
    /// `USER-session-ID`, so equal ids of different users never share.
    pub fn session(&self) -> Option<Session> {
        self.session.map(|id| Session {
            key: format!("{}-session-{id}", self.user),
            ttl: self.ttl,
        })
    }
}

/// Why a proxy username does not follow the convention.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UsernameError {
    /// Nothing before `-session-`.
    #[error("proxy username {0:?} has no user before \"-session-\"")]
    EmptyUser(String),
    /// A session id that is empty or has characters other than ASCII
    /// letters, digits, `_` and `.`.
    #[error("proxy username {0:?}: session id must be non-empty ASCII letters, digits, '_' or '.'")]
    BadSession(String),
    /// A TTL that is not a whole number of seconds between 1 and 86400.
    #[error("proxy username {0:?}: ttl must be 1 to 86400 seconds")]
    BadTtl(String),
}

/// Longest accepted session TTL.
const MAX_TTL_SECS: u64 = 86_400;

/// Parses `user1`, `user1-session-abc123` or `user1-session-abc123-ttl-300`.
///
/// The user part is everything before the first `-session-` (it may itself
/// contain `-`); a trailing `-ttl-N` gives the TTL in seconds.
///
/// ```
/// use std::time::Duration;
/// let u = addrpool::parse_username("user1-session-abc123-ttl-300").unwrap();
/// assert_eq!((u.user, u.session, u.ttl), ("user1", Some("abc123"), Some(Duration::from_secs(300))));
/// assert_eq!(addrpool::parse_username("user1").unwrap().session, None);
/// ```
pub fn parse_username(name: &str) -> Result<ProxyUsername<'_>, UsernameError> {
    const SEP: &str = "-session-";
    let Some(at) = name.find(SEP) else {
        return Ok(ProxyUsername {
            user: name,
            session: None,
            ttl: None,
        });
    };
    let user = &name[..at];
    if user.is_empty() {
        return Err(UsernameError::EmptyUser(name.to_owned()));
    }
    let rest = &name[at + SEP.len()..];
    let (session, ttl) = match rest.rsplit_once("-ttl-") {
        Some((s, t)) => {
            let secs: u64 = t
                .parse()
                .ok()
                .filter(|s| (1..=MAX_TTL_SECS).contains(s))
                .ok_or_else(|| UsernameError::BadTtl(name.to_owned()))?;
            (s, Some(Duration::from_secs(secs)))
        }
        None => (rest, None),
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    if session.is_empty() || !session.chars().all(valid) {
        return Err(UsernameError::BadSession(name.to_owned()));
    }
    Ok(ProxyUsername {
        user,
        session: Some(session),
        ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_convention() {
        let u = parse_username("user1-session-abc123").unwrap();
        assert_eq!((u.user, u.session, u.ttl), ("user1", Some("abc123"), None));
        assert_eq!(u.session().unwrap().key, "user1-session-abc123");
        let u = parse_username("team-a-session-x_1.2-ttl-60").unwrap();
        assert_eq!((u.user, u.session), ("team-a", Some("x_1.2")));
        assert_eq!(u.ttl, Some(Duration::from_secs(60)));
        let u = parse_username("plain").unwrap();
        assert_eq!((u.user, u.session, u.ttl), ("plain", None, None));
        assert_eq!(u.session(), None);
        // "-ttl-" without a session is just part of the user name.
        assert_eq!(parse_username("a-ttl-5").unwrap().user, "a-ttl-5");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "-session-abc",
            "u-session-",
            "u-session-a-b",
            "u-session-a b",
            "u-session--ttl-5",
        ] {
            assert!(parse_username(bad).is_err(), "{bad}");
        }
        for bad in [
            "u-session-a-ttl-",
            "u-session-a-ttl-0",
            "u-session-a-ttl-x",
            "u-session-a-ttl-86401",
        ] {
            assert!(
                matches!(parse_username(bad), Err(UsernameError::BadTtl(_))),
                "{bad}"
            );
        }
    }
}
