//! `RuleSet`: rules in insertion order, a segment index for lookups, and a
//! small overlay of recent additions.
//!
//! Layout. The bulk of the rules lives in an immutable-by-default `Store`
//! behind an `Arc`: compact 12-byte entries in insertion order, and an index
//! that cuts the address space into elementary segments (sorted boundary
//! points, binary-searched; for IPv4 a 65,537-entry table on the top 16 bits
//! narrows the search to a few segments). Each segment names the rule that
//! decides it, or a short list when expiring rules overlap (the list runs in
//! insertion order and stops at the first rule that never expires, since
//! nothing after it can ever be the first match).
//!
//! Single additions go to `recent`, a short list scanned after the indexes.
//! When it grows past `RECENT_MAX` it becomes a new, small indexed level; a
//! level is merged with the one before it once it reaches a quarter of that
//! one's size (the logarithmic method of Bentley and Saxe). So the set is a
//! few levels, oldest and largest first, each an immutable index; an add
//! costs amortised O(log n) rebuild work instead of a full rebuild, and a
//! lookup visits each level (most sets have one). Removals leave a
//! tombstone (the level is rebuilt when tombstones pile up, or at once when
//! the removed rule cut a list short). Expired entries stop matching when
//! the clock passes them and are purged by the next write.
//!
//! Cloning a `RuleSet` copies two `Arc`s: that is what makes snapshots for
//! lock-free readers cheap. A write after a clone copies what it touches.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use crate::rule::Rule;
use crate::space::{self, MAPPED_HI, MAPPED_LO};

/// Additions kept outside the index before it is rebuilt.
const RECENT_MAX: usize = 32;
/// A level is merged into the one before it once it holds at least
/// 1/`MERGE_RATIO` of that one's live entries.
const MERGE_RATIO: usize = 4;
/// Segment count above which the IPv4 top-16-bit table is worth its 256 KiB.
const TOP_TABLE_MIN: usize = 4096;

const NONE: u32 = u32::MAX;
const MULTI: u32 = 1 << 31;

// Entry tag bits.
const KIND_MASK: u8 = 0b11;
/// Written as IPv6 and not inside the mapped block: bounds in `wide[a]`.
const WIDE: u8 = 1 << 2;
/// Written as IPv4-mapped IPv6; `a`/`b` hold the IPv4 bounds.
const MAPPED: u8 = 1 << 3;
const DEAD: u8 = 1 << 4;
const EXPIRES: u8 = 1 << 5;
/// This permanent rule cut some segment's list short: removing it needs a
/// rebuild so that the rules it hid become visible.
const TRUNCATES: u8 = 1 << 6;

#[derive(Clone, Copy, Debug)]
struct Entry {
    tag: u8,
    prefix: u8,
    a: u32,
    b: u32,
}

/// An addition not yet in the index.
#[derive(Clone, Copy, Debug)]
struct Recent {
    rule: Rule,
    lo: u128,
    hi: u128,
    expires: Option<Instant>,
}

#[derive(Clone, Debug, Default)]
struct Index {
    /// IPv4 segments as `(start, value)`: the value sits in the cache line
    /// the search already touched.
    v4: Vec<(u32, u32)>,
    v4_top: Vec<u32>,
    v6_starts: Vec<u128>,
    v6_vals: Vec<u32>,
    /// Flattened cover lists: `[len, slot, slot, ...]`.
    lists: Vec<u32>,
}

#[derive(Clone, Debug, Default)]
struct Store {
    entries: Vec<Entry>,
    /// Bounds of IPv6 rules outside the mapped block.
    wide: Vec<[u128; 2]>,
    /// `(slot, deadline)` of expiring entries, sorted by slot.
    deadlines: Vec<(u32, Instant)>,
    index: Index,
    /// Slots sorted by rule, for exact lookups (dedup and remove).
    by_rule: Vec<u32>,
    dead: usize,
    /// No live entry expires before this.
    next_expiry: Option<Instant>,
}

