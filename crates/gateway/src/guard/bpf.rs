//! Kernel-side filtering: a classic BPF socket filter, compiled from a
//! [`Policy`], that makes the kernel drop SYNs from denied peers before a
//! connection (or a request socket, or a SYN-ACK) exists.
//!
//! What the program does: a socket filter on a TCP listener runs for every
//! segment addressed to it (`tcp_filter` in `tcp_v4_rcv` / `tcp_v6_rcv`),
//! with `skb->data` at the TCP header, so the IP header is read through the
//! `SKF_NET_OFF` negative offset. It branches on the version nibble (an
//! `AF_INET6` dual-stack listener sees IPv4 packets as IPv4), loads the
//! source address (IPv6: four words kept in scratch memory) and walks a
//! balanced tree of comparisons over the sorted, disjoint denied ranges:
//! `O(log n)` instructions per packet. It returns 0 (drop) inside a denied
//! range and "keep everything" otherwise. Accepted connections inherit the
//! filter the listener had when they were created; it lets their own peer
//! through, so it costs them a few instructions per segment and nothing
//! else.
//!
//! Semantics: the program denies exactly what [`Policy::decide_at`] denies
//! at compile time: the denied ranges are the deny set minus the allow set
//! (allow holes are respected), or, for a policy whose default is deny,
//! everything outside the allow set. Expiring entries are compiled in as
//! they stand at that instant, and [`BpfProgram::next_change`] says when
//! the first of them runs out; [`KernelFilter::watch`] recompiles then, so
//! a ban is never enforced in the kernel after it ends. (An expiring *allow*
//! entry makes the kernel more lenient, never stricter, until the refresh;
//! the accept-time [`Guard`](super::Guard) is the exact check and stays on.)
//!
//! Limits: a socket filter has at most 4,096 instructions and is charged to
//! the socket's option memory. A policy with more than
//! [`BpfLimits::max_ranges`] denied ranges after merging (or a program
//! longer than [`BpfLimits::max_instructions`]) is not compiled; the filter
//! is detached and accept-time filtering alone applies. Large block lists
//! belong in nftables ([`nft_script`](super::nft_script)).
//!
//! Not counted: classic BPF has no maps, so SYNs dropped by the kernel are
//! not counted per listener (they show up host-wide as the skb drop reason
//! `SOCKET_FILTER`, e.g. with `perf trace -e skb:kfree_skb`).

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iprules::{Policy, Shared, Verdict};
use socket2::{SockFilter, SockRef};

use super::space::{self, Span, V4_FIRST, V4_LAST};

/// `SKF_NET_OFF`: negative load offsets from here read the network header.
const SKF_NET_OFF: i32 = -0x10_0000;

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const LD_B_ABS: u16 = 0x30; // BPF_LD | BPF_B | BPF_ABS
const LD_MEM: u16 = 0x60; // BPF_LD | BPF_W | BPF_MEM
const ST: u16 = 0x02; // BPF_ST
const AND_K: u16 = 0x54; // BPF_ALU | BPF_AND | BPF_K
const JA: u16 = 0x05; // BPF_JMP | BPF_JA
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGT_K: u16 = 0x25; // BPF_JMP | BPF_JGT | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

/// The return value that keeps a packet whole.
const KEEP: u32 = u32::MAX;
/// The kernel's limit on a classic BPF program (`BPF_MAXINSNS`).
pub const BPF_MAXINSNS: usize = 4096;

/// Ranges per leaf of the comparison tree (checked one after the other).
const LEAF: usize = 3;

fn net(off: u32) -> u32 {
    // Two's complement of the negative offset, as the kernel reads `k`.
    SKF_NET_OFF.wrapping_add_unsigned(off) as u32
}

/// One classic BPF instruction (`struct sock_filter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Insn {
    /// Opcode (`BPF_LD | BPF_W | BPF_ABS`, …).
    pub code: u16,
    /// Jump offset when the condition holds.
    pub jt: u8,
    /// Jump offset when it does not.
    pub jf: u8,
    /// The constant operand.
    pub k: u32,
}

