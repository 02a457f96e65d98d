//! The task of one `[monitor.<name>]`: follow an nginx access log, turn
//! each line into outcomes of pool addresses, and feed the pool's tracker.
//!
//! The tailer is synchronous: every `poll_interval` one
//! `spawn_blocking` call reads what nginx wrote since the last poll (in
//! batches of at most [`BATCH_LINES`] lines), parses it, attributes it
//! and records it; the async task only schedules polls and stops on the
//! cancellation token.
//!
//! # What survives a restart
//!
//! - **The log offset** ([`store::LogOffset`]): saved after a poll that
//!   moved it, at most once per [`SAVE_EVERY`], and at shutdown, from the
//!   blocking thread (the store fsyncs). At start the saved offset wins
//!   over `mode` ([`resume`]); the tailer ignores it if the file is
//!   another one (rotated while stopped: the rest of `<log>.1` is read
//!   when it is the saved file, then the new file from its start) or
//!   shorter than the offset (truncated). An offset saved for another
//!   path is not used. Reading is **at-least-once**: after a clean stop
//!   (SIGTERM) nothing is read twice; after a crash (`kill -9`, power
//!   loss) the lines read since the last save — at most about
//!   [`SAVE_EVERY`] plus one batch — are read and judged again. Lines of
//!   a rotated-away file still being drained when the process dies may be
//!   missed (the tailer's offset covers its current file only).
//! - **The pool's benches**: restored by [`resume`]
//!   ([`crate::pools::Pool::restore_benches`]); the changes the tracker
//!   makes are queued on the pool's [`BenchJournal`] and written by this
//!   task, in order, after each batch and whenever one is queued (client
//!   feedback), off the async workers.
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use accesslog::{Malformed, Offset, Tailer};
use health::{Observation, Outcome};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::config::MonitorSpec;
use crate::metrics::Metrics;
use crate::pools::{BenchJournal, Pool, RecordError, instant_of};

/// Most lines one read takes before the offset may be saved and the
/// shutdown token is checked again: bounds what a crash reads twice in a
/// large backlog.
pub const BATCH_LINES: usize = 16_384;

/// Least time between two saves of the offset while lines keep coming.
pub const SAVE_EVERY: Duration = Duration::from_secs(1);

/// What a monitor resumes from and persists to; from [`resume`].
#[derive(Debug)]
pub struct Resume {
    /// The store the offset and the benches are written to.
    pub store: store::Store,
    /// Where the monitor stopped last time, if it was following the same
    /// path.
    pub offset: Option<Offset>,
    /// The pool's bench changes, for this task to write.
    pub journal: Option<Arc<BenchJournal>>,
}

/// Reads what a monitor resumes from: re-applies the pool's saved benches
/// and reads the saved log offset. Errors (stopping start-up) when the
/// store cannot be read or a record of this monitor is unreadable.
/// Blocks on the store (start-up only).
pub fn resume(
    spec: &MonitorSpec,
    pool: &Pool,
    store: &store::Store,
) -> Result<Resume, store::StoreError> {
    let journal = pool
        .restore_benches(store, Instant::now(), SystemTime::now())?
        .map(|(journal, _)| journal);
    let offset = match store.offset(&spec.name)? {
        None => None,
        Some(saved) => {
            let path = spec.access_log.display().to_string();
            match &saved.path {
                Some(p) if *p != path => {
                    tracing::info!(
                        monitor = %spec.name,
                        saved = %p,
                        now = %path,
                        "the saved log offset is for another path; starting from `mode`"
                    );
                    None
                }
                _ => Some(offset_of(&saved)?),
            }
        }
    };
    Ok(Resume {
        store: store.clone(),
        offset,
        journal,
    })
}

/// The tailer's offset of a saved record (`file_id` is `dev:inode`).
fn offset_of(saved: &store::LogOffset) -> Result<Offset, store::StoreError> {
    format!("{}:{}", saved.file_id, saved.offset)
        .parse()
        .map_err(|_| store::StoreError::Decode {
            table: store::Table::Offsets.name(),
            key: saved.monitor.clone(),
            reason: format!("file_id {:?} is not dev:inode", saved.file_id),
        })
}

/// The record of `offset`.
fn record_of(monitor: &str, path: &std::path::Path, offset: Offset) -> store::LogOffset {
    store::LogOffset {
        monitor: monitor.to_owned(),
        file_id: format!("{}:{}", offset.dev, offset.inode),
        offset: offset.pos,
        path: Some(path.display().to_string()),
    }
}

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
    store: store::Store,
    journal: Option<Arc<BenchJournal>>,
    /// The saved offset to open the log at (until it is open).
    resume_at: Option<Offset>,
    /// The offset last saved, and when.
    saved: Option<Offset>,
    saved_at: Option<Instant>,
    /// Whether the last save failed (logged once until one succeeds).
    save_failed: bool,
}