/// A set of IP rules with sub-linear lookups.
///
/// - [`check`](RuleSet::check) returns the first rule, in insertion order,
///   that matches an address; it never scans the rules.
/// - Adding a rule that is already present is a no-op; adding it again with a
///   different expiry replaces the old entry (the new one goes last).
/// - Entries added with [`add_until`](RuleSet::add_until) stop matching the
///   moment their deadline passes; the next write purges them.
/// - Cloning is two reference-count increments: readers can hold a snapshot
///   while a writer changes its own copy (see [`Shared`](crate::Shared)).
/// - Loading many rules at once through [`Extend`] or [`FromIterator`]
///   builds the index once; single adds are amortised O(log n).
///
/// ```
/// use iprules::{Rule, RuleSet};
/// let mut set = RuleSet::new();
/// set.add("10.0.0.0/8".parse()?);
/// set.add("2001:db8::/32".parse()?);
/// assert_eq!(set.check("10.1.2.3".parse()?), Some("10.0.0.0/8".parse()?));
/// assert_eq!(set.check("::ffff:10.1.2.3".parse()?), Some("10.0.0.0/8".parse()?));
/// assert_eq!(set.check("192.0.2.1".parse()?), None);
/// assert!(set.remove(&"10.0.0.0/8".parse()?));
/// assert_eq!(set.len(), 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct RuleSet {
    /// Indexed levels, oldest (and largest) first.
    levels: Arc<Vec<Arc<Store>>>,
    recent: Arc<Vec<Recent>>,
}

enum Place {
    Indexed(usize, u32),
    Recent(usize),
}

impl RuleSet {
    /// An empty set.
    pub fn new() -> RuleSet {
        RuleSet::default()
    }

    /// The first rule (in insertion order) matching `addr`, skipping expired
    /// entries. Reads the clock only if a candidate entry has an expiry.
    #[inline]
    pub fn check(&self, addr: IpAddr) -> Option<Rule> {
        let mut now = None;
        self.find(space::key(addr), &mut || {
            *now.get_or_insert_with(Instant::now)
        })
    }

    /// Like [`check`](RuleSet::check), with the current time given.
    #[inline]
    pub fn check_at(&self, addr: IpAddr, now: Instant) -> Option<Rule> {
        self.find(space::key(addr), &mut || now)
    }

