//! The per-tenant group-commit writer. Every append to a conversation log goes through it:
//! jobs that arrive while a transaction is being committed wait and then go into the next
//! transaction together, so one fsync covers many messages under load and throughput grows
//! with load, while every reply still means "committed".
//!
//! One writer per tenant also means one writer per SQLite file, which is what SQLite wants.
//!
//! Two kinds of writer, by backend:
//!
//! - SQLite: an OS thread of its own with its own synchronous connection (rusqlite on the same
//!   libsqlite3 as sqlx) that runs a whole batch — `BEGIN IMMEDIATE`, every append, `COMMIT` —
//!   without leaving the thread. Through sqlx every statement was a hand-off to sqlx's worker
//!   thread and back, and that chain of wake-ups, not SQLite, was what saturated a core.
//!   Messages go through this thread; the rare state changes and read positions keep the async
//!   path below on the tenant's pool (SQLite's write lock, with its busy timeout, orders the
//!   two connections, and each conversation has one write in flight, so their order per
//!   conversation holds). SQLite's automatic WAL checkpoint would run inside whichever commit
//!   crosses its threshold and hold every queued message behind the copy and its `fsync` (the
//!   benchmark's p99 tail); a [`Checkpointer`] thread does it beside the writer instead.
//!   Being the only thread that appends messages to its file, it also keeps the rule that a
//!   `client_msg_id` is stored once per conversation, from memory
//!   (`conversations::client_ids`), where PostgreSQL has a unique index.
//! - PostgreSQL: a task on the async runtime; the hand-offs are network round trips there
//!   anyway. It has a connection of its own, held outside any pool, that plans each
//!   statement once (`storage::writer_connection`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use sea_orm::{ConnectionTrait, DatabaseConnection, TransactionSession};
use tokio::sync::{oneshot, watch};

use super::HeldConnection;
use crate::conversations::Participant;
use crate::conversations::client_ids::ClientIds;
use crate::conversations::log::{self, Change, NewMessage, WriteError, Written};

/// Most operations in one transaction: bounds how long one commit holds the write lock and
/// how much a failed commit takes down with it.
const MAX_BATCH: usize = 256;

/// Jobs waiting for a writer. A full queue makes callers wait (backpressure), not fail.
const QUEUE_DEPTH: usize = 4096;

/// A writer with nothing to do for this long ends, releasing its tenant's pool (or its thread
/// and connection).
const IDLE_EXIT: Duration = Duration::from_secs(120);

/// An idle writer, once out of the map, still takes sends this long before it ends: a caller
/// that looked it up just before holds it for the microseconds until its send. A send later
/// still finds the queue gone (when it fails, the caller starts a new writer) or, in the
/// instant of the drop, is answered `Unavailable`: nothing stored, the client sends again.
const LATE_SEND_GRACE: Duration = Duration::from_secs(1);

/// How long the SQLite writer waits for the write lock (another connection of the same file
/// writing). As long as the pools wait: see `storage::SQLITE_BUSY_TIMEOUT`.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One operation on a conversation log.
#[derive(Clone, Debug)]
pub enum WriteOp {
    Message(NewMessage),
    Change(Change),
    Read {
        conversation_id: i64,
        reader: Participant,
        seq: i64,
    },
}

impl WriteOp {
    /// The conversation whose row this operation locks and writes.
    fn conversation_id(&self) -> i64 {
        match self {
            WriteOp::Message(m) => m.conversation_id,
            WriteOp::Change(c) => c.conversation_id(),
            WriteOp::Read {
                conversation_id, ..
            } => *conversation_id,
        }
    }
}

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<Written, WriteError>>,
}

/// The writers of this process, one per tenant that wrote recently.
#[derive(Clone)]
pub struct Writers {
    inner: Arc<DashMap<i64, Writer>>,
    /// Distinguishes a writer from its successor when an idle one removes itself.
    next_id: Arc<AtomicU64>,
    /// Per SQLite tenant, held by its writer thread for its whole life: a successor started
    /// while an idle writer still answers its last late sends waits for it to end. The
    /// writer's memory of stored ids (`conversations::client_ids`) is right only while no
    /// other writer appends to the same file.
    turns: Arc<DashMap<i64, Arc<std::sync::Mutex<()>>>>,
    /// Other nodes write the same databases (cluster mode): batches then lock their
    /// conversations in one order first (see [`lock_in_order`]). Alone, a tenant's batches run
    /// one after another and that extra round trip would buy nothing.
    shared: bool,
}

