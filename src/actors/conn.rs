//! What actors hold of a client connection: a bounded outbound queue and a way to close it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Poll;

use actix::Message;
use bytestring::ByteString;
use futures_util::task::AtomicWaker;
use tokio::sync::mpsc;

/// Why the server closes a connection on its own initiative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    /// The outbound queue filled up: the client does not read fast enough (close 4001).
    TooSlow = 1,
    /// The tenant was suspended (close 4003).
    Suspended = 2,
}

/// Raised when the server closes a connection on its own initiative, with the reason; the
/// connection loop waits on it. A waker and a byte rather than a channel: it is one of the
/// few things every idle connection holds, and a channel costs some hundreds of bytes. Not a
/// `Notify` either: the loop polls the alarm each time it wakes, for every frame in or out, and
/// a waiting `Notified` takes its mutex on every poll where an `AtomicWaker` takes none
/// (docs/benchmarks.md, "The relay on Kefu's stack").
#[derive(Debug, Default)]
pub struct Alarm {
    waker: AtomicWaker,
    /// 0 until raised, then the [`Kill`].
    reason: AtomicU8,
}

impl Alarm {
    /// Resolves once raised (also when raised before the wait began), with the reason.
    pub async fn raised(&self) -> Kill {
        std::future::poll_fn(|cx| {
            // Registered before the check, so a raise in between still wakes this task.
            self.waker.register(cx.waker());
            match self.reason.load(Ordering::Acquire) {
                0 => Poll::Pending,
                2 => Poll::Ready(Kill::Suspended),
                _ => Poll::Ready(Kill::TooSlow),
            }
        })
        .await
    }

    fn raise(&self, why: Kill) {
        self.reason.store(why as u8, Ordering::Release);
        self.waker.wake();
    }
}

/// A connection as actors see it. Cloning is cheap; all clones feed the same socket.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub id: u64,
    tx: mpsc::Sender<ByteString>,
    alarm: Arc<Alarm>,
}

impl ConnHandle {
    /// A handle and what the connection loop watches: its outbound queue and the alarm.
    pub fn new(id: u64, buffer: usize) -> (Self, mpsc::Receiver<ByteString>, Arc<Alarm>) {
        let (tx, rx) = mpsc::channel(buffer);
        let alarm = Arc::new(Alarm::default());
        (
            Self {
                id,
                tx,
                alarm: alarm.clone(),
            },
            rx,
            alarm,
        )
    }

    /// Closes the connection (its loop sends the close frame for `why`).
    pub fn kill(&self, why: Kill) {
        self.alarm.raise(why);
    }

    /// Queues a frame without waiting. A full queue means the client is not keeping up: rather
    /// than grow memory without bound, the connection is closed; the client resyncs when it
    /// comes back.
    pub fn push(&self, frame: ByteString) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(frame) {
            self.alarm.raise(Kill::TooSlow);
        }
    }

    /// Queues a frame, waiting for room (replays, which pace themselves to the socket).
    /// False once the connection is gone.
    pub async fn push_wait(&self, frame: ByteString) -> bool {
        self.tx.send(frame).await.is_ok()
    }
}

/// Queues a frame on every connection but `except` (the one it came from, if any).
pub fn fan_out(conns: &[ConnHandle], frame: &ByteString, except: Option<u64>) {
    for c in conns {
        if Some(c.id) != except {
            c.push(frame.clone());
        }
    }
}

/// Close every connection of an agent or visitor on this node.
#[derive(Message)]
#[rtype(result = "()")]
pub struct KillAll(pub Kill);

/// A frame for every connection of an agent or visitor, except the one it came from.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub frame: ByteString,
    pub except: Option<u64>,
}

/// A connection joins a hub.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attach(pub ConnHandle);

/// A connection left a hub.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Detach(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_closes_the_connection_instead_of_growing() {
        let (conn, mut out, alarm) = ConnHandle::new(1, 2);
        let raised = |a: &Alarm| futures_util::FutureExt::now_or_never(a.raised());
        conn.push("a".into());
        conn.push("b".into());
        assert_eq!(raised(&alarm), None, "room left: nothing to say");
        conn.push("c".into());
        assert_eq!(raised(&alarm), Some(Kill::TooSlow));
        // What was queued is still delivered in order; the frame that did not fit is dropped
        // (the client resyncs by seq when it reconnects).
        assert_eq!(out.recv().await.as_deref(), Some("a"));
        assert_eq!(out.recv().await.as_deref(), Some("b"));
        assert!(out.try_recv().is_err());
    }
}
