//! A real `redis-server` for tests (installed by `.ci/run`): started on a
//! free loopback port without persistence, killed when dropped.

use std::net::{TcpListener, TcpStream};
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
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        RedisServer::spawn(port, args)
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