/// How large a program may get before the kernel filter is given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BpfLimits {
    /// Most denied ranges (after merging, IPv4 and IPv6 together).
    /// Default: 512.
    pub max_ranges: usize,
    /// Most instructions. Default (and ceiling): [`BPF_MAXINSNS`].
    pub max_instructions: usize,
}

impl Default for BpfLimits {
    fn default() -> BpfLimits {
        BpfLimits {
            max_ranges: 512,
            max_instructions: BPF_MAXINSNS,
        }
    }
}

/// Why no socket filter could be made or attached.
#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    /// The policy denies more separate ranges than [`BpfLimits::max_ranges`].
    #[error("{ranges} denied ranges exceed the socket-filter limit of {max}")]
    TooManyRanges {
        /// Denied ranges after merging.
        ranges: usize,
        /// The limit.
        max: usize,
    },
    /// The program would be longer than [`BpfLimits::max_instructions`].
    #[error(
        "the socket filter for {ranges} denied ranges needs {instructions} instructions; the limit is {max}"
    )]
    TooLong {
        /// Denied ranges after merging.
        ranges: usize,
        /// Instructions the program needs.
        instructions: usize,
        /// The limit.
        max: usize,
    },
    /// The kernel refused the program (`SO_ATTACH_FILTER`).
    #[error("cannot attach the socket filter: {0}")]
    Attach(#[source] io::Error),
}

/// A compiled socket filter for one snapshot of a [`Policy`].
#[derive(Clone, Debug)]
pub struct BpfProgram {
    insns: Vec<Insn>,
    v4_ranges: usize,
    v6_ranges: usize,
    next_change: Option<Instant>,
}

impl BpfProgram {
    /// Compiles the addresses `policy` denies at `now` (see the module
    /// docs for the semantics and the limits).
    ///
    /// ```
    /// use std::time::Instant;
    /// use gateway::guard::{BpfLimits, BpfProgram};
    /// let mut p = iprules::Policy::default();
    /// p.deny.add("192.0.2.0/24".parse()?);
    /// p.allow.add("192.0.2.7".parse()?);
    /// let prog = BpfProgram::compile(&p, Instant::now(), &BpfLimits::default())?;
    /// assert_eq!(prog.ranges(), 2); // .0-.6 and .8-.255
    /// assert!(!prog.evaluate("192.0.2.1".parse()?));
    /// assert!(prog.evaluate("192.0.2.7".parse()?));
    /// assert!(prog.evaluate("::ffff:198.51.100.1".parse()?));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn compile(
        policy: &Policy,
        now: Instant,
        limits: &BpfLimits,
    ) -> Result<BpfProgram, BpfError> {
        Denied::of(policy, now).program(limits)
    }

    /// The instructions.
    pub fn instructions(&self) -> &[Insn] {
        &self.insns
    }

    /// Denied ranges compiled in (IPv4 and IPv6).
    pub fn ranges(&self) -> usize {
        self.v4_ranges + self.v6_ranges
    }

    /// Whether the program denies nothing (there is no point attaching it).
    pub fn is_empty(&self) -> bool {
        self.ranges() == 0
    }

    /// When the first expiring entry compiled in runs out: the program must
    /// be recompiled then.
    pub fn next_change(&self) -> Option<Instant> {
        self.next_change
    }

    /// Runs the program, in user space, on a SYN from `src` as the kernel
    /// would, and says whether it is let through. An IPv4-mapped address is
    /// sent as IPv4, as a dual-stack listener receives it.
    pub fn evaluate(&self, src: IpAddr) -> bool {
        let header = match src.to_canonical() {
            IpAddr::V4(a) => {
                let mut h = vec![0u8; 20];
                h[0] = 0x45;
                h[9] = 6;
                h[12..16].copy_from_slice(&a.octets());
                h
            }
            IpAddr::V6(a) => {
                let mut h = vec![0u8; 40];
                h[0] = 0x60;
                h[6] = 6;
                h[8..24].copy_from_slice(&a.octets());
                h
            }
        };
        run(&self.insns, &header) != 0
    }

    /// Attaches the program to `socket` (`SO_ATTACH_FILTER`), replacing any
    /// filter it had.
    pub fn attach(&self, socket: &impl AsFd) -> Result<(), BpfError> {
        let code: Vec<SockFilter> = self
            .insns
            .iter()
            .map(|i| SockFilter::new(i.code, i.jt, i.jf, i.k))
            .collect();
        SockRef::from(socket)
            .attach_filter(&code)
            .map_err(BpfError::Attach)
    }
}

