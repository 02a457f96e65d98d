//! The task of one `[monitor.<name>]`: follow an nginx access log, turn
//! each line into outcomes of pool addresses, and feed the pool's tracker.
//!
//! The tailer is synchronous: every `poll_interval` one
//! `spawn_blocking` call reads what nginx wrote since the last poll,
//! parses it, attributes it and records it; the async task only schedules
//! polls and stops on the cancellation token.
//!
//! The tailer's position ([`accesslog::Offset`]) is kept in memory only: a
//! restart starts again from `mode`. Persisting it belongs to the state
//! store (`state_dir`), which comes later; the offset is logged at
//! shutdown so the seam is visible.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use accesslog::{Malformed, Tailer};
use health::{Observation, Outcome};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::MonitorSpec;
use crate::metrics::Metrics;
use crate::pools::{Pool, RecordError, instant_of};

/// Most distinct out-of-pool addresses warned about per monitor.
const MAX_UNKNOWN_WARNINGS: usize = 64;

/// How often malformed-line sampling starts again (at most
/// [`Malformed::DEFAULT_SAMPLES`] logged per period).
const SAMPLE_PERIOD: Duration = Duration::from_secs(60);

/// What a poll needs, moved into `spawn_blocking` and back.
struct Worker {
    spec: Arc<MonitorSpec>,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    tailer: Option<Tailer>,
    malformed: Malformed,
    sampling_since: Instant,
    /// Lines read since the monitor started (the n-th line is logged as
    /// `line = n` with malformed samples).
    lines: u64,
    unknown: HashSet<IpAddr>,
    last_error: Option<String>,
}

impl Worker {
    /// Opens the tailer if it is not open yet; errors are logged once.
    fn ensure_open(&mut self) {
        if self.tailer.is_some() {
            return;
        }
        match Tailer::open(&self.spec.access_log, self.spec.mode, None) {
            Ok(t) => {
                tracing::info!(
                    monitor = %self.spec.name,
                    path = %self.spec.access_log.display(),
                    mode = ?self.spec.mode,
                    exists = t.offset().is_some(),
                    "monitor following {}",
                    self.spec.access_log.display()
                );
                self.tailer = Some(t);
                self.last_error = None;
            }
            Err(e) => self.error(format!("cannot open: {e}")),
        }
    }

    fn error(&mut self, message: String) {
        if self.last_error.as_ref() != Some(&message) {
            tracing::warn!(
                monitor = %self.spec.name,
                path = %self.spec.access_log.display(),
                "{message} (retrying every poll)"
            );
            self.last_error = Some(message);
        }
    }

    /// One poll: read, parse, attribute, record.
    fn poll(&mut self) {
        self.ensure_open();
        let Some(mut tailer) = self.tailer.take() else {
            return;
        };
        if self.sampling_since.elapsed() >= SAMPLE_PERIOD {
            self.malformed.take_samples();
            self.sampling_since = Instant::now();
        }
        let now = Instant::now();
        let wall = SystemTime::now();
        let (mut parsed, mut malformed) = (0u64, 0u64);
        let spec = Arc::clone(&self.spec);
        let result = tailer.poll_with(|line| {
            if self.shutdown.is_cancelled() {
                return;
            }
            self.lines += 1;
            let outcome = spec
                .format
                .parse(line)
                .and_then(|r| Ok((r.outcomes(&spec.source)?, r.time()?)));
            match outcome {
                Ok((outcomes, time)) => {
                    parsed += 1;
                    let at = time.map_or(now, |t| instant_of(t.to_system_time(), now, wall));
                    for o in outcomes {
                        let Some(status) = o.status else { continue };
                        let mut obs = Observation::new(Outcome::Status(status));
                        if let Some(t) = o.time {
                            obs = obs.with_latency(t);
                        }
                        if let Err(RecordError::UnknownAddress { ip, .. }) =
                            self.pool.record(o.addr, obs, at, &self.metrics)
                            && self.unknown.len() < MAX_UNKNOWN_WARNINGS
                            && self.unknown.insert(ip)
                        {
                            tracing::warn!(
                                monitor = %spec.name,
                                %ip,
                                "the log names an address outside the pool; its outcomes are ignored"
                            );
                        }
                    }
                }
                Err(error) => {
                    malformed += 1;
                    if self.malformed.record(line, error.clone()) {
                        let sample = self
                            .malformed
                            .samples()
                            .last()
                            .map_or("", |s| s.line.as_str());
                        tracing::warn!(
                            monitor = %spec.name,
                            path = %spec.access_log.display(),
                            line = self.lines,
                            %error,
                            text = sample,
                            "malformed access-log line (counted, skipped)"
                        );
                    }
                }
            }
        });
        self.metrics.count_lines(&spec.name, parsed, malformed);
        match result {
            Ok(_) => self.last_error = None,
            Err(e) => self.error(format!("cannot read: {e}")),
        }
        self.tailer = Some(tailer);
    }
}

/// Runs one monitor until `shutdown` is cancelled. Never fails: read
/// errors are logged and retried.
pub async fn run(
    spec: MonitorSpec,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let interval = spec.poll_interval;
    let mut worker = Some(Worker {
        spec: Arc::new(spec),
        pool,
        metrics,
        shutdown: shutdown.clone(),
        tailer: None,
        malformed: Malformed::default(),
        sampling_since: Instant::now(),
        lines: 0,
        unknown: HashSet::new(),
        last_error: None,
    });
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => {}
        }
        let Some(mut w) = worker.take() else { break };
        match tokio::task::spawn_blocking(move || {
            w.poll();
            w
        })
        .await
        {
            Ok(w) => worker = Some(w),
            Err(e) => return Err(format!("log poll panicked: {e}")),
        }
    }
    if let Some(w) = worker {
        // Not persisted yet: a restart starts again from `mode`.
        let offset = w.tailer.as_ref().and_then(Tailer::offset);
        tracing::info!(
            monitor = %w.spec.name,
            offset = offset.map(|o| o.to_string()).unwrap_or_default(),
            lines = w.lines,
            malformed = w.malformed.count(),
            "monitor stopped"
        );
    }
    Ok(())
}
