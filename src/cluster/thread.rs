//! The thread a node's NATS connection lives on.
//!
//! The client's socket task, the publisher of notices, the subscriptions, the queue leases and
//! the cluster's heartbeat all run on one thread of their own with a single-threaded runtime.
//! A notice then crosses from a conversation actor to this thread and from this thread to a
//! hub, but it never waits behind the actors' own work: on the first actor thread, where these
//! tasks ran before, a notice arriving while that thread served a burst of messages waited for
//! the burst (docs/benchmarks.md, "Cross-node").

use std::sync::Mutex;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// The name the thread shows in `top -H`, `/proc/<pid>/task/*/comm` and profilers.
const THREAD_NAME: &str = "kefu-nats";

/// A running cluster thread. It stops when [`ClusterThread::stop`] is called or the value is
/// dropped; stopping cancels every task on it (the NATS connection closes with them).
pub struct ClusterThread {
    /// Where to spawn the cluster's tasks.
    handle: Handle,
    /// Dropping the sender ends the thread's `block_on` and with it the runtime. In a
    /// `Mutex` so that a shared owner can stop the thread before the last reference goes.
    stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl ClusterThread {
    pub fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(THREAD_NAME.to_owned())
            .spawn(move || {
                // Either a stop or the sender dropped: both mean the node is done with us.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
                // Dropping the runtime here cancels what still runs on it.
            })?;
        Ok(Self {
            handle,
            stop: Mutex::new(Some(stop)),
        })
    }

    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Stops the thread; tasks spawned afterwards never run. Not waited for: it may be called
    /// from a task on the thread itself.
    pub fn stop(&self) {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_tasks_on_its_own_named_thread_until_stopped() {
        let thread = ClusterThread::start().expect("thread starts");
        let name = thread
            .handle()
            .spawn(async { std::thread::current().name().map(str::to_owned) })
            .await
            .expect("task runs");
        assert_eq!(name.as_deref(), Some(THREAD_NAME));

        thread.stop();
        // The runtime shuts down: a task spawned now is cancelled, never run.
        let late = loop {
            let task = thread.handle().spawn(async {});
            match task.await {
                Ok(()) => tokio::task::yield_now().await,
                Err(e) => break e,
            }
        };
        assert!(late.is_cancelled());
    }
}
