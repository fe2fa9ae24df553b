//! Reads of conversations and messages, and the writes outside a conversation's log
//! (visitors, opening a conversation).

use chrono::Utc;
use entity::tenant::{agent, conversation, message, visitor};
use sea_orm::sea_query::{self, Expr, IntoCondition};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, JoinType, PrimaryKeyTrait,
    QueryFilter, QueryOrder, QuerySelect, RelationDef, SelectTwo, Set, SqlErr,
};

use super::{ConversationStatus, log};
use crate::storage::reader::SqliteReader;

/// Most messages one history page or one sync round returns.
pub const MAX_PAGE: u64 = 500;

pub async fn create_visitor(
    db: &impl ConnectionTrait,
    name: &str,
) -> Result<visitor::Model, DbErr> {
    visitor::ActiveModel {
        name: Set(name.to_owned()),
        created_at: Set(Utc::now()),
        ..Default::default()
    }
    .insert(db)
    .await
}

pub async fn find_visitor(
    db: &impl ConnectionTrait,
    id: i64,
) -> Result<Option<visitor::Model>, DbErr> {
    visitor::Entity::find_by_id(id).one(db).await
}

/// The visitor's conversation that is not closed, if any (there is at most one).
pub async fn open_conversation_of(
    db: &impl ConnectionTrait,
    visitor_id: i64,
) -> Result<Option<conversation::Model>, DbErr> {
    conversation::Entity::find()
        .filter(conversation::Column::VisitorId.eq(visitor_id))
        .filter(conversation::Column::Status.ne(ConversationStatus::Closed.as_str()))
        .one(db)
        .await
}

/// `owner` (a visitor or an agent) by id, each row with one of its conversations whose status
/// passes `status`, or with none. The condition sits inside the `LEFT JOIN`, so an owner
/// without any such conversation still comes back. No relation is declared between these
/// entities; this one exists for the sockets' opening queries only.
fn with_conversations<E>(
    owner_id: i64,
    key: conversation::Column,
    owner_key: E::Column,
    status: fn(Expr) -> Expr,
) -> SelectTwo<E, conversation::Entity>
where
    E: EntityTrait,
    i64: Into<<E::PrimaryKey as PrimaryKeyTrait>::ValueType>,
{
    let def: RelationDef = conversation::Entity::belongs_to(E::default())
        .from(key)
        .to(owner_key)
        .into();
    let def = def.rev().on_condition(move |_owner, conv| {
        status(Expr::col((conv, conversation::Column::Status))).into_condition()
    });
    E::find_by_id(owner_id)
        .select_also(conversation::Entity)
        .join(JoinType::LeftJoin, def)
}

/// Whether the visitor still exists (`None` if not) and its conversation that is not closed:
/// what a visitor's socket needs before it opens, for every socket a visitor opens.
///
/// On SQLite it is read on the caller's thread (`reader`, see [`crate::storage::reader`]):
/// through the pool, the hand-off to sqlx's thread and back cost more than everything else
/// in opening the socket. Elsewhere, or should that read fail, it is one query on the pool.
pub async fn visitor_with_open_conversation(
    db: &impl ConnectionTrait,
    reader: Option<&SqliteReader>,
    visitor_id: i64,
) -> Result<Option<Option<conversation::Model>>, DbErr> {
    if let Some(found) = SqliteReader::read_or_defer(reader, |conn| {
        log::sync::visitor_with_open_conversation(conn, visitor_id)
    }) {
        return Ok(found);
    }
    let found = with_conversations::<visitor::Entity>(
        visitor_id,
        conversation::Column::VisitorId,
        visitor::Column::Id,
        |status| sea_query::ExprTrait::ne(status, ConversationStatus::Closed.as_str()),
    )
    .one(db)
    .await?;
    Ok(found.map(|(_, open)| open))
}

