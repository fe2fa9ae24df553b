//! A PostgreSQL connection that one owner holds for its whole life, outside any pool: each
//! tenant's writer on a node (`storage::writer`) runs its statements on one.
//!
//! Why not a pool of one: sqlx's pool sends the server a `Sync` and waits for its answer each
//! time a connection is taken (`test_before_acquire`) and again, always, each time it is
//! given back. Around a writer's one statement per batch that was two more round trips to
//! PostgreSQL, both on the batch's path (the next batch waits for the connection to come
//! back), and about a tenth of a node's CPU in a pair of nodes at 4,000 msg/s
//! (docs/benchmarks.md, "Cross-node"). A held connection runs the statement and nothing else.
//!
//! It implements sea-orm's [`ConnectionTrait`], binding values as sea-orm binds them, so the
//! writer's statements are the same code on it as on a pool. Transactions are the owner's:
//! `BEGIN`, statements, `COMMIT` or `ROLLBACK` through [`ConnectionTrait::execute_unprepared`].

use std::sync::Arc;

use sea_orm::sqlx::postgres::{PgConnectOptions, PgConnection};
use sea_orm::sqlx::{self, ConnectOptions, Connection, Executor};
use sea_orm::{
    ConnAcquireErr, ConnectionTrait, DbBackend, DbErr, ExecResult, QueryResult, RuntimeErr,
    Statement, Values,
};
use sea_query_sqlx::SqlxValues;
use tokio::sync::{Mutex, MutexGuard};

pub struct HeldConnection {
    /// How to connect, and to connect again after a failure broke the connection.
    options: PgConnectOptions,
    /// The connection once made: `None` before the first statement, and after an error that
    /// may have left it unusable (the next statement connects afresh). The lock is never
    /// contended (one owner); it makes `&self` methods possible, as the trait wants.
    conn: Mutex<Option<PgConnection>>,
}

impl HeldConnection {
    /// Connects lazily, on the first statement.
    pub fn new(options: PgConnectOptions) -> Self {
        Self {
            options,
            conn: Mutex::new(None),
        }
    }

    /// The connection, made first if there is none.
    async fn connection(&self) -> Result<MutexGuard<'_, Option<PgConnection>>, DbErr> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            // As long as a pool's caller would wait for a connection.
            let conn = tokio::time::timeout(super::ACQUIRE_TIMEOUT, self.options.connect())
                .await
                .map_err(|_| DbErr::ConnectionAcquire(ConnAcquireErr::Timeout))?
                .map_err(|e| DbErr::Conn(RuntimeErr::SqlxError(Arc::new(e))))?;
            *guard = Some(conn);
        }
        Ok(guard)
    }

    /// Ends the transaction open on the connection without keeping it. A connection that
    /// broke had its transaction ended by the server, and is not made again for this.
    pub async fn rollback(&self) {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_mut()
            && c.execute("ROLLBACK").await.is_err()
        {
            *guard = None;
        }
    }

    /// Closes the connection (the owner is done with it).
    pub async fn close(&self) {
        if let Some(conn) = self.conn.lock().await.take() {
            let _ = conn.close().await;
        }
    }
}

/// Runs `$body` on the held connection (bound to `$c`), keeping the connection unless the
/// error may have broken it: an error the server reported leaves it usable, anything else
/// (I/O, protocol, a decode that stopped mid-stream) and it is dropped.
macro_rules! on_connection {
    ($self:ident, $c:ident => $body:expr, $err:path) => {{
        let mut guard = $self.connection().await?;
        // `connection` just filled it.
        let $c = guard.as_mut().expect("connected");
        match $body.await {
            Ok(v) => Ok(v),
            Err(e) => {
                if !matches!(e, sqlx::Error::Database(_)) {
                    *guard = None;
                }
                Err($err(RuntimeErr::SqlxError(Arc::new(e))))
            }
        }
    }};
}

/// The statement with its values bound as sea-orm binds them.
fn query(stmt: &Statement) -> sqlx::query::Query<'_, sqlx::Postgres, SqlxValues> {
    let values = stmt.values.clone().unwrap_or(Values(Vec::new()));
    sqlx::query_with(sqlx::AssertSqlSafe(stmt.sql.as_str()), SqlxValues(values))
}

#[async_trait::async_trait]
impl ConnectionTrait for HeldConnection {
    fn get_database_backend(&self) -> DbBackend {
        DbBackend::Postgres
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        on_connection!(self, c => query(&stmt).execute(&mut *c), DbErr::Exec).map(Into::into)
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        on_connection!(self, c => c.execute(sqlx::AssertSqlSafe(sql.to_owned())), DbErr::Exec)
            .map(Into::into)
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        on_connection!(self, c => query(&stmt).fetch_optional(&mut *c), DbErr::Query)
            .map(|row| row.map(Into::into))
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        on_connection!(self, c => query(&stmt).fetch_all(&mut *c), DbErr::Query)
            .map(|rows| rows.into_iter().map(Into::into).collect())
    }
}