#[derive(Clone)]
struct Writer {
    id: u64,
    tx: flume::Sender<Job>,
    /// SQLite writers take messages only (see the module documentation).
    messages_only: bool,
    /// Its sender lives in the writer; `changed()` fails once the writer has ended.
    done: watch::Receiver<()>,
}

impl Writers {
    /// `shared`: other nodes write the same databases.
    pub fn new(shared: bool) -> Self {
        Self {
            inner: Arc::default(),
            next_id: Arc::default(),
            turns: Arc::default(),
            shared,
        }
    }

    /// Writes `op` for `tenant_id` into `db` and returns once it is committed.
    pub async fn write(
        &self,
        tenant_id: i64,
        db: &DatabaseConnection,
        op: WriteOp,
    ) -> Result<Written, WriteError> {
        let (reply, answer) = oneshot::channel();
        let mut job = Job { op, reply };
        // Two tries: the writer we found may have just ended because it was idle.
        for _ in 0..2 {
            let writer = self.writer(tenant_id, db);
            if writer.messages_only && !matches!(job.op, WriteOp::Message(_)) {
                // Boxed, as `storage::pools` boxes a tenant's opening: a SeaORM transaction's
                // future would otherwise size every write's, messages' included.
                return Box::pin(write_alone(db, &job.op)).await;
            }
            match writer.tx.send_async(job).await {
                Ok(()) => return answer.await.map_err(|_| WriteError::Unavailable)?,
                Err(flume::SendError(back)) => {
                    self.inner.remove_if(&tenant_id, |_, w| w.id == writer.id);
                    job = back;
                }
            }
        }
        Err(WriteError::Unavailable)
    }

    /// Ends every writer after its queue is written, and waits for that (shutdown: nothing
    /// accepted is dropped).
    pub async fn flush(&self) {
        let writers: Vec<Writer> = self.inner.iter().map(|e| e.value().clone()).collect();
        self.inner.clear();
        for w in writers {
            let Writer { tx, mut done, .. } = w;
            drop(tx);
            while done.changed().await.is_ok() {}
        }
    }

    fn writer(&self, tenant_id: i64, db: &DatabaseConnection) -> Writer {
        if let Some(w) = self.inner.get(&tenant_id) {
            return w.clone();
        }
        self.inner
            .entry(tenant_id)
            .or_insert_with(|| {
                let (tx, rx) = flume::bounded(QUEUE_DEPTH);
                let (done_tx, done) = watch::channel(());
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let map = self.inner.clone();
                let file = super::sqlite_file(db);
                let messages_only = file.is_some();
                match file {
                    Some(path) => {
                        let turn = self.turns.entry(tenant_id).or_default().clone();
                        let spawned = std::thread::Builder::new()
                            .name(format!("kefu-writer-{tenant_id}"))
                            .spawn(move || {
                                // A writer that panicked released its turn all the same.
                                let _turn = turn.lock().unwrap_or_else(|e| e.into_inner());
                                run_sqlite(tenant_id, id, &path, rx, map);
                                drop(done_tx);
                            });
                        // Without a thread the queue's receiver is gone: the first send fails,
                        // the caller drops this writer and tries once more, then reports the
                        // storage as unavailable.
                        if let Err(e) = spawned {
                            tracing::error!(error = %e, tenant_id, "could not start a writer thread");
                        }
                    }
                    None => {
                        let db = match super::writer_connection(db) {
                            Some(own) => Db::Held(Box::new(own)),
                            None => Db::Pool(db.clone()),
                        };
                        let shared = self.shared;
                        tokio::spawn(async move {
                            run(tenant_id, id, &db, rx, map, shared).await;
                            if let Db::Held(own) = &db {
                                // This writer's alone: closed now, not left to the server.
                                own.close().await;
                            }
                            drop(done_tx);
                        });
                    }
                }
                Writer {
                    id,
                    tx,
                    messages_only,
                    done,
                }
            })
            .clone()
    }
}

