//! nginx access logs as pool-address health signals.
//!
//! Three parts, usable on their own:
//!
//! * [`LogFormat`]: compiles an nginx `log_format` string (`combined` and
//!   `main` are built in) into a single-pass, backtracking-free matcher that
//!   yields a borrowed [`Record`]: string slices into the line, typed
//!   accessors on demand ([`Record::status`], [`Record::time`],
//!   [`Record::attempts`] over `$upstream_addr` lists, …), nothing allocated.
//!   [`Record::outcomes`] attributes a request to pool addresses according to
//!   an [`AddressSource`]; [`Summary`] and [`scan_file`] total a whole log
//!   per address; [`Malformed`] counts and samples lines that do not parse.
//! * [`Tailer`]: follows a log file by polling, across rename + create and
//!   copytruncate rotations, starting in [`Mode::Parse`] or [`Mode::Serve`],
//!   and resumes after a restart from a persisted [`Offset`].
//! * [`NginxConfig`]: reads `upstream` blocks, `server { listen …;
//!   proxy_bind …; }` blocks (→ [`NginxConfig::port_map`]) and `log_format`
//!   directives from nginx configuration.
//!
//! The parser knows nothing of files or sockets; the tailer is synchronous
//! (run it in `spawn_blocking` from async code).
//!
//! # Example
//!
//! ```
//! use accesslog::{AddressSource, LogFormat, Malformed, Mode, Tailer};
//! use std::time::Duration;
//!
//! let format = LogFormat::new(&format!(
//!     "{} $upstream_addr $upstream_status $request_time $upstream_response_time",
//!     LogFormat::COMBINED
//! ))?;
//!
//! // nginx writes a log…
//! let dir = std::env::temp_dir().join(format!("accesslog-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("access.log");
//! std::fs::write(
//!     &path,
//!     concat!(
//!         r#"192.0.2.7 - - [10/Oct/2000:13:55:36 -0700] "GET /a HTTP/1.1" 200 12 "-" "curl \x22x\x22" "#,
//!         "10.0.0.1:80, 10.0.0.2:80 502, 200 0.010 0.004, 0.006\n",
//!         "not a log line\n",
//!     ),
//! )?;
//!
//! // …which we follow from its start.
//! let mut tailer = Tailer::open(&path, Mode::Parse, None)?;
//! let mut malformed = Malformed::default();
//! let mut seen = Vec::new();
//! tailer.poll_with(|line| match format.parse(line) {
//!     Ok(record) => {
//!         assert_eq!(record.status(), Ok(Some(200)));
//!         assert_eq!(record.decoded("http_user_agent").as_deref(), Some(r#"curl "x""#));
//!         assert_eq!(record.request_time(), Ok(Some(Duration::from_millis(10))));
//!         assert_eq!(record.last_upstream_addr(), Some("10.0.0.2:80".parse().unwrap()));
//!         for outcome in record.outcomes(&AddressSource::UpstreamAddr).unwrap() {
//!             seen.push((outcome.addr.to_string(), outcome.status));
//!         }
//!     }
//!     Err(error) => {
//!         malformed.record(line, error);
//!     }
//! })?;
//! assert_eq!(
//!     seen,
//!     [("10.0.0.1".to_string(), Some(502)), ("10.0.0.2".to_string(), Some(200))]
//! );
//! assert_eq!(malformed.count(), 1);
//! // Persist this; `Tailer::open(&path, Mode::Serve, Some(offset))` resumes here.
//! let offset = tailer.offset().unwrap();
//! assert_eq!(offset.pos, std::fs::metadata(&path)?.len());
//! std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

mod conf;
mod escape;
mod format;
mod record;
mod scan;
mod tail;
mod time;

pub use conf::{
    ConfigError, Listen, LocationBlock, LogFormatDecl, NginxConfig, ServerBlock, Upstream,
    UpstreamServer,
};
pub use format::{Escape, FormatError, LogFormat, ParseError};
pub use record::{Attempt, Attempts, Record, Values};
pub use scan::{
    AddressSource, AddressStats, Malformed, MalformedSample, Outcome, Summary, scan_file,
    scan_reader,
};
pub use tail::{Mode, Offset, OffsetParseError, TailStats, Tailer};
pub use time::Timestamp;
