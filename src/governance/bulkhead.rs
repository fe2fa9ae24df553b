//! Bulkheads: bounded concurrency per tenant per dependency. A tenant whose database is slow
//! or locked fills its own compartment and is refused fast (`overloaded`) past it, instead of
//! piling up requests, memory and connections that other tenants need.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::settings::BulkheadSettings;

/// Which compartment of a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Compartment {
    /// HTTP requests that use the tenant's database.
    TenantDbRequests,
    /// Writes to the tenant's conversation logs in flight.
    TenantDbWrites,
}

impl Compartment {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TenantDbRequests => "tenant_db_requests",
            Self::TenantDbWrites => "tenant_db_writes",
        }
    }
}

/// A call refused because its compartment is full.
#[derive(Debug, thiserror::Error)]
#[error("too much of this tenant's work is already waiting on its database; retry shortly")]
pub struct Full {
    pub compartment: Compartment,
}

/// The compartments of this node.
#[derive(Clone)]
pub struct Bulkheads {
    settings: BulkheadSettings,
    map: Arc<DashMap<(Compartment, i64), Arc<Semaphore>>>,
    /// Refusals so far, per compartment (for `/metrics`).
    rejected: Arc<DashMap<Compartment, AtomicU64>>,
}

impl Bulkheads {
    pub fn new(settings: BulkheadSettings) -> Self {
        Self {
            settings,
            map: Arc::new(DashMap::new()),
            rejected: Arc::new(DashMap::new()),
        }
    }

    fn size(&self, c: Compartment) -> usize {
        let n = match c {
            Compartment::TenantDbRequests => self.settings.tenant_db_requests,
            Compartment::TenantDbWrites => self.settings.tenant_db_writes,
        };
        n as usize
    }

    /// Takes a place in the tenant's compartment, or is refused at once when it is full. The
    /// place is given back when the permit is dropped.
    pub fn enter(&self, c: Compartment, tenant_id: i64) -> Result<OwnedSemaphorePermit, Full> {
        // Read lock first: every write and tenant request passes here.
        let sem = match self.map.get(&(c, tenant_id)) {
            Some(sem) => sem.clone(),
            None => self
                .map
                .entry((c, tenant_id))
                .or_insert_with(|| Arc::new(Semaphore::new(self.size(c))))
                .clone(),
        };
        sem.try_acquire_owned().map_err(|_| {
            self.rejected
                .entry(c)
                .or_insert_with(|| AtomicU64::new(0))
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                compartment = c.as_str(),
                tenant_id,
                "bulkhead full; refused"
            );
            Full { compartment: c }
        })
    }

    /// Refusals so far, per compartment.
    pub fn rejected(&self) -> Vec<(Compartment, u64)> {
        self.rejected
            .iter()
            .map(|e| (*e.key(), e.value().load(Ordering::Relaxed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_compartment_refuses_and_frees_on_drop() {
        let b = Bulkheads::new(BulkheadSettings {
            tenant_db_requests: 2,
            tenant_db_writes: 1,
        });
        let one = b.enter(Compartment::TenantDbRequests, 1).unwrap();
        let _two = b.enter(Compartment::TenantDbRequests, 1).unwrap();
        assert!(b.enter(Compartment::TenantDbRequests, 1).is_err());
        // Another tenant's compartment is its own.
        let _other = b.enter(Compartment::TenantDbRequests, 2).unwrap();
        drop(one);
        let _again = b.enter(Compartment::TenantDbRequests, 1).unwrap();
        assert_eq!(b.rejected(), vec![(Compartment::TenantDbRequests, 1)]);
    }
}
