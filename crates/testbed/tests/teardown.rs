//! The harness cleans up after itself, also when a test panics.

use std::panic::{AssertUnwindSafe, catch_unwind};

fn listed(name: &str) -> bool {
    testbed::ip(&["netns", "list"])
        .unwrap()
        .lines()
        .any(|l| l.split_whitespace().next() == Some(name))
}

#[test]
fn namespaces_are_removed_on_drop_and_on_panic() {
    let bed = testbed::Testbed::new().expect("testbed needs root");
    let names = [
        bed.proxy().name().to_owned(),
        bed.upstream().name().to_owned(),
    ];
    assert!(names.iter().all(|n| listed(n)));
    // The link works both ways and the upstream server sees the peer.
    let server = bed.start_upstream_server(8080).unwrap();
    let body = bed.proxy().run(|| async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect((testbed::UPSTREAM_V4, 8080))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        testbed::body_of(&out).to_owned()
    });
    assert_eq!(body, testbed::PROXY_V4.to_string());
    assert_eq!(
        server.peers(),
        vec![std::net::IpAddr::from(testbed::PROXY_V4)]
    );
    drop(server);
    // A panic inside the namespace reaches the caller; the drop still cleans up.
    let r = catch_unwind(AssertUnwindSafe(|| {
        bed.proxy().run(|| async { panic!("boom") });
    }));
    assert!(r.is_err());
    drop(bed);
    assert!(names.iter().all(|n| !listed(n)), "namespaces removed");
}