    /// Whether any live rule matches `addr`.
    #[inline]
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.check(addr).is_some()
    }

    /// Adds a rule that never expires. Returns whether the set changed.
    pub fn add(&mut self, rule: Rule) -> bool {
        self.insert(rule, None, Instant::now())
    }

    /// Adds a rule that stops matching at `expires`. Returns whether the set
    /// changed. A deadline already past adds nothing (and drops an existing
    /// entry for the same rule, which it replaces).
    pub fn add_until(&mut self, rule: Rule, expires: Instant) -> bool {
        self.insert(rule, Some(expires), Instant::now())
    }

    /// [`add`](RuleSet::add) or [`add_until`](RuleSet::add_until) with the
    /// current time given, for callers with their own clock.
    pub fn add_until_at(&mut self, rule: Rule, expires: Option<Instant>, now: Instant) -> bool {
        self.insert(rule, expires, now)
    }

    /// Removes one rule (compared as written: `10.0.0.1` and
    /// `::ffff:10.0.0.1` are different rules). Returns whether it was there.
    pub fn remove(&mut self, rule: &Rule) -> bool {
        self.remove_at(rule, Instant::now())
    }

    /// [`remove`](RuleSet::remove) with the current time given.
    pub fn remove_at(&mut self, rule: &Rule, now: Instant) -> bool {
        self.purge_at(now);
        match self.locate(rule) {
            Some(place) => {
                self.drop_place(place);
                true
            }
            None => false,
        }
    }

    /// Removes every rule.
    pub fn clear(&mut self) {
        *self = RuleSet::default();
    }

    /// The number of live (not expired) rules.
    pub fn len(&self) -> usize {
        self.len_at(Instant::now())
    }

    /// [`len`](RuleSet::len) at a given time.
    pub fn len_at(&self, now: Instant) -> usize {
        let recent_live = self
            .recent
            .iter()
            .filter(|r| r.expires.is_none_or(|t| now < t))
            .count();
        self.levels.iter().map(|l| l.len_at(now)).sum::<usize>() + recent_live
    }

    /// Whether no live rule is left.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The live rules and their expiry, in insertion order.
    pub fn iter(&self) -> impl Iterator<Item = (Rule, Option<Instant>)> + '_ {
        self.iter_at(Instant::now())
    }

    /// [`iter`](RuleSet::iter) at a given time.
    pub fn iter_at(&self, now: Instant) -> impl Iterator<Item = (Rule, Option<Instant>)> + '_ {
        let indexed = self.levels.iter().flat_map(move |l| l.items_at(now));
        let recent = self
            .recent
            .iter()
            .filter(move |r| r.expires.is_none_or(|t| now < t))
            .map(|r| (r.rule, r.expires));
        indexed.chain(recent)
    }

    /// The expiry of `rule` if it is in the set: `Some(None)` for a permanent
    /// entry, `None` if absent or expired.
    pub fn get(&self, rule: &Rule) -> Option<Option<Instant>> {
        let now = Instant::now();
        let exp = match self.locate(rule)? {
            Place::Indexed(level, slot) => self.levels[level].expiry(slot),
            Place::Recent(i) => self.recent[i].expires,
        };
        match exp {
            Some(t) if t <= now => None,
            other => Some(other),
        }
    }

    /// Drops expired entries now (writes do this on their own).
    pub fn purge_expired(&mut self) {
        self.purge_at(Instant::now());
    }

    /// Merges everything into one index: the fastest shape for lookups
    /// after many single adds or removes.
    pub fn compact(&mut self) {
        self.rebuild(Instant::now(), Vec::new());
    }

    /// Bytes of heap memory held by the set (capacity of its buffers, not
    /// counting allocator overhead). Shared buffers are counted in full.
    pub fn heap_size(&self) -> usize {
        self.levels.iter().map(|l| l.heap_size()).sum::<usize>()
            + self.levels.capacity() * std::mem::size_of::<Arc<Store>>()
            + self.recent.capacity() * std::mem::size_of::<Recent>()
    }

    #[inline]
    fn find(&self, k: u128, now: &mut impl FnMut() -> Instant) -> Option<Rule> {
        for level in self.levels.iter() {
            if let Some(r) = level.find(k, now) {
                return Some(r);
            }
        }
        self.recent
            .iter()
            .find(|r| r.lo <= k && k <= r.hi && r.expires.is_none_or(|t| now() < t))
            .map(|r| r.rule)
    }

    fn insert(&mut self, rule: Rule, expires: Option<Instant>, now: Instant) -> bool {
        self.purge_at(now);
        if let Some(place) = self.locate(&rule) {
            let old = match place {
                Place::Indexed(level, slot) => self.levels[level].expiry(slot),
                Place::Recent(i) => self.recent[i].expires,
            };
            if old == expires {
                return false;
            }
            self.drop_place(place);
            if expires.is_some_and(|t| t <= now) {
                return true;
            }
        } else if expires.is_some_and(|t| t <= now) {
            return false;
        }
        let (lo, hi) = rule.bounds();
        let recent = Arc::make_mut(&mut self.recent);
        recent.push(Recent {
            rule,
            lo,
            hi,
            expires,
        });
        if recent.len() > RECENT_MAX {
            let items: Vec<_> = recent.drain(..).map(|r| (r.rule, r.expires)).collect();
            let levels = Arc::make_mut(&mut self.levels);
            levels.push(Arc::new(Store::build(&items)));
            // Merge while the newest level is large next to the one before.
            while levels.len() >= 2 {
                let n = levels.len();
                if levels[n - 1].live() * MERGE_RATIO < levels[n - 2].live() {
                    break;
                }
                let newer = levels.pop().expect("two levels");
                let older = levels.pop().expect("two levels");
                let items: Vec<_> = older.items_at(now).chain(newer.items_at(now)).collect();
                levels.push(Arc::new(Store::build(&items)));
            }
        }
        true
    }

    fn locate(&self, rule: &Rule) -> Option<Place> {
        for (i, level) in self.levels.iter().enumerate() {
            if let Some(slot) = level.locate(rule) {
                return Some(Place::Indexed(i, slot));
            }
        }
        self.recent
            .iter()
            .position(|r| r.rule == *rule)
            .map(Place::Recent)
    }

    fn drop_place(&mut self, place: Place) {
        match place {
            Place::Recent(i) => {
                Arc::make_mut(&mut self.recent).remove(i);
            }
            Place::Indexed(level, slot) => {
                let levels = Arc::make_mut(&mut self.levels);
                let store = Arc::make_mut(&mut levels[level]);
                if store.kill(slot) {
                    // It hid later rules of its level: rebuild that level.
                    // (Its dead and expired entries are skipped by items_at.)
                    let items: Vec<_> = store.items_at_dead_ok().collect();
                    *store = Store::build(&items);
                }
                Self::tidy(levels, level);
            }
        }
    }

    /// Rebuilds a level full of tombstones; drops an empty one.
    fn tidy(levels: &mut Vec<Arc<Store>>, level: usize) {
        let store = &levels[level];
        if store.live() == 0 {
            levels.remove(level);
        } else if store.dead * 2 > store.entries.len() + 64 {
            let items: Vec<_> = store.items_at_dead_ok().collect();
            levels[level] = Arc::new(Store::build(&items));
        }
    }

    fn purge_at(&mut self, now: Instant) {
        if self
            .levels
            .iter()
            .any(|l| l.next_expiry.is_some_and(|t| t <= now))
        {
            let levels = Arc::make_mut(&mut self.levels);
            for i in (0..levels.len()).rev() {
                if levels[i].next_expiry.is_some_and(|t| t <= now) {
                    Arc::make_mut(&mut levels[i]).purge(now);
                    Self::tidy(levels, i);
                }
            }
        }
        if self
            .recent
            .iter()
            .any(|r| r.expires.is_some_and(|t| t <= now))
        {
            Arc::make_mut(&mut self.recent).retain(|r| r.expires.is_none_or(|t| now < t));
        }
    }

    /// Rebuilds one index from the live entries, in order, followed by `more`.
    fn rebuild(&mut self, now: Instant, more: Vec<(Rule, Option<Instant>)>) {
        let mut items: Vec<(Rule, Option<Instant>)> = self.iter_at(now).collect();
        items.extend(more);
        self.levels = Arc::new(if items.is_empty() {
            Vec::new()
        } else {
            vec![Arc::new(Store::build(&items))]
        });
        self.recent = Arc::new(Vec::new());
    }

    /// Adds many permanent rules with a single rebuild. Returns how many
    /// changed the set.
    fn bulk(&mut self, rules: impl IntoIterator<Item = Rule>) -> usize {
        let now = Instant::now();
        self.purge_at(now);
        let rules = rules.into_iter();
        let hint = rules.size_hint().0;
        let mut seen: HashSet<Key, BuildHasherDefault<FoldHasher>> =
            HashSet::with_capacity_and_hasher(hint, BuildHasherDefault::default());
        let mut new = Vec::with_capacity(hint);
        for rule in rules {
            if !seen.insert(rule_key(&rule)) {
                continue;
            }
            match self.locate(&rule) {
                Some(Place::Indexed(level, slot)) => {
                    if self.levels[level].expiry(slot).is_none() {
                        continue;
                    }
                    // An expiring entry is never a list's cut-off point, so
                    // a tombstone is enough; everything is rebuilt below.
                    let levels = Arc::make_mut(&mut self.levels);
                    Arc::make_mut(&mut levels[level]).kill(slot);
                }
                Some(Place::Recent(i)) => {
                    if self.recent[i].expires.is_none() {
                        continue;
                    }
                    Arc::make_mut(&mut self.recent).remove(i);
                }
                None => {}
            }
            new.push((rule, None));
        }
        let added = new.len();
        if added > 0 {
            self.rebuild(now, new);
        }
        added
    }
}