/// The file behind a SQLite pool, or `None` for PostgreSQL (or an in-memory SQLite database,
/// which a second connection would not see).
/// A change or read position on its own transaction on the pool (SQLite: beside the writer
/// thread, see the module documentation).
async fn write_alone(db: &DatabaseConnection, op: &WriteOp) -> Result<Written, WriteError> {
    let txn = crate::storage::begin_write(db).await?;
    let result = apply_state(&txn, op).await;
    // A refusal leaves nothing to keep; dropping the transaction rolls it back.
    if result.is_ok() {
        TransactionSession::commit(txn).await?;
    }
    result
}

/// A state change or read position inside `txn` (messages are appended in batches, never here).
async fn apply_state(
    txn: &impl sea_orm::ConnectionTrait,
    op: &WriteOp,
) -> Result<Written, WriteError> {
    match op {
        WriteOp::Change(c) => log::apply(txn, c).await,
        WriteOp::Read {
            conversation_id,
            reader,
            seq,
        } => log::set_read(txn, *conversation_id, *reader, *seq).await,
        WriteOp::Message(_) => Err(WriteError::Unavailable),
    }
}

/// The SQLite writer thread: batches of messages, each in one transaction on its own
/// connection.
fn run_sqlite(
    tenant_id: i64,
    id: u64,
    path: &std::path::Path,
    rx: flume::Receiver<Job>,
    map: Arc<DashMap<i64, Writer>>,
) {
    let mut db = match open_sqlite(path) {
        Ok(db) => db,
        Err(e) => {
            tracing::error!(error = %e, tenant_id, "could not open the writer's connection");
            // Leave the map so that the next write starts afresh; fail whatever is queued.
            map.remove_if(&tenant_id, |_, w| w.id == id);
            drop(rx.drain().collect::<Vec<_>>());
            return;
        }
    };
    // The WAL is copied back into the database file by a thread of its own, not inside
    // whichever commit crosses SQLite's automatic threshold: that commit, and every message
    // of the tenant queued behind it, would wait for the copy and its `fsync`.
    let checkpointer = Checkpointer::start(tenant_id, path, Rounds::DEFAULT);
    if checkpointer.is_some()
        && let Err(e) = db.pragma_update(None, "wal_autocheckpoint", 0)
    {
        tracing::warn!(error = %e, tenant_id, "automatic checkpoints stay on the writer");
    }
    let mut ids = ClientIds::default();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = match rx.recv_timeout(IDLE_EXIT) {
            Ok(job) => job,
            Err(flume::RecvTimeoutError::Disconnected) => break,
            Err(flume::RecvTimeoutError::Timeout) => {
                // Idle: leave the map, then write whatever raced in before leaving.
                map.remove_if(&tenant_id, |_, w| w.id == id);
                while let Ok(job) = rx.recv_timeout(LATE_SEND_GRACE) {
                    batch.push(job);
                    batch.extend(rx.try_iter().take(MAX_BATCH - 1));
                    write_batch_sqlite(&mut db, &mut ids, &mut batch);
                }
                break;
            }
        };
        batch.push(first);
        batch.extend(rx.try_iter().take(MAX_BATCH - 1));
        write_batch_sqlite(&mut db, &mut ids, &mut batch);
        if let Some(c) = &checkpointer {
            c.committed(&mut db, tenant_id);
        }
    }
    drop(checkpointer);
    tracing::debug!(tenant_id, "conversation writer ended");
}

/// How often the checkpointer copies what was committed into the database file. Each copy
/// ends with an `fsync` of that file, which the writer's own `fsync`s of the WAL queue behind
/// on the same disk; every two seconds rather than every 250 ms, a hot page is copied once
/// for many commits, and the steady benchmark's p99 fell by about a millisecond
/// (docs/benchmarks.md, "Steady").
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// Frames (pages of 4 KiB) in the WAL past which the writer is asked to rewind it. SQLite
/// starts the WAL again from the top only when a write transaction begins with everything in
/// it copied into the database file, and under sustained load the checkpointer never gets
/// there: the writer appends while it copies. The WAL then grows without end (5 GB in 50 s at
/// 13,000 msg/s), and every commit writes into freshly allocated file blocks, which the kernel
/// zeroes first: a quarter of the server's CPU at that rate (docs/benchmarks.md, "CPU per
/// message and the ramp ceiling"). A rewind holds the writer for a moment, so it should be
/// rare: at 4,000 msg/s the WAL passes 128 MiB every few seconds (it peaks near 260 MB, since
/// the checkpointer looks only every [`CHECKPOINT_EVERY`]).
const WAL_REWIND_FRAMES: i64 = 32_768;

