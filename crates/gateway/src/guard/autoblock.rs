//! Automatic bans of misbehaving clients (fail2ban / CrowdSec style):
//! offenses are counted per client in a sliding window, and a client that
//! reaches the threshold gets an expiring deny entry in the live policy,
//! longer each time it comes back.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use iprules::{Policy, Rule, RuleSet, Shared};

use super::lru::Lru;
use super::space::client_key;

/// Something a client did that counts towards a ban.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Offense {
    /// Wrong or missing credentials (proxy auth, admin API).
    AuthFailed,
    /// A backend's registration failed authentication.
    RegistrationAuthFailed,
    /// A request that could not be parsed.
    Malformed,
    /// A request answered with a 4xx status that hints at probing.
    ClientError4xx,
    /// The client went over its rate limit.
    RateExceeded,
}

impl Offense {
    /// The offense's name in logs and metrics (`auth_failed`, …).
    pub fn name(self) -> &'static str {
        match self {
            Offense::AuthFailed => "auth_failed",
            Offense::RegistrationAuthFailed => "registration_auth_failed",
            Offense::Malformed => "malformed",
            Offense::ClientError4xx => "client_error_4xx",
            Offense::RateExceeded => "rate_exceeded",
        }
    }
}

impl fmt::Display for Offense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How [`AutoBlock`] counts and bans.
#[derive(Clone, Debug)]
pub struct AutoBlockOptions {
    /// Offenses within `window` that trigger a ban; the ban fires on the
    /// offense that reaches it. 0 is taken as 1. Default: 5.
    pub threshold: u32,
    /// The sliding window offenses are counted in: a ban fires when the
    /// `threshold`-th most recent offense is less than `window` old.
    /// Default: 10 minutes.
    pub window: Duration,
    /// The first ban's length. Default: 10 minutes.
    pub ban: Duration,
    /// Each repeat ban is this many times longer than the one before
    /// (`ban * ban_increment^n` for a client banned `n` times before).
    /// Values below 1 are taken as 1. Default: 2.
    pub ban_increment: f64,
    /// No ban is longer than this. Default: 1 day.
    pub max_ban: Duration,
    /// IPv6 clients are counted and banned per network of this prefix
    /// length. Default: 64.
    pub ipv6_prefix: u8,
    /// Addresses that are never counted (monitoring, the operator's own
    /// networks).
    pub ignore: RuleSet,
    /// A client's ban count is forgotten once its last ban has been over
    /// for this long. Default: 1 day.
    pub forget_after: Duration,
    /// Most clients with offenses (and, separately, with a ban history)
    /// remembered; the least recently seen is forgotten first. Active bans
    /// are capped at this number too (the one ending soonest goes).
    /// Default: 100,000.
    pub max_tracked: usize,
}

impl Default for AutoBlockOptions {
    fn default() -> AutoBlockOptions {
        AutoBlockOptions {
            threshold: 5,
            window: Duration::from_secs(600),
            ban: Duration::from_secs(600),
            ban_increment: 2.0,
            max_ban: Duration::from_secs(86_400),
            ipv6_prefix: 64,
            ignore: RuleSet::new(),
            forget_after: Duration::from_secs(86_400),
            max_tracked: 100_000,
        }
    }
}

/// One active ban.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ban {
    /// The client key banned (an IPv4 address or an IPv6 network); the
    /// deny entry added to the policy.
    pub rule: Rule,
    /// When the ban ends (the deny entry stops matching at this instant).
    pub until: Instant,
    /// Its length.
    pub duration: Duration,
    /// How many times this client has been banned, this ban included.
    pub times: u32,
    /// The offense that triggered it (`None` for a ban restored by
    /// [`AutoBlock::import`]).
    pub offense: Option<Offense>,
}

