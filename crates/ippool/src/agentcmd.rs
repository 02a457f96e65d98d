//! `ippool keygen` and `ippool agent`: the backend side of
//! self-registration, for backends in any language.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

/// `ippool keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// The agent (or admin) id: 1-64 of `a-z 0-9 . _ -`.
    #[arg(long, value_name = "ID")]
    pub id: String,
    /// `agent` (registers its own services) or `admin` (adds and revokes
    /// keys over the channel).
    #[arg(long, default_value = "agent", value_name = "ROLE")]
    pub role: String,
    /// Where to write `ID.key` (mode 0600) and `ID.pub`.
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub dir: PathBuf,
}

/// `ippool agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The proxy's registration channel: `ws://HOST:3042` or `wss://…`.
    /// Repeat for every instance of a fleet: the backend registers with
    /// each, independently (one proxy down does not touch the others).
    #[arg(long, value_name = "URL", required = true)]
    pub proxy: Vec<String>,
    /// The agent id (its public key must be in the proxy's key store).
    #[arg(long, value_name = "ID")]
    pub id: String,
    /// The private key written by `ippool keygen`.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The backend's address, as the proxy should reach it.
    #[arg(long, value_name = "ADDR")]
    pub service: SocketAddr,
    /// Routes, `HOST/PATH` (e.g. `example.com/`, `*.example.com/api`);
    /// repeat for more.
    #[arg(long = "route", value_name = "HOST/PATH", required = true)]
    pub routes: Vec<String>,
    /// The service's weight.
    #[arg(long, default_value_t = 1)]
    pub weight: u32,
    /// The service's name (default: `default`).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// CA certificate (PEM) to verify a `wss://` proxy with.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
}

/// Writes a key pair.
pub fn keygen(a: &KeygenArgs) -> ExitCode {
    let id: registry::KeyId = match a.id.parse() {
        Ok(id) => id,
        Err(e) => return crate::fail(2, format_args!("--id {}: {e}", a.id)),
    };
    let role: registry::Role = match a.role.parse() {
        Ok(r) => r,
        Err(e) => return crate::fail(2, format_args!("--role {}: {e}", a.role)),
    };
    match registry::generate_keypair(&a.dir, &id, role) {
        Ok(_) => crate::print_out(&format!(
            "wrote {} (private, mode 0600: keep it with the backend)\n\
             wrote {} (public: copy it into the proxy's registry.keys_dir)\n",
            a.dir.join(format!("{id}.key")).display(),
            a.dir.join(format!("{id}.pub")).display()
        )),
        Err(e) => crate::fail(1, e),
    }
}

/// `HOST/PATH` → (host, path prefix).
fn split_route(r: &str) -> Result<(String, String), String> {
    let (host, path) = match r.find('/') {
        Some(i) => (&r[..i], &r[i..]),
        None => (r, "/"),
    };
    if host.is_empty() {
        return Err(format!(
            "--route {r}: expected HOST/PATH, e.g. example.com/api"
        ));
    }
    Ok((host.to_owned(), path.to_owned()))
}

/// Runs the sidecar until SIGINT or SIGTERM, then drains and deregisters
/// (with every proxy at once).
pub fn agent(a: &AgentArgs) -> ExitCode {
    let mut routes = Vec::with_capacity(a.routes.len());
    for r in &a.routes {
        match split_route(r) {
            Ok(route) => routes.push(route),
            Err(e) => return crate::fail(2, e),
        }
    }
    for (i, url) in a.proxy.iter().enumerate() {
        if a.proxy[..i].contains(url) {
            return crate::fail(2, format_args!("--proxy {url} is given twice"));
        }
    }
    let key = match registry::load_signing_key(Path::new(&a.key)) {
        Ok(k) => k,
        Err(e) => return crate::fail(2, format_args!("--key {}: {e}", a.key.display())),
    };
    let mut builders = Vec::with_capacity(a.proxy.len());
    for url in &a.proxy {
        // Each channel signs its own challenges (nonce, id and channel).
        let mut b = registry::Agent::builder(url.as_str(), a.id.as_str(), key.clone())
            .service(a.service)
            .weight(a.weight);
        if let Some(n) = &a.name {
            b = b.name(n.as_str());
        }
        for (host, path) in &routes {
            b = b.route(host.as_str(), path.as_str());
        }
        if let Some(ca) = &a.ca {
            b = b.ca_file(ca);
        }
        builders.push((url.clone(), b));
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return crate::fail(1, format_args!("cannot start the runtime: {e}")),
    };
    rt.block_on(async {
        let mut agents = Vec::with_capacity(builders.len());
        // An agent whose state channel closes has stopped on its own.
        let (ended_tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
        for (url, b) in builders {
            match b.start() {
                Ok(agent) => {
                    let mut states = agent.watch();
                    let ended_tx = ended_tx.clone();
                    tokio::spawn(async move {
                        while states.changed().await.is_ok() {
                            let s = states.borrow_and_update().clone();
                            tracing::info!(proxy = %url, state = ?s, "agent state");
                        }
                        let _ = ended_tx.send(url);
                    });
                    agents.push(agent);
                }
                Err(e) => return crate::fail(2, format_args!("--proxy {url}: {e}")),
            }
        }
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => return crate::fail(1, format_args!("signals: {e}")),
            };
        let code = tokio::select! {
            _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
            _ = term.recv() => ExitCode::SUCCESS,
            Some(url) = ended.recv() => {
                tracing::error!(proxy = %url, "agent stopped unexpectedly");
                ExitCode::FAILURE
            }
        };
        tracing::info!("stopping: draining and deregistering");
        futures_util::future::join_all(agents.into_iter().map(registry::Agent::shutdown)).await;
        code
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn routes() {
        assert_eq!(
            super::split_route("example.com/api").unwrap(),
            ("example.com".into(), "/api".into())
        );
        assert_eq!(
            super::split_route("*.example.com").unwrap(),
            ("*.example.com".into(), "/".into())
        );
        assert!(super::split_route("/api").is_err());
    }
}
