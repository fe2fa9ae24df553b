use sea_orm::entity::prelude::*;

/// One stored message of a conversation, numbered by `seq` without gaps.
#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "messages")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub conversation_id: i64,
    pub seq: i64,
    /// The sender's id for this message, unique per conversation: a re-send is recognised.
    pub client_msg_id: String,
    /// `visitor`, `agent` or `system`.
    pub sender_kind: String,
    pub sender_id: Option<i64>,
    /// The `content` object as JSON text.
    pub content: String,
    pub created_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
