//! A forward proxy on 127.0.0.1:3128 whose connections leave from a
//! 127.0.0.0/24 loopback pool (no root, no setup: all of 127/8 is local on
//! Linux).
//!
//! ```text
//! cargo run -p gateway --example forward_proxy
//! python3 -m http.server 8000 --bind 127.0.0.1 &
//! curl -sv -x http://127.0.0.1:3128 http://127.0.0.1:8000/ 2>&1 | grep -i x-ippool-source
//! curl -s --socks5-hostname 127.0.0.1:3128 http://127.0.0.1:8000/ >/dev/null
//! curl -s -x http://127.0.0.1:3128 http://169.254.169.254/   # 403: not allowed
//! ```
//!
//! Loopback destinations are denied by the default policy; this example
//! allows 127.0.0.0/8 so that it can reach a local server. Stop it with
//! Ctrl-C (or after `IPPOOL_EXAMPLE_SECS` seconds, if set).

use std::time::Duration;

use addrpool::{Assigner, Pool, PoolOptions, Strategy};
use gateway::egress::{EgressOptions, EgressProxy, default_deny_rules};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = Pool::start(
        "127.0.0.0/24".parse()?,
        Assigner::Static,
        PoolOptions {
            strategy: Strategy::RoundRobin,
            max_uses: None,
            ..Default::default()
        },
    )
    .await?;
    let mut opts = EgressOptions::new(pool.clone());
    opts.listen = std::env::var("IPPOOL_EXAMPLE_LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:3128".into())
        .parse()?;
    opts.policy.update(|p| {
        p.allow.add("127.0.0.0/8".parse().expect("a valid rule"));
    });
    println!("denied unless allowed:");
    for (rule, why) in default_deny_rules() {
        println!("  {rule:<18} {why}");
    }
    let proxy = EgressProxy::bind(opts).await?;
    let metrics = proxy.metrics();
    println!(
        "forward proxy (HTTP, CONNECT, SOCKS5) on {}",
        proxy.local_addr()
    );
    let secs: Option<u64> = std::env::var("IPPOOL_EXAMPLE_SECS")
        .ok()
        .and_then(|s| s.parse().ok());
    proxy
        .serve(async move {
            match secs {
                Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                None => std::future::pending::<()>().await,
            }
        })
        .await;
    let m = metrics.snapshot();
    for (protocol, result, n) in m.iter_requests().filter(|r| r.2 > 0) {
        println!("{} {} {n}", protocol.as_str(), result.as_str());
    }
    pool.shutdown().await;
    Ok(())
}
