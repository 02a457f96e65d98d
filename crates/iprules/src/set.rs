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
//! Single additions go to `recent`, a short list scanned after the index;
//! when it grows past `RECENT_MAX` everything is rebuilt. Removals of indexed
//! rules leave a tombstone (a rebuild happens when tombstones pile up, or at
//! once when the removed rule cut a list short). Expired entries stop
//! matching when the clock passes them and are purged by the next write.
//!
//! Cloning a `RuleSet` copies two `Arc`s: that is what makes snapshots for
//! lock-free readers cheap. A write after a clone copies what it touches.

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use crate::rule::Rule;
use crate::space::{self, MAPPED_HI, MAPPED_LO};

/// Additions kept outside the index before it is rebuilt.
const RECENT_MAX: usize = 32;
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
    v4_starts: Vec<u32>,
    v4_vals: Vec<u32>,
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
    store: Arc<Store>,
    recent: Arc<Vec<Recent>>,
}

enum Place {
    Indexed(u32),
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
        self.find(space::key(addr), &mut || *now.get_or_insert_with(Instant::now))
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

    /// [`add_until`](RuleSet::add_until) with the current time given, for
    /// callers with their own clock.
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
                self.drop_place(place, now);
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
        let s = &*self.store;
        let expired = s
            .deadlines
            .iter()
            .filter(|&&(slot, t)| t <= now && s.entries[slot as usize].tag & DEAD == 0)
            .count();
        let recent_live = self
            .recent
            .iter()
            .filter(|r| r.expires.is_none_or(|t| now < t))
            .count();
        s.entries.len() - s.dead - expired + recent_live
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
        let s = &*self.store;
        let indexed = (0..s.entries.len() as u32).filter_map(move |slot| {
            let e = s.entries[slot as usize];
            if e.tag & DEAD != 0 {
                return None;
            }
            let exp = if e.tag & EXPIRES != 0 {
                let t = s.deadline(slot);
                if t <= now {
                    return None;
                }
                Some(t)
            } else {
                None
            };
            Some((s.rule_of(e), exp))
        });
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
            Place::Indexed(slot) => {
                let e = self.store.entries[slot as usize];
                (e.tag & EXPIRES != 0).then(|| self.store.deadline(slot))
            }
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

    /// Bytes of heap memory held by the set (capacity of its buffers, not
    /// counting allocator overhead). Shared buffers are counted in full.
    pub fn heap_size(&self) -> usize {
        use std::mem::size_of;
        let s = &*self.store;
        let i = &s.index;
        s.entries.capacity() * size_of::<Entry>()
            + s.wide.capacity() * size_of::<[u128; 2]>()
            + s.deadlines.capacity() * size_of::<(u32, Instant)>()
            + s.by_rule.capacity() * 4
            + (i.v4_starts.capacity() + i.v4_vals.capacity() + i.v4_top.capacity()) * 4
            + i.v6_starts.capacity() * 16
            + (i.v6_vals.capacity() + i.lists.capacity()) * 4
            + self.recent.capacity() * size_of::<Recent>()
            + size_of::<Store>()
    }

