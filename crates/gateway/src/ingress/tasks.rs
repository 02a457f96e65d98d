//! Owned tasks: finished ones are reaped on each spawn; the rest are
//! drained (or aborted) on shutdown, and aborted when the owner drops.

use std::future::Future;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinSet;

#[derive(Default)]
pub(crate) struct Tasks {
    set: Mutex<JoinSet<()>>,
}

impl Tasks {
    pub(crate) fn spawn(&self, f: impl Future<Output = ()> + Send + 'static) {
        let mut set = self.set.lock().unwrap_or_else(PoisonError::into_inner);
        while set.try_join_next().is_some() {}
        set.spawn(f);
    }

    pub(crate) fn reap(&self) {
        let mut set = self.set.lock().unwrap_or_else(PoisonError::into_inner);
        while set.try_join_next().is_some() {}
    }

    fn take(&self) -> JoinSet<()> {
        std::mem::take(&mut *self.set.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Waits for every task (also those spawned meanwhile) until
    /// `timeout`, then aborts what is left.
    pub(crate) async fn drain(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut local = self.take();
            if local.is_empty() {
                return;
            }
            while !local.is_empty() {
                if tokio::time::timeout_at(deadline, local.join_next())
                    .await
                    .is_err()
                {
                    tracing::info!(
                        left = local.len(),
                        "drain timeout: closing open ingress connections"
                    );
                    local.shutdown().await;
                    self.take().shutdown().await;
                    return;
                }
            }
        }
    }
}
