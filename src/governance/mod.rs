//! Service governance: what stops one tenant, visitor or script from hurting everyone else.
//!
//! - [`limits`]: token-bucket rate limits per tenant, per client IP and per account.

pub mod limits;

pub use limits::{Limit, Limits, Refusal};
