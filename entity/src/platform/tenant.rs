use sea_orm::entity::prelude::*;

/// A business renting Kefu. Its data lives in the database named by `db_name`.
#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "tenants")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    #[sea_orm(unique)]
    pub slug: String,
    pub name: String,
    /// `provisioning` while onboarding is under way, then `active` or `suspended`.
    pub status: String,
    /// SQLite file stem or PostgreSQL database name of the tenant's own database.
    #[sea_orm(unique)]
    pub db_name: String,
    pub created_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
