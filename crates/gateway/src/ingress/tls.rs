//! TLS termination: certificates from PEM files, chosen by SNI, reloaded
//! without a restart.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use iprules::Shared;
use rustls::server::{
    ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain file and its private key file (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertPaths {
    /// The chain, leaf first (PEM `CERTIFICATE` blocks).
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1 PEM).
    pub key: PathBuf,
}

impl CertPaths {
    /// A certificate and its key.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> CertPaths {
        CertPaths {
            cert: cert.into(),
            key: key.into(),
        }
    }
}

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// No certificate was given.
    #[error("no certificate: at least one certificate and key is needed")]
    NoCertificates,
    /// A file could not be read or parsed.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The key does not belong to the certificate.
    #[error("{}: the key does not match the certificate {}", key.display(), cert.display())]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The certificate names no DNS host (subjectAltName).
    #[error("{}: the certificate has no DNS subjectAltName", path.display())]
    NoNames {
        /// The certificate file.
        path: PathBuf,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

#[derive(Clone, Default)]
struct CertSet {
    keys: Vec<Arc<CertifiedKey>>,
    names: Vec<Vec<String>>,
    /// Lowercase name → index; first certificate wins.
    exact: HashMap<String, usize>,
    /// `example.com` for `*.example.com` → index.
    wildcard: HashMap<String, usize>,
}

impl CertSet {
    fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let idx = sni
            .and_then(|name| {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                self.exact.get(&name).copied().or_else(|| {
                    name.split_once('.')
                        .and_then(|(_, parent)| self.wildcard.get(parent).copied())
                })
            })
            .unwrap_or(0);
        self.keys.get(idx).cloned()
    }
}

type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    std::fs::metadata(path)
        .ok()
        .and_then(|m| Some((m.modified().ok()?, m.len())))
}

/// The certificates of TLS listeners: each a chain and key from PEM
/// files. The client's SNI picks the certificate whose DNS names
/// (subjectAltName; `*.example.com` covers one label) match; a client
/// without SNI, or naming no certificate, gets the first.
///
/// [`reload`](CertStore::reload) re-reads every file and swaps the set at
/// once: handshakes after it see the new certificates (the TLS session
/// cache is emptied too, so no session made under the old certificates is
/// resumed), connections already open keep theirs. A reload that fails
/// keeps the old set.
pub struct CertStore {
    paths: Vec<CertPaths>,
    current: Shared<CertSet>,
    stamps: Mutex<Vec<(Stamp, Stamp)>>,
    sessions: Arc<Sessions>,
}

/// Sessions kept for resumption (stateful TLS 1.3 tickets and TLS 1.2
/// session ids), forgotten on every reload.
#[derive(Debug)]
pub(crate) struct Sessions(Shared<Arc<ServerSessionMemoryCache>>);

/// Sessions kept per certificate store.
const SESSION_CACHE: usize = 4096;

impl Sessions {
    fn new() -> Sessions {
        Sessions(Shared::new(ServerSessionMemoryCache::new(SESSION_CACHE)))
    }

    fn clear(&self) {
        self.0.replace(ServerSessionMemoryCache::new(SESSION_CACHE));
    }
}

impl StoresServerSessions for Sessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.0.read(|c| c.put(key, value))
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.read(|c| c.get(key))
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.0.read(|c| c.take(key))
    }

    fn can_cache(&self) -> bool {
        true
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("paths", &self.paths)
            .field("names", &self.names())
            .finish()
    }
}

impl CertStore {
    /// Loads every certificate and key.
    pub fn load(paths: impl IntoIterator<Item = CertPaths>) -> Result<Arc<CertStore>, TlsError> {
        let paths: Vec<CertPaths> = paths.into_iter().collect();
        let stamps = Self::stamps(&paths);
        let set = Self::read(&paths)?;
        Ok(Arc::new(CertStore {
            paths,
            current: Shared::new(set),
            stamps: Mutex::new(stamps),
            sessions: Arc::new(Sessions::new()),
        }))
    }

    fn stamps(paths: &[CertPaths]) -> Vec<(Stamp, Stamp)> {
        paths
            .iter()
            .map(|p| (stamp(&p.cert), stamp(&p.key)))
            .collect()
    }

    fn read(paths: &[CertPaths]) -> Result<CertSet, TlsError> {
        if paths.is_empty() {
            return Err(TlsError::NoCertificates);
        }
        let mut set = CertSet::default();
        for (i, p) in paths.iter().enumerate() {
            let file_err = |path: &Path, reason: String| TlsError::File {
                path: path.to_owned(),
                reason,
            };
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&p.cert)
                .map_err(|e| file_err(&p.cert, e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| file_err(&p.cert, e.to_string()))?;
            let Some(leaf) = chain.first() else {
                return Err(file_err(&p.cert, "no CERTIFICATE block".into()));
            };
            let names = dns_names(leaf.as_ref())
                .ok_or_else(|| file_err(&p.cert, "not a valid X.509 certificate".into()))?;
            if names.is_empty() {
                return Err(TlsError::NoNames {
                    path: p.cert.clone(),
                });
            }
            let key = PrivateKeyDer::from_pem_file(&p.key)
                .map_err(|e| file_err(&p.key, e.to_string()))?;
            let signer = rustls::crypto::ring::sign::any_supported_type(&key)
                .map_err(|e| file_err(&p.key, e.to_string()))?;
            let ck = CertifiedKey::new(chain, signer);
            match ck.keys_match() {
                Ok(())
                | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
                Err(_) => {
                    return Err(TlsError::Mismatch {
                        cert: p.cert.clone(),
                        key: p.key.clone(),
                    });
                }
            }
            for n in &names {
                let n = n.trim_end_matches('.').to_ascii_lowercase();
                match n.strip_prefix("*.") {
                    Some(parent) => set.wildcard.entry(parent.to_owned()).or_insert(i),
                    None => set.exact.entry(n).or_insert(i),
                };
            }
            set.keys.push(Arc::new(ck));
            set.names.push(names);
        }
        Ok(set)
    }