impl Extend<Rule> for RuleSet {
    /// Adds many rules with one index rebuild (the fast way to load a list).
    fn extend<I: IntoIterator<Item = Rule>>(&mut self, iter: I) {
        self.bulk(iter);
    }
}

impl FromIterator<Rule> for RuleSet {
    fn from_iter<I: IntoIterator<Item = Rule>>(iter: I) -> RuleSet {
        let mut set = RuleSet::new();
        set.bulk(iter);
        set
    }
}

impl Store {
    #[inline]
    fn find(&self, k: u128, now: &mut impl FnMut() -> Instant) -> Option<Rule> {
        let v = self.index.lookup(k);
        if v == NONE {
            return None;
        }
        if v & MULTI == 0 {
            return self.live_rule(v, now);
        }
        let off = (v & !MULTI) as usize;
        let n = self.index.lists[off] as usize;
        self.index.lists[off + 1..off + 1 + n]
            .iter()
            .find_map(|&slot| self.live_rule(slot, now))
    }

    /// Entries not removed (expired ones included until purged).
    fn live(&self) -> usize {
        self.entries.len() - self.dead
    }

    fn len_at(&self, now: Instant) -> usize {
        let expired = self
            .deadlines
            .iter()
            .filter(|&&(slot, t)| t <= now && self.entries[slot as usize].tag & DEAD == 0)
            .count();
        self.live() - expired
    }

