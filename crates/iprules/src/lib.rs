//! IP rule sets: single addresses, inclusive ranges and CIDR subnets, IPv4
//! and IPv6, with IPv4-mapped IPv6 addresses matching IPv4 rules (and the
//! reverse).
//!
//! - [`Rule`]: one rule, parsed from and printed as `10.0.0.1`,
//!   `10.0.0.0/8`, `10.0.0.1-10.0.0.10`, `2001:db8::/32`, `::ffff:1.2.3.4`.
//! - [`RuleSet`]: add, remove, clear, and [`check`](RuleSet::check) an
//!   address in tens of nanoseconds whatever the number of rules; entries
//!   may expire.
//! - [`Policy`]: an allow set, a deny set and a default; allow wins.
//! - [`Shared`]: lock-free reads of a value that a writer replaces.
//! - [`parse_rules`]: a rule list, one per line, with line-numbered errors.
//!
//! The crate does no I/O and needs no async runtime.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use iprules::{Policy, Rule, Shared, Verdict};
//!
//! let mut policy = Policy::new(Verdict::Allow);
//! policy.deny.extend(iprules::parse_rules("
//!     10.0.0.0/8            # private
//!     192.0.2.10-192.0.2.20 # a range need not be a CIDR block
//!     2001:db8::/32
//! ")?);
//! policy.allow.add("10.1.2.3".parse()?);
//!
//! // A ban that lifts itself in ten minutes.
//! let ban: Rule = "198.51.100.7".parse()?;
//! policy.deny.add_until(ban, Instant::now() + Duration::from_secs(600));
//!
//! let live = Shared::new(policy);
//! let peer = "::ffff:10.9.9.9".parse()?;
//! assert!(!live.read(|p| p.allows(peer)));
//! assert!(live.read(|p| p.allows("10.1.2.3".parse().unwrap())));
//! assert!(!live.read(|p| p.allows("198.51.100.7".parse().unwrap())));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod policy;
mod rule;
mod set;
mod shared;
mod space;

pub use policy::{Decision, Policy, Reason, Verdict};
pub use rule::{LineError, Rule, RuleError, RuleKind, parse_rules};
pub use set::RuleSet;
pub use shared::Shared;
