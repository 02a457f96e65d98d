//! The API contract: `/openapi.json` lists exactly the routes of the admin
//! module's route table, and every operation it lists is served by the real
//! router (with each documented status reachable for its 401/404 cases).

mod support;

use std::collections::BTreeSet;

use support::{Daemon, TempDir, http};

const TOKEN: &str = "openapi-admin-token-0123456789";

/// (method, path) rows of the route table in `src/admin.rs`'s docs.
fn documented_routes() -> BTreeSet<(String, String)> {
    let src = include_str!("../src/admin.rs");
    src.lines()
        .filter_map(|l| l.strip_prefix("//! | `"))
        .filter_map(|l| l.split('`').next())
        .filter_map(|route| {
            let (method, path) = route.split_once(' ')?;
            // `/probe[?pool=NAME]…` and `…?rule=RULE`: the path alone.
            let path = path.split(['[', '?']).next()?;
            Some((method.to_owned(), path.to_owned()))
        })
        .collect()
}

fn fill(path: &str) -> String {
    path.replace("{set}", "clients")
        .replace("{list}", "deny")
        .replace("{pool}", "nope")
        .replace("{ip}", "192.0.2.1")
        .replace("{id}", "nobody")
}

#[test]
fn openapi_matches_the_route_table_and_the_router() {
    let dir = TempDir::new();
    let cfg = dir.write(
        "ippool.toml",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"IPPOOL_TEST_TOKEN\"\n\
         [rules.clients]\ndefault = \"allow\"\n",
    );
    let mut d = Daemon::start(&cfg, &[("IPPOOL_TEST_TOKEN", TOKEN)]);
    let r = http(d.admin, "GET", "/openapi.json", &[], "");
    assert_eq!(r.status, 200);
    let doc: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    assert_eq!(doc["openapi"], "3.1.0");

    let mut in_doc = BTreeSet::new();
    for (path, ops) in doc["paths"].as_object().expect("paths") {
        for (method, op) in ops.as_object().expect("operations") {
            in_doc.insert((method.to_uppercase(), path.clone()));
            assert!(
                op["responses"]["200"].is_object(),
                "{method} {path}: no 200"
            );
        }
    }
    assert_eq!(
        in_doc,
        documented_routes(),
        "openapi.json vs the route table"
    );

    let bearer = format!("Bearer {TOKEN}");
    for (method, path) in &in_doc {
        let op = &doc["paths"][path][method.to_lowercase()];
        let url = fill(path);
        if path == "/api/events" {
            // A stream that does not end: only its head is read.
            use std::io::{BufRead, BufReader, Write};
            let mut s = std::net::TcpStream::connect(d.admin).expect("connect");
            s.write_all(b"GET /api/events HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("send");
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).expect("status");
            assert!(line.starts_with("HTTP/1.1 200"), "{line}");
            continue;
        }
        // Without the token: a mutation is refused (401), a read is served
        // from loopback; neither falls through to "no such route".
        let r = http(d.admin, method, &url, &[], "{}");
        assert!(!r.body.contains("no such route"), "{method} {url}: {r:?}");
        if op["security"].is_array() {
            assert_eq!(r.status, 401, "{method} {url} documents auth: {r:?}");
            assert!(op["responses"]["401"].is_object(), "{method} {path}");
        } else {
            // Every status a read answers with is documented.
            assert!(
                op["responses"][r.status.to_string()].is_object(),
                "{method} {url} answered {} which is not documented",
                r.status
            );
        }
        if op["security"].is_array() && !path.contains("{set}/{list}") {
            // With the token: whatever it answers is documented (unknown
            // pools and sets 404, bad bodies 400, a reload 200).
            let r = http(d.admin, method, &url, &[("Authorization", &bearer)], "{}");
            assert_ne!(r.status, 401, "{method} {url} with token: {r:?}");
            assert!(
                op["responses"][r.status.to_string()].is_object(),
                "{method} {url} answered {} which is not documented: {r:?}",
                r.status
            );
        }
    }
    // And a route that is not documented does not exist.
    assert_eq!(http(d.admin, "GET", "/api/nothing", &[], "").status, 404);
    assert!(d.terminate().success());
}
