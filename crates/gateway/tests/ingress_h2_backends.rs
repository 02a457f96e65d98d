//! Routes that speak HTTP/2 to their backends (`Route::backend_http2`):
//! h2c with prior knowledge and h2 over TLS (ALPN), requests from HTTP/1.1
//! and HTTP/2 clients multiplexed on one backend connection, trailers
//! passed back (gRPC's `grpc-status`), `TE: trailers` passed on, health
//! checks over HTTP/2, a backend that does not speak HTTP/2 refused with
//! a 502, a second connection past the streams one carries, a client's
//! oversized body not blamed on the backend, and a removal cutting the
//! streams in flight.

mod ingress_util;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gateway::ingress::{Backend as B, BackendTls, HealthCheck, Route, RouteMatch, RouteTable};
use http::{HeaderMap, HeaderValue, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use ingress_util::*;
use tokio::net::TcpListener;

/// What an HTTP/2 backend saw of one request.
#[derive(Debug, Clone)]
struct H2Seen {
    version: Version,
    te: Option<String>,
    authority: Option<String>,
}

/// An HTTP/2-only backend (h2c with prior knowledge, or h2 over TLS):
/// answers the request body back (or the path when there is none), with
/// the trailer `grpc-status: 0`; `/health` answers 200.
struct H2Backend {
    addr: std::net::SocketAddr,
    conns: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<H2Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for H2Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(req: Request<Incoming>, seen: Arc<Mutex<Vec<H2Seen>>>) -> Response<BoxBody> {
    seen.lock().unwrap().push(H2Seen {
        version: req.version(),
        te: req
            .headers()
            .get("te")
            .map(|v| v.to_str().unwrap().to_owned()),
        authority: req.uri().authority().map(|a| a.to_string()),
    });
    let path = req.uri().path().to_owned();
    if path == "/slow" {
        // Held until more requests are open at once than one connection
        // carries (or 5 s).
        let n = SLOW.fetch_add(1, Ordering::SeqCst) + 1;
        let t0 = std::time::Instant::now();
        while SLOW.load(Ordering::SeqCst) < 101.max(n) && t0.elapsed() < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    if path == "/hold" {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let Ok(body) = req.into_body().collect().await.map(|c| c.to_bytes()) else {
        return Response::new(
            Full::new(Bytes::new())
                .with_trailers(async { None })
                .boxed(),
        );
    };
    let body = if body.is_empty() {
        Bytes::from(path)
    } else {
        body
    };
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    let body = Full::new(body)
        .with_trailers(async move { Some(Ok::<_, Infallible>(trailers)) })
        .boxed();
    Response::new(body)
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// `/slow` requests seen (one test uses it).
static SLOW: AtomicUsize = AtomicUsize::new(0);

impl H2Backend {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> H2Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (c, s) = (conns.clone(), seen.clone());
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (s, acceptor) = (s.clone(), acceptor.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, Infallible>(answer(req, s).await) }
                    });
                    let http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    match acceptor {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(a) => {
                            if let Ok(t) = a.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(t), svc).await;
                            }
                        }
                    }
                });
            }
        });
        H2Backend {
            addr,
            conns,
            seen,
            task,
        }
    }

    fn seen(&self) -> Vec<H2Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A test CA's root (PEM file in `dir`) and a server configuration for
/// 127.0.0.1 offering ALPN h2.
fn tls_pki(dir: &std::path::Path) -> (std::path::PathBuf, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ca_file = dir.join("h2-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![leaf.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
    )
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    (ca_file, Arc::new(cfg))
}

