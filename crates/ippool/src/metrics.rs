//! Prometheus metrics of the daemon, encoded with `prometheus-client`.
//!
//! - `ippool_build_info{version}`: always 1.
//! - `ippool_rule_checks_total{set,verdict}`: rule checks answered by the
//!   admin API.
//! - `ippool_guard_connections_total{set,result}`: what the listeners of
//!   each rule set decided at accept (`accepted`, `denied`,
//!   `rate_limited`; requests, for a per-request rate limit).
//! - `ippool_rules{set,list}`: rules in each list of each set.
//! - `ippool_pool_addresses{pool,state}`: addresses of each pool by state
//!   (`available`, `benched`, `probation`), refreshed at scrape time.
//! - `ippool_pool_transitions_total{pool,kind}`: state changes (`benched`,
//!   `bench_suppressed`, `restored`).
//! - `ippool_accesslog_lines_total{monitor,result}`: access-log lines read
//!   by each monitor (`parsed`, `malformed`).
//! - Egress pools, read from [`addrpool::Pool::metrics`] at scrape time:
//!   `ippool_egress_pool_{assigned,removed,leased,retired,assign_failures,connect_failures}_total{pool}`,
//!   `ippool_egress_pool_{held,leased_now}{pool}` and the histogram
//!   `ippool_egress_pool_assign_latency_seconds{pool}` (demand to a
//!   bindable address).
//! - Egress listeners, from [`gateway::egress::EgressMetrics`]:
//!   `ippool_egress_requests_total{listener,protocol,result}`,
//!   `ippool_egress_connections_total{listener}`,
//!   `ippool_egress_bytes_total{listener,direction}` and
//!   `ippool_egress_tunnels_open{listener}`.
//! - Reverse proxies, from [`gateway::ingress::IngressMetrics`]:
//!   `ippool_ingress_requests_total{listener}`,
//!   `ippool_ingress_lean_requests_total{listener}` (of those, served on
//!   the lean HTTP/1.1 path; the rest went through hyper),
//!   `ippool_ingress_responses_total{listener,class}` (`1xx` … `5xx`),
//!   `ippool_ingress_errors_total{listener,kind}` (`no_route`,
//!   `no_backend`, `bad_gateway`, `timeout`, `body_too_large`,
//!   `bad_request`, `tls_handshake`) and
//!   `ippool_ingress_connections_open{listener}`.
//! - TCP balancers, from [`gateway::l4::L4Metrics`]:
//!   `ippool_l4_{accepted,forwarded,no_upstream,failed,retries}_total{listener}`,
//!   `ippool_l4_active{listener}`, `ippool_l4_bytes_total{listener,direction}`
//!   and, per configured upstream (a short, fixed list),
//!   `ippool_l4_upstream_connect_failures_total{listener,upstream}`.