/// When the checkpointer works and when it asks for a rewind.
#[derive(Clone, Copy)]
struct Rounds {
    every: Duration,
    rewind_frames: i64,
}

impl Rounds {
    const DEFAULT: Rounds = Rounds {
        every: CHECKPOINT_EVERY,
        rewind_frames: WAL_REWIND_FRAMES,
    };
}

/// A SQLite writer's companion thread: `PRAGMA wal_checkpoint(PASSIVE)` on a connection of its
/// own after commits, which runs beside the writer's next transactions instead of inside one.
/// It ends (after a last checkpoint) when dropped.
struct Checkpointer {
    /// Raised by the writer after each commit; the thread checkpoints only when raised.
    dirty: Arc<std::sync::atomic::AtomicBool>,
    /// Raised by the thread when the WAL is long: the writer then finishes the copy itself,
    /// between two transactions, so that its next one rewinds the WAL.
    rewind: Arc<std::sync::atomic::AtomicBool>,
    /// Dropping it wakes and ends the thread.
    stop: Option<flume::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Checkpointer {
    /// `None` when its connection or thread cannot be had: then SQLite's automatic
    /// checkpoints stay on.
    fn start(tenant_id: i64, path: &std::path::Path, rounds: Rounds) -> Option<Self> {
        let mut db = match open_sqlite(path) {
            Ok(db) => db,
            Err(e) => {
                tracing::warn!(error = %e, tenant_id, "no checkpointer connection");
                return None;
            }
        };
        let dirty = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let rewind = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop, stopped) = flume::bounded::<()>(0);
        let (flag, long) = (dirty.clone(), rewind.clone());
        let thread = std::thread::Builder::new()
            .name(format!("kefu-checkpoint-{tenant_id}"))
            .spawn(move || {
                loop {
                    let last = !matches!(
                        stopped.recv_timeout(rounds.every),
                        Err(flume::RecvTimeoutError::Timeout)
                    );
                    if (flag.swap(false, Ordering::AcqRel) || last)
                        && checkpoint(&mut db, tenant_id).is_some_and(|f| f >= rounds.rewind_frames)
                    {
                        // Once more first, for what came in during that copy of a long WAL,
                        // so that little is left for the writer to wait on.
                        checkpoint(&mut db, tenant_id);
                        long.store(true, Ordering::Release);
                    }
                    if last {
                        break;
                    }
                }
            });
        match thread {
            Ok(thread) => Some(Self {
                dirty,
                rewind,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Err(e) => {
                tracing::warn!(error = %e, tenant_id, "no checkpointer thread");
                None
            }
        }
    }

    /// Called by the writer after each commit, on its own connection: marks the WAL for the
    /// next round and, when the thread found it long, copies what is left of it. That copy
    /// is the little committed since the thread's own, and with nothing being appended
    /// meanwhile it completes, so the writer's next transaction starts the WAL from the top
    /// (unless a reader still reads an old snapshot from it; then the next request does).
    fn committed(&self, writer: &mut rusqlite::Connection, tenant_id: i64) {
        self.dirty.store(true, Ordering::Release);
        if self.rewind.swap(false, Ordering::AcqRel) {
            checkpoint(writer, tenant_id);
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Disconnects the channel: the thread does a last checkpoint and ends.
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A PASSIVE checkpoint never waits for the writer or readers: it copies what it can now.
/// Returns the frames in the WAL.
fn checkpoint(db: &mut rusqlite::Connection, tenant_id: i64) -> Option<i64> {
    // Columns: blocked (always 0 for PASSIVE), frames in the WAL, frames copied.
    match db.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1)) {
        Ok(frames) => Some(frames),
        Err(e) => {
            tracing::warn!(error = %e, tenant_id, "WAL checkpoint failed; the next one retries");
            None
        }
    }
}

fn open_sqlite(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    use rusqlite::OpenFlags;
    // The file exists (the tenant was onboarded): never create one here.
    let db = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    db.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    // The pools' settings (storage::connect): a commit is durable once answered.
    db.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
    db.pragma_update(None, "synchronous", "FULL")?;
    db.pragma_update(None, "foreign_keys", true)?;
    db.set_prepared_statement_cache_capacity(log::sync::STATEMENT_CACHE);
    Ok(db)
}

/// One transaction for the whole batch, answered after the commit. Any storage error fails
/// the batch and nothing of it is acknowledged: the transaction rolls back (dropped
/// uncommitted), so no `seq` is left behind.
fn write_batch_sqlite(db: &mut rusqlite::Connection, ids: &mut ClientIds, batch: &mut Vec<Job>) {
    let results = (|| {
        let txn = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now = chrono::Utc::now();
        let mut results = Vec::with_capacity(batch.len());
        for job in batch.iter() {
            results.push(match &job.op {
                WriteOp::Message(m) => log::sync::append(&txn, ids, m, now)?,
                // `Writers::write` never queues these here.
                WriteOp::Change(_) | WriteOp::Read { .. } => Err(WriteError::Unavailable),
            });
        }
        txn.commit()?;
        Ok::<_, rusqlite::Error>(results)
    })();
    if results.is_err() {
        // Rolled back: the ids recorded in it were not stored after all.
        ids.forget_all();
    }
    answer(batch, results);
}

/// Answers every job of a batch after its transaction: each its own result, or, when the
/// batch failed, all of them "unavailable" (nothing of it was stored).
fn answer<E: std::fmt::Display>(
    batch: &mut Vec<Job>,
    results: Result<Vec<Result<Written, WriteError>>, E>,
) {
    match results {
        Ok(results) => {
            for (job, result) in batch.drain(..).zip(results) {
                let _ = job.reply.send(result);
            }
        }
        Err(e) => {
            tracing::error!(error = %e, jobs = batch.len(), "conversation write failed; nothing acknowledged");
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(WriteError::Unavailable));
            }
        }
    }
}

/// What the async writer writes through.
enum Db {
    /// PostgreSQL: the writer's own connection (`storage::writer_connection`).
    Held(Box<HeldConnection>),
    /// An in-memory SQLite database, which only its pool's connection sees.
    Pool(DatabaseConnection),
}

async fn run(
    tenant_id: i64,
    id: u64,
    db: &Db,
    rx: flume::Receiver<Job>,
    map: Arc<DashMap<i64, Writer>>,
    shared: bool,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = match tokio::time::timeout(IDLE_EXIT, rx.recv_async()).await {
            Ok(Ok(job)) => job,
            Ok(Err(flume::RecvError::Disconnected)) => break,
            Err(_) => {
                // Idle: leave the map, then write whatever raced in before leaving.
                map.remove_if(&tenant_id, |_, w| w.id == id);
                while let Ok(Ok(job)) = tokio::time::timeout(LATE_SEND_GRACE, rx.recv_async()).await
                {
                    batch.push(job);
                    batch.extend(rx.try_iter().take(MAX_BATCH - 1));
                    write_batch(db, &mut batch, shared).await;
                }
                break;
            }
        };
        batch.push(first);
        batch.extend(rx.try_iter().take(MAX_BATCH - 1));
        write_batch(db, &mut batch, shared).await;
    }
    tracing::debug!(tenant_id, "conversation writer ended");
}

