//! TLS to backends: the backends of a route reached over HTTPS, their
//! certificates checked as a browser would (there is no switch to skip
//! the check: give the CA that signs them instead).
//!
//! A route's [`BackendTls`] applies to every backend of the route, static
//! and registered alike. Each new backend connection does its TCP connect
//! and its TLS handshake within the connect timeout; a handshake that
//! fails is a connect failure (the request goes to another backend if it
//! may, and the backend's passive health counts it). Kept-alive
//! connections stay TLS in the backend's pool. Requests are HTTP/1.1
//! (ALPN `http/1.1` when the configuration comes from
//! [`BackendTls::from_pem`]).

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// Where systems keep their CA bundle.
const SYSTEM_CA_FILES: [&str; 4] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// The ALPN protocols spoken to backends.
const HTTP11: &[u8] = b"http/1.1";
const H2: &[u8] = b"h2";

/// How a route's backends are reached over TLS.
///
/// ```no_run
/// use gateway::ingress::{BackendTls, Route, RouteMatch};
/// use std::path::Path;
/// let tls = BackendTls::from_pem(Some(Path::new("backend-ca.pem")), None)?
///     .with_server_name("api.internal")?;
/// let route = Route::new("api", RouteMatch::host("api.example.com")).with_backend_tls(tls);
/// # Ok::<(), String>(())
/// ```
#[derive(Clone)]
pub struct BackendTls {
    connector: TlsConnector,
    /// The same configuration offering ALPN `h2`, for routes that speak
    /// HTTP/2 to their backends.
    connector_h2: TlsConnector,
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
    /// For one made by [`BackendTls::from_pem`]: a hash of the files'
    /// names and contents as read, so that the same files read again
    /// compare equal (a config reload keeps the backends' connections) and
    /// changed ones do not.
    origin: Option<String>,
}

impl BackendTls {
    /// TLS with `config`: its roots check the backends' certificates, its
    /// client certificate (if any) is shown to them. Its ALPN list should
    /// be empty or `http/1.1` (a backend that chooses another protocol is
    /// refused). The name checked is each backend's IP address unless
    /// [`with_server_name`](BackendTls::with_server_name) gives one.
    pub fn new(config: Arc<ClientConfig>) -> BackendTls {
        BackendTls {
            connector: TlsConnector::from(Arc::clone(&config)),
            connector_h2: TlsConnector::from(Arc::new({
                let mut c = (*config).clone();
                c.alpn_protocols = vec![H2.to_vec()];
                c
            })),
            config,
            server_name: None,
            origin: None,
        }
    }