use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use crate::rules::RuleSets;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    set: String,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabels {
    set: String,
    list: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolStateLabels {
    pool: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    pool: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LineLabels {
    monitor: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FleetLabels {
    change: &'static str,
}

/// The registry and the handles to update it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rule_checks: Family<CheckLabels, Counter>,
    rules: Family<RuleLabels, Gauge>,
    pool_addresses: Family<PoolStateLabels, Gauge>,
    pool_transitions: Family<TransitionLabels, Counter>,
    accesslog_lines: Family<LineLabels, Counter>,
    fleet_changes: Family<FleetLabels, Counter>,
    fleet_offenses: Family<OffenseLabels, Counter>,
    fleet_bans: Counter,
    egress: Arc<EgressCollector>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OffenseLabels {
    result: &'static str,
}

impl Metrics {
    /// Registers every metric, with the rule counts of `sets` and zeroed
    /// check counters for each set.
    pub fn new(sets: &Arc<RuleSets>) -> Metrics {
        let mut registry = Registry::with_prefix("ippool");
        registry.register(
            "build",
            "Build information; always 1",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let rule_checks = Family::<CheckLabels, Counter>::default();
        registry.register(
            "rule_checks",
            "Rule checks answered, by rule set and verdict",
            rule_checks.clone(),
        );
        let rules = Family::<RuleLabels, Gauge>::default();
        registry.register(
            "rules",
            "Rules in each list of each rule set",
            rules.clone(),
        );
        let pool_addresses = Family::<PoolStateLabels, Gauge>::default();
        registry.register(
            "pool_addresses",
            "Addresses of each pool by state",
            pool_addresses.clone(),
        );
        let pool_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "pool_transitions",
            "Address state changes of each pool, by kind",
            pool_transitions.clone(),
        );
        let accesslog_lines = Family::<LineLabels, Counter>::default();
        registry.register(
            "accesslog_lines",
            "Access-log lines read by each monitor, parsed or malformed",
            accesslog_lines.clone(),
        );
        let fleet_changes = Family::<FleetLabels, Counter>::default();
        registry.register(
            "fleet_changes",
            "Changes made by other instances of the fleet and applied here \
             (rule_added, rule_removed, ban_taken, ban_lifted), and rereads of \
             the shared store after its change feed was lost (resync)",
            fleet_changes.clone(),
        );
        let fleet_offenses = Family::<OffenseLabels, Counter>::default();
        registry.register(
            "fleet_offenses",
            "Auto-block offenses for the fleet's counts in Redis: added, \
             dropped (the queue to Redis was full), failed (Redis refused or \
             was unreachable)",
            fleet_offenses.clone(),
        );
        let fleet_bans = Counter::default();
        registry.register(
            "fleet_bans",
            "Clients banned here because the fleet's count of their offenses \
             reached the threshold",
            fleet_bans.clone(),
        );
        let egress = Arc::new(EgressCollector {
            sets: Arc::clone(sets),
            ..EgressCollector::default()
        });
        registry.register_collector(Box::new(Arc::clone(&egress)));
        let m = Metrics {
            egress,
            registry,
            rule_checks,
            rules,
            pool_addresses,
            pool_transitions,
            accesslog_lines,
            fleet_changes,
            fleet_offenses,
            fleet_bans,
        };
        for s in sets.summaries() {
            for verdict in ["allow", "deny"] {
                drop(m.rule_checks.get_or_create(&CheckLabels {
                    set: s.name.clone(),
                    verdict,
                }));
            }
            m.set_rule_count(&s.name, "allow", s.allow);
            m.set_rule_count(&s.name, "deny", s.deny);
        }
        m
    }

    /// Counts one check of set `set` with verdict `verdict` (`"allow"` or
    /// `"deny"`).
    pub fn count_check(&self, set: &str, verdict: &'static str) {
        self.rule_checks
            .get_or_create(&CheckLabels {
                set: set.to_owned(),
                verdict,
            })
            .inc();
    }

    /// Sets the number of rules in list `list` of set `set`.
    pub fn set_rule_count(&self, set: &str, list: &'static str, n: usize) {
        self.rules
            .get_or_create(&RuleLabels {
                set: set.to_owned(),
                list,
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Creates the series of pool `pool` at zero, so they show before the
    /// first event.
    pub fn add_pool(&self, pool: &str) {
        self.set_pool_addresses(pool, 0, 0, 0);
        for kind in ["benched", "bench_suppressed", "restored"] {
            drop(self.pool_transitions.get_or_create(&TransitionLabels {
                pool: pool.to_owned(),
                kind,
            }));
        }
    }

    /// Creates the line counters of monitor `monitor` at zero.
    pub fn add_monitor(&self, monitor: &str) {
        for result in ["parsed", "malformed"] {
            drop(self.accesslog_lines.get_or_create(&LineLabels {
                monitor: monitor.to_owned(),
                result,
            }));
        }
    }

    /// Sets the address counts of pool `pool` by state.
    pub fn set_pool_addresses(
        &self,
        pool: &str,
        available: usize,
        benched: usize,
        probation: usize,
    ) {
        for (state, n) in [
            ("available", available),
            ("benched", benched),
            ("probation", probation),
        ] {
            self.pool_addresses
                .get_or_create(&PoolStateLabels {
                    pool: pool.to_owned(),
                    state,
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Counts one transition of kind `kind` in pool `pool`.
    pub fn count_transition(&self, pool: &str, kind: &'static str) {
        self.pool_transitions
            .get_or_create(&TransitionLabels {
                pool: pool.to_owned(),
                kind,
            })
            .inc();
    }

    /// Counts one change from the fleet applied here (`rule_added`,
    /// `rule_removed`, `ban_taken`, `ban_lifted`, `resync`).
    pub fn count_fleet_change(&self, change: &'static str) {
        self.fleet_changes
            .get_or_create(&FleetLabels { change })
            .inc();
    }

    /// Counts `n` offenses for the fleet's counts with `result` (`added`,
    /// `dropped`, `failed`).
    pub fn count_fleet_offenses(&self, result: &'static str, n: u64) {
        self.fleet_offenses
            .get_or_create(&OffenseLabels { result })
            .inc_by(n);
    }

    /// Counts one ban taken here on the fleet's count.
    pub fn count_fleet_ban(&self) {
        self.fleet_bans.inc();
    }

    /// Counts `parsed` and `malformed` lines of monitor `monitor`.
    pub fn count_lines(&self, monitor: &str, parsed: u64, malformed: u64) {
        for (result, n) in [("parsed", parsed), ("malformed", malformed)] {
            if n > 0 {
                self.accesslog_lines
                    .get_or_create(&LineLabels {
                        monitor: monitor.to_owned(),
                        result,
                    })
                    .inc_by(n);
            }
        }
    }

    /// Exports the counters of egress pool `name` from now on.
    pub fn add_egress_pool(&self, name: &str, pool: addrpool::Pool) {
        lock(&self.egress.pools).push((name.to_owned(), pool));
    }

    /// Exports the counters of egress listener `name` from now on, in
    /// place of those of an earlier listener of that name (replaced at
    /// reload).
    pub fn add_egress_listener(&self, name: &str, m: Arc<gateway::egress::EgressMetrics>) {
        put(&self.egress.listeners, name, m);
    }

    /// Exports the counters of reverse proxy `name` from now on, in place
    /// of those of an earlier one of that name (replaced at reload).
    pub fn add_ingress(&self, name: &str, m: Arc<gateway::ingress::IngressMetrics>) {
        put(&self.egress.ingresses, name, m);
    }

    /// Exports the counters of TCP balancer `name` from now on, in place
    /// of those of an earlier one of that name.
    pub fn add_l4(&self, name: &str, m: Arc<gateway::l4::L4Metrics>) {
        put(&self.egress.balancers, name, m);
    }

    /// Stops exporting the counters of listener `name` of `kind`
    /// (`"egress"`, `"l4"` or `"ingress"`; removed at reload). The series
    /// of pools (`ippool_pool_*`) are not touched.
    pub fn remove_listener(&self, kind: &str, name: &str) {
        match kind {
            "egress" => lock(&self.egress.listeners).retain(|(n, _)| n != name),
            "l4" => lock(&self.egress.balancers).retain(|(n, _)| n != name),
            "ingress" => lock(&self.egress.ingresses).retain(|(n, _)| n != name),
            _ => {}
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Puts `(name, m)` in `list`, replacing an entry of that name.
fn put<T>(list: &Mutex<Vec<(String, T)>>, name: &str, m: T) {
    let mut list = lock(list);
    list.retain(|(n, _)| n != name);
    list.push((name.to_owned(), m));
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    listener: String,
    protocol: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    listener: String,
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BytesLabels {
    listener: String,
    direction: &'static str,
}

/// Reads the egress pools' and listeners' own counters at scrape time, so
/// the data path keeps its plain atomics and nothing is counted twice.
#[derive(Debug, Default)]
struct EgressCollector {
    /// The rule sets, for their guards' counters.
    sets: Arc<RuleSets>,
    pools: Mutex<Vec<(String, addrpool::Pool)>>,
    listeners: Mutex<Vec<(String, Arc<gateway::egress::EgressMetrics>)>>,
    balancers: Mutex<Vec<(String, Arc<gateway::l4::L4Metrics>)>>,
    ingresses: Mutex<Vec<(String, Arc<gateway::ingress::IngressMetrics>)>>,
}

/// A histogram from bucket counts (not cumulative) and a sum.
struct ConstHistogram {
    sum: f64,
    count: u64,
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for ConstHistogram {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            self.sum,
            self.count,
            &self.buckets,
            None,
        )
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Encodes one metric family: `rows` of (labels, metric).
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: &[(L, M)],
) -> Result<(), std::fmt::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, m) in rows {
        m.encode(metric.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for EgressCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pools: Vec<(PoolLabel, addrpool::MetricsSnapshot)> = lock(&self.pools)
            .iter()
            .map(|(name, p)| (PoolLabel { pool: name.clone() }, p.metrics()))
            .collect();
        type Get = fn(&addrpool::MetricsSnapshot) -> u64;
        let counters: [(&str, &str, Get); 6] = [
            (
                "egress_pool_assigned",
                "Addresses made usable (added, adopted or taken into the working set)",
                |m| m.assigned_total,
            ),
            (
                "egress_pool_removed",
                "Addresses removed from the interface (netlink)",
                |m| m.removed_total,
            ),
            ("egress_pool_leased", "Leases handed out", |m| {
                m.leased_total
            }),
            (
                "egress_pool_retired",
                "Addresses retired (use limit, idle time, bind failure)",
                |m| m.retired_total,
            ),
            (
                "egress_pool_assign_failures",
                "Assignments that failed or timed out",
                |m| m.assign_failures_total,
            ),
            (
                "egress_pool_connect_failures",
                "Outbound connections that failed (bind, connect, timeout)",
                |m| m.connect_failures_total,
            ),
        ];
        for (name, help, get) in counters {
            let rows: Vec<_> = pools
                .iter()
                .map(|(l, m)| (l.clone(), ConstCounter::new(get(m))))
                .collect();
            family(&mut encoder, name, help, MetricType::Counter, &rows)?;
        }
        let gauges: [(&str, &str, Get); 2] = [
            (
                "egress_pool_held",
                "Addresses the pool holds now (ready, leased, being assigned or removed)",
                |m| m.held,
            ),
            ("egress_pool_leased_now", "Leases outstanding now", |m| {
                m.leased_now
            }),
        ];
        for (name, help, get) in gauges {
            let rows: Vec<_> = pools
                .iter()
                .map(|(l, m)| {
                    (
                        l.clone(),
                        ConstGauge::new(i64::try_from(get(m)).unwrap_or(i64::MAX)),
                    )
                })
                .collect();
            family(&mut encoder, name, help, MetricType::Gauge, &rows)?;
        }
        let rows: Vec<_> = pools
            .iter()
            .map(|(l, m)| {
                let mut buckets: Vec<(f64, u64)> = addrpool::ASSIGN_LATENCY_BOUNDS_US
                    .iter()
                    .zip(m.assign_latency_buckets)
                    .map(|(&us, n)| (us as f64 / 1e6, n))
                    .collect();
                buckets.push((
                    f64::MAX,
                    m.assign_latency_buckets[addrpool::ASSIGN_LATENCY_BOUNDS_US.len()],
                ));
                let count = m.assign_latency_buckets.iter().sum();
                (
                    l.clone(),
                    ConstHistogram {
                        sum: m.assign_latency_sum.as_secs_f64(),
                        count,
                        buckets,
                    },
                )
            })
            .collect();
        family(
            &mut encoder,
            "egress_pool_assign_latency_seconds",
            "Time from demand to a bindable address",
            MetricType::Histogram,
            &rows,
        )?;

        let listeners: Vec<(String, gateway::egress::EgressMetricsSnapshot)> =
            lock(&self.listeners)
                .iter()
                .map(|(n, m)| (n.clone(), m.snapshot()))
                .collect();
        let rows: Vec<_> = listeners
            .iter()
            .flat_map(|(n, s)| {
                s.iter_requests().map(move |(p, r, v)| {
                    (
                        RequestLabels {
                            listener: n.clone(),
                            protocol: p.as_str(),
                            result: r.as_str(),
                        },
                        ConstCounter::new(v),
                    )
                })
            })
            .collect();
        family(
            &mut encoder,
            "egress_requests",
            "Egress requests and tunnels by protocol and result",
            MetricType::Counter,
            &rows,
        )?;
        let rows: Vec<_> = listeners
            .iter()
            .map(|(n, s)| {
                (
                    ListenerLabel {
                        listener: n.clone(),
                    },
                    ConstCounter::new(s.connections_total),
                )
            })
            .collect();
        family(
            &mut encoder,
            "egress_connections",
            "Client connections accepted",
            MetricType::Counter,
            &rows,
        )?;
        let rows: Vec<_> = listeners
            .iter()
            .flat_map(|(n, s)| {
                [("up", s.bytes_up_total), ("down", s.bytes_down_total)].map(|(direction, v)| {
                    (
                        BytesLabels {
                            listener: n.clone(),
                            direction,
                        },
                        ConstCounter::new(v),
                    )
                })
            })
            .collect();
        family(
            &mut encoder,
            "egress_bytes",
            "Bytes carried: up (client to destination) and down",
            MetricType::Counter,
            &rows,
        )?;
        let rows: Vec<_> = listeners
            .iter()
            .map(|(n, s)| {
                (
                    ListenerLabel {
                        listener: n.clone(),
                    },
                    ConstGauge::new(i64::try_from(s.active_tunnels).unwrap_or(i64::MAX)),
                )
            })
            .collect();
        family(
            &mut encoder,
            "egress_tunnels_open",
            "CONNECT and SOCKS5 tunnels open now",
            MetricType::Gauge,
            &rows,
        )?;
        self.encode_l4(&mut encoder)?;
        self.encode_ingress(&mut encoder)?;
        self.encode_guards(&mut encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuardLabels {
    set: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    listener: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    listener: String,
    kind: &'static str,
}

impl EgressCollector {
    fn encode_guards(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut rows = Vec::new();
        for (set, m) in self.sets.guard_counts() {
            for (result, n) in [
                ("accepted", m.accepted_total),
                ("denied", m.denied_total),
                ("rate_limited", m.rate_limited_total),
            ] {
                let labels = GuardLabels {
                    set: set.to_owned(),
                    result,
                };
                rows.push((labels, ConstCounter::new(n)));
            }
        }
        family(
            encoder,
            "guard_connections",
            "What the listeners of each rule set decided at accept: accepted, denied (by the rules or a ban), rate_limited",
            MetricType::Counter,
            &rows,
        )
    }

    fn encode_ingress(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all: Vec<(String, gateway::ingress::IngressMetricsSnapshot)> = lock(&self.ingresses)
            .iter()
            .map(|(n, m)| (n.clone(), m.snapshot()))
            .collect();
        let label = |n: &String| ListenerLabel {
            listener: n.clone(),
        };
        let rows: Vec<_> = all
            .iter()
            .map(|(n, s)| (label(n), ConstCounter::new(s.requests_total)))
            .collect();
        family(
            encoder,
            "ingress_requests",
            "Requests received",
            MetricType::Counter,
            &rows,
        )?;
        let rows: Vec<_> = all
            .iter()
            .map(|(n, s)| (label(n), ConstCounter::new(s.lean_requests_total)))
            .collect();
        family(
            encoder,
            "ingress_lean_requests",
            "Of the requests, those served on the lean HTTP/1.1 path (the rest: hyper)",
            MetricType::Counter,
            &rows,
        )?;
        let rows: Vec<_> = all
            .iter()
            .flat_map(|(n, s)| {
                ["1xx", "2xx", "3xx", "4xx", "5xx"]
                    .into_iter()
                    .zip(s.responses_total)
                    .map(move |(class, v)| {
                        let l = ClassLabels {
                            listener: n.clone(),
                            class,
                        };
                        (l, ConstCounter::new(v))
                    })
            })
            .collect();
        family(
            encoder,
            "ingress_responses",
            "Responses by status class",
            MetricType::Counter,
            &rows,
        )?;
        let rows: Vec<_> = all
            .iter()
            .flat_map(|(n, s)| {
                [
                    ("no_route", s.no_route_total),
                    ("no_backend", s.no_backend_total),
                    ("bad_gateway", s.bad_gateway_total),
                    ("timeout", s.timeouts_total),
                    ("body_too_large", s.body_too_large_total),
                    ("bad_request", s.bad_request_total),
                    ("tls_handshake", s.tls_handshake_errors_total),
                ]
                .map(|(kind, v)| {
                    let l = KindLabels {
                        listener: n.clone(),
                        kind,
                    };
                    (l, ConstCounter::new(v))
                })
            })
            .collect();
        family(
            encoder,
            "ingress_errors",
            "Requests the proxy answered itself, by kind",
            MetricType::Counter,
            &rows,
        )?;
        let rows: Vec<_> = all
            .iter()
            .map(|(n, s)| {
                (
                    label(n),
                    ConstGauge::new(i64::try_from(s.connections_open).unwrap_or(i64::MAX)),
                )
            })
            .collect();
        family(
            encoder,
            "ingress_connections_open",
            "Client connections open now",
            MetricType::Gauge,
            &rows,
        )
    }

    fn encode_l4(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let balancers: Vec<(String, gateway::l4::L4MetricsSnapshot)> = lock(&self.balancers)
            .iter()
            .map(|(n, m)| (n.clone(), m.snapshot()))
            .collect();
        type L4Get = fn(&gateway::l4::L4MetricsSnapshot) -> u64;
        let counters: [(&str, &str, L4Get); 5] = [
            ("l4_accepted", "Client connections accepted", |s| {
                s.accepted_total
            }),
            (
                "l4_forwarded",
                "Connections forwarded to an upstream",
                |s| s.forwarded_total,
            ),
            (
                "l4_no_upstream",
                "Clients closed because no upstream was available",
                |s| s.no_upstream_total,
            ),
            ("l4_failed", "Clients closed after every dial failed", |s| {
                s.failed_total
            }),
            ("l4_retries", "Dials retried on another upstream", |s| {
                s.retries_total
            }),
        ];
        let label = |n: &String| ListenerLabel {
            listener: n.clone(),
        };
        for (name, help, get) in counters {
            let rows: Vec<_> = balancers
                .iter()
                .map(|(n, s)| (label(n), ConstCounter::new(get(s))))
                .collect();
            family(encoder, name, help, MetricType::Counter, &rows)?;
        }
        let rows: Vec<_> = balancers
            .iter()
            .map(|(n, s)| {
                let active = i64::try_from(s.active).unwrap_or(i64::MAX);
                (label(n), ConstGauge::new(active))
            })
            .collect();
        family(
            encoder,
            "l4_active",
            "Connections open now",
            MetricType::Gauge,
            &rows,
        )?;
        let rows: Vec<_> = balancers
            .iter()
            .flat_map(|(n, s)| {
                [("up", s.bytes_up_total), ("down", s.bytes_down_total)].map(|(direction, v)| {
                    let l = BytesLabels {
                        listener: n.clone(),
                        direction,
                    };
                    (l, ConstCounter::new(v))
                })
            })
            .collect();
        family(
            encoder,
            "l4_bytes",
            "Bytes carried: up (client to upstream) and down",
            MetricType::Counter,
            &rows,
        )?;
        let rows: Vec<_> = balancers
            .iter()
            .flat_map(|(n, s)| {
                s.upstreams.iter().map(move |u| {
                    let l = UpstreamLabels {
                        listener: n.clone(),
                        upstream: u.addr.to_string(),
                    };
                    (
                        l,
                        ConstCounter::new(u.connect_failures_total + u.timeouts_total),
                    )
                })
            })
            .collect();
        family(
            encoder,
            "l4_upstream_connect_failures",
            "Failed dials (errors and timeouts) per upstream",
            MetricType::Counter,
            &rows,
        )
    }
}