/// Runs a batch in one transaction and answers every job after the commit. Messages (one per
/// conversation: each conversation actor has one write in flight) are appended together;
/// changes and read positions follow one by one. Any storage error fails the whole batch and
/// nothing of it is acknowledged: the transaction rolls back, so no `seq` is left behind.
async fn write_batch(db: &Db, batch: &mut Vec<Job>, shared: bool) {
    // Another node may insert the same `client_msg_id` between this batch's re-send lookup
    // and its insert (cluster mode, PostgreSQL). The unique index refuses it and the batch
    // rolls back; run it again once, and the lookup then finds that copy and answers it as
    // a duplicate.
    let mut results = try_batch(db, batch, shared).await;
    if let Err(e) = &results
        && matches!(
            e.sql_err(),
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
        )
    {
        tracing::debug!("batch raced another writer on a client_msg_id; running it again");
        results = try_batch(db, batch, shared).await;
    }
    answer(batch, results);
}

/// One attempt at a batch: every result, or the storage error that rolled it all back.
async fn try_batch(
    db: &Db,
    batch: &[Job],
    shared: bool,
) -> Result<Vec<Result<Written, WriteError>>, sea_orm::DbErr> {
    // The usual batch, messages of distinct conversations, is one statement that commits on
    // its own (see `log::append_many`): no transaction to open and close around it.
    let messages: Option<Vec<&NewMessage>> = batch
        .iter()
        .map(|job| match &job.op {
            WriteOp::Message(m) => Some(m),
            _ => None,
        })
        .collect();
    if let Some(msgs) = messages
        && distinct(msgs.iter().map(|m| m.conversation_id))
    {
        return match db {
            Db::Held(c) => log::append_many(c.as_ref(), &msgs).await,
            Db::Pool(c) => log::append_many(c, &msgs).await,
        };
    }
    match db {
        Db::Held(c) => {
            let c = c.as_ref();
            c.execute_unprepared("BEGIN").await?;
            match batch_in_transaction(c, batch, shared).await {
                Ok(results) => {
                    c.execute_unprepared("COMMIT").await?;
                    Ok(results)
                }
                Err(e) => {
                    // A failed statement leaves the transaction aborted: end it before the
                    // next batch.
                    c.rollback().await;
                    Err(e)
                }
            }
        }
        Db::Pool(c) => {
            let txn = crate::storage::begin_write(c).await?;
            let results = batch_in_transaction(&txn, batch, shared).await?;
            TransactionSession::commit(txn).await?;
            Ok(results)
        }
    }
}

