//! SeaORM entities, split by the database they live in.
//!
//! - [`platform`]: the single platform database shared by the whole deployment.
//! - [`tenant`]: the schema every tenant's own database has. Nothing in a tenant database names
//!   its tenant: isolation comes from which database the row is in, not from a column.

pub mod platform;
pub mod tenant;
