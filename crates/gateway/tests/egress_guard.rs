//! The egress listener's guard: denied clients reset at accept, requests
//! over the client's rate limit answered 429 with Retry-After (per request,
//! so keep-alive does not escape it), repeat offenders banned.

mod support;

use std::sync::Arc;
use std::time::Duration;

use addrpool::{Assigner, Pool, PoolOptions};
use gateway::egress::{EgressOptions, Protocol, RequestResult};
use gateway::guard::{AutoBlock, AutoBlockOptions, Guard, RateLimit, RateLimitOptions};
use support::{Running, get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_answers_429_and_repeat_offenders_are_banned() {
    let up = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = testbed::PeerServer::start(up).unwrap();
    let url = format!("http://{}/", up.local_addr());
    let pool = Pool::start(
        "127.0.0.0/24".parse().unwrap(),
        Assigner::Static,
        PoolOptions::default(),
    )
    .await
    .unwrap();
    let policy = Arc::new(iprules::Shared::new(iprules::Policy::default()));
    let autoblock = Arc::new(AutoBlock::new(
        Arc::clone(&policy),
        AutoBlockOptions {
            threshold: 2,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(3600),
            ..Default::default()
        },
    ));
    let guard = Guard::new(Arc::clone(&policy))
        .with_rate_limit(Arc::new(RateLimit::new(RateLimitOptions {
            rate: 0.5,
            burst: 3,
            ..Default::default()
        })))
        .with_autoblock(Arc::clone(&autoblock))
        .rate_per_request();
    let mut opts = EgressOptions::new(pool.clone());
    opts.policy.update(|p| {
        p.allow.add("127.0.0.0/8".parse().unwrap());
    });
    opts.guard = Arc::new(guard);
    let proxy = Running::start(opts).await;

    for i in 0..3 {
        assert_eq!(
            get(proxy.addr, &url, None).await.status,
            200,
            "request {i} within burst"
        );
    }
    let r = get(proxy.addr, &url, None).await;
    assert_eq!(r.status, 429, "{r:?}");
    assert_eq!(
        r.header("retry-after").as_deref(),
        Some("2"),
        "1/rate = 2 s: {r:?}"
    );
    assert_eq!(
        proxy
            .metrics
            .snapshot()
            .requests(Protocol::Http, RequestResult::RateLimited),
        1
    );
    // A second refusal reaches the autoblock threshold (2): banned, and
    // the next connection is reset at accept, before any answer.
    assert_eq!(get(proxy.addr, &url, None).await.status, 429);
    assert_eq!(autoblock.bans(std::time::Instant::now()).len(), 1);
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The reset may even beat connect() back to userspace.
        let Ok(mut s) = tokio::net::TcpStream::connect(proxy.addr).await else {
            return true;
        };
        let _ = s
            .write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let mut buf = [0u8; 64];
        s.read(&mut buf).await.map_or(true, |n| n == 0)
    })
    .await
    .unwrap();
    assert!(refused, "a banned client gets no answer");
    assert!(policy.read(|p| !p.allows("127.0.0.1".parse().unwrap())));
    proxy.stop().await;
    pool.shutdown().await;
}
