//! nginx configuration reader.

use std::net::IpAddr;
use std::time::Duration;

use accesslog::{ConfigError, Escape, LogFormat, NginxConfig};

const CONF: &str = r#"
# The pool, as the ipmanager seed deploys it.
include /etc/nginx/modules-enabled/*.conf;
http {
    log_format pool escape=json '$remote_addr [$time_local] '
                                "\"$request\" $status $server_port";
    proxy_bind 10.9.9.9;

    upstream egress {
        zone egress 64k;
        server 10.0.0.1:8080 weight=5 max_fails=3 fail_timeout=1m30s;
        server 10.0.0.2 backup;
        server [2001:db8::1]:81 down max_conns=10 resolve;
        server backend.example:9000;   # host name
        server unix:/run/app.sock;
        keepalive 16;
    }

    server {
        listen 127.0.0.1:9001 default_server;
        listen 9011;
        server_name a.example "b.example";
        proxy_bind 10.0.0.1;
        location / { proxy_pass http://egress; }
    }
    server {
        listen 9002;
        location / {
            proxy_bind 10.0.0.2;
            location /api { proxy_pass http://127.0.0.1:1; }
        }
        location /other { proxy_bind 10.0.0.2; }
    }
    server {
        listen [::1]:9003;
        location / { proxy_pass http://egress; }   # inherits 10.9.9.9
    }
    server {
        listen unix:/run/nginx.sock;
        listen 9004;
        proxy_bind $binding;
        location / { proxy_bind off; }
    }
    map $x $binding { default 10.0.0.5; server 1; }
}
stream {
    server { listen 7000; proxy_bind 10.0.1.1; proxy_pass egress; }
}
"#;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn reads_upstreams() {
    let c = NginxConfig::parse(CONF).unwrap();
    assert_eq!(c.includes, ["/etc/nginx/modules-enabled/*.conf"]);
    assert_eq!(c.upstreams.len(), 1);
    let u = &c.upstreams[0];
    assert_eq!((u.name.as_str(), u.line), ("egress", 9));
    assert_eq!(u.servers.len(), 5);
    let s = &u.servers[0];
    assert_eq!(s.socket_addr, Some("10.0.0.1:8080".parse().unwrap()));
    assert_eq!((s.weight, s.max_fails, s.line), (5, 3, 11));
    assert_eq!(s.fail_timeout, Duration::from_secs(90));
    let s = &u.servers[1];
    assert_eq!(s.socket_addr, Some("10.0.0.2:80".parse().unwrap()));
    assert!(s.backup && !s.down);
    assert_eq!((s.weight, s.max_fails), (1, 1));
    assert_eq!(s.fail_timeout, Duration::from_secs(10));
    let s = &u.servers[2];
    assert_eq!(s.socket_addr, Some("[2001:db8::1]:81".parse().unwrap()));
    assert!(s.down);
    assert_eq!(s.max_conns, 10);
    assert_eq!(s.other, ["resolve"]);
    assert_eq!(u.servers[3].address, "backend.example:9000");
    assert_eq!(u.servers[3].socket_addr, None);
    assert_eq!(u.servers[4].address, "unix:/run/app.sock");
}

#[test]
fn reads_servers_and_port_map() {
    let c = NginxConfig::parse(CONF).unwrap();
    assert_eq!(c.servers.len(), 5);
    let s = &c.servers[0];
    assert_eq!(s.line, 19);
    assert_eq!(s.server_names, ["a.example", "b.example"]);
    assert_eq!(s.listen[0].ip, Some(ip("127.0.0.1")));
    assert_eq!(s.listen[0].port, Some(9001));
    assert_eq!(s.listen[0].params, ["default_server"]);
    assert_eq!(s.listen[1].port, Some(9011));
    assert_eq!(s.locations[0].proxy_pass.as_deref(), Some("http://egress"));
    let s = &c.servers[1];
    assert_eq!(s.proxy_bind.as_deref(), Some("10.9.9.9"));
    let paths: Vec<_> = s.locations.iter().map(|l| l.path.as_str()).collect();
    assert_eq!(paths, ["/", "/api", "/other"]);
    assert_eq!(s.locations[1].proxy_bind.as_deref(), Some("10.0.0.2"));
    assert_eq!(c.servers[4].proxy_pass.as_deref(), Some("egress"));

    let map = c.port_map().unwrap();
    let expected = [
        (9001, "10.0.0.1"),
        (9011, "10.0.0.1"),
        // Every location binds 10.0.0.2 (own or inherited from `/`).
        (9002, "10.0.0.2"),
        (9003, "10.9.9.9"),
        (7000, "10.0.1.1"),
    ];
    assert_eq!(map.len(), expected.len(), "{map:?}");
    for (port, addr) in expected {
        assert_eq!(map.get(&port), Some(&ip(addr)), "port {port}");
    }
}

#[test]
fn location_binds_without_server_bind() {
    let c = NginxConfig::parse(
        "server { listen 1; location / { proxy_bind 10.0.0.7; } location /x { proxy_bind 10.0.0.7; } }
         server { listen 2; location / { proxy_bind 10.0.0.7; } location /x { proxy_bind 10.0.0.8; } }
         server { listen 3; location / { } }",
    )
    .unwrap();
    let map = c.port_map().unwrap();
    assert_eq!(map.len(), 1);
    assert_eq!(map[&1], ip("10.0.0.7"));
}

#[test]
fn log_formats_compile() {
    let c = NginxConfig::parse(CONF).unwrap();
    let d = c.log_format("pool").unwrap();
    assert_eq!(d.line, 5);
    assert_eq!(d.escape, Escape::Json);
    assert_eq!(
        d.format,
        "$remote_addr [$time_local] \"$request\" $status $server_port"
    );
    let f = LogFormat::with_escape(&d.format, d.escape).unwrap();
    let r = f
        .parse(r#"1.2.3.4 [10/Oct/2000:13:55:36 -0700] "GET / HTTP/1.1" 200 9001"#)
        .unwrap();
    assert_eq!(r.server_port(), Ok(Some(9001)));
}

#[test]
fn port_conflicts_are_errors() {
    let e = NginxConfig::parse(
        "server { listen 80; proxy_bind 10.0.0.1; }\nserver { listen 80; proxy_bind 10.0.0.2; }",
    )
    .unwrap()
    .port_map()
    .unwrap_err();
    assert!(
        matches!(
            e,
            ConfigError::PortConflict {
                port: 80,
                first_line: 1,
                line: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn syntax_errors_name_the_line() {
    let cases = [
        (
            "http {\n server {\n listen 80;\n }\n",
            "line 1: a block is not closed",
        ),
        ("a;\n}\n", "line 2: unexpected `}`"),
        ("a;\n\n;", "line 3: unexpected `;`"),
        ("a b\n", "line 1: a directive (missing `;`)"),
        ("x {\n a b }", "line 2: unexpected `}` (missing `;`)"),
        (
            "log_format x '$a\n\n",
            "line 1: a quoted string is not closed",
        ),
        ("a 'b'c;", "line 1: unexpected 'c' after a quoted string"),
        (
            "upstream u {\n server 1.2.3.4 weight=x;\n}",
            "line 2: `server`: invalid \"weight=x\"",
        ),
        (
            "upstream u {\n server;\n}",
            "line 2: `server` needs an argument",
        ),
        (
            "log_format x escape=xml '$a';",
            "line 1: `log_format`: invalid \"escape=xml\"",
        ),
    ];
    for (text, want) in cases {
        let e = NginxConfig::parse(text).unwrap_err().to_string();
        assert!(e.starts_with(want), "{text:?}: got {e:?}, want {want:?}");
    }
}

#[test]
fn missing_file_names_the_path() {
    let e = NginxConfig::from_file("/nonexistent/nginx.conf").unwrap_err();
    assert!(
        e.to_string().starts_with("/nonexistent/nginx.conf: "),
        "{e}"
    );
}