/// The agent's stored role, if the agent still exists, with its active conversations by id:
/// what an agent's socket needs before it opens. Read like
/// [`visitor_with_open_conversation`], and for the same reason.
pub async fn agent_with_active_conversations(
    db: &impl ConnectionTrait,
    reader: Option<&SqliteReader>,
    agent_id: i64,
) -> Result<Option<(String, Vec<conversation::Model>)>, DbErr> {
    if let Some(found) = SqliteReader::read_or_defer(reader, |conn| {
        log::sync::agent_with_active_conversations(conn, agent_id)
    }) {
        return Ok(found);
    }
    let mut rows = with_conversations::<agent::Entity>(
        agent_id,
        conversation::Column::AgentId,
        agent::Column::Id,
        |status| sea_query::ExprTrait::eq(status, ConversationStatus::Active.as_str()),
    )
    .order_by_asc(conversation::Column::Id)
    .all(db)
    .await?
    .into_iter();
    let Some((agent, first)) = rows.next() else {
        return Ok(None);
    };
    let conversations = first
        .into_iter()
        .chain(rows.filter_map(|(_, conv)| conv))
        .collect();
    Ok(Some((agent.role, conversations)))
}

/// Opens a queued conversation for a visitor, or returns the open one it already has
/// (`false` in the second field). A unique partial index makes this hold under races.
pub async fn open_conversation(
    db: &impl ConnectionTrait,
    visitor_id: i64,
    team_id: i64,
) -> Result<(conversation::Model, bool), DbErr> {
    if let Some(open) = open_conversation_of(db, visitor_id).await? {
        return Ok((open, false));
    }
    let now = Utc::now();
    let inserted = conversation::ActiveModel {
        visitor_id: Set(visitor_id),
        team_id: Set(team_id),
        status: Set(ConversationStatus::Queued.as_str().to_owned()),
        agent_id: Set(None),
        last_seq: Set(0),
        queued_at: Set(now),
        created_at: Set(now),
        assigned_at: Set(None),
        closed_at: Set(None),
        closed_by: Set(None),
        abandoned: Set(false),
        ..Default::default()
    }
    .insert(db)
    .await;
    match inserted {
        Ok(c) => Ok((c, true)),
        Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
            let open = open_conversation_of(db, visitor_id).await?;
            open.map(|c| (c, false)).ok_or(e)
        }
        Err(e) => Err(e),
    }
}

/// A conversation by id. Long-poll and `sync` read it on every request; on SQLite it is read
/// on the caller's thread when a `reader` is given, like the sockets' opening reads, and
/// through the pool otherwise or should that read fail.
pub async fn get(
    db: &impl ConnectionTrait,
    reader: Option<&SqliteReader>,
    id: i64,
) -> Result<Option<conversation::Model>, DbErr> {
    if let Some(found) =
        SqliteReader::read_or_defer(reader, |conn| log::sync::conversation(conn, id))
    {
        return Ok(found);
    }
    conversation::Entity::find_by_id(id).one(db).await
}

/// Which conversations a listing shows.
pub struct ListFilter {
    pub status: Option<ConversationStatus>,
    /// `Some(agent)`: only that agent's conversations and the queued ones.
    pub agent_scope: Option<i64>,
    /// Paging: ids below this one (listing is newest first).
    pub before_id: Option<i64>,
    pub limit: u64,
}

pub async fn list(
    db: &impl ConnectionTrait,
    f: ListFilter,
) -> Result<Vec<conversation::Model>, DbErr> {
    let mut q = conversation::Entity::find();
    if let Some(s) = f.status {
        q = q.filter(conversation::Column::Status.eq(s.as_str()));
    }
    if let Some(agent) = f.agent_scope {
        q = q.filter(
            sea_orm::Condition::any()
                .add(conversation::Column::AgentId.eq(agent))
                .add(conversation::Column::Status.eq(ConversationStatus::Queued.as_str())),
        );
    }
    if let Some(before) = f.before_id {
        q = q.filter(conversation::Column::Id.lt(before));
    }
    q.order_by_desc(conversation::Column::Id)
        .limit(f.limit.min(MAX_PAGE))
        .all(db)
        .await
}

