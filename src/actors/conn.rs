//! What actors hold of a client connection: a bounded outbound queue and a way to close it.

use std::sync::Arc;

use actix::Message;
use bytestring::ByteString;
use tokio::sync::{Notify, mpsc};

/// Raised when a connection's outbound queue fills up: the client does not read fast enough,
/// and the connection loop closes it (4001). A `Notify` rather than a channel: it is one of
/// the few things every idle connection holds, and a channel costs some hundreds of bytes.
#[derive(Debug, Default)]
pub struct TooSlow(Notify);

impl TooSlow {
    /// Resolves once raised (also when raised before the wait began).
    pub async fn raised(&self) {
        self.0.notified().await
    }

    fn raise(&self) {
        self.0.notify_one();
    }
}

/// A connection as actors see it. Cloning is cheap; all clones feed the same socket.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub id: u64,
    tx: mpsc::Sender<ByteString>,
    too_slow: Arc<TooSlow>,
}

impl ConnHandle {
    /// A handle and what the connection loop watches: its outbound queue and the alarm.
    pub fn new(id: u64, buffer: usize) -> (Self, mpsc::Receiver<ByteString>, Arc<TooSlow>) {
        let (tx, rx) = mpsc::channel(buffer);
        let too_slow = Arc::new(TooSlow::default());
        (
            Self {
                id,
                tx,
                too_slow: too_slow.clone(),
            },
            rx,
            too_slow,
        )
    }

    /// Queues a frame without waiting. A full queue means the client is not keeping up: rather
    /// than grow memory without bound, the connection is closed; the client resyncs when it
    /// comes back.
    pub fn push(&self, frame: ByteString) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(frame) {
            self.too_slow.raise();
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
        let (conn, mut out, too_slow) = ConnHandle::new(1, 2);
        let raised = |t: &TooSlow| futures_util::FutureExt::now_or_never(t.raised()).is_some();
        conn.push("a".into());
        conn.push("b".into());
        assert!(!raised(&too_slow), "room left: nothing to say");
        conn.push("c".into());
        assert!(raised(&too_slow));
        // What was queued is still delivered in order; the frame that did not fit is dropped
        // (the client resyncs by seq when it reconnects).
        assert_eq!(out.recv().await.as_deref(), Some("a"));
        assert_eq!(out.recv().await.as_deref(), Some("b"));
        assert!(out.try_recv().is_err());
    }
}