/// What [`AutoBlock::count`] made of an offense.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// It reached the threshold: the client is banned.
    Banned(Ban),
    /// Counted against this client key, below the threshold.
    Counted(Rule),
    /// Not counted: the address is ignored, or its client is banned.
    NotCounted,
}

/// An active ban as plain data, to keep across a restart
/// ([`AutoBlock::export`] / [`AutoBlock::import`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BanRecord {
    /// The client key banned.
    pub rule: Rule,
    /// When the ban ends, in wall-clock time.
    pub until: SystemTime,
    /// How many times this client has been banned.
    pub times: u32,
}

#[derive(Clone, Copy)]
struct History {
    times: u32,
    last_until: Instant,
}

struct State {
    /// Recent offense times per client (at most `threshold` of them).
    offenders: Lru<Rule, VecDeque<Instant>>,
    history: Lru<Rule, History>,
    active: HashMap<Rule, Ban>,
    by_end: BTreeSet<(Instant, Rule)>,
}

/// Counts offenses per client and bans repeat offenders in a live policy.
///
/// Clients are keyed by [`client_key`] (an IPv6 client is its /64 by
/// default). When a client's offenses reach [`AutoBlockOptions::threshold`]
/// within the window, [`record`](AutoBlock::record) adds its key to the
/// policy's deny set with an expiry (through [`Shared::update`], so every
/// listener sees it on its next accept) and returns the [`Ban`]. An entry
/// the operator put in the deny set without an expiry is never replaced by
/// a ban, and an allow entry still wins over a ban.
///
/// Every method takes the current time, so tests (and replays) control the
/// clock. Memory is bounded by [`AutoBlockOptions::max_tracked`].
///
/// ```
/// use std::sync::Arc;
/// use std::time::{Duration, Instant};
/// use gateway::guard::{AutoBlock, AutoBlockOptions, Offense};
/// let policy = Arc::new(iprules::Shared::new(iprules::Policy::default()));
/// let ab = AutoBlock::new(policy.clone(), AutoBlockOptions { threshold: 3, ..Default::default() });
/// let ip = "2001:db8:1:2::7".parse()?;
/// let t = Instant::now();
/// assert!(ab.record(ip, Offense::AuthFailed, t).is_none());
/// assert!(ab.record(ip, Offense::AuthFailed, t).is_none());
/// let ban = ab.record("2001:db8:1:2::8".parse()?, Offense::AuthFailed, t).unwrap();
/// assert_eq!(ban.rule.to_string(), "2001:db8:1:2::/64");
/// assert_eq!(ban.duration, Duration::from_secs(600));
/// assert!(!policy.read(|p| p.decide_at(ip, t).is_allowed()));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct AutoBlock {
    policy: Arc<Shared<Policy>>,
    opts: AutoBlockOptions,
    state: Mutex<State>,
}

impl fmt::Debug for AutoBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.lock();
        f.debug_struct("AutoBlock")
            .field("opts", &self.opts)
            .field("offenders", &st.offenders.len())
            .field("active_bans", &st.active.len())
            .finish_non_exhaustive()
    }
}

impl AutoBlock {
    /// Bans into `policy`'s deny set.
    pub fn new(policy: Arc<Shared<Policy>>, opts: AutoBlockOptions) -> AutoBlock {
        let cap = opts.max_tracked.max(1);
        AutoBlock {
            policy,
            state: Mutex::new(State {
                offenders: Lru::new(cap),
                history: Lru::new(cap),
                active: HashMap::new(),
                by_end: BTreeSet::new(),
            }),
            opts,
        }
    }

    /// The options.
    pub fn options(&self) -> &AutoBlockOptions {
        &self.opts
    }

    /// The policy bans go into.
    pub fn policy(&self) -> &Arc<Shared<Policy>> {
        &self.policy
    }