    /// From PEM files: the CA certificates that sign the backends'
    /// certificates (default: the system's bundle, `SSL_CERT_FILE` if set),
    /// and a client certificate chain with its key for backends that ask
    /// for one. Errors name the file and what is wrong with it.
    pub fn from_pem(
        ca: Option<&Path>,
        client: Option<(&Path, &Path)>,
    ) -> Result<BackendTls, String> {
        use std::hash::{Hash, Hasher};
        // What was read is what is hashed: the same files with the same
        // contents make an equal BackendTls.
        let mut hash = std::collections::hash_map::DefaultHasher::new();
        let mut read = |path: &Path| -> Result<Vec<u8>, String> {
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            (path, &bytes).hash(&mut hash);
            Ok(bytes)
        };
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            Some(path) => {
                for cert in pem_certs(path, &read(path)?)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
                }
            }
            None => {
                // SSL_CERT_FILE, when set, is the bundle (as for OpenSSL).
                let path = match std::env::var_os("SSL_CERT_FILE") {
                    Some(p) => PathBuf::from(p),
                    None => SYSTEM_CA_FILES
                        .iter()
                        .map(PathBuf::from)
                        .find(|p| p.is_file())
                        .ok_or_else(|| {
                            format!(
                                "no CA bundle found (SSL_CERT_FILE, {}): give a CA file",
                                SYSTEM_CA_FILES.join(", ")
                            )
                        })?,
                };
                let bytes = read(&path)?;
                let (added, _) = roots.add_parsable_certificates(pem_certs(&path, &bytes)?);
                if added == 0 {
                    return Err(format!("{}: no usable CA certificate", path.display()));
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = pem_certs(cert, &read(cert)?)?;
                let key_bytes = read(key)?;
                let key = PrivateKeyDer::from_pem_slice(&key_bytes)
                    .map_err(|e| format!("client key {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("client certificate {}: {e}", cert.display()))?
            }
        };
        config.alpn_protocols = vec![HTTP11.to_vec()];
        let mut tls = BackendTls::new(Arc::new(config));
        tls.origin = Some(format!("{:x}", hash.finish()));
        Ok(tls)
    }

    /// Checks the backends' certificates against `name` (a DNS name or an
    /// IP address) instead of each backend's IP address, and sends it as
    /// SNI.
    pub fn with_server_name(mut self, name: &str) -> Result<BackendTls, String> {
        let n = ServerName::try_from(name.to_owned())
            .map_err(|e| format!("server name {name:?}: {e}"))?;
        self.server_name = Some(n);
        Ok(self)
    }

    /// The name checked for a backend at `addr`.
    fn name_for(&self, addr: SocketAddr) -> ServerName<'static> {
        match &self.server_name {
            Some(n) => n.clone(),
            // An IPv4-mapped backend address is checked as the IPv4 one.
            None => ServerName::IpAddress(addr.ip().to_canonical().into()),
        }
    }
}

impl PartialEq for BackendTls {
    /// The same name, and the same configuration object or the same files
    /// with the same contents.
    fn eq(&self, other: &BackendTls) -> bool {
        let same_config = match (&self.origin, &other.origin) {
            (Some(a), Some(b)) => a == b,
            _ => Arc::ptr_eq(&self.config, &other.config),
        };
        same_config && self.server_name == other.server_name
    }
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("server_name", &self.server_name)
            .field("alpn", &self.config.alpn_protocols)
            .finish_non_exhaustive()
    }
}

/// The certificates of a PEM file's `bytes` (at least one).
fn pem_certs(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no CERTIFICATE in the file", path.display()));
    }
    Ok(certs)
}

/// A connection to a backend: plain TCP, or TLS over it.
pub(crate) enum BackendStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl BackendStream {
    /// Runs the TLS handshake over `tcp` when `tls` is set. The error says
    /// what the backend's certificate or handshake got wrong.
    /// With `http2`, ALPN offers `h2` only (a backend without ALPN is
    /// taken to know HTTP/2 beforehand); else what the configuration
    /// offers, which must leave the backend speaking HTTP/1.1.
    pub(crate) async fn over(
        tcp: TcpStream,
        tls: Option<&BackendTls>,
        addr: SocketAddr,
        http2: bool,
    ) -> io::Result<BackendStream> {
        match tls {
            None => Ok(BackendStream::Plain(tcp)),
            Some(t) => {
                let connector = if http2 { &t.connector_h2 } else { &t.connector };
                let s = connector.connect(t.name_for(addr), tcp).await?;
                let want = if http2 { H2 } else { HTTP11 };
                match s.get_ref().1.alpn_protocol() {
                    None => Ok(BackendStream::Tls(Box::new(s))),
                    Some(p) if p == want => Ok(BackendStream::Tls(Box::new(s))),
                    Some(p) => Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the backend chose ALPN {:?}; this route speaks {} to its backends",
                            String::from_utf8_lossy(p),
                            String::from_utf8_lossy(want)
                        ),
                    )),
                }
            }
        }
    }

    /// The TCP socket under it.
    pub(crate) fn tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(s) => s,
            BackendStream::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether an idle connection is unusable: closed, reset, or with
    /// bytes the backend sent unasked (a TLS close_notify among them).
    pub(crate) fn stale(&self) -> bool {
        crate::wire::stale(self.tcp())
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            BackendStream::Plain(s) => s.is_write_vectored(),
            BackendStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
