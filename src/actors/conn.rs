//! What actors hold of a client connection: a bounded outbound queue and a way to close it.

use actix::Message;
use bytestring::ByteString;
use tokio::sync::mpsc;

/// Why the server closes a connection on its own initiative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kill {
    /// The outbound queue filled up: the client does not read fast enough (close 4001).
    TooSlow,
}

/// A connection as actors see it. Cloning is cheap; all clones feed the same socket.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub id: u64,
    tx: mpsc::Sender<ByteString>,
    kill: mpsc::Sender<Kill>,
}

impl ConnHandle {
    /// A handle and the receiving ends the connection loop reads.
    pub fn new(id: u64, buffer: usize) -> (Self, mpsc::Receiver<ByteString>, mpsc::Receiver<Kill>) {
        let (tx, rx) = mpsc::channel(buffer);
        let (kill, kill_rx) = mpsc::channel(1);
        (Self { id, tx, kill }, rx, kill_rx)
    }

    /// Queues a frame without waiting. A full queue means the client is not keeping up: rather
    /// than grow memory without bound, the connection is closed; the client resyncs when it
    /// comes back.
    pub fn push(&self, frame: ByteString) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(frame) {
            let _ = self.kill.try_send(Kill::TooSlow);
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
        let (conn, mut out, mut kill) = ConnHandle::new(1, 2);
        conn.push("a".into());
        conn.push("b".into());
        assert!(kill.try_recv().is_err(), "room left: nothing to say");
        conn.push("c".into());
        assert_eq!(kill.try_recv().ok(), Some(Kill::TooSlow));
        // What was queued is still delivered in order; the frame that did not fit is dropped
        // (the client resyncs by seq when it reconnects).
        assert_eq!(out.recv().await.as_deref(), Some("a"));
        assert_eq!(out.recv().await.as_deref(), Some("b"));
        assert!(out.try_recv().is_err());
    }
}