/// The ranges a policy denies at one instant, split by family.
struct Denied {
    v4: Vec<(u32, u32)>,
    v6: Vec<Span>,
    next_change: Option<Instant>,
}

impl Denied {
    fn of(policy: &Policy, now: Instant) -> Denied {
        let (allow, allow_exp) = space::live(&policy.allow, now);
        let allow = space::merge(allow.into_iter().map(|(s, _)| s).collect());
        let (denied, deny_exp) = match policy.default {
            Verdict::Allow => {
                let (deny, exp) = space::live(&policy.deny, now);
                let deny = space::merge(deny.into_iter().map(|(s, _)| s).collect());
                (space::subtract(&deny, &allow), exp)
            }
            // Deny entries change nothing when everything is denied anyway.
            Verdict::Deny => (space::complement(&allow), None),
        };
        let next_change = match (allow_exp, deny_exp) {
            (Some(a), Some(d)) => Some(a.min(d)),
            (a, d) => a.or(d),
        };
        let v4 = space::clip(&denied, V4_FIRST, V4_LAST)
            .into_iter()
            // Inside the mapped block the low 32 bits are the IPv4 address.
            .map(|(lo, hi)| (lo as u32, hi as u32))
            .collect();
        // IPv6 packets never carry an IPv4-mapped source to a TCP listener
        // (tcp_v6_conn_request drops them), so the mapped block is left out.
        let mut v6 = space::clip(&denied, 0, V4_FIRST - 1);
        v6.extend(space::clip(&denied, V4_LAST + 1, u128::MAX));
        Denied {
            v4,
            v6,
            next_change,
        }
    }

    fn ranges(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    fn program(self, limits: &BpfLimits) -> Result<BpfProgram, BpfError> {
        let ranges = self.ranges();
        if ranges > limits.max_ranges {
            return Err(BpfError::TooManyRanges {
                ranges,
                max: limits.max_ranges,
            });
        }
        let insns = generate(&self.v4, &self.v6);
        let max = limits.max_instructions.min(BPF_MAXINSNS);
        if insns.len() > max {
            return Err(BpfError::TooLong {
                ranges,
                instructions: insns.len(),
                max,
            });
        }
        Ok(BpfProgram {
            insns,
            v4_ranges: self.v4.len(),
            v6_ranges: self.v6.len(),
            next_change: self.next_change,
        })
    }
}

/// Removes the socket filter of `socket`, if it has one.
pub fn detach(socket: &impl AsFd) -> io::Result<()> {
    match SockRef::from(socket).detach_filter() {
        // ENOENT: there was none.
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// A user-space interpreter for the instructions this module emits. Loads
/// at `SKF_NET_OFF` read `header`; anything else ends the program with 0,
/// as a failed load does in the kernel.
fn run(prog: &[Insn], header: &[u8]) -> u32 {
    let mut a: u32 = 0;
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    let load = |k: u32, size: usize| -> Option<u32> {
        let off = (k as i32).checked_sub(SKF_NET_OFF)?;
        let off = usize::try_from(off).ok()?;
        let bytes = header.get(off..off.checked_add(size)?)?;
        Some(bytes.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)))
    };
    while let Some(i) = prog.get(pc) {
        pc += 1;
        let jump = |cond: bool| usize::from(if cond { i.jt } else { i.jf });
        match i.code {
            LD_W_ABS | LD_B_ABS => {
                let size = if i.code == LD_W_ABS { 4 } else { 1 };
                match load(i.k, size) {
                    Some(v) => a = v,
                    None => return 0,
                }
            }
            LD_MEM => a = mem.get(i.k as usize).copied().unwrap_or(0),
            ST => {
                if let Some(m) = mem.get_mut(i.k as usize) {
                    *m = a;
                }
            }
            AND_K => a &= i.k,
            JA => pc += i.k as usize,
            JEQ_K => pc += jump(a == i.k),
            JGT_K => pc += jump(a > i.k),
            JGE_K => pc += jump(a >= i.k),
            RET_K => return i.k,
            _ => return 0,
        }
    }
    0
}

// ---------------------------------------------------------------------------
// Code generation: a tiny assembler with labels.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Label(usize);

enum Op {
    Plain(Insn),
    /// A conditional jump to labels; far targets get a `ja` trampoline.
    Cond {
        code: u16,
        k: u32,
        t: Label,
        f: Label,
    },
    Ja(Label),
    Mark(Label),
}

#[derive(Default)]
struct Asm {
    ops: Vec<Op>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }
    fn mark(&mut self, l: Label) {
        self.ops.push(Op::Mark(l));
    }
    fn plain(&mut self, code: u16, k: u32) {
        self.ops.push(Op::Plain(Insn {
            code,
            jt: 0,
            jf: 0,
            k,
        }));
    }
    fn cond(&mut self, code: u16, k: u32, t: Label, f: Label) {
        self.ops.push(Op::Cond { code, k, t, f });
    }
    fn ja(&mut self, l: Label) {
        self.ops.push(Op::Ja(l));
    }

