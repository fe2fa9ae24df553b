//! The per-tenant group-commit writer. Every append to a conversation log goes through it:
//! jobs that arrive while a transaction is being committed wait and then go into the next
//! transaction together, so one fsync covers many messages under load and throughput grows
//! with load, while every reply still means "committed".
//!
//! One writer per tenant also means one writer per SQLite file, which is what SQLite wants.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use sea_orm::{DatabaseConnection, TransactionSession};
use tokio::sync::{mpsc, oneshot, watch};

use crate::conversations::Participant;
use crate::conversations::log::{self, Change, NewMessage, WriteError, Written};

/// Most operations in one transaction: bounds how long one commit holds the write lock and
/// how much a failed commit takes down with it.
const MAX_BATCH: usize = 256;

/// Jobs waiting for a writer. A full queue makes callers wait (backpressure), not fail.
const QUEUE_DEPTH: usize = 4096;

/// A writer with nothing to do for this long ends, releasing its tenant's pool.
const IDLE_EXIT: Duration = Duration::from_secs(120);

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

struct Job {
    op: WriteOp,
    reply: oneshot::Sender<Result<Written, WriteError>>,
}

/// The writers of this process, one per tenant that wrote recently.
#[derive(Clone, Default)]
pub struct Writers {
    inner: Arc<DashMap<i64, Writer>>,
    /// Distinguishes a writer from its successor when an idle one removes itself.
    next_id: Arc<AtomicU64>,
}

#[derive(Clone)]
struct Writer {
    id: u64,
    tx: mpsc::Sender<Job>,
    /// Its sender lives in the writer task; `changed()` fails once the task has ended.
    done: watch::Receiver<()>,
}

impl Writers {
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
            match writer.tx.send(job).await {
                Ok(()) => return answer.await.map_err(|_| WriteError::Unavailable)?,
                Err(mpsc::error::SendError(back)) => {
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
        self.inner
            .entry(tenant_id)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
                let (done_tx, done) = watch::channel(());
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let map = self.inner.clone();
                let db = db.clone();
                tokio::spawn(async move {
                    run(tenant_id, id, db, rx, map).await;
                    drop(done_tx);
                });
                Writer { id, tx, done }
            })
            .clone()
    }
}

async fn run(
    tenant_id: i64,
    id: u64,
    db: DatabaseConnection,
    mut rx: mpsc::Receiver<Job>,
    map: Arc<DashMap<i64, Writer>>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let first = match tokio::time::timeout(IDLE_EXIT, rx.recv()).await {
            Ok(Some(job)) => job,
            Ok(None) => break,
            Err(_) => {
                // Idle: leave the map, then finish whatever raced in before leaving.
                map.remove_if(&tenant_id, |_, w| w.id == id);
                rx.close();
                match rx.recv().await {
                    Some(job) => job,
                    None => break,
                }
            }
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        write_batch(&db, &mut batch).await;
    }
    tracing::debug!(tenant_id, "conversation writer ended");
}

/// Runs a batch in one transaction and answers every job after the commit. Messages (one per
/// conversation: each conversation actor has one write in flight) are appended together;
/// changes and read positions follow one by one. Any storage error fails the whole batch and
/// nothing of it is acknowledged: the transaction rolls back, so no `seq` is left behind.
async fn write_batch(db: &DatabaseConnection, batch: &mut Vec<Job>) {
    // Another node may insert the same `client_msg_id` between this batch's re-send lookup
    // and its insert (cluster mode, PostgreSQL). The unique index refuses it and the batch
    // rolls back; run it again once, and the lookup then finds that copy and answers it as
    // a duplicate.
    let mut results = try_batch(db, batch).await;
    if let Err(e) = &results
        && matches!(
            e.sql_err(),
            Some(sea_orm::SqlErr::UniqueConstraintViolation(_))
        )
    {
        tracing::debug!("batch raced another writer on a client_msg_id; running it again");
        results = try_batch(db, batch).await;
    }
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

/// One attempt at a batch: every result, or the storage error that rolled it all back.
async fn try_batch(
    db: &DatabaseConnection,
    batch: &[Job],
) -> Result<Vec<Result<Written, WriteError>>, sea_orm::DbErr> {
    async {
        let txn = crate::storage::begin_write(db).await?;
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
        let mut ids: Vec<i64> = messages.iter().map(|(_, m)| m.conversation_id).collect();
        ids.sort_unstable();
        ids.dedup();
        // Distinct conversations go in one round; should one repeat, one at a time keeps
        // their order.
        let rounds: Vec<Vec<(usize, &NewMessage)>> = if ids.len() == messages.len() {
            vec![messages]
        } else {
            messages.into_iter().map(|m| vec![m]).collect()
        };
        for round in rounds {
            let msgs: Vec<&NewMessage> = round.iter().map(|(_, m)| *m).collect();
            for ((i, _), r) in round.iter().zip(log::append_many(&txn, &msgs).await?) {
                results[*i] = Some(r);
            }
        }
        for (i, job) in batch.iter().enumerate() {
            let result = match &job.op {
                WriteOp::Message(_) => continue,
                WriteOp::Change(c) => log::apply(&txn, c).await,
                WriteOp::Read {
                    conversation_id,
                    reader,
                    seq,
                } => log::set_read(&txn, *conversation_id, *reader, *seq).await,
            };
            if let Err(WriteError::Storage(e)) = result {
                return Err(e);
            }
            results[i] = Some(result);
        }
        TransactionSession::commit(txn).await?;
        Ok::<_, sea_orm::DbErr>(
            results
                .into_iter()
                .map(|r| r.unwrap_or(Err(WriteError::Unavailable)))
                .collect::<Vec<_>>(),
        )
    }
    .await
}