/// A batch that is not only messages of distinct conversations, inside a transaction the
/// caller opened and ends.
async fn batch_in_transaction(
    txn: &impl sea_orm::ConnectionTrait,
    batch: &[Job],
    shared: bool,
) -> Result<Vec<Result<Written, WriteError>>, sea_orm::DbErr> {
    if shared {
        lock_in_order(txn, batch).await?;
    }
    let mut results: Vec<Option<Result<Written, WriteError>>> =
        batch.iter().map(|_| None).collect();
    let messages: Vec<(usize, &NewMessage)> = batch
        .iter()
        .enumerate()
        .filter_map(|(i, job)| match &job.op {
            WriteOp::Message(m) => Some((i, m)),
            _ => None,
        })
        .collect();
    // Distinct conversations go in one round; should one repeat, one at a time keeps
    // their order.
    let rounds: Vec<Vec<(usize, &NewMessage)>> =
        if distinct(messages.iter().map(|(_, m)| m.conversation_id)) {
            vec![messages]
        } else {
            messages.into_iter().map(|m| vec![m]).collect()
        };
    for round in rounds {
        let msgs: Vec<&NewMessage> = round.iter().map(|(_, m)| *m).collect();
        for ((i, _), r) in round.iter().zip(log::append_many(txn, &msgs).await?) {
            results[*i] = Some(r);
        }
    }
    for (i, job) in batch.iter().enumerate() {
        if matches!(job.op, WriteOp::Message(_)) {
            continue;
        }
        let result = apply_state(txn, &job.op).await;
        if let Err(WriteError::Storage(e)) = result {
            return Err(e);
        }
        results[i] = Some(result);
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or(Err(WriteError::Unavailable)))
        .collect())
}

/// Are these conversation ids all different?
fn distinct(ids: impl Iterator<Item = i64>) -> bool {
    let mut ids: Vec<i64> = ids.collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    ids.len() == n
}