/// Messages with `seq > after_seq`, ascending, at most `limit`. Read like [`get`]: every
/// long-poll and every `sync` reads a page, most of them of a message or two.
pub async fn messages_after(
    db: &impl ConnectionTrait,
    reader: Option<&SqliteReader>,
    conversation_id: i64,
    after_seq: i64,
    limit: u64,
) -> Result<Vec<message::Model>, DbErr> {
    let limit = limit.min(MAX_PAGE);
    if let Some(page) = SqliteReader::read_or_defer(reader, |conn| {
        // At most MAX_PAGE: fits.
        log::sync::messages_after(conn, conversation_id, after_seq, limit as i64)
    }) {
        return Ok(page);
    }
    message::Entity::find()
        .filter(message::Column::ConversationId.eq(conversation_id))
        .filter(message::Column::Seq.gt(after_seq))
        .order_by_asc(message::Column::Seq)
        .limit(limit)
        .all(db)
        .await
}

/// Queued conversations in queue order (for rebuilding a tenant's queue).
pub async fn queued(db: &impl ConnectionTrait) -> Result<Vec<conversation::Model>, DbErr> {
    conversation::Entity::find()
        .filter(conversation::Column::Status.eq(ConversationStatus::Queued.as_str()))
        .order_by_asc(conversation::Column::QueuedAt)
        .order_by_asc(conversation::Column::Id)
        .all(db)
        .await
}

/// Active conversations (for rebuilding agents' loads).
pub async fn active(db: &impl ConnectionTrait) -> Result<Vec<conversation::Model>, DbErr> {
    conversation::Entity::find()
        .filter(conversation::Column::Status.eq(ConversationStatus::Active.as_str()))
        .all(db)
        .await
}

#[cfg(test)]
mod tests {
    use migration::{MigratorTrait, TenantMigrator};
    use sea_orm::{ActiveModelTrait, Database, DatabaseConnection, Set};

    use super::*;

    /// A migrated tenant file with one conversation of three messages, and its reader.
    async fn tenant_file() -> (tempfile::TempDir, DatabaseConnection, SqliteReader, i64) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tenant.db");
        let db = Database::connect(format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .expect("connect");
        TenantMigrator::up(&db, None).await.expect("migrate");
        let visitor = create_visitor(&db, "v").await.expect("visitor");
        let (conv, _) = open_conversation(&db, visitor.id, 1)
            .await
            .expect("conversation");
        for seq in 1..=3 {
            message::ActiveModel {
                conversation_id: Set(conv.id),
                seq: Set(seq),
                client_msg_id: Set(format!("c{seq}")),
                sender_kind: Set("visitor".into()),
                sender_id: Set(Some(visitor.id)),
                content: Set(format!(r#"{{"type":"text","text":"{seq}"}}"#)),
                created_at: Set(Utc::now()),
                ..Default::default()
            }
            .insert(&db)
            .await
            .expect("message");
        }
        (dir, db, SqliteReader::new(path), conv.id)
    }

    /// The reads on the caller's thread must give what the pool gives, row for row, or a
    /// long-poll or `sync` would answer differently by backend.
    #[tokio::test]
    async fn reads_on_the_callers_thread_match_the_pools() {
        let (_dir, db, reader, id) = tenant_file().await;
        for id in [id, id + 1] {
            let pooled = get(&db, None, id).await.expect("pool");
            assert_eq!(get(&db, Some(&reader), id).await.expect("reader"), pooled);
        }
        for (after, limit) in [
            (0, MAX_PAGE),
            (1, MAX_PAGE),
            (0, 2),
            (3, 10),
            (0, MAX_PAGE + 1),
        ] {
            let pooled = messages_after(&db, None, id, after, limit)
                .await
                .expect("pool");
            let read = messages_after(&db, Some(&reader), id, after, limit)
                .await
                .expect("reader");
            assert_eq!(read, pooled, "after {after}, limit {limit}");
        }
        assert_eq!(
            messages_after(&db, Some(&reader), id, 1, 1)
                .await
                .expect("reader")
                .iter()
                .map(|m| m.seq)
                .collect::<Vec<_>>(),
            [2]
        );
    }
}