    /// Resolves labels. Conditional jumps reach at most 255 instructions;
    /// a farther target is reached through a `ja` placed right after the
    /// jump. Adding trampolines moves code, so this iterates to a fixpoint
    /// (trampolines are only ever added, so it terminates).
    fn assemble(self) -> Vec<Insn> {
        let n = self.ops.len();
        let mut far = vec![(false, false); n];
        let mut pos = vec![0usize; n];
        let mut at = vec![0usize; self.labels];
        loop {
            let mut p = 0;
            for (i, op) in self.ops.iter().enumerate() {
                pos[i] = p;
                p += match op {
                    Op::Mark(l) => {
                        at[l.0] = p;
                        0
                    }
                    Op::Cond { .. } => 1 + usize::from(far[i].0) + usize::from(far[i].1),
                    _ => 1,
                };
            }
            let mut changed = false;
            for (i, op) in self.ops.iter().enumerate() {
                if let Op::Cond { t, f, .. } = op {
                    // Offsets count from the instruction after the jump
                    // (its trampolines, if any, come first).
                    let next = pos[i] + 1;
                    if !far[i].0 && at[t.0].saturating_sub(next) > 255 {
                        far[i].0 = true;
                        changed = true;
                    }
                    if !far[i].1 && at[f.0].saturating_sub(next) > 255 {
                        far[i].1 = true;
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        let mut out = Vec::new();
        let ja = |from: usize, to: usize| Insn {
            code: JA,
            jt: 0,
            jf: 0,
            // All jumps go forward (the generator only targets later labels).
            k: u32::try_from(to.saturating_sub(from + 1)).unwrap_or(u32::MAX),
        };
        for (i, op) in self.ops.iter().enumerate() {
            match op {
                Op::Plain(insn) => out.push(*insn),
                Op::Ja(l) => out.push(ja(pos[i], at[l.0])),
                Op::Mark(_) => {}
                Op::Cond { code, k, t, f } => {
                    let (tf, ff) = far[i];
                    let next = pos[i] + 1;
                    let jt = if tf { 0 } else { at[t.0].saturating_sub(next) };
                    let jf = if ff {
                        usize::from(tf)
                    } else {
                        at[f.0].saturating_sub(next)
                    };
                    debug_assert!(at[t.0] >= next && at[f.0] >= next, "backward jump");
                    debug_assert!(jt <= 255 && jf <= 255);
                    out.push(Insn {
                        code: *code,
                        jt: jt as u8,
                        jf: jf as u8,
                        k: *k,
                    });
                    if tf {
                        out.push(ja(next, at[t.0]));
                    }
                    if ff {
                        out.push(ja(next + usize::from(tf), at[f.0]));
                    }
                }
            }
        }
        out
    }
}

/// A comparison `x >= k` of the loaded source against a constant, jumping
/// to `t` or `f`.
trait Point: Copy {
    fn ge(asm: &mut Asm, k: Self, t: Label, f: Label);
    fn succ(self) -> Option<Self>;
}

impl Point for u32 {
    fn ge(asm: &mut Asm, k: u32, t: Label, f: Label) {
        if k == 0 {
            asm.ja(t);
        } else {
            asm.cond(JGE_K, k, t, f);
        }
    }
    fn succ(self) -> Option<u32> {
        self.checked_add(1)
    }
}

impl Point for u128 {
    /// Lexicographic over the four words in scratch memory M[0..4]; stops
    /// early once the remaining words of `k` are all zero.
    fn ge(asm: &mut Asm, k: u128, t: Label, f: Label) {
        let w = [
            (k >> 96) as u32,
            (k >> 64) as u32,
            (k >> 32) as u32,
            k as u32,
        ];
        for i in 0..4 {
            if w[i..].iter().all(|x| *x == 0) {
                asm.ja(t);
                return;
            }
            asm.plain(LD_MEM, i as u32);
            if i == 3 {
                asm.cond(JGE_K, w[3], t, f);
                return;
            }
            let check_eq = asm.label();
            let equal = asm.label();
            asm.cond(JGT_K, w[i], t, check_eq);
            asm.mark(check_eq);
            asm.cond(JEQ_K, w[i], equal, f);
            asm.mark(equal);
        }
    }
    fn succ(self) -> Option<u128> {
        self.checked_add(1)
    }
}

/// Emits a balanced tree of comparisons over sorted, disjoint `ranges`,
/// ending in jumps to `keep` or `drop`.
fn tree<P: Point>(asm: &mut Asm, ranges: &[(P, P)], keep: Label, drop: Label) {
    if ranges.len() <= LEAF {
        for &(lo, hi) in ranges {
            // Sorted: below this range means below every later one too.
            let above_lo = asm.label();
            P::ge(asm, lo, above_lo, keep);
            asm.mark(above_lo);
            match hi.succ() {
                Some(after) => {
                    let next = asm.label();
                    P::ge(asm, after, next, drop);
                    asm.mark(next);
                }
                None => asm.ja(drop),
            }
        }
        asm.ja(keep);
        return;
    }
    let mid = ranges.len() / 2;
    let (left, right) = ranges.split_at(mid);
    let l = asm.label();
    let r = asm.label();
    P::ge(asm, right[0].0, r, l);
    asm.mark(l);
    tree(asm, left, keep, drop);
    asm.mark(r);
    tree(asm, right, keep, drop);
}

fn generate(v4: &[(u32, u32)], v6: &[Span]) -> Vec<Insn> {
    let mut asm = Asm::default();
    if v4.is_empty() && v6.is_empty() {
        asm.plain(RET_K, KEEP);
        return asm.assemble();
    }
    let keep = asm.label();
    let drop = asm.label();
    let is_v4 = asm.label();
    let not_v4 = asm.label();
    let is_v6 = asm.label();
    asm.plain(LD_B_ABS, net(0));
    asm.plain(AND_K, 0xf0);
    asm.cond(JEQ_K, 0x40, is_v4, not_v4);
    asm.mark(not_v4);
    asm.cond(JEQ_K, 0x60, is_v6, keep);

    asm.mark(is_v4);
    if v4.is_empty() {
        asm.ja(keep);
    } else {
        asm.plain(LD_W_ABS, net(12));
        tree(&mut asm, v4, keep, drop);
    }

    asm.mark(is_v6);
    if v6.is_empty() {
        asm.ja(keep);
    } else {
        for word in 0..4u32 {
            asm.plain(LD_W_ABS, net(8 + 4 * word));
            asm.plain(ST, word);
        }
        tree(&mut asm, v6, keep, drop);
    }

    asm.mark(keep);
    asm.plain(RET_K, KEEP);
    asm.mark(drop);
    asm.plain(RET_K, 0);
    asm.assemble()
}

// ---------------------------------------------------------------------------
// Keeping a listener's filter in step with a live policy.

/// What [`KernelFilter::refresh`] left on the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterState {
    /// A program is attached.
    Attached {
        /// Denied ranges it holds.
        ranges: usize,
        /// Its length in instructions.
        instructions: usize,
    },
    /// The policy denies nothing: no filter is attached.
    Empty,
    /// The policy is too large for a socket filter: no filter is attached
    /// and accept-time filtering alone applies.
    TooBig {
        /// Denied ranges after merging.
        ranges: usize,
    },
}

/// The outcome of one refresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FilterReport {
    /// What is on the socket now.
    pub state: FilterState,
    /// When the program must be recompiled (an expiring entry runs out).
    pub next_change: Option<Instant>,
}

/// A listener's socket filter kept in step with a live policy.
///
/// ```no_run
/// # async fn demo(listener: tokio::net::TcpListener) {
/// use std::sync::Arc;
/// use std::time::Duration;
/// use gateway::guard::KernelFilter;
/// let policy = Arc::new(iprules::Shared::new(iprules::Policy::default()));
/// let filter = KernelFilter::new(policy.clone());
/// // Owned by the listener's task; returns when the shutdown future does.
/// filter.watch(&listener, Duration::from_millis(200), std::future::pending()).await;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct KernelFilter {
    policy: Arc<Shared<Policy>>,
    limits: BpfLimits,
}

impl KernelFilter {
    /// A filter over `policy` with the default [`BpfLimits`].
    pub fn new(policy: Arc<Shared<Policy>>) -> KernelFilter {
        KernelFilter::with_limits(policy, BpfLimits::default())
    }

