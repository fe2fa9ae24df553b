//! Service governance: what stops one tenant, visitor or script from hurting everyone else.
//!
//! - [`limits`]: token-bucket rate limits per tenant, per client IP and per account.
//! - [`breaker`]: circuit breakers around each dependency (tenant databases, NATS).
//! - [`bulkhead`]: bounded concurrency per tenant per dependency.
//!
//! Breakers and bulkheads live in [`Governance`], owned by the real-time core
//! ([`crate::actors::Realtime`]), the root of the supervisor tree, so that actors and HTTP
//! handlers consult the same ones.

pub mod breaker;
pub mod bulkhead;
pub mod limits;

pub use breaker::{BreakerOpen, Breakers, Dependency};
pub use bulkhead::{Bulkheads, Compartment, Full};
pub use limits::{Limit, Limits, Refusal};

use crate::settings::{BreakerSettings, BulkheadSettings};

/// The breakers and bulkheads of this node.
#[derive(Clone)]
pub struct Governance {
    pub breakers: Breakers,
    pub bulkheads: Bulkheads,
}

impl Governance {
    pub fn new(breakers: BreakerSettings, bulkheads: BulkheadSettings) -> Self {
        Self {
            breakers: Breakers::new(breakers),
            bulkheads: Bulkheads::new(bulkheads),
        }
    }
}