    /// The client key of `ip` (see [`client_key`]).
    pub fn key(&self, ip: IpAddr) -> Rule {
        client_key(ip, self.opts.ipv6_prefix)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one offense by `ip` at `now`. Returns the ban when this
    /// offense reaches the threshold. Offenses of an ignored address, or of
    /// a client already banned, are not counted.
    pub fn record(&self, ip: IpAddr, offense: Offense, now: Instant) -> Option<Ban> {
        match self.count(ip, offense, now) {
            Recorded::Banned(ban) => Some(ban),
            Recorded::Counted(_) | Recorded::NotCounted => None,
        }
    }

    /// [`record`](AutoBlock::record), telling apart an offense counted
    /// without a ban (to pass on to a count shared by several instances,
    /// which may then call [`ban`](AutoBlock::ban)) from one not counted.
    pub fn count(&self, ip: IpAddr, offense: Offense, now: Instant) -> Recorded {
        if self.opts.ignore.check_at(ip, now).is_some() {
            return Recorded::NotCounted;
        }
        let key = self.key(ip);
        let threshold = usize::try_from(self.opts.threshold.max(1)).unwrap_or(usize::MAX);
        let mut st = self.lock();
        expire(&mut st, now);
        if st.active.contains_key(&key) {
            return Recorded::NotCounted;
        }
        let reached = {
            let times = match st.offenders.get_mut(&key) {
                Some(times) => times,
                None => {
                    st.offenders.insert(key, VecDeque::new());
                    match st.offenders.get_mut(&key) {
                        Some(times) => times,
                        None => return Recorded::NotCounted,
                    }
                }
            };
            times.push_back(now);
            while times.len() > threshold
                || times
                    .front()
                    .is_some_and(|t| now.saturating_duration_since(*t) >= self.opts.window)
            {
                times.pop_front();
            }
            times.len() >= threshold
        };
        if !reached {
            return Recorded::Counted(key);
        }
        Recorded::Banned(self.impose(&mut st, key, offense, now))
    }

    /// Bans client `key` (a [`key`](AutoBlock::key)) now, as if its
    /// offenses here had reached the threshold: for a count kept across
    /// several instances (a fleet) that reached it. The length follows the
    /// client's ban history as for any ban. `None` if it is banned already.
    /// The `ignore` list is not consulted: the offenses counted were
    /// checked against it where they happened.
    pub fn ban(&self, key: Rule, offense: Offense, now: Instant) -> Option<Ban> {
        let mut st = self.lock();
        expire(&mut st, now);
        if st.active.contains_key(&key) {
            return None;
        }
        Some(self.impose(&mut st, key, offense, now))
    }

    /// Bans `key` for the length its history calls for.
    fn impose(&self, st: &mut State, key: Rule, offense: Offense, now: Instant) -> Ban {
        st.offenders.remove(&key);
        let before = match st.history.peek(&key) {
            Some(h) if now.saturating_duration_since(h.last_until) < self.opts.forget_after => {
                h.times
            }
            _ => 0,
        };
        let duration = self.ban_length(before);
        let ban = Ban {
            rule: key,
            until: now + duration,
            duration,
            times: before.saturating_add(1),
            offense: Some(offense),
        };
        self.install(st, ban, now);
        tracing::info!(rule = %key, ?duration, times = ban.times, %offense, "client banned");
        ban
    }

    /// `ban * increment^n`, capped at `max_ban`.
    fn ban_length(&self, n: u32) -> Duration {
        let inc = if self.opts.ban_increment.is_finite() {
            self.opts.ban_increment.max(1.0)
        } else {
            1.0
        };
        let max = self.opts.max_ban.as_secs_f64();
        let secs = self.opts.ban.as_secs_f64() * inc.powi(i32::try_from(n).unwrap_or(i32::MAX));
        if secs.is_finite() && secs < max {
            Duration::from_secs_f64(secs)
        } else {
            self.opts.max_ban
        }
    }

    /// Puts `ban` in the policy and the tables.
    fn install(&self, st: &mut State, ban: Ban, now: Instant) {
        let cap = self.opts.max_tracked.max(1);
        while st.active.len() >= cap {
            let Some(&(until, rule)) = st.by_end.iter().next() else {
                break;
            };
            st.by_end.remove(&(until, rule));
            st.active.remove(&rule);
            self.policy.update(|p| remove_ban(p, &rule, now));
        }
        st.history.insert(
            ban.rule,
            History {
                times: ban.times,
                last_until: ban.until,
            },
        );
        st.active.insert(ban.rule, ban);
        st.by_end.insert((ban.until, ban.rule));
        self.policy.update(|p| match p.deny.get(&ban.rule) {
            // The operator's own permanent entry stays as it is.
            Some(None) => false,
            Some(Some(t)) if t >= ban.until => false,
            _ => p.deny.add_until_at(ban.rule, Some(ban.until), now),
        });
    }

    /// The active bans at `now`, soonest to end first.
    pub fn bans(&self, now: Instant) -> Vec<Ban> {
        let mut st = self.lock();
        expire(&mut st, now);
        st.by_end
            .iter()
            .filter_map(|(_, rule)| st.active.get(rule).copied())
            .collect()
    }

    /// Lifts the ban on `key` (a [`Ban::rule`], or
    /// [`key`](AutoBlock::key) of an address) and forgets its pending
    /// offenses. Its ban count is kept, so a repeat offender still gets a
    /// longer ban next time. Returns whether a ban was active.
    pub fn lift(&self, key: &Rule, now: Instant) -> bool {
        let mut st = self.lock();
        expire(&mut st, now);
        st.offenders.remove(key);
        let Some(ban) = st.active.remove(key) else {
            return false;
        };
        st.by_end.remove(&(ban.until, ban.rule));
        self.policy.update(|p| remove_ban(p, key, now));
        true
    }

    /// Clients with pending offenses (not banned yet).
    pub fn tracked(&self) -> usize {
        self.lock().offenders.len()
    }

    /// The active bans as plain data, with `wall` the wall-clock time that
    /// corresponds to `now`.
    pub fn export(&self, now: Instant, wall: SystemTime) -> Vec<BanRecord> {
        self.bans(now)
            .into_iter()
            .map(|b| BanRecord {
                rule: b.rule,
                until: wall + b.until.saturating_duration_since(now),
                times: b.times,
            })
            .collect()
    }

    /// Restores bans saved by [`export`](AutoBlock::export) (`wall` is the
    /// wall-clock time that corresponds to `now`); records already over are
    /// skipped. Returns how many bans were restored.
    pub fn import(&self, records: &[BanRecord], now: Instant, wall: SystemTime) -> usize {
        let mut st = self.lock();
        expire(&mut st, now);
        let mut restored = 0;
        for rec in records {
            let Ok(left) = rec.until.duration_since(wall) else {
                continue;
            };
            if left.is_zero() {
                continue;
            }
            if let Some(old) = st.active.remove(&rec.rule) {
                st.by_end.remove(&(old.until, old.rule));
            }
            let ban = Ban {
                rule: rec.rule,
                until: now + left,
                duration: left,
                times: rec.times.max(1),
                offense: None,
            };
            self.install(&mut st, ban, now);
            restored += 1;
        }
        restored
    }
}

/// Drops the ended bans from the tables (their policy entries have already
/// stopped matching on their own).
fn expire(st: &mut State, now: Instant) {
    while let Some(&(until, rule)) = st.by_end.iter().next() {
        if until > now {
            break;
        }
        st.by_end.remove(&(until, rule));
        st.active.remove(&rule);
    }
}

/// Removes a ban's entry from the deny set, unless it is permanent (the
/// operator's, not ours).
fn remove_ban(p: &mut Policy, rule: &Rule, now: Instant) -> bool {
    match p.deny.get(rule) {
        Some(Some(_)) => p.deny.remove_at(rule, now),
        _ => false,
    }
}
