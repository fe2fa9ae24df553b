use sea_orm::entity::prelude::*;

/// How far a participant has read a conversation.
#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "read_positions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub conversation_id: i64,
    /// `visitor` or `agent`.
    #[sea_orm(primary_key, auto_increment = false)]
    pub reader_kind: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub reader_id: i64,
    pub seq: i64,
    pub updated_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
