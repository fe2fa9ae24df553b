//! Tenant connection pools: opened lazily, capped in number, closed when idle.
//!
//! A deployment may host thousands of tenants of which a few dozen are busy. Holding a pool
//! per tenant would hold file handles (SQLite) or server connections (PostgreSQL) for every
//! quiet one, so pools live here only while used: the least recently used is dropped when
//! more than `max_open` are open, and a sweeper drops those idle for `idle_secs`.
//!
//! Dropping a pool from the map never breaks a request that is using it: the request holds a
//! clone, and the pool closes when the last clone goes.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::OnceCell;
// tokio's Instant, so that tests with paused time see pools age.
use tokio::time::Instant;

use super::{StorageError, TenantDb};
use crate::settings::TenantPoolSettings;

/// One tenant's pool, or the promise of one while the first caller opens it.
struct Slot {
    /// Filled once; concurrent first requests wait for the same open instead of racing.
    conn: OnceCell<TenantDb>,
    /// Milliseconds since `TenantPools::epoch` of the last use, for LRU and idle eviction.
    last_used: AtomicU64,
}

#[derive(Clone)]
pub struct TenantPools {
    inner: Arc<Inner>,
}

struct Inner {
    slots: DashMap<String, Arc<Slot>>,
    settings: TenantPoolSettings,
    /// Reference point for `Slot::last_used`, so that a timestamp fits in an atomic.
    epoch: Instant,
}

impl TenantPools {
    pub fn new(settings: TenantPoolSettings) -> Self {
        let inner = Arc::new(Inner {
            slots: DashMap::new(),
            settings,
            epoch: Instant::now(),
        });
        // The sweeper holds only a weak reference, so it ends when the storage is dropped.
        let weak = Arc::downgrade(&inner);
        let idle = Duration::from_secs(inner.settings.idle_secs.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle / 4);
            loop {
                tick.tick().await;
                let Some(inner) = weak.upgrade() else { break };
                inner.evict_idle(idle);
            }
        });
        Self { inner }
    }

    pub fn settings(&self) -> &TenantPoolSettings {
        &self.inner.settings
    }

    pub fn len(&self) -> usize {
        self.inner.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.slots.is_empty()
    }

    /// Returns the pool for `db_name`, opening it with `open` on first use.
    pub async fn get<F, Fut>(&self, db_name: &str, open: F) -> Result<TenantDb, StorageError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<TenantDb, StorageError>>,
    {
        // Read lock first: this runs for every request and every write, and the slot is
        // almost always there already.
        let found = self.inner.slots.get(db_name).map(|s| s.clone());
        let slot = match found {
            Some(slot) => slot,
            None => self
                .inner
                .slots
                .entry(db_name.to_owned())
                .or_insert_with(|| {
                    Arc::new(Slot {
                        conn: OnceCell::new(),
                        last_used: AtomicU64::new(0),
                    })
                })
                .clone(),
        };
        slot.last_used.store(self.inner.now_ms(), Ordering::Relaxed);
        // `open` boxed: opening a tenant's database (connect, pragmas, migrations) is a future
        // of several KB, and inline it would make the future of every `get`, and of every
        // caller's, that size, copied whole each time one is moved or boxed: with
        // `Writers::write`'s rare path it made each message's write 13 KB to allocate and copy,
        // for a path taken once per tenant (docs/benchmarks.md, "A write's future").
        let conn = slot
            .conn
            .get_or_try_init(|| Box::pin(open()))
            .await?
            .clone();
        if self.inner.slots.len() > self.inner.settings.max_open {
            self.inner.evict_lru(db_name);
        }
        Ok(conn)
    }

    /// Forgets a tenant's pool (its database is about to be dropped).
    pub fn evict(&self, db_name: &str) {
        self.inner.slots.remove(db_name);
    }
}

impl Inner {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn evict_lru(&self, keep: &str) {
        while self.slots.len() > self.settings.max_open {
            let oldest = self
                .slots
                .iter()
                .filter(|e| e.key() != keep)
                .min_by_key(|e| e.value().last_used.load(Ordering::Relaxed))
                .map(|e| e.key().clone());
            match oldest {
                Some(name) => {
                    tracing::debug!(tenant_db = %name, "closing least recently used tenant pool");
                    self.slots.remove(&name);
                }
                None => break,
            }
        }
    }

    fn evict_idle(&self, idle: Duration) {
        let cutoff = self
            .now_ms()
            .saturating_sub(u64::try_from(idle.as_millis()).unwrap_or(u64::MAX));
        self.slots.retain(|name, slot| {
            let keep = slot.last_used.load(Ordering::Relaxed) >= cutoff;
            if !keep {
                tracing::debug!(tenant_db = %name, "closing idle tenant pool");
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(max_open: usize) -> TenantPoolSettings {
        TenantPoolSettings {
            max_open,
            idle_secs: 60,
            connections: 1,
        }
    }

    /// The pool bookkeeping is what is under test, not the database behind it.
    async fn open_memory() -> Result<TenantDb, StorageError> {
        Ok(TenantDb {
            conn: sea_orm::DatabaseConnection::default(),
            reader: None,
        })
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn least_recently_used_pool_is_closed_past_the_cap() {
        let pools = TenantPools::new(settings(2));
        pools.get("a", open_memory).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        pools.get("b", open_memory).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        pools.get("a", open_memory).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        pools.get("c", open_memory).await.unwrap();
        assert_eq!(pools.len(), 2);
        assert!(pools.inner.slots.contains_key("a"));
        assert!(pools.inner.slots.contains_key("c"));
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn idle_pools_are_swept() {
        let pools = TenantPools::new(settings(10));
        pools.get("a", open_memory).await.unwrap();
        assert_eq!(pools.len(), 1);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(pools.is_empty());
    }
}