/// An h2c request from a client of the proxy: status, body, trailers.
async fn h2c_call(
    proxy: std::net::SocketAddr,
    host: &str,
    path: &str,
    body: &'static str,
) -> (u16, String, Option<HeaderMap>) {
    let mut sender = h2c(proxy).await;
    let req = Request::post(format!("http://{host}{path}"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap();
    let resp = tokio::time::timeout(IO_TIMEOUT, sender.send_request(req))
        .await
        .expect("in time")
        .expect("response");
    let status = resp.status().as_u16();
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    let text = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
    (status, text, trailers)
}

/// A table with route `grpc` (host grpc.test) speaking HTTP/2 to `backend`
/// (id g1).
fn grpc_table(backend: &H2Backend) -> RouteTable {
    let table = RouteTable::default();
    table
        .upsert_route(
            Route::new("grpc", RouteMatch::host("grpc.test"))
                .with_backend(B::new("g1", backend.addr))
                .with_backend_http2(),
        )
        .unwrap();
    table
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_spoken_to_in_http2_share_one_connection_and_pass_trailers() {
    let backend = H2Backend::start(None).await;
    let table = grpc_table(&backend);
    let p = Running::start(opts(&table)).await;

    // gRPC-shaped: HTTP/2 client, TE: trailers, trailers back.
    let (status, body, trailers) = h2c_call(p.addr, "grpc.test", "/pkg.Svc/Call", "ping").await;
    assert_eq!((status, body.as_str()), (200, "ping"));
    let trailers = trailers.expect("trailers passed back");
    assert_eq!(trailers["grpc-status"], "0");
    let seen = backend.seen();
    assert_eq!(seen[0].version, Version::HTTP_2);
    assert_eq!(
        seen[0].te.as_deref(),
        Some("trailers"),
        "TE: trailers passed on"
    );
    assert_eq!(seen[0].authority.as_deref(), Some("grpc.test"));

    // HTTP/1.1 clients too (off the lean path), many at once: all on the
    // one backend connection.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let addr = p.addr;
        set.spawn(async move { get(addr, "grpc.test", &format!("/n/{i}")).await });
    }
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.text().starts_with("/n/"), "{}", r.text());
    }
    assert_eq!(
        backend.conns.load(Ordering::SeqCst),
        1,
        "multiplexed on one connection"
    );
    assert_eq!(backend.seen().len(), 21);
    assert!(
        backend
            .seen()
            .iter()
            .all(|s| s.te.is_none() || s.te.as_deref() == Some("trailers"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_over_tls_to_backends_with_health_checks_and_a_refusal() {
    let dir = std::env::temp_dir().join(format!(
        "ippool-h2b-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let (ca_file, server) = tls_pki(&dir);
    let backend = H2Backend::start(Some(server)).await;
    let h1_only = Backend::start("h1").await;
    let check = HealthCheck {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        rise: 1,
        fall: 1,
        ..HealthCheck::new("/health")
    };
    let table = RouteTable::default();
    table
        .upsert_route(
            Route::new("tls", RouteMatch::host("tls.test"))
                .with_backend(B::new("t1", backend.addr))
                .with_backend_tls(BackendTls::from_pem(Some(&ca_file), None).unwrap())
                .with_backend_http2()
                .with_health_check(check),
        )
        .unwrap();
    table
        .upsert_route(
            Route::new("old", RouteMatch::host("old.test"))
                .with_backend(B::new("o1", h1_only.addr))
                .with_backend_http2(),
        )
        .unwrap();
    let p = Running::start(opts(&table)).await;

    let r = get(p.addr, "tls.test", "/over/tls").await;
    assert_eq!((r.status, r.text().as_str()), (200, "/over/tls"));
    assert_eq!(backend.seen()[0].version, Version::HTTP_2);
    // Checked over HTTP/2 and TLS: up.
    wait_for("the check over h2", || {
        table.snapshot().backend("t1").unwrap().check_up == Some(true)
            && backend
                .seen()
                .iter()
                .any(|s| s.version == Version::HTTP_2 && s.authority.is_some())
            && backend.seen().len() >= 2
    })
    .await;

    // A backend that speaks only HTTP/1.1: 502, and the client says so.
    let r = get(p.addr, "old.test", "/").await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(h1_only.hits(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_a_connections_share_open_another_and_removal_cuts_them() {
    let backend = H2Backend::start(None).await;
    let table = grpc_table(&backend);
    let mut o = opts(&table);
    o.max_body_bytes = Some(10);
    let p = Running::start(o).await;

    // 130 slow requests at once: more than one connection carries (100).
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..130 {
        let addr = p.addr;
        set.spawn(async move { get(addr, "grpc.test", "/slow").await });
    }
    while let Some(r) = set.join_next().await {
        assert_eq!(r.unwrap().status, 200);
    }
    let conns = backend.conns.load(Ordering::SeqCst);
    assert!((2..=3).contains(&conns), "{conns} backend connections");

    // A chunked body over the limit: 413, the backend not blamed.
    let big = b"POST /x HTTP/1.1\r\nHost: grpc.test\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n\
                40\r\naaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n0\r\n\r\n";
    let r = raw(p.addr, big).await;
    assert_eq!(raw_status(&r), 413, "{r}");
    let snap = table.snapshot();
    assert_eq!(
        snap.backend("g1").unwrap().failures_total,
        0,
        "not the backend's fault"
    );

    // Removed while a stream is open: the stream ends now, not when the
    // backend would have answered.
    let before = backend.seen().len();
    let addr = p.addr;
    let slow = tokio::spawn(async move { get(addr, "grpc.test", "/hold").await.status });
    wait_for("the held request at the backend", || {
        backend.seen().len() > before
    })
    .await;
    let removed_at = std::time::Instant::now();
    table.remove_route("grpc").unwrap();
    let status = slow.await.unwrap();
    let took = removed_at.elapsed();
    assert_eq!(status, 502);
    assert!(
        took < Duration::from_millis(600),
        "cut, not answered: {took:?}"
    );
}
