//! A real `redis-server` for tests (installed by `.ci/run`): started on a
//! free loopback port without persistence, killed when dropped; plain, or
//! TLS only with certificates from a test CA.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `redis-server` child process, killed on drop.
pub struct RedisServer {
    port: u16,
    child: Child,
}

impl RedisServer {
    /// Starts one on a free loopback port and waits until it listens.
    ///
    /// # Panics
    ///
    /// When `redis-server` is not installed or does not listen within 10 s.
    pub fn start() -> RedisServer {
        RedisServer::with_args(&[])
    }

    /// Starts one on a free loopback port with more `redis-server`
    /// arguments (`["--requirepass", "s3cret"]`).
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn with_args(args: &[&str]) -> RedisServer {
        let port = free_port();
        RedisServer::spawn(port, args)
    }

    /// Starts one that speaks TLS only (`rediss://127.0.0.1:PORT`), with a
    /// server certificate for 127.0.0.1 from a CA made here; the PEM files
    /// go to `dir`. With `auth_clients`, it asks clients for a certificate
    /// from that CA (Redis's default).
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`], or when `dir` cannot be written.
    pub fn with_tls(dir: &Path, auth_clients: bool) -> (RedisServer, TlsFiles) {
        let files = TlsFiles::write(dir);
        let port = free_port();
        let s = |p: &Path| p.to_str().expect("a UTF-8 path").to_owned();
        let args = [
            "--port".to_owned(),
            "0".to_owned(),
            "--tls-port".to_owned(),
            port.to_string(),
            "--tls-cert-file".to_owned(),
            s(&files.server_cert),
            "--tls-key-file".to_owned(),
            s(&files.server_key),
            "--tls-ca-cert-file".to_owned(),
            s(&files.ca),
            "--tls-auth-clients".to_owned(),
            if auth_clients { "yes" } else { "no" }.to_owned(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        (RedisServer::spawn(port, &args), files)
    }

    /// Starts one on `port` (again, after a drop: a restart, empty).
    ///
    /// # Panics
    ///
    /// As [`RedisServer::start`].
    pub fn on(port: u16) -> RedisServer {
        RedisServer::spawn(port, &[])
    }

    fn spawn(port: u16, args: &[&str]) -> RedisServer {
        // A later --port (a TLS server's `--port 0`) overrides this one.
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        let server = RedisServer { port, child };
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "redis-server does not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Runs `redis-cli` against it; its output, trimmed.
    ///
    /// # Panics
    ///
    /// When `redis-cli` is not installed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli is installed (.ci/run installs redis-tools)");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// The PEM files of [`RedisServer::with_tls`].
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that issued the server's and the client's certificates.
    pub ca: PathBuf,
    /// The server's certificate (for 127.0.0.1 and localhost) and key.
    pub server_cert: PathBuf,
    /// The server's key.
    pub server_key: PathBuf,
    /// A client certificate from the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Another CA, which issued nothing the server shows.
    pub other_ca: PathBuf,
}

impl TlsFiles {
    fn write(dir: &Path) -> TlsFiles {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        std::fs::create_dir_all(dir).expect("the certificate directory");
        let put = |name: &str, text: String| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("a certificate file");
            path
        };
        let ca = |name: &str| {
            let key = KeyPair::generate().expect("a key");
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key).expect("a CA certificate");
            (cert.pem(), Issuer::new(params, key))
        };
        let leaf = |issuer: &Issuer<'_, KeyPair>, names: &[&str]| {
            let key = KeyPair::generate().expect("a key");
            let params =
                CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                    .expect("leaf params");
            let cert = params.signed_by(&key, issuer).expect("a leaf certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (ca_pem, issuer) = ca("ippool test Redis CA");
        let (other_pem, _) = ca("some other CA");
        let (server_cert, server_key) = leaf(&issuer, &["127.0.0.1", "localhost"]);
        let (client_cert, client_key) = leaf(&issuer, &["ippool-client"]);
        TlsFiles {
            ca: put("ca.pem", ca_pem),
            server_cert: put("server.pem", server_cert),
            server_key: put("server.key", server_key),
            client_cert: put("client.pem", client_cert),
            client_key: put("client.key", client_key),
            other_ca: put("other-ca.pem", other_pem),
        }
    }
}
