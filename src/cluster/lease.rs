//! Who runs each tenant's queue: PostgreSQL session advisory locks on the platform database.
//!
//! Why advisory locks rather than a lease in NATS key-value: the queue's decisions are only
//! worth anything if they can be stored, so tying ownership to the database session makes
//! "owns the queue" and "can reach the store" fail together. A lock lives exactly as long as
//! its session: when a node dies (even by SIGKILL) the kernel closes its socket, PostgreSQL
//! ends the session and the lock is free at once; there is no lease to wait out and no clock
//! to trust. A NATS outage does not move the queue either (it cannot be reached meanwhile,
//! but it is not duplicated).
//!
//! Each node keeps one dedicated connection for its locks and checks every tick which locks
//! that session still holds, so a node whose session broke learns it and stops its queues
//! within a tick.

use dashmap::DashSet;
use sea_orm::sqlx::{Connection, PgConnection, Row};
use tokio::sync::Mutex;

/// First key of every queue lock (`pg_try_advisory_lock(int4, int4)`); the second is the
/// tenant id. ASCII "kefu", so the locks are recognisable in `pg_locks`.
const LOCK_CLASS: i32 = 0x6b65_6675;

pub struct Leases {
    url: String,
    /// The session that holds the locks; `None` after it broke, until reconnected.
    conn: Mutex<Option<PgConnection>>,
    /// Tenants whose queue lock this node holds.
    held: DashSet<i64>,
}

impl Leases {
    pub async fn connect(url: &str) -> Result<Self, sea_orm::sqlx::Error> {
        let conn = PgConnection::connect(url).await?;
        Ok(Self {
            url: url.to_owned(),
            conn: Mutex::new(Some(conn)),
            held: DashSet::new(),
        })
    }

    /// Does this node hold the tenant's queue?
    pub fn holds(&self, tenant: i64) -> bool {
        self.held.contains(&tenant)
    }

    /// Tenants whose queue this node holds.
    pub fn held(&self) -> Vec<i64> {
        self.held.iter().map(|t| *t).collect()
    }

    /// Takes the tenant's queue if no node has it. True if this node holds it now.
    pub async fn try_acquire(&self, tenant: i64) -> bool {
        if self.holds(tenant) {
            return true;
        }
        let Ok(key) = i32::try_from(tenant) else {
            return false;
        };
        let mut guard = self.conn.lock().await;
        let Some(conn) = self.session(&mut guard).await else {
            return false;
        };
        let got = sea_orm::sqlx::query("SELECT pg_try_advisory_lock($1, $2)")
            .bind(LOCK_CLASS)
            .bind(key)
            .fetch_one(&mut *conn)
            .await
            .and_then(|row| row.try_get::<bool, _>(0));
        match got {
            Ok(true) => {
                self.held.insert(tenant);
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(error = %e, "lease session failed; reconnecting");
                *guard = None;
                false
            }
        }
    }

    /// Gives the tenant's queue up.
    pub async fn release(&self, tenant: i64) {
        if self.held.remove(&tenant).is_none() {
            return;
        }
        let Ok(key) = i32::try_from(tenant) else {
            return;
        };
        let mut guard = self.conn.lock().await;
        if let Some(conn) = guard.as_mut()
            && sea_orm::sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(LOCK_CLASS)
                .bind(key)
                .execute(&mut *conn)
                .await
                .is_err()
        {
            // The session is broken, which releases everything anyway.
            *guard = None;
        }
    }

    /// Checks which of the locks this node believes it holds its session really holds, and
    /// returns (and forgets) the ones lost.
    pub async fn verify(&self) -> Vec<i64> {
        let believed = self.held();
        if believed.is_empty() {
            return Vec::new();
        }
        let mut guard = self.conn.lock().await;
        let really: Option<Vec<i64>> = match guard.as_mut() {
            None => None,
            Some(conn) => sea_orm::sqlx::query(
                "SELECT objid::bigint FROM pg_locks WHERE locktype = 'advisory' \
                 AND pid = pg_backend_pid() AND classid = $1::bigint::oid AND objsubid = 2 \
                 AND granted",
            )
            .bind(i64::from(LOCK_CLASS))
            .fetch_all(&mut *conn)
            .await
            .ok()
            .map(|rows| rows.iter().filter_map(|r| r.try_get(0).ok()).collect()),
        };
        let really = match really {
            Some(r) => r,
            None => {
                *guard = None;
                Vec::new()
            }
        };
        let lost: Vec<i64> = believed
            .into_iter()
            .filter(|t| !really.contains(t))
            .collect();
        for t in &lost {
            self.held.remove(t);
        }
        lost
    }

    /// The lock session, reconnected if it broke.
    async fn session<'a>(
        &self,
        guard: &'a mut Option<PgConnection>,
    ) -> Option<&'a mut PgConnection> {
        if guard.is_none() {
            match PgConnection::connect(&self.url).await {
                Ok(c) => *guard = Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "lease session cannot reconnect");
                    return None;
                }
            }
        }
        guard.as_mut()
    }
}
