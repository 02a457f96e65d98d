//! A hyper-util client whose every connection leaves from a new address of
//! a loopback pool (127.0.0.0/24: no root, no setup).
//!
//! ```text
//! cargo run -p addrpool --example hyper_client            # local echo server
//! cargo run -p addrpool --example hyper_client -- http://127.0.0.1:8080/
//! ```
//!
//! Without a URL it starts a server on 127.0.0.1 that answers with the peer
//! address it saw, so the output shows the rotation.

use std::error::Error;

use addrpool::{Assigner, Pool, PoolOptions, Source};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn Error + Send + Sync>> {
    let (url, _server) = match std::env::args().nth(1) {
        Some(url) => (url, None),
        None => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let server = testbed::PeerServer::start(listener)?;
            (format!("http://{}/", server.local_addr()), Some(server))
        }
    };
    let pool = Pool::start(
        "127.0.0.0/24".parse::<Source>()?,
        Assigner::Static,
        PoolOptions::default(),
    )
    .await?;
    // Hyper pools connections per host and a pooled connection keeps its
    // source: disable idle pooling for one source per request.
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(pool.connector());
    for _ in 0..5 {
        let res = client.get(url.parse()?).await?;
        let status = res.status();
        let body = res.into_body().collect().await?.to_bytes();
        println!("{status} {}", String::from_utf8_lossy(&body));
    }
    let m = pool.metrics();
    println!(
        "leased {} addresses, retired {}",
        m.leased_total, m.retired_total
    );
    pool.shutdown().await;
    Ok(())
}
