//! IP rules in the data plane: who may connect, enforced at accept time and
//! in the kernel, with automatic bans and per-client rate limits.
//!
//! - [`Guard`]: the accept-time filter of a listener. `guard.accept(&listener)`
//!   replaces `listener.accept()`; peers the live [`iprules::Policy`] denies
//!   (or that go over a [`RateLimit`]) are reset before a byte is read, and
//!   counted.
//! - [`KernelFilter`] / [`BpfProgram`]: the same policy compiled to a
//!   classic BPF socket filter, so the kernel drops SYNs from denied peers
//!   before a connection exists (for policies up to a few hundred ranges;
//!   larger ones stay accept-time only). Kept in step with the policy,
//!   expiring entries included.
//! - [`nft_script`]: the policy as an nftables table, for large block lists
//!   or host-wide enforcement (`ippool rules export --format nft`).
//! - [`AutoBlock`]: counts [`Offense`]s per client in a sliding window and
//!   bans repeat offenders with expiring deny entries, longer each time.
//! - [`RateLimit`]: a token bucket per client.
//!
//! Clients are counted per [`client_key`]: an IPv4 address, or an IPv6
//! network (a /64 by default), since one subscriber holds a whole /64.
//!
//! Which to use: the [`Guard`] is always on and exact (it reads the policy
//! on every accept, so a change or a ban applies to the very next
//! connection). The kernel filter is an optimisation on top: a denied
//! client costs no accept, no socket and no SYN-ACK, which matters under a
//! flood, and it never denies more than the policy does.

mod accept;
mod autoblock;
mod bpf;
mod lru;
mod nft;
mod ratelimit;
mod space;

pub use accept::{BanHook, Guard, GuardMetrics, OffenseFeed, Refusal};
pub use autoblock::{AutoBlock, AutoBlockOptions, Ban, BanRecord, Offense, Recorded};
pub use bpf::{
    BPF_MAXINSNS, BpfError, BpfLimits, BpfProgram, FilterReport, FilterState, Insn, KernelFilter,
    detach,
};
pub use nft::{NftError, NftOptions, nft_script};
pub use ratelimit::{RateLimit, RateLimitOptions, RetryAfter};
pub use space::client_key;
