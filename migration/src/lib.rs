//! Schema migrations for Kefu's two kinds of database.
//!
//! - [`PlatformMigrator`]: the one platform database (tenants, their domains, generated secrets).
//! - [`TenantMigrator`]: every tenant's own database (agents, teams, and later conversations).
//!
//! - tenant migration 2 adds visitors, conversations, messages and read positions.
//! - tenant migration 3 drops, on SQLite only, the unique index on a message's
//!   `client_msg_id`, a rule the server's SQLite writer keeps itself.
//!
//! Both are versioned by sea-orm-migration's `seaql_migrations` table inside their own database,
//! so running them again is a no-op and a tenant created by an older release is brought up to
//! date at the next start.

pub use sea_orm_migration::prelude::*;

mod platform;
mod tenant;

pub struct PlatformMigrator;

#[async_trait::async_trait]
impl MigratorTrait for PlatformMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![Box::new(platform::m20261126_000001_tenants::Migration)]
    }
}

pub struct TenantMigrator;

#[async_trait::async_trait]
impl MigratorTrait for TenantMigrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(tenant::m20261126_000001_accounts::Migration),
            Box::new(tenant::m20261126_000002_conversations::Migration),
            Box::new(tenant::m20261128_000003_client_ids_without_index::Migration),
        ]
    }
}