/// Locks the rows of every conversation the batch writes, in id order, before any statement
/// writes one. In cluster mode two nodes' batches often share conversations (a visitor on one
/// node, its agent on the other); locks taken statement by statement follow each statement's
/// plan (a bitmap scan locks in the table's physical order, an index scan in id order, and the
/// state changes one row at a time), so two batches could take the same two rows in opposite
/// orders and deadlock. In one order, a batch waits for the other and never the other way round.
async fn lock_in_order(
    txn: &impl sea_orm::ConnectionTrait,
    batch: &[Job],
) -> Result<(), sea_orm::DbErr> {
    use entity::tenant::conversation::{Column, Entity};
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
    let mut ids: Vec<i64> = batch.iter().map(|job| job.op.conversation_id()).collect();
    ids.sort_unstable();
    ids.dedup();
    Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::Id.is_in(ids))
        .order_by_asc(Column::Id)
        .lock_exclusive()
        .into_tuple::<i64>()
        .all(txn)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future `f` returns, without running it.
    fn future_size<A, R: std::future::Future, F: Fn(A) -> R>(_: &F) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every message awaits these two inside its conversation actor's boxed write; a rare path
    /// inlined into them (a tenant's opening, a SeaORM transaction) once made that 13 KB per
    /// message to allocate and copy.
    #[test]
    fn a_writes_futures_stay_small() {
        fn tenant_db(s: &'static crate::storage::Storage) -> impl Future + 'static {
            s.tenant_db("t")
        }
        fn write(w: &'static (Writers, DatabaseConnection, WriteOp)) -> impl Future + 'static {
            w.0.write(1, &w.1, w.2.clone())
        }
        let (open, append) = (future_size(&tenant_db), future_size(&write));
        assert!(open <= 1024, "Storage::tenant_db's future is {open} bytes");
        assert!(append <= 1024, "Writers::write's future is {append} bytes");
    }

    /// Rows the database file holds by itself, the WAL ignored (`immutable=1`).
    fn rows_in_main_file(path: &std::path::Path) -> i64 {
        let uri = format!("file:{}?immutable=1", path.display());
        let db = rusqlite::Connection::open_with_flags(
            uri,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_URI,
        )
        .expect("open read-only");
        db.query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap_or(0)
    }

    /// A tenant file in WAL mode with one table `t (x)`, and a writer connection to it set up
    /// as the server's (automatic checkpoints off).
    fn tenant_file_and_writer() -> (tempfile::TempDir, std::path::PathBuf, rusqlite::Connection) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("tenant.db");
        let setup = rusqlite::Connection::open(&path).expect("create");
        setup
            .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE t (x);")
            .expect("schema");
        drop(setup);
        let writer = open_sqlite(&path).expect("writer connection");
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .expect("no automatic checkpoints");
        (dir, path, writer)
    }

    #[test]
    fn the_checkpointer_copies_commits_into_the_database_file() {
        let (_dir, path, mut writer) = tenant_file_and_writer();
        let checkpointer = Checkpointer::start(1, &path, Rounds::DEFAULT).expect("checkpointer");
        let before = rows_in_main_file(&path);
        let txn = writer.transaction().expect("begin");
        for x in 0..100 {
            txn.execute("INSERT INTO t VALUES (?1)", [x])
                .expect("insert");
        }
        txn.commit().expect("commit");
        checkpointer.committed(&mut writer, 1);

        // Only the checkpointer moves the rows from the WAL into the file (the writer's own
        // checkpoints are off): wait for it, boundedly.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while rows_in_main_file(&path) < 100 {
            assert!(std::time::Instant::now() < deadline, "never checkpointed");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(before, 0);
        drop(checkpointer);
    }

    #[test]
    fn the_wal_is_rewound_while_the_writer_keeps_appending() {
        let (dir, path, mut writer) = tenant_file_and_writer();
        // Rounds far more often, and a far lower threshold, than the server's, so that this
        // small test crosses it many times.
        let rounds = Rounds {
            every: Duration::from_millis(5),
            rewind_frames: 64,
        };
        let checkpointer = Checkpointer::start(1, &path, rounds).expect("checkpointer");
        // Back-to-back transactions of about three pages each, some 50 MiB of WAL frames in
        // all: the thread's checkpoints alone never find the WAL fully copied when one of
        // them begins, so without the rewind the WAL would hold all of it.
        let blob = vec![7u8; 6000];
        for _ in 0..4000 {
            let txn = writer.transaction().expect("begin");
            txn.execute("INSERT INTO t VALUES (?1)", [&blob])
                .expect("insert");
            txn.commit().expect("commit");
            checkpointer.committed(&mut writer, 1);
        }
        let wal = std::fs::metadata(dir.path().join("tenant.db-wal"))
            .expect("the WAL")
            .len();
        assert!(wal < 16 << 20, "the WAL grew to {wal} bytes");
        drop(checkpointer);
    }
}
