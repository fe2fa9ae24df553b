//! Reads that run on the caller's thread (SQLite tenants only).
//!
//! sqlx runs every SQLite connection on a thread of its own, so each query through the pool is
//! a hand-off to that thread and a wake-up back: two context switches and two futex calls,
//! where an indexed lookup in SQLite itself takes microseconds. On the path that opens a
//! visitor's socket that hand-off was more than half of the server's CPU per connection
//! (docs/benchmarks.md, "Idle connections"). The few reads on such paths run here instead, on a
//! connection of the same file that the calling thread uses directly: the sockets' opening
//! reads, and the conversation and page of messages that every long-poll, `sync` and history
//! request reads (docs/benchmarks.md, "Long-poll"). A page holds at most
//! `conversations::store::MAX_PAGE` messages, so no read holds the thread for long.
//!
//! Blocking the async thread for them is safe because a read in WAL mode never waits for the
//! writer: it sees the last commit and takes no lock a writer holds. The one wait left is
//! SQLite's own recovery of a WAL after a crash, bounded by [`READ_BUSY_TIMEOUT`]; a read that
//! fails for any reason is answered by the caller's async path instead (see
//! `conversations::store`), so this is a shortcut, never a second source of truth.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// Idle read connections kept per tenant: one per async worker thread of a small machine,
/// each a file handle and SQLite's page cache. More are opened when more threads read at
/// once and closed after their read.
const IDLE_READERS: usize = 4;

/// Longest a read waits for a lock (only WAL recovery takes one a reader must wait for). Short,
/// because it would hold an async thread; past it the caller's async path answers.
const READ_BUSY_TIMEOUT: Duration = Duration::from_millis(100);

/// Statements each read connection keeps prepared (the sockets' opening queries, a conversation
/// by id and a page of its messages, with room to spare).
const STATEMENT_CACHE: usize = 8;

/// A tenant file's read connections, shared by the threads that read it.
#[derive(Debug)]
pub struct SqliteReader {
    /// The tenant's database file, as its pool opened it.
    path: PathBuf,
    /// Connections between reads; a read takes one (or opens one) and puts it back.
    idle: Mutex<Vec<Connection>>,
}

impl SqliteReader {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `read` here when there is a reader; `None` tells the caller to ask its pool
    /// instead (no reader for this backend, or the read failed, which is logged).
    pub fn read_or_defer<R>(
        reader: Option<&Self>,
        read: impl FnOnce(&Connection) -> rusqlite::Result<R>,
    ) -> Option<R> {
        match reader?.read(read) {
            Ok(found) => Some(found),
            Err(e) => {
                tracing::warn!(error = %e, "read on the caller's thread failed; asking the pool");
                None
            }
        }
    }

    /// Runs `read` on a connection of this file, on the calling thread.
    pub fn read<R>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<R>,
    ) -> rusqlite::Result<R> {
        // A panic inside `read` cannot leave the list half-changed: it is only pushed and popped.
        let pooled = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open(&self.path)?,
        };
        let result = read(&conn);
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < IDLE_READERS {
            idle.push(conn);
        }
        result
    }
}

fn open(path: &Path) -> rusqlite::Result<Connection> {
    // Read-write without create rather than read-only: a read-only connection cannot open a
    // WAL file whose shared-memory index is missing (every other connection closed), and the
    // file exists (the tenant was onboarded). `query_only` keeps it to reads.
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    db.busy_timeout(READ_BUSY_TIMEOUT)?;
    db.pragma_update(None, "query_only", true)?;
    db.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(db)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with_a_row() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.db");
        let db = Connection::open(&path).expect("create");
        db.pragma_update(None, "journal_mode", "WAL").expect("wal");
        db.execute_batch("CREATE TABLE t (x INTEGER); INSERT INTO t VALUES (7);")
            .expect("table");
        (dir, path)
    }

    #[test]
    fn reads_see_the_file_and_cannot_write_it() {
        let (_dir, path) = file_with_a_row();
        let reader = SqliteReader::new(path);
        let x: i64 = reader
            .read(|db| db.query_row("SELECT x FROM t", [], |r| r.get(0)))
            .expect("read");
        assert_eq!(x, 7);
        let write = reader.read(|db| db.execute("INSERT INTO t VALUES (8)", []));
        assert!(write.is_err(), "a read connection must refuse writes");
    }

    #[test]
    fn connections_are_reused_up_to_the_idle_cap() {
        let (_dir, path) = file_with_a_row();
        let reader = SqliteReader::new(path);
        // Nested reads hold several connections at once, as threads reading together do.
        fn nest(reader: &SqliteReader, depth: usize) -> rusqlite::Result<()> {
            if depth == 0 {
                return Ok(());
            }
            reader.read(|_| nest(reader, depth - 1))
        }
        nest(&reader, IDLE_READERS + 2).expect("reads");
        assert_eq!(reader.idle.lock().expect("lock").len(), IDLE_READERS);
    }

    #[test]
    fn a_missing_file_is_an_error_not_a_new_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gone.db");
        let reader = SqliteReader::new(path.clone());
        assert!(reader.read(|_| Ok(())).is_err());
        assert!(!path.exists());
    }

    /// Built with `SQLITE_ENABLE_QPSG` (.cargo/config.toml): without it, a statement with a
    /// bound `LIMIT` (every SeaORM `.one()`) is parsed and planned again on every run, because
    /// SQLite plans such a limit by the value bound.
    #[test]
    fn sqlite_plans_do_not_depend_on_bound_values() {
        let db = Connection::open_in_memory().expect("memory");
        let qpsg = db
            .db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG)
            .expect("db_config");
        assert!(
            qpsg,
            "libsqlite3 was built without SQLITE_ENABLE_QPSG: is .cargo/config.toml's \
             LIBSQLITE3_FLAGS overridden?"
        );
    }
}
