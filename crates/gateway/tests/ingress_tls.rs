//! TLS termination by the ingress proxy, on loopback with a test CA: ALPN
//! (h2 and http/1.1), SNI choosing among certificates, certificate reload
//! by call and by file watch; backends reached over TLS, their
//! certificates checked.

mod ingress_util;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use gateway::ingress::{
    Backend as B, BackendTls, CertPaths, CertStore, HealthCheck, Route, RouteMatch, RouteTable,
    TlsOptions,
};
use http::{Request, Version};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ingress_util::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A test CA that issues leaf certificates.
struct Ca {
    root: CertificateDer<'static>,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "ippool test CA");
        let cert = params.self_signed(&key).unwrap();
        Ca {
            root: cert.der().clone(),
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// Writes the root certificate to `dir/name` (PEM).
    fn write_root(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.root_pem).unwrap();
        path
    }

    /// A server configuration with a leaf for `names` (DNS names or IP
    /// addresses), for a test backend.
    fn server(&self, names: &[&str]) -> Arc<rustls::ServerConfig> {
        self.server_with(names, false)
    }

    /// [`server`](Ca::server), asking clients for a certificate this CA
    /// signed when `clients` is set.
    fn server_with(&self, names: &[&str], clients: bool) -> Arc<rustls::ServerConfig> {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if clients {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.root.clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let cfg = builder
            .with_single_cert(vec![cert.der().clone()], key)
            .unwrap();
        Arc::new(cfg)
    }

    /// Writes a leaf for `names` to `dir/stem.pem` and `dir/stem.key`;
    /// returns its paths and DER.
    fn leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> (CertPaths, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let paths = CertPaths::new(
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        // Write to temporary names, then rename: a watcher never sees half
        // a file.
        for (path, text) in [(&paths.cert, cert.pem()), (&paths.key, key.serialize_pem())] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        (paths, cert.der().clone())
    }

    fn client(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.root.clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(cfg))
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "ippool-ingress-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn handshake(
    connector: &TlsConnector,
    addr: std::net::SocketAddr,
    sni: &str,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tokio::time::timeout(
        IO_TIMEOUT,
        connector.connect(ServerName::try_from(sni.to_owned()).unwrap(), tcp),
    )
    .await
    .expect("handshake in time")
    .expect("handshake")
}

fn peer_cert(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref().1.peer_certificates().unwrap()[0].clone()
}

fn routes(a: &Backend) -> RouteTable {
    let t = RouteTable::default();
    t.upsert_route(Route::new("a", RouteMatch::host("a.test")).with_backend(B::new("a", a.addr)))
        .unwrap();
    t.upsert_route(Route::new("b", RouteMatch::host("b.test")).with_backend(B::new("b", a.addr)))
        .unwrap();
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_over_tls_have_their_certificates_checked() {
    let dir = TempDir::new("upstream");
    let ca = Ca::new();
    let ca_file = ca.write_root(&dir.0, "ca.pem");
    let other_ca = Ca::new().write_root(&dir.0, "other.pem");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = Backend::serve_tls("tls", listener, ca.server(&["127.0.0.1", "api.internal"]));
    let plain = Backend::start("plain").await;
    let tls = |ca: &Path| BackendTls::from_pem(Some(ca), None).unwrap();
    let table = RouteTable::default();
    let route = |name: &str, tls: BackendTls, to: std::net::SocketAddr| {
        Route::new(name, RouteMatch::host(&format!("{name}.test")))
            .with_backend(B::new(name, to))
            .with_backend_tls(tls)
    };
    // Checked against the backend's IP address (an IP SAN), or a name.
    table
        .upsert_route(route("ip", tls(&ca_file), backend.addr))
        .unwrap();
    let named = tls(&ca_file).with_server_name("api.internal").unwrap();
    table
        .upsert_route(route("named", named, backend.addr))
        .unwrap();
    let wrong = tls(&ca_file).with_server_name("other.internal").unwrap();
    table
        .upsert_route(route("wrongname", wrong, backend.addr))
        .unwrap();
    table
        .upsert_route(route("untrusted", tls(&other_ca), backend.addr))
        .unwrap();
    table
        .upsert_route(route("plain", tls(&ca_file), plain.addr))
        .unwrap();
    let p = Running::start(opts(&table)).await;

    // Over TLS, on the lean path and kept alive: one backend connection
    // for three requests.
    let mut c = H1::connect(p.addr).await;
    for _ in 0..3 {
        let r = c.get("ip.test", "/").await;
        assert_eq!(
            (r.status, r.backend()),
            (200, "tls".to_owned()),
            "{}",
            r.text()
        );
    }
    assert_eq!(backend.conns(), 1, "the TLS connection was reused");
    let r = get(p.addr, "named.test", "/").await;
    assert_eq!(r.status, 200, "{}", r.text());
    // A body goes up through TLS too.
    let r = send(p.addr, {
        let mut req = request("POST", "ip.test", "/echo");
        *req.body_mut() = Full::new(Bytes::from_static(b"up through TLS"));
        req
    })
    .await
    .unwrap();
    assert_eq!((r.status, r.text()), (200, "up through TLS".to_owned()));

    // Refused certificates, and a backend that does not speak TLS: 502,
    // saying why.
    for (host, why) in [
        ("wrongname.test", "not valid for name \"other.internal\""),
        ("untrusted.test", "invalid peer certificate"),
        ("plain.test", "does the backend speak TLS on this port?"),
    ] {
        let r = get(p.addr, host, "/").await;
        assert_eq!(r.status, 502, "{host}: {}", r.text());
        assert!(
            r.error().contains("TLS with backend") && r.error().contains(why),
            "{host}: {}",
            r.error()
        );
    }
    assert_eq!(plain.hits(), 0);

    // Health checks go over TLS too: a backend with a refused certificate
    // goes down, one with a good one stays up.
    let check = HealthCheck {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        rise: 1,
        fall: 1,
        ..HealthCheck::new("/health")
    };
    let checks = |n: &str, tls: BackendTls| {
        Route::new(n, RouteMatch::host(&format!("{n}.test")))
            .with_backend(B::new(n, backend.addr))
            .with_backend_tls(tls)
            .with_health_check(check.clone())
    };
    table.upsert_route(checks("good", tls(&ca_file))).unwrap();
    table.upsert_route(checks("bad", tls(&other_ca))).unwrap();
    let t0 = std::time::Instant::now();
    let before = backend
        .state
        .checks
        .load(std::sync::atomic::Ordering::SeqCst);
    loop {
        let snap = table.snapshot();
        let (good, bad) = (snap.backend("good").unwrap(), snap.backend("bad").unwrap());
        let checked = backend
            .state
            .checks
            .load(std::sync::atomic::Ordering::SeqCst)
            > before;
        if checked && good.check_up == Some(true) && bad.check_up == Some(false) {
            break;
        }
        assert!(
            t0.elapsed() < IO_TIMEOUT,
            "checks over TLS: good up, bad down"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Turning TLS off for a route starts its backends afresh: its pooled
    // TLS connection is not used for plain HTTP (which the backend, all
    // TLS, refuses).
    assert_eq!(get(p.addr, "named.test", "/").await.status, 200);
    table
        .upsert_route(
            Route::new("named", RouteMatch::host("named.test"))
                .with_backend(B::new("named", backend.addr)),
        )
        .unwrap();
    let r = get(p.addr, "named.test", "/").await;
    assert_eq!(r.status, 502, "plain HTTP to a TLS port: {}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_shown_to_backends_that_ask() {
    let dir = TempDir::new("mtls");
    let ca = Ca::new();
    let ca_file = ca.write_root(&dir.0, "ca.pem");
    let (client, _) = ca.leaf(&dir.0, "client", &["proxy.test"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = Backend::serve_tls("mtls", listener, ca.server_with(&["127.0.0.1"], true));
    let table = RouteTable::default();
    let with_cert =
        BackendTls::from_pem(Some(&ca_file), Some((&client.cert, &client.key))).unwrap();
    let without = BackendTls::from_pem(Some(&ca_file), None).unwrap();
    for (name, tls) in [("with", with_cert), ("without", without)] {
        table
            .upsert_route(
                Route::new(name, RouteMatch::host(&format!("{name}.test")))
                    .with_backend(B::new(name, backend.addr))
                    .with_backend_tls(tls),
            )
            .unwrap();
    }
    let p = Running::start(opts(&table)).await;
    let r = get(p.addr, "with.test", "/").await;
    assert_eq!(
        (r.status, r.backend()),
        (200, "mtls".to_owned()),
        "{}",
        r.text()
    );
    let r = get(p.addr, "without.test", "/").await;
    assert_eq!(r.status, 502, "no client certificate: {}", r.text());
    assert_eq!(backend.hits(), 1);
    // A key that is not the certificate's: refused when loading.
    let (other, _) = ca.leaf(&dir.0, "other", &["other.test"]);
    let e = BackendTls::from_pem(Some(&ca_file), Some((&client.cert, &other.key))).unwrap_err();
    assert!(e.contains("client certificate"), "{e}");
}

/// A proxy with route `r` (host r.test) plain to backend `a`, and a
/// request to `a`'s `/hold` in flight.
struct Held {
    table: RouteTable,
    plain: Route,
    ca_file: PathBuf,
    p: Running,
    held: tokio::task::JoinHandle<Resp>,
}

impl Held {
    async fn start(dir: &TempDir, a: &Backend) -> Held {
        let ca_file = Ca::new().write_root(&dir.0, "ca.pem");
        let table = RouteTable::default();
        let plain = Route::new("r", RouteMatch::host("r.test")).with_backend(B::new("a", a.addr));
        table.upsert_route(plain.clone()).unwrap();
        let p = Running::start(opts(&table)).await;
        let addr = p.addr;
        let held = tokio::spawn(async move { get(addr, "r.test", "/hold").await });
        a.wait_holding(1).await;
        Held {
            table,
            plain,
            ca_file,
            p,
            held,
        }
    }

    /// Turns route `r` to TLS (a, plain, can no longer be reached).
    fn turn_tls(&self) {
        let tls = BackendTls::from_pem(Some(&self.ca_file), None).unwrap();
        self.table
            .upsert_route(self.plain.clone().with_backend_tls(tls))
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_backend_cuts_what_its_predecessor_had_in_flight() {
    let dir = TempDir::new("tls-remove");
    let a = Backend::start("a").await;
    let h = Held::start(&dir, &a).await;
    h.turn_tls();
    let (table, held) = (h.table, h.held);
    // Removed at once: the request still held on the plain connection is
    // closed too, not left to run.
    table.remove("a").unwrap();
    let r = tokio::time::timeout(IO_TIMEOUT, held)
        .await
        .expect("cut, not left waiting")
        .unwrap();
    assert_eq!(r.status, 502, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_tls_change_lets_requests_in_flight_finish_and_drains_complete() {
    let dir = TempDir::new("tls-change");
    let (a, b) = (Backend::start("a").await, Backend::start("b").await);
    let h = Held::start(&dir, &a).await;
    // b joins and is drained away while the route turns to TLS.
    h.table.upsert_backend("r", B::new("b", b.addr)).unwrap();
    let drain = h.table.drain("b", Duration::from_secs(5)).unwrap();
    h.turn_tls();
    let Held { table, p, held, .. } = h;
    a.release();
    let r = held.await.unwrap();
    assert_eq!(
        (r.status, r.backend()),
        (200, "a".to_owned()),
        "not cut by the change"
    );
    assert_eq!(
        tokio::time::timeout(IO_TIMEOUT, drain)
            .await
            .expect("drain ends"),
        gateway::ingress::DrainOutcome::Drained,
        "the drain of b completes across the change"
    );
    assert!(table.snapshot().backend("b").is_none(), "b is gone");
    assert!(table.snapshot().routes[0].backend_tls.is_some());
    // New requests use the new setting (a speaks plain HTTP: refused).
    let r = get(p.addr, "r.test", "/").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.error().contains("TLS with backend a"), "{}", r.error());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_with_sni_choosing_the_certificate() {
    let dir = TempDir::new("sni");
    let ca = Ca::new();
    let (pa, der_a) = ca.leaf(&dir.0, "a", &["a.test"]);
    let (pb, der_b) = ca.leaf(&dir.0, "b", &["b.test", "*.b.test"]);
    let certs = CertStore::load([pa, pb]).unwrap();
    assert_eq!(certs.names()[1], ["b.test", "*.b.test"]);
    let backend = Backend::start("a").await;
    let table = routes(&backend);
    let mut o = opts(&table);
    o.tls = Some(TlsOptions::new(certs));
    let p = Running::start(o).await;
    let h2 = ca.client(&[b"h2", b"http/1.1"]);

    // SNI b.test: b's certificate, ALPN h2, HTTP/2 end to end.
    let tls = handshake(&h2, p.addr, "b.test").await;
    assert!(peer_cert(&tls) == der_b);
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("https://b.test/hello")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = read(sender.send_request(req).await.unwrap()).await.unwrap();
    assert_eq!((r.status, r.version), (200, Version::HTTP_2));
    let seen = backend.seen();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["host"], "b.test");
    assert!(
        seen.headers["forwarded"]
            .to_str()
            .unwrap()
            .ends_with(";proto=https")
    );

    // A wildcard name.
    let tls = handshake(&h2, p.addr, "x.b.test").await;
    assert!(peer_cert(&tls) == der_b);

    // SNI a.test, HTTP/1.1 only: a's certificate, HTTP/1.1.
    let h1 = ca.client(&[b"http/1.1"]);
    let tls = handshake(&h1, p.addr, "a.test").await;
    assert!(peer_cert(&tls) == der_a);
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = read(
        sender
            .send_request(request("GET", "a.test", "/"))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.version), (200, Version::HTTP_11));
    // HTTP/1.1 over TLS takes the lean path, and says https upstream.
    let lean = p.metrics.snapshot().lean_requests_total;
    // The same kept-alive connection (the client may need a moment to be
    // ready for the next request).
    sender.ready().await.unwrap();
    let r = read(
        sender
            .send_request(request("GET", "a.test", "/again"))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(p.metrics.snapshot().lean_requests_total, lean + 1);
    assert!(lean >= 1, "the first request too");
    assert_eq!(backend.seen().headers["x-forwarded-proto"], "https");

    // An unknown name gets the first certificate (and fails verification
    // for that name); a plain-text client fails the handshake.
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let bad = h1
        .connect(ServerName::try_from("c.test").unwrap(), tcp)
        .await;
    assert!(bad.is_err());
    let resp = raw(p.addr, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    assert!(!resp.starts_with("HTTP/1.1 200"), "{resp}");
    // Both failures are counted (the first when the server sees the
    // client's alert, which may come after the plain-text one).
    wait_for("two TLS handshake errors", || {
        p.metrics.snapshot().tls_handshake_errors_total >= 2
    })
    .await;
    assert_eq!(p.metrics.snapshot().http2_requests_total, 1);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_without_a_restart() {
    let dir = TempDir::new("reload");
    let ca = Ca::new();
    let (pa, der_old) = ca.leaf(&dir.0, "a", &["a.test"]);
    let certs = CertStore::load([pa.clone()]).unwrap();
    let backend = Backend::start("a").await;
    let table = routes(&backend);
    let mut o = opts(&table);
    o.tls = Some(TlsOptions {
        certs: certs.clone(),
        watch: None,
    });
    let p = Running::start(o).await;
    let client = ca.client(&[b"http/1.1"]);
    let before = handshake(&client, p.addr, "a.test").await;
    assert!(peer_cert(&before) == der_old);

    // New files: old handshakes keep theirs until reload() ...
    let (_, der_new) = ca.leaf(&dir.0, "a", &["a.test"]);
    assert!(der_new != der_old);
    assert!(peer_cert(&handshake(&client, p.addr, "a.test").await) == der_old);
    certs.reload().unwrap();
    // ... then new handshakes see the new certificate.
    assert!(peer_cert(&handshake(&client, p.addr, "a.test").await) == der_new);
    // The connection made before still works.
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(before))
        .await
        .unwrap();
    tokio::spawn(conn);
    let r = read(
        sender
            .send_request(request("GET", "a.test", "/"))
            .await
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 200);

    // A broken key keeps the old set.
    std::fs::write(&pa.key, "not a key").unwrap();
    assert!(certs.reload().is_err());
    assert!(peer_cert(&handshake(&client, p.addr, "a.test").await) == der_new);
    p.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_certificate_files_are_picked_up_by_the_watch() {
    let dir = TempDir::new("watch");
    let ca = Ca::new();
    let (pa, der_old) = ca.leaf(&dir.0, "a", &["a.test"]);
    let certs = CertStore::load([pa]).unwrap();
    let backend = Backend::start("a").await;
    let table = routes(&backend);
    let mut o = opts(&table);
    o.tls = Some(TlsOptions {
        certs,
        watch: Some(Duration::from_millis(100)),
    });
    let p = Running::start(o).await;
    let client = ca.client(&[b"http/1.1"]);
    assert!(peer_cert(&handshake(&client, p.addr, "a.test").await) == der_old);
    // Modification times can be coarse: make sure the new files differ
    // in time as well as content.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (_, der_new) = ca.leaf(&dir.0, "a", &["a.test"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = peer_cert(&handshake(&client, p.addr, "a.test").await);
        if got == der_new {
            break;
        }
        assert!(got == der_old);
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch never reloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.stop().await;
}

#[test]
fn loading_reports_bad_files() {
    let dir = TempDir::new("bad");
    let ca = Ca::new();
    let (pa, _) = ca.leaf(&dir.0, "a", &["a.test"]);
    let (pb, _) = ca.leaf(&dir.0, "b", &["b.test"]);
    // Mismatched key.
    let e = CertStore::load([CertPaths::new(&pa.cert, &pb.key)]).unwrap_err();
    assert!(e.to_string().contains("does not match"), "{e}");
    // Missing file.
    let e = CertStore::load([CertPaths::new(dir.0.join("nope.pem"), &pa.key)]).unwrap_err();
    assert!(e.to_string().contains("nope.pem"), "{e}");
    // None at all.
    assert!(CertStore::load([]).is_err());
}
