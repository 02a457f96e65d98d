//! Access logs written to files, in nginx `combined` format
//! (`access_log = "path"` on `[egress.*]` and `[ingress.*]`). The proxies
//! queue lines; one task per file appends them, flushing whenever the
//! queue is empty, so a request never waits on the disk.

use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The proxies' side: queues one line per entry.
pub struct FileSink {
    tx: mpsc::UnboundedSender<String>,
}

impl gateway::access::AccessLog for FileSink {
    fn record(&self, entry: gateway::access::AccessEntry) {
        let mut line = gateway::access::combined(&entry);
        line.push('\n');
        let _ = self.tx.send(line);
    }
}

/// The writing side, run as a task until shutdown.
pub struct Writer {
    path: PathBuf,
    file: tokio::fs::File,
    rx: mpsc::UnboundedReceiver<String>,
}

/// Opens (creating, appending) `path`.
pub async fn open(path: &Path) -> std::io::Result<(FileSink, Writer)> {
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await?;
    let (tx, rx) = mpsc::unbounded_channel();
    Ok((
        FileSink { tx },
        Writer {
            path: path.to_owned(),
            file,
            rx,
        },
    ))
}

impl Writer {
    /// Appends lines until shutdown (then writes what is queued) or until
    /// every sink is gone.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => None,
                line = self.rx.recv() => line,
            };
            let Some(first) = first else {
                while let Ok(l) = self.rx.try_recv() {
                    buf.extend_from_slice(l.as_bytes());
                }
                self.write(&mut buf).await;
                return;
            };
            buf.extend_from_slice(first.as_bytes());
            while buf.len() < 256 * 1024
                && let Ok(l) = self.rx.try_recv()
            {
                buf.extend_from_slice(l.as_bytes());
            }
            self.write(&mut buf).await;
        }
    }

    async fn write(&mut self, buf: &mut Vec<u8>) {
        if buf.is_empty() {
            return;
        }
        if let Err(e) = self.file.write_all(buf).await {
            tracing::error!(path = %self.path.display(), error = %e, "access log write failed; lines lost");
        }
        buf.clear();
    }
}
