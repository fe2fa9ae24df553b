//! The relay's optional log (`kefu-loadtest relay --store FILE`): every message written to a
//! SQLite file and committed before its ack and its delivery, the least a relay must do to
//! keep the promise Kefu makes ("persisted before delivery").
//!
//! The bare relay answers what the network and the WebSocket stack cost; this answers what
//! durable storage adds to them on the same machine, so that a ceiling of Kefu's can be read
//! against both (docs/benchmarks.md, "A relay that stores"). It does what Kefu's SQLite writer
//! does for a message and nothing more: one writer thread taking the queued messages in
//! batches, one `INSERT` each into a table shaped like Kefu's `messages` (its row id and the
//! unique index on `(conversation_id, seq)`), one commit per batch in WAL mode with
//! `synchronous = FULL`, and the WAL copied back by a thread of its own, rewound when long,
//! as Kefu's writer does. What it leaves out is Kefu's own work: seqs come from memory
//! instead of the conversation's row, and there are no tenants, senders' checks or
//! `client_msg_id` look-ups. The system message that opens an assignment (seq 1) is kept in
//! memory only, as in the bare relay: it is not on the path a scenario measures.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::{Connection, params};

/// Messages in one commit at most, as Kefu's SQLite writer.
const MAX_BATCH: usize = 256;

/// How often the checkpointer copies committed pages into the database file, as Kefu's.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// WAL frames past which the writer copies the rest itself so that its next transaction
/// starts the WAL from the top, as Kefu's (under sustained writes the checkpointer alone
/// never catches up, and the WAL would grow without end).
const WAL_REWIND_FRAMES: i64 = 32_768;

const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL,
        seq INTEGER NOT NULL,
        client_msg_id TEXT NOT NULL,
        sender_kind TEXT NOT NULL,
        sender_id INTEGER NOT NULL,
        content TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE UNIQUE INDEX IF NOT EXISTS uq_messages_seq ON messages (conversation_id, seq);
";

const INSERT: &str = "INSERT INTO messages \
     (id, conversation_id, seq, client_msg_id, sender_kind, sender_id, content, created_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)";

/// One message as stored.
pub struct Row {
    pub id: i64,
    pub conversation_id: i64,
    pub seq: i64,
    pub client_msg_id: String,
    pub sender_kind: &'static str,
    pub sender_id: i64,
    pub content: String,
    pub created_at: String,
}

/// A message waiting for its commit, and what to do once it is committed (ack, deliver).
struct Pending {
    row: Row,
    then: Box<dyn FnOnce() + Send>,
}

/// The handle to the writer thread; the thread ends when the last handle is dropped.
pub struct Store {
    queue: mpsc::Sender<Pending>,
}

impl Store {
    /// Opens (or creates) the log at `path` and starts its writer and checkpointer.
    pub fn open(path: &Path) -> Result<Self> {
        let db = open(path).with_context(|| format!("opening the relay's log {path:?}"))?;
        db.execute_batch(SCHEMA)
            .context("creating the relay's log")?;
        db.pragma_update(None, "wal_autocheckpoint", 0)?;
        let checkpointer = Connection::open(path)?;
        let rewind = Arc::new(AtomicBool::new(false));
        let (queue, rx) = mpsc::channel();
        let flag = rewind.clone();
        thread::Builder::new()
            .name("relay-writer".into())
            .spawn(move || write(db, &rx, &flag))?;
        let stop = Arc::downgrade(&rewind);
        thread::Builder::new()
            .name("relay-checkpoint".into())
            .spawn(move || {
                // Ends once the writer (the flag's other owner) has ended.
                while let Some(rewind) = stop.upgrade() {
                    if checkpoint(&checkpointer).is_some_and(|f| f >= WAL_REWIND_FRAMES) {
                        rewind.store(true, Ordering::Release);
                    }
                    drop(rewind);
                    thread::sleep(CHECKPOINT_EVERY);
                }
            })?;
        Ok(Self { queue })
    }

    /// Queues `row`; `then` runs on the writer's thread once it is committed, in the order
    /// rows were queued. If the writer has failed, nothing runs: the message is never acked.
    pub fn append(&self, row: Row, then: Box<dyn FnOnce() + Send>) {
        let _ = self.queue.send(Pending { row, then });
    }
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    db.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
    // A commit is on the disk once answered, as Kefu's.
    db.pragma_update(None, "synchronous", "FULL")?;
    Ok(db)
}

/// The writer: a batch per commit, then each message's follow-up, until every handle is gone
/// or a commit fails (then it stops, and what is queued is never acknowledged).
fn write(mut db: Connection, rx: &mpsc::Receiver<Pending>, rewind: &AtomicBool) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        batch.extend(rx.try_iter().take(MAX_BATCH - 1));
        if let Err(e) = commit(&mut db, &batch) {
            eprintln!("relay: the log's commit failed, nothing more is acknowledged: {e}");
            return;
        }
        for p in batch.drain(..) {
            (p.then)();
        }
        if rewind.swap(false, Ordering::AcqRel) {
            checkpoint(&db);
        }
    }
}

fn commit(db: &mut Connection, batch: &[Pending]) -> rusqlite::Result<()> {
    let txn = db.transaction()?;
    {
        let mut insert = txn.prepare_cached(INSERT)?;
        for Pending { row: r, .. } in batch {
            insert.execute(params![
                r.id,
                r.conversation_id,
                r.seq,
                r.client_msg_id,
                r.sender_kind,
                r.sender_id,
                r.content,
                r.created_at
            ])?;
        }
    }
    txn.commit()
}

/// A PASSIVE checkpoint (never waits for the writer); returns the frames in the WAL.
fn checkpoint(db: &Connection) -> Option<i64> {
    db.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_committed_before_their_follow_up_runs_in_queue_order() {
        let dir = std::env::temp_dir().join(format!("relay-store-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.db");
        let _ = std::fs::remove_file(&path);
        let store = Store::open(&path).unwrap();
        let (done_tx, done) = mpsc::channel();
        for seq in 1..=300 {
            let done_tx = done_tx.clone();
            let reader = path.clone();
            store.append(
                Row {
                    id: seq,
                    conversation_id: 7,
                    seq,
                    client_msg_id: format!("c{seq}"),
                    sender_kind: "visitor",
                    sender_id: 1,
                    content: r#"{"type":"text","text":"hi"}"#.into(),
                    created_at: "2026-11-29T00:00:00.000Z".into(),
                },
                Box::new(move || {
                    // Another connection sees the row by the time its follow-up runs.
                    let db = Connection::open(reader).unwrap();
                    let found: i64 = db
                        .query_row(
                            "SELECT count(*) FROM messages WHERE conversation_id = 7 AND seq = ?1",
                            [seq],
                            |r| r.get(0),
                        )
                        .unwrap();
                    done_tx.send((seq, found)).unwrap();
                }),
            );
        }
        let seen: Vec<(i64, i64)> = (0..300).map(|_| done.recv().unwrap()).collect();
        assert_eq!(seen, (1..=300).map(|s| (s, 1)).collect::<Vec<_>>());
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
