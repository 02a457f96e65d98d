//! The dashboard in a real browser: headless Chromium loads `/` from a
//! live daemon; the figures it shows (pools, routes, rule sets, bans) are
//! the API's, and a screenshot is taken.

mod support;

use std::net::TcpListener;
use std::process::Command;

use support::{Daemon, PeerEcho, TempDir, http};

fn chromium() -> String {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return name.to_owned();
        }
    }
    panic!(
        "no Chromium: this test needs one (Debian: apt-get install chromium; .ci/run installs it)"
    );
}

/// The text of the element that follows `anchor` and then `field`.
fn figure(dom: &str, anchor: &str, field: &str) -> String {
    let at = dom
        .find(anchor)
        .unwrap_or_else(|| panic!("no {anchor} in the page"));
    let rest = &dom[at..];
    let f = rest
        .find(field)
        .unwrap_or_else(|| panic!("no {field} after {anchor}"));
    let rest = &rest[f + field.len()..];
    let start = rest.find('>').expect(">") + 1;
    let end = rest[start..].find('<').expect("<");
    rest[start..start + end].to_owned()
}

#[test]
fn the_dashboard_shows_what_the_api_says() {
    let browser = chromium();
    let upstream = PeerEcho::start();
    let backend = TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let dir = TempDir::new();
    let cfg = dir.write(
        "ippool.toml",
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"

[rules.clients]
default = "allow"
deny = ["10.0.0.0/8", "192.0.2.0/24"]
allow = ["10.1.2.3"]

[pools.loop]
source = "127.0.50.0/29"
strategy = "round_robin"
max_uses = 0
keep_assigned = 6

[egress.main]
listen = "127.0.0.1:0"
pool = "loop"
allow = ["127.0.0.0/8"]

[ingress.web]
listen = "127.0.0.1:0"
rules = "clients"
[ingress.web.routes.all]
backends = ["{backend}"]
"#
        ),
    );
    let mut d = Daemon::start(&cfg, &[]);
    // Some traffic so the pool holds addresses.
    for _ in 0..6 {
        let r = http(
            d.egress("main"),
            "GET",
            &format!("http://{}/", upstream.addr),
            &[],
            "",
        );
        assert_eq!(r.status, 200);
    }
    // Requests to a backend that is down: counted, and failed.
    for _ in 0..3 {
        let r = http(d.ingress("web"), "GET", "/", &[("Host", "x.test")], "");
        assert_eq!(r.status, 502, "{r:?}");
    }
    let page = http(d.admin, "GET", "/", &[], "");
    assert_eq!(page.status, 200);
    assert!(!page.body.contains("https://"), "no asset from elsewhere");

    let shot = dir.0.join("dashboard.png");
    let out = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1280,900",
            "--virtual-time-budget=2500",
        ])
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("http://{}/", d.admin))
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let png = std::fs::read(&shot).expect("screenshot written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    // `IPPOOL_SCREENSHOT=docs/dashboard.png cargo test … dashboard` keeps
    // it (how the README's picture is made).
    if let Some(keep) = std::env::var_os("IPPOOL_SCREENSHOT") {
        std::fs::write(&keep, &png).expect("write IPPOOL_SCREENSHOT");
    }

    let out = Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=2500",
            "--dump-dom",
        ])
        .arg(format!("http://{}/", d.admin))
        .output()
        .expect("run chromium");
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        dom.contains("data-ready=\"1\""),
        "the page never loaded its data:\n{dom}"
    );

    let probe: serde_json::Value =
        serde_json::from_str(&http(d.admin, "GET", "/probe?pool=loop&recent=0", &[], "").body)
            .expect("JSON");
    let pool = &probe["pools"][0];
    for f in ["size", "available", "benched", "probation"] {
        assert_eq!(
            figure(&dom, "data-pool=\"loop\"", &format!("data-field=\"{f}\"")),
            pool[f].to_string(),
            "{f}"
        );
    }
    assert_eq!(pool["size"], 6);
    let leases: u64 = pool["addresses"]
        .as_array()
        .expect("addresses")
        .iter()
        .map(|a| a["leases"].as_u64().expect("an egress address has leases"))
        .sum();
    assert_eq!(
        figure(&dom, "data-pool=\"loop\"", "data-field=\"leased\""),
        leases.to_string(),
        "leased"
    );
    // Backend traffic, as /api/routes says.
    let routes: serde_json::Value =
        serde_json::from_str(&http(d.admin, "GET", "/api/routes", &[], "").body).expect("JSON");
    let all1 = &routes["routes"][0]["backends"][0];
    assert_eq!(all1["requests"], 3, "{routes}");
    for f in ["requests", "failures"] {
        assert_eq!(
            figure(
                &dom,
                "data-backend=\"all-1\"",
                &format!("data-field=\"{f}\"")
            ),
            all1[f].to_string(),
            "{f}"
        );
    }
    // Rule hits, as /metrics says: every accepted ingress connection was
    // checked against `clients` and let in.
    let m = http(d.admin, "GET", "/metrics", &[], "").body;
    let accepted = support::metric(
        &m,
        "ippool_guard_connections_total{set=\"clients\",result=\"accepted\"}",
    )
    .expect("accepts counted");
    assert!(accepted >= 3.0, "{accepted}");
    assert_eq!(
        figure(&dom, "data-set=\"clients\"", "data-field=\"accepted\""),
        format!("{accepted}")
    );
    assert_eq!(
        figure(&dom, "data-set=\"clients\"", "data-field=\"denied\""),
        "0"
    );
    assert_eq!(
        figure(&dom, "data-set=\"clients\"", "data-field=\"deny\""),
        "2"
    );
    assert_eq!(
        figure(&dom, "data-set=\"clients\"", "data-field=\"allow\""),
        "1"
    );
    assert_eq!(
        figure(&dom, "data-backend=\"all-1\"", "data-field=\"weight\""),
        "1"
    );
    assert!(dom.contains("no ban"), "the bans table says there is none");
    // The pool's state over time is plotted, its caption from the same data.
    assert!(
        dom.contains("data-pool-chart=\"loop\""),
        "no chart for the pool"
    );
    let caption = format!(
        "loop: {} available, {} probation, {} benched",
        pool["available"], pool["probation"], pool["benched"]
    );
    assert!(dom.contains(&caption), "want `{caption}`");
    assert!(d.terminate().success());
}