    fn expiry(&self, slot: u32) -> Option<Instant> {
        (self.entries[slot as usize].tag & EXPIRES != 0).then(|| self.deadline(slot))
    }

    /// Live, unexpired entries in insertion order.
    fn items_at(&self, now: Instant) -> impl Iterator<Item = (Rule, Option<Instant>)> + '_ {
        (0..self.entries.len() as u32).filter_map(move |slot| {
            let e = self.entries[slot as usize];
            if e.tag & DEAD != 0 {
                return None;
            }
            let exp = self.expiry(slot);
            if exp.is_some_and(|t| t <= now) {
                return None;
            }
            Some((self.rule_of(e), exp))
        })
    }

    /// Entries not removed, expired or not (for rebuilding a level without a
    /// clock at hand; expired ones are purged by the next write).
    fn items_at_dead_ok(&self) -> impl Iterator<Item = (Rule, Option<Instant>)> + '_ {
        (0..self.entries.len() as u32).filter_map(move |slot| {
            let e = self.entries[slot as usize];
            (e.tag & DEAD == 0).then(|| (self.rule_of(e), self.expiry(slot)))
        })
    }

    fn locate(&self, rule: &Rule) -> Option<u32> {
        let want = rule_key(rule);
        let pos = self
            .by_rule
            .binary_search_by(|&slot| self.entry_key(self.entries[slot as usize]).cmp(&want))
            .ok()?;
        let slot = self.by_rule[pos];
        (self.entries[slot as usize].tag & DEAD == 0).then_some(slot)
    }

    /// Tombstones a slot. Returns whether the level must be rebuilt because
    /// the entry cut a cover list short.
    fn kill(&mut self, slot: u32) -> bool {
        let e = &mut self.entries[slot as usize];
        if e.tag & DEAD != 0 {
            return false;
        }
        e.tag |= DEAD;
        self.dead += 1;
        e.tag & TRUNCATES != 0
    }

    fn purge(&mut self, now: Instant) {
        let mut next = None::<Instant>;
        for &(slot, t) in &self.deadlines {
            let e = &mut self.entries[slot as usize];
            if e.tag & DEAD != 0 {
                continue;
            }
            if t <= now {
                e.tag |= DEAD;
                self.dead += 1;
            } else {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        self.next_expiry = next;
    }

    fn heap_size(&self) -> usize {
        use std::mem::size_of;
        let i = &self.index;
        self.entries.capacity() * size_of::<Entry>()
            + self.wide.capacity() * size_of::<[u128; 2]>()
            + self.deadlines.capacity() * size_of::<(u32, Instant)>()
            + self.by_rule.capacity() * 4
            + i.v4.capacity() * 8
            + i.v4_top.capacity() * 4
            + i.v6_starts.capacity() * 16
            + (i.v6_vals.capacity() + i.lists.capacity()) * 4
            + size_of::<Store>()
    }

    #[inline]
    fn live_rule(&self, slot: u32, now: &mut impl FnMut() -> Instant) -> Option<Rule> {
        let e = self.entries[slot as usize];
        if e.tag & DEAD != 0 {
            return None;
        }
        if e.tag & EXPIRES != 0 && now() >= self.deadline(slot) {
            return None;
        }
        Some(self.rule_of(e))
    }

    fn deadline(&self, slot: u32) -> Instant {
        match self.deadlines.binary_search_by_key(&slot, |&(s, _)| s) {
            Ok(i) => self.deadlines[i].1,
            // Every EXPIRES entry has a deadline; be safe anyway.
            Err(_) => Instant::now(),
        }
    }

    #[inline]
    fn rule_of(&self, e: Entry) -> Rule {
        let (first, last) = if e.tag & WIDE != 0 {
            let [lo, hi] = self.wide[e.a as usize];
            (
                IpAddr::V6(Ipv6Addr::from(lo)),
                IpAddr::V6(Ipv6Addr::from(hi)),
            )
        } else if e.tag & MAPPED != 0 {
            (
                IpAddr::V6(Ipv4Addr::from(e.a).to_ipv6_mapped()),
                IpAddr::V6(Ipv4Addr::from(e.b).to_ipv6_mapped()),
            )
        } else {
            (
                IpAddr::V4(Ipv4Addr::from(e.a)),
                IpAddr::V4(Ipv4Addr::from(e.b)),
            )
        };
        Rule::from_parts(e.tag & KIND_MASK, first, last, e.prefix)
    }

    fn build(items: &[(Rule, Option<Instant>)]) -> Store {
        let mut entries = Vec::with_capacity(items.len());
        let mut wide = Vec::new();
        let mut deadlines = Vec::new();
        let mut v4_iv: Vec<(u32, u32, u32)> = Vec::with_capacity(items.len());
        let mut v6_iv: Vec<(u128, u128, u32)> = Vec::new();
        let mut next_expiry = None::<Instant>;
        for (slot, &(rule, expires)) in items.iter().enumerate() {
            let slot = slot as u32;
            let (lo, hi) = rule.bounds();
            let mut tag = rule.kind_code();
            let (a, b) = if !rule.is_ipv6() {
                (lo as u32, hi as u32)
            } else if space::v4_of(lo).is_some() && space::v4_of(hi).is_some() {
                tag |= MAPPED;
                (lo as u32, hi as u32)
            } else {
                tag |= WIDE;
                wide.push([lo, hi]);
                ((wide.len() - 1) as u32, 0)
            };
            if let Some(t) = expires {
                tag |= EXPIRES;
                deadlines.push((slot, t));
                next_expiry = Some(next_expiry.map_or(t, |n| n.min(t)));
            }
            entries.push(Entry {
                tag,
                prefix: rule.prefix_len().unwrap_or(0),
                a,
                b,
            });
            // Split the interval around the mapped block.
            if lo < MAPPED_LO {
                v6_iv.push((lo, hi.min(MAPPED_LO - 1), slot));
            }
            if lo <= MAPPED_HI && hi >= MAPPED_LO {
                v4_iv.push((lo.max(MAPPED_LO) as u32, hi.min(MAPPED_HI) as u32, slot));
            }
            if hi > MAPPED_HI {
                v6_iv.push((lo.max(MAPPED_HI + 1), hi, slot));
            }
        }
        let mut index = Index::default();
        let (s4, v4) = segments(&v4_iv, &mut entries, &mut index.lists);
        let (s6, v6) = segments(&v6_iv, &mut entries, &mut index.lists);
        index.v4_top = top_table(&s4);
        index.v4 = s4.into_iter().zip(v4).collect();
        (index.v6_starts, index.v6_vals) = (s6, v6);
        index.lists.shrink_to_fit();
        let keys: Vec<Key> = items.iter().map(|(r, _)| rule_key(r)).collect();
        let mut by_rule: Vec<u32> = (0..items.len() as u32).collect();
        by_rule.sort_unstable_by_key(|&slot| keys[slot as usize]);
        drop(keys);
        wide.shrink_to_fit();
        deadlines.shrink_to_fit();
        Store {
            entries,
            wide,
            deadlines,
            index,
            by_rule,
            dead: 0,
            next_expiry,
        }
    }
}

/// The order of `by_rule`: bounds, then kind and written family. Equal keys
/// mean equal rules (a subnet's prefix follows from its bounds).
type Key = (u128, u128, u8);

fn rule_key(rule: &Rule) -> Key {
    let (lo, hi) = rule.bounds();
    let fam = if !rule.is_ipv6() {
        0
    } else if space::v4_of(lo).is_some() && space::v4_of(hi).is_some() {
        MAPPED
    } else {
        WIDE
    };
    (lo, hi, rule.kind_code() | fam)
}

impl Store {
    fn entry_key(&self, e: Entry) -> Key {
        let (lo, hi) = if e.tag & WIDE != 0 {
            let [lo, hi] = self.wide[e.a as usize];
            (lo, hi)
        } else {
            (MAPPED_LO | u128::from(e.a), MAPPED_LO | u128::from(e.b))
        };
        (lo, hi, e.tag & (KIND_MASK | WIDE | MAPPED))
    }
}

/// A fast, non-cryptographic hasher for de-duplicating a bulk load (the
/// input is the caller's own rule list, so hash flooding is not a concern).
#[derive(Default)]
struct FoldHasher(u64);

impl Hasher for FoldHasher {
    fn finish(&self) -> u64 {
        let x = self.0.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x ^ (x >> 32)
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut buf = [0u8; 8];
            buf[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(buf));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }
}

impl Index {
    #[inline]
    fn lookup(&self, k: u128) -> u32 {
        match space::v4_of(k) {
            Some(a) => self.lookup_v4(a),
            None => self.lookup_v6(k),
        }
    }

    #[inline]
    fn lookup_v4(&self, a: u32) -> u32 {
        let segs = &self.v4;
        if segs.is_empty() {
            return NONE;
        }
        let (lo, hi) = if self.v4_top.is_empty() {
            (0, segs.len())
        } else {
            let h = (a >> 16) as usize;
            (
                (self.v4_top[h] as usize).saturating_sub(1),
                self.v4_top[h + 1] as usize,
            )
        };
        // starts[0] == 0 and starts[lo] <= a, so the partition point is >= 1.
        let i = lo + segs[lo..hi].partition_point(|&(s, _)| s <= a) - 1;
        segs[i].1
    }

    #[inline]
    fn lookup_v6(&self, k: u128) -> u32 {
        let starts = &self.v6_starts;
        if starts.is_empty() {
            return NONE;
        }
        let i = starts.partition_point(|&s| s <= k) - 1;
        self.v6_vals[i]
    }
}

/// A point type the segment builder works over.
trait Point: Copy + Ord + Default {
    fn succ(self) -> Option<Self>;
}

impl Point for u32 {
    fn succ(self) -> Option<u32> {
        self.checked_add(1)
    }
}

impl Point for u128 {
    fn succ(self) -> Option<u128> {
        self.checked_add(1)
    }
}

/// Cuts the space into segments where the set of covering rules is constant
/// and gives each the value to return: `NONE`, a slot, or `MULTI | offset`
/// of a list in `lists`. Marks rules that cut a list short as `TRUNCATES`.
fn segments<P: Point>(
    iv: &[(P, P, u32)],
    entries: &mut [Entry],
    lists: &mut Vec<u32>,
) -> (Vec<P>, Vec<u32>) {
    if iv.is_empty() {
        return (Vec::new(), Vec::new());
    }
    let mut ev: Vec<(P, bool, u32)> = Vec::with_capacity(iv.len() * 2);
    for &(lo, hi, slot) in iv {
        ev.push((lo, true, slot));
        if let Some(end) = hi.succ() {
            ev.push((end, false, slot));
        }
    }
    ev.sort_unstable_by_key(|e| e.0);
    let mut starts = Vec::with_capacity(ev.len() + 1);
    let mut vals = Vec::with_capacity(ev.len() + 1);
    starts.push(P::default());
    vals.push(NONE);
    // Slots covering the current point, sorted. Usually zero or one long,
    // so a sorted Vec beats a tree; deep nesting costs a memmove per event.
    let mut active: Vec<u32> = Vec::new();
    let mut cover: Vec<u32> = Vec::new();
    // Identical lists are shared: many segments of nested rules repeat them.
    let mut known: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut i = 0;
    while i < ev.len() {
        let pos = ev[i].0;
        while i < ev.len() && ev[i].0 == pos {
            let (_, start, slot) = ev[i];
            match (active.binary_search(&slot), start) {
                (Err(at), true) => active.insert(at, slot),
                (Ok(at), false) => {
                    active.remove(at);
                }
                _ => {}
            }
            i += 1;
        }
        cover.clear();
        for &slot in &active {
            cover.push(slot);
            if entries[slot as usize].tag & EXPIRES == 0 {
                break;
            }
        }
        if cover.len() < active.len()
            && let Some(&last) = cover.last()
        {
            entries[last as usize].tag |= TRUNCATES;
        }
        let val = match cover.len() {
            0 => NONE,
            1 => cover[0],
            _ => *known.entry(cover.clone()).or_insert_with(|| {
                let off = lists.len() as u32;
                lists.push(cover.len() as u32);
                lists.extend_from_slice(&cover);
                MULTI | off
            }),
        };
        if pos == P::default() {
            vals[0] = val;
        } else if vals.last() != Some(&val) {
            starts.push(pos);
            vals.push(val);
        }
    }
    starts.shrink_to_fit();
    vals.shrink_to_fit();
    (starts, vals)
}

/// `top[h]` = number of segments starting below `h << 16`, for h in 0..=65536.
fn top_table(starts: &[u32]) -> Vec<u32> {
    if starts.len() < TOP_TABLE_MIN {
        return Vec::new();
    }
    let mut top = Vec::with_capacity(65537);
    let mut j = 0usize;
    for h in 0..=65536u64 {
        let bound = h << 16;
        while j < starts.len() && u64::from(starts[j]) < bound {
            j += 1;
        }
        top.push(j as u32);
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Thousands of single adds, removes and expiries stack up several
    /// levels; lookups must still equal a linear scan in insertion order.
    #[test]
    fn levels_stay_equivalent_to_a_linear_scan() {
        let mut x = 0x9e37_79b9_u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let t0 = Instant::now();
        let mut now = t0 + Duration::from_secs(1);
        let mut set = RuleSet::new();
        let mut model: Vec<(Rule, Option<Instant>)> = Vec::new();
        let mut max_levels = 0;
        let rule_at = |a: u32, len: u32| {
            Rule::range(
                IpAddr::V4(Ipv4Addr::from(a)),
                IpAddr::V4(Ipv4Addr::from(a + len)),
            )
            .expect("ordered")
        };
        for step in 0..6000 {
            model.retain(|e| e.1.is_none_or(|t| now < t));
            match rnd(10) {
                0..=6 => {
                    let r = rule_at(rnd(5000) as u32, rnd(40) as u32);
                    let exp = (rnd(4) == 0).then(|| now + Duration::from_secs(1 + rnd(50)));
                    let changed = set.add_until_at(r, exp, now);
                    let pos = model.iter().position(|e| e.0 == r);
                    let want = match pos {
                        Some(i) if model[i].1 == exp => false,
                        Some(i) => {
                            model.remove(i);
                            model.push((r, exp));
                            true
                        }
                        None => {
                            model.push((r, exp));
                            true
                        }
                    };
                    assert_eq!(changed, want, "add {r} at step {step}");
                }
                7 | 8 if !model.is_empty() => {
                    let i = rnd(model.len() as u64) as usize;
                    let r = model.remove(i).0;
                    assert!(set.remove_at(&r, now), "remove {r} at step {step}");
                }
                _ => now += Duration::from_secs(rnd(3)),
            }
            max_levels = max_levels.max(set.levels.len());
            if step % 50 == 0 {
                for _ in 0..40 {
                    let ip = IpAddr::V4(Ipv4Addr::from(rnd(5100) as u32));
                    let want = model
                        .iter()
                        .find(|e| e.0.contains(ip) && e.1.is_none_or(|t| now < t))
                        .map(|e| e.0);
                    assert_eq!(set.check_at(ip, now), want, "{ip} at step {step}");
                }
                let live = model.iter().filter(|e| e.1.is_none_or(|t| now < t)).count();
                assert_eq!(set.len_at(now), live, "len at step {step}");
            }
        }
        assert!(
            max_levels >= 3,
            "the test must exercise stacked levels, saw {max_levels}"
        );
        model.retain(|e| e.1.is_none_or(|t| now < t));
        let listed: Vec<_> = set.iter_at(now).collect();
        assert_eq!(listed, model);
        set.compact();
        assert!(set.levels.len() <= 1);
        assert_eq!(set.iter_at(now).collect::<Vec<_>>(), model);
    }
}
