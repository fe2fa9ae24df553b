use sea_orm::entity::prelude::*;

/// A conversation (会话) between one visitor and, once assigned, one agent.
#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "conversations")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub visitor_id: i64,
    /// The team whose queue serves it.
    pub team_id: i64,
    /// `queued`, `active` or `closed`.
    pub status: String,
    /// The agent holding it while `active`.
    pub agent_id: Option<i64>,
    /// Highest `seq` stored; the next message gets `last_seq + 1`.
    pub last_seq: i64,
    /// Place in the queue: earlier is served first. A conversation sent back to the queue
    /// keeps its original time, so it returns near the head.
    pub queued_at: DateTimeUtc,
    pub created_at: DateTimeUtc,
    pub assigned_at: Option<DateTimeUtc>,
    pub closed_at: Option<DateTimeUtc>,
    /// `visitor`, `agent` or `system`.
    pub closed_by: Option<String>,
    /// Closed while still queued: the visitor left or went silent before an agent came.
    pub abandoned: bool,
}

impl ActiveModelBehavior for ActiveModel {}