    /// A filter over `policy` with the given limits.
    pub fn with_limits(policy: Arc<Shared<Policy>>, limits: BpfLimits) -> KernelFilter {
        KernelFilter { policy, limits }
    }

    /// The policy it follows.
    pub fn policy(&self) -> &Arc<Shared<Policy>> {
        &self.policy
    }

    /// Compiles the current policy as of `now` and attaches it to
    /// `listener` (or detaches the old program when nothing is denied or
    /// the policy is too big). On an attach error the old program is
    /// detached too, so a stale filter never outlives a change.
    pub fn refresh(&self, listener: &impl AsFd, now: Instant) -> Result<FilterReport, BpfError> {
        self.apply(&self.policy.snapshot(), listener, now)
    }

    fn apply(
        &self,
        policy: &Policy,
        listener: &impl AsFd,
        now: Instant,
    ) -> Result<FilterReport, BpfError> {
        let denied = Denied::of(policy, now);
        let next_change = denied.next_change;
        match denied.program(&self.limits) {
            Ok(prog) if prog.is_empty() => {
                detach(listener).map_err(BpfError::Attach)?;
                Ok(FilterReport {
                    state: FilterState::Empty,
                    next_change: prog.next_change(),
                })
            }
            Ok(prog) => {
                if let Err(e) = prog.attach(listener) {
                    let _ = detach(listener);
                    return Err(e);
                }
                Ok(FilterReport {
                    state: FilterState::Attached {
                        ranges: prog.ranges(),
                        instructions: prog.instructions().len(),
                    },
                    next_change: prog.next_change(),
                })
            }
            Err(BpfError::TooManyRanges { ranges, .. } | BpfError::TooLong { ranges, .. }) => {
                detach(listener).map_err(BpfError::Attach)?;
                // When entries expire the policy may fit again.
                Ok(FilterReport {
                    state: FilterState::TooBig { ranges },
                    next_change,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Keeps `listener`'s filter in step with the policy until `shutdown`
    /// resolves: recompiles when the policy is replaced (checked every
    /// `every`) and at the instant the first compiled-in expiring entry
    /// runs out. Errors are logged and retried at the next change. The
    /// filter stays attached when this returns.
    pub async fn watch(
        &self,
        listener: &impl AsFd,
        every: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let every = every.max(Duration::from_millis(1));
        let mut seen: Option<Arc<Policy>> = None;
        let mut next_change: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let snap = self.policy.snapshot();
            let replaced = seen.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &snap));
            if replaced || next_change.is_some_and(|t| t <= now) {
                next_change = match self.apply(&snap, listener, now) {
                    Ok(report) => {
                        tracing::debug!(?report.state, "socket filter refreshed");
                        match report.state {
                            // Nothing in the kernel to take back: retry
                            // compiling a large policy now and then only.
                            FilterState::TooBig { .. } => {
                                report.next_change.map(|t| t.max(now + every * 10))
                            }
                            _ => report.next_change,
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "socket filter not refreshed; accept-time filtering still applies");
                        None
                    }
                };
                seen = Some(snap);
            }
            let mut wake = now + every;
            if let Some(t) = next_change {
                wake = wake.min(t);
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    #[test]
    fn far_jumps_get_trampolines() {
        let mut asm = Asm::default();
        let t = asm.label();
        let f = asm.label();
        asm.cond(JEQ_K, 1, t, f);
        for _ in 0..300 {
            asm.plain(AND_K, 0xff);
        }
        asm.mark(t);
        asm.plain(RET_K, 7);
        asm.mark(f);
        asm.plain(RET_K, 9);
        let prog = asm.assemble();
        assert_eq!(prog.len(), 1 + 2 + 300 + 2);
        assert_eq!(prog[1].code, JA);
        assert_eq!(run(&prog, &[]), 9); // A = 0, not 1
    }

    #[test]
    fn matches_policy_on_random_sets() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let now = Instant::now();
        let mut long_programs = 0;
        for round in 0..40 {
            let mut p = Policy::default();
            if round % 5 == 4 {
                p.default = Verdict::Deny;
            }
            let n = 1 + (xorshift(&mut seed) % 300) as usize;
            for _ in 0..n {
                let r = xorshift(&mut seed);
                let base = (r >> 32) as u32 & 0x0fff_ff00; // clustered, so ranges meet
                let rule: iprules::Rule = match r % 4 {
                    0 => format!("{}", std::net::Ipv4Addr::from(base | (r as u32 & 0xff)))
                        .parse()
                        .unwrap(),
                    1 => format!(
                        "{}-{}",
                        std::net::Ipv4Addr::from(base),
                        std::net::Ipv4Addr::from(base + (r as u32 & 0x3ff))
                    )
                    .parse()
                    .unwrap(),
                    2 => format!("2001:db8:{:x}::/48", (r >> 8) & 0xff)
                        .parse()
                        .unwrap(),
                    _ => format!("2001:db8:{:x}:{:x}::/64", (r >> 8) & 0xff, (r >> 20) & 0xf)
                        .parse()
                        .unwrap(),
                };
                if xorshift(&mut seed).is_multiple_of(6) {
                    p.allow.add(rule);
                } else {
                    p.deny.add(rule);
                }
            }
            let limits = BpfLimits {
                max_ranges: usize::MAX,
                max_instructions: usize::MAX,
            };
            let prog = BpfProgram::compile(&p, now, &limits).unwrap();
            // Long enough for far jumps through trampolines.
            long_programs += usize::from(prog.instructions().len() > 600);
            let mut probes: Vec<IpAddr> = Vec::new();
            for (rule, _) in p.deny.iter().chain(p.allow.iter()) {
                for point in [space::key(rule.first()), space::key(rule.last())] {
                    for d in [-1i128, 0, 1] {
                        probes.push(space::addr_of(point.wrapping_add_signed(d)));
                    }
                }
            }
            for _ in 0..500 {
                let r = xorshift(&mut seed);
                probes.push(IpAddr::V4(((r >> 32) as u32 & 0x0fff_ffff).into()));
                probes.push(
                    format!(
                        "2001:db8:{:x}:{:x}::{:x}",
                        r & 0xff,
                        (r >> 8) & 0x1f,
                        (r >> 40) & 0xffff
                    )
                    .parse()
                    .unwrap(),
                );
            }
            for ip in probes {
                if let IpAddr::V6(v6) = ip
                    && v6.to_ipv4_mapped().is_some()
                {
                    continue; // never seen by a TCP listener as IPv6
                }
                assert_eq!(
                    prog.evaluate(ip),
                    p.decide_at(ip, now).is_allowed(),
                    "round {round}, {ip}, {} ranges",
                    prog.ranges()
                );
            }
        }
        assert!(long_programs > 5, "{long_programs}");
    }
}