    /// Re-reads every file; on success new handshakes use the new set.
    pub fn reload(&self) -> Result<(), TlsError> {
        let stamps = Self::stamps(&self.paths);
        let set = Self::read(&self.paths)?;
        self.current.replace(set);
        self.sessions.clear();
        *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) = stamps;
        Ok(())
    }

    /// Reloads if a file's modification time or size changed since the
    /// last load. Whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = Self::stamps(&self.paths);
        if *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) == now {
            return Ok(false);
        }
        self.reload().map(|()| true)
    }

    /// The DNS names of each certificate, in the order given.
    pub fn names(&self) -> Vec<Vec<String>> {
        self.current.read(|s| s.names.clone())
    }

    /// The files.
    pub fn paths(&self) -> &[CertPaths] {
        &self.paths
    }

    /// The certificate chain and key a client naming `sni` gets.
    pub fn resolve(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        self.current.read(|s| s.resolve(sni))
    }
}

/// rustls' view of a [`CertStore`].
#[derive(Debug)]
pub(crate) struct Resolver(pub(crate) Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.resolve(hello.server_name())
    }
}

/// A rustls server configuration over `certs` (ring), offering `h2`
/// when `http2`.
pub(crate) fn server_config(
    certs: Arc<CertStore>,
    http2: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let alpn: &[&[u8]] = if http2 {
        &[b"h2", b"http/1.1"]
    } else {
        &[b"http/1.1"]
    };
    rustls_server_config(certs, alpn)
}

/// A rustls server configuration (ring, TLS 1.2 and 1.3, no client
/// certificates) whose certificate is picked by SNI from `certs`, so
/// that a [`CertStore::reload`] applies to the next handshake; offering
/// `alpn`. For other TLS listeners that share the ingress's certificate
/// handling (the registration channel's `wss://`).
pub fn rustls_server_config(
    certs: Arc<CertStore>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let sessions = certs.sessions.clone();
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Resolver(certs)));
    cfg.session_storage = sessions;
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

// ------------------------------------------------------------ DER

/// One DER element: tag, contents, and the rest of the input.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The DNS names of a certificate's subjectAltName extension; `None` if
/// it is not DER X.509.
pub(crate) fn dns_names(cert: &[u8]) -> Option<Vec<String>> {
    const SEQ: u8 = 0x30;
    let (tag, cert, _) = der(cert)?;
    if tag != SEQ {
        return None;
    }
    let (tag, mut tbs, _) = der(cert)?;
    if tag != SEQ {
        return None;
    }
    let mut names = Vec::new();
    while !tbs.is_empty() {
        let (tag, body, rest) = der(tbs)?;
        tbs = rest;
        if tag != 0xa3 {
            continue;
        }
        // [3] EXPLICIT Extensions ::= SEQUENCE OF Extension
        let (tag, mut exts, _) = der(body)?;
        if tag != SEQ {
            return None;
        }
        while !exts.is_empty() {
            let (tag, ext, rest) = der(exts)?;
            exts = rest;
            if tag != SEQ {
                return None;
            }
            let (tag, oid, mut rest) = der(ext)?;
            if tag != 0x06 || oid != [0x55, 0x1d, 0x11] {
                continue;
            }
            // critical BOOLEAN DEFAULT FALSE
            let (mut tag, mut value, r) = der(rest)?;
            if tag == 0x01 {
                rest = r;
                (tag, value, _) = der(rest)?;
            }
            if tag != 0x04 {
                return None;
            }
            let (tag, mut general, _) = der(value)?;
            if tag != SEQ {
                return None;
            }
            while !general.is_empty() {
                let (tag, v, rest) = der(general)?;
                general = rest;
                // dNSName [2] IA5String
                if tag == 0x82
                    && let Ok(s) = std::str::from_utf8(v)
                {
                    names.push(s.to_owned());
                }
            }
        }
    }
    Some(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn san_dns_names() {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![
            "a.test".to_owned(),
            "*.wild.test".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            dns_names(cert.der()).unwrap(),
            ["a.test".to_owned(), "*.wild.test".to_owned()]
        );
        assert_eq!(dns_names(b"\x30\x03\x02\x01"), None);
        assert_eq!(dns_names(b""), None);
    }
}
