use sea_orm::entity::prelude::*;

/// A person answering conversations (坐席), or a supervisor or admin of the tenant.
#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "agents")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    /// Stored lower-cased so that login is case-insensitive and uniqueness holds.
    #[sea_orm(unique)]
    pub email: String,
    pub name: String,
    /// Argon2id PHC string.
    pub password_hash: String,
    /// `admin`, `supervisor` or `agent`.
    pub role: String,
    /// How many active conversations the queue may give this agent at once.
    pub max_concurrent: i32,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