    #[inline]
    fn find(&self, k: u128, now: &mut impl FnMut() -> Instant) -> Option<Rule> {
        let s = &*self.store;
        let v = s.index.lookup(k);
        if v != NONE {
            if v & MULTI == 0 {
                if let Some(r) = s.live_rule(v, now) {
                    return Some(r);
                }
            } else {
                let off = (v & !MULTI) as usize;
                let n = s.index.lists[off] as usize;
                for &slot in &s.index.lists[off + 1..off + 1 + n] {
                    if let Some(r) = s.live_rule(slot, now) {
                        return Some(r);
                    }
                }
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
            let same = match place {
                Place::Indexed(slot) => {
                    let e = self.store.entries[slot as usize];
                    let old = (e.tag & EXPIRES != 0).then(|| self.store.deadline(slot));
                    old == expires
                }
                Place::Recent(i) => self.recent[i].expires == expires,
            };
            if same {
                return false;
            }
            self.drop_place(place, now);
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
            self.rebuild(now, Vec::new());
        }
        true
    }

    fn locate(&self, rule: &Rule) -> Option<Place> {
        let s = &*self.store;
        if let Ok(pos) = s
            .by_rule
            .binary_search_by(|&slot| s.rule_of(s.entries[slot as usize]).cmp(rule))
        {
            let slot = s.by_rule[pos];
            if s.entries[slot as usize].tag & DEAD == 0 {
                return Some(Place::Indexed(slot));
            }
        }
        self.recent
            .iter()
            .position(|r| r.rule == *rule)
            .map(Place::Recent)
    }

    fn drop_place(&mut self, place: Place, now: Instant) {
        match place {
            Place::Recent(i) => {
                Arc::make_mut(&mut self.recent).remove(i);
            }
            Place::Indexed(slot) => {
                let s = Arc::make_mut(&mut self.store);
                let e = &mut s.entries[slot as usize];
                e.tag |= DEAD;
                s.dead += 1;
                let truncates = e.tag & TRUNCATES != 0;
                if truncates || s.dead * 2 > s.entries.len() + 64 {
                    self.rebuild(now, Vec::new());
                }
            }
        }
    }

    fn purge_at(&mut self, now: Instant) {
        if self.store.next_expiry.is_some_and(|t| t <= now) {
            let s = Arc::make_mut(&mut self.store);
            let mut next = None::<Instant>;
            for &(slot, t) in &s.deadlines {
                let e = &mut s.entries[slot as usize];
                if e.tag & DEAD != 0 {
                    continue;
                }
                if t <= now {
                    e.tag |= DEAD;
                    s.dead += 1;
                } else {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
            }
            s.next_expiry = next;
            if s.dead * 2 > s.entries.len() + 64 {
                self.rebuild(now, Vec::new());
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

    /// Rebuilds the index from the live entries, in order, followed by `more`.
    fn rebuild(&mut self, now: Instant, more: Vec<(Rule, Option<Instant>)>) {
        let mut items: Vec<(Rule, Option<Instant>)> = self.iter_at(now).collect();
        items.extend(more);
        self.store = Arc::new(Store::build(&items));
        self.recent = Arc::new(Vec::new());
    }

    /// Adds many permanent rules with a single rebuild. Returns how many
    /// changed the set.
    fn bulk(&mut self, rules: impl IntoIterator<Item = Rule>) -> usize {
        let now = Instant::now();
        self.purge_at(now);
        let mut seen = std::collections::HashSet::new();
        let mut new = Vec::new();
        for rule in rules {
            if !seen.insert(rule) {
                continue;
            }
            match self.locate(&rule) {
                Some(Place::Indexed(slot)) => {
                    if self.store.entries[slot as usize].tag & EXPIRES == 0 {
                        continue;
                    }
                    let s = Arc::make_mut(&mut self.store);
                    s.entries[slot as usize].tag |= DEAD;
                    s.dead += 1;
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
            (IpAddr::V4(Ipv4Addr::from(e.a)), IpAddr::V4(Ipv4Addr::from(e.b)))
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
        (index.v4_starts, index.v4_vals) = (s4, v4);
        (index.v6_starts, index.v6_vals) = (s6, v6);
        index.lists.shrink_to_fit();
        let mut by_rule: Vec<u32> = (0..items.len() as u32).collect();
        by_rule.sort_unstable_by(|&x, &y| items[x as usize].0.cmp(&items[y as usize].0));
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
        let starts = &self.v4_starts;
        if starts.is_empty() {
            return NONE;
        }
        let (lo, hi) = if self.v4_top.is_empty() {
            (0, starts.len())
        } else {
            let h = (a >> 16) as usize;
            (
                (self.v4_top[h] as usize).saturating_sub(1),
                self.v4_top[h + 1] as usize,
            )
        };
        // starts[0] == 0 and starts[lo] <= a, so the partition point is >= 1.
        let i = lo + starts[lo..hi].partition_point(|&s| s <= a) - 1;
        self.v4_vals[i]
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
    let mut active: BTreeSet<u32> = BTreeSet::new();
    let mut cover: Vec<u32> = Vec::new();
    // Identical lists are shared: many segments of nested rules repeat them.
    let mut known: HashMap<Vec<u32>, u32> = HashMap::new();
    let mut i = 0;
    while i < ev.len() {
        let pos = ev[i].0;
        while i < ev.len() && ev[i].0 == pos {
            let (_, start, slot) = ev[i];
            if start {
                active.insert(slot);
            } else {
                active.remove(&slot);
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