impl Worker {
    /// Opens the tailer if it is not open yet; errors are logged once.
    fn ensure_open(&mut self) {
        if self.tailer.is_some() {
            return;
        }
        match Tailer::open(&self.spec.access_log, self.spec.mode, self.resume_at) {
            Ok(t) => {
                tracing::info!(
                    monitor = %self.spec.name,
                    path = %self.spec.access_log.display(),
                    mode = ?self.spec.mode,
                    exists = t.offset().is_some(),
                    resumed = self.resume_at.map(|o| o.to_string()).unwrap_or_default(),
                    at = t.offset().map(|o| o.to_string()).unwrap_or_default(),
                    "monitor following {}",
                    self.spec.access_log.display()
                );
                // What resuming gave (the saved offset, or `mode` if the
                // file is another one) is where the next save starts from.
                self.saved = self.resume_at.take();
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

    /// One poll: read, parse, attribute, record, in batches of at most
    /// [`BATCH_LINES`] lines; after each batch the offset may be saved and
    /// the pool's bench changes are. Stops early on shutdown without
    /// consuming the lines it did not judge.
    fn poll(&mut self) {
        self.ensure_open();
        let Some(mut tailer) = self.tailer.take() else {
            self.save_benches();
            return;
        };
        if self.sampling_since.elapsed() >= SAMPLE_PERIOD {
            self.malformed.take_samples();
            self.sampling_since = Instant::now();
        }
        loop {
            let result = self.batch(&mut tailer);
            let full = matches!(result, Ok(n) if n >= BATCH_LINES);
            match result {
                Ok(_) => self.last_error = None,
                Err(e) => self.error(format!("cannot read: {e}")),
            }
            self.save_offset(&tailer, false);
            self.save_benches();
            if !full || self.shutdown.is_cancelled() {
                break;
            }
        }
        self.tailer = Some(tailer);
    }

    /// Reads at most [`BATCH_LINES`] lines; how many were taken.
    fn batch(&mut self, tailer: &mut Tailer) -> std::io::Result<usize> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let (mut parsed, mut malformed) = (0u64, 0u64);
        let mut taken = 0usize;
        let spec = Arc::clone(&self.spec);
        let result = tailer.poll_while(|line| {
            if taken >= BATCH_LINES || self.shutdown.is_cancelled() {
                // Not consumed: the next poll (or the next run) reads it.
                return false;
            }
            taken += 1;
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
            true
        });
        self.metrics.count_lines(&spec.name, parsed, malformed);
        result
    }

    /// Saves the tailer's offset if it moved since the last save and, unless
    /// `force`, the last save is [`SAVE_EVERY`] old. A failed save is
    /// logged and retried on the next call.
    fn save_offset(&mut self, tailer: &Tailer, force: bool) {
        let Some(offset) = tailer.offset() else {
            return;
        };
        if self.saved == Some(offset)
            || (!force && self.saved_at.is_some_and(|t| t.elapsed() < SAVE_EVERY))
        {
            return;
        }
        let record = record_of(&self.spec.name, &self.spec.access_log, offset);
        match self.store.put_offset(&record) {
            Ok(()) => {
                self.saved = Some(offset);
                self.saved_at = Some(Instant::now());
                if std::mem::take(&mut self.save_failed) {
                    tracing::info!(monitor = %self.spec.name, "log offset saved again");
                }
            }
            Err(e) => {
                if !std::mem::replace(&mut self.save_failed, true) {
                    tracing::error!(
                        monitor = %self.spec.name,
                        error = %e,
                        "log offset not saved (retrying): a restart would read lines again"
                    );
                }
            }
        }
    }

    /// Writes the pool's queued bench changes.
    fn save_benches(&self) {
        if let Some(j) = &self.journal {
            j.save(&self.spec.name, &self.store);
        }
    }
}

/// Resolves when `journal` has changes queued; never without one.
async fn bench_changed(journal: Option<&BenchJournal>) {
    match journal {
        Some(j) => j.changed().await,
        None => std::future::pending().await,
    }
}

/// Runs one monitor until `shutdown` is cancelled, resuming from and
/// persisting to `resume` (see the module docs). Never fails on I/O: read
/// and store errors are logged and retried.
pub async fn run(
    spec: MonitorSpec,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    resume: Resume,
    shutdown: CancellationToken,
) -> Result<(), String> {
    let interval = spec.poll_interval;
    let journal = resume.journal.clone();
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
        store: resume.store,
        journal: resume.journal,
        resume_at: resume.offset,
        saved: None,
        saved_at: None,
        save_failed: false,
    });
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let poll = tokio::select! {
            () = shutdown.cancelled() => break,
            _ = ticks.tick() => true,
            () = bench_changed(journal.as_deref()) => false,
        };
        let Some(mut w) = worker.take() else { break };
        match tokio::task::spawn_blocking(move || {
            if poll {
                w.poll();
            } else {
                w.save_benches();
            }
            w
        })
        .await
        {
            Ok(w) => worker = Some(w),
            Err(e) => return Err(format!("log poll panicked: {e}")),
        }
    }
    let Some(w) = worker else { return Ok(()) };
    // The last bench changes and the exact offset of the last line judged.
    let w = tokio::task::spawn_blocking(move || {
        let mut w = w;
        w.save_benches();
        if let Some(t) = w.tailer.take() {
            w.save_offset(&t, true);
            w.tailer = Some(t);
        }
        w
    })
    .await
    .map_err(|e| format!("saving the log offset panicked: {e}"))?;
    let offset = w.tailer.as_ref().and_then(Tailer::offset);
    tracing::info!(
        monitor = %w.spec.name,
        offset = offset.map(|o| o.to_string()).unwrap_or_default(),
        saved = w.saved == offset,
        lines = w.lines,
        malformed = w.malformed.count(),
        "monitor stopped"
    );
    Ok(())
}
