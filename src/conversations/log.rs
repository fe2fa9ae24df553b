//! Appending to a conversation's log. Every function here runs for the group-commit writer,
//! inside its transaction or (a batch of messages on PostgreSQL, [`append_many`]) as one
//! statement that commits on its own, and allocates the next `seq` with
//! `UPDATE … SET last_seq = last_seq + 1 … RETURNING`: the row lock that statement takes is what
//! serialises concurrent appends to one conversation, on SQLite and PostgreSQL alike.

use std::collections::HashMap;

use chrono::Utc;
use entity::tenant::{conversation, message, read_position};
use sea_orm::sea_query::{Expr, ExprTrait};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, DbErr, EntityTrait, FromQueryResult,
    QueryFilter, Set,
};
use serde_json::json;

use super::{ConversationStatus, Participant};
use crate::protocol::AgentRef;

/// A message to append.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub conversation_id: i64,
    pub client_msg_id: String,
    pub sender: Participant,
    /// The `content` object, already validated, as JSON text.
    pub content: String,
}

/// Who closes a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Closer {
    Visitor(i64),
    Agent(i64),
    /// The queue: a visitor who went silent while queued.
    System,
}

impl Closer {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Visitor(_) => "visitor",
            Self::Agent(_) => "agent",
            Self::System => "system",
        }
    }
}

/// A change of a conversation's state, recorded as a system message in its log.
#[derive(Clone, Debug)]
pub enum Change {
    /// Queued → active with `agent`.
    Assign {
        conversation_id: i64,
        agent: AgentRef,
    },
    /// Active with `from` → active with `to`.
    Transfer {
        conversation_id: i64,
        from: i64,
        to: AgentRef,
    },
    /// Active with `from` → queued (for `to_team`, or its own team). `reason` is recorded.
    Requeue {
        conversation_id: i64,
        from: i64,
        to_team: Option<(i64, String)>,
        reason: &'static str,
    },
    /// Any open state → closed.
    Close { conversation_id: i64, by: Closer },
}

/// What one operation of a batch did.
// Built once per write and moved to its one reader; boxing the big variant would only add an
// allocation per message.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Written {
    /// Stored: the new message, and the conversation as it is now (`before` as it was).
    Stored {
        message: message::Model,
        conversation: conversation::Model,
        before: conversation::Model,
    },
    /// The `client_msg_id` was stored before; nothing new was stored.
    Duplicate { message: message::Model },
    /// A read position was stored.
    ReadStored,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("no such conversation")]
    NotFound,
    #[error("the conversation is closed")]
    Closed,
    #[error("this conversation is not yours")]
    NotParticipant,
    #[error("the conversation changed meanwhile")]
    Stale,
    #[error("this client_msg_id was used by another sender")]
    ClientMsgIdReused,
    #[error("storage error: {0}")]
    Storage(#[from] DbErr),
    #[error("storage is unavailable")]
    Unavailable,
    /// The tenant has too many writes in flight (bulkhead): refused before anything ran.
    #[error("too many of this tenant's writes are waiting; send again shortly")]
    Overloaded,
}

/// Appends messages of distinct conversations (PostgreSQL) in one statement, however many
/// there are: it finds re-sends, locks the conversations' rows in id order, allocates every
/// `seq` (checking in the same `UPDATE` that each sender may write) and inserts the messages.
/// Outside a transaction that statement commits on its own, so a batch of messages costs the
/// writer one round trip and holds the rows' locks only while it runs and commits; another
/// node's writer waiting for the same conversation waits that long and no longer. Its text
/// never changes (the batch travels as arrays), so each connection prepares it once.
///
/// Locking in id order first matters in cluster mode: two nodes' batches often share
/// conversations (a visitor on one node, its agent on the other), and rows locked in the
/// `UPDATE`'s plan order could be taken in opposite orders by two batches, a deadlock.
///
/// The caller guarantees the conversations are distinct (each conversation actor has at most
/// one write in flight). An `Err` is a storage failure: nothing of the batch was stored.
pub async fn append_many(
    db: &impl ConnectionTrait,
    msgs: &[&NewMessage],
) -> Result<Vec<Result<Written, WriteError>>, DbErr> {
    let mut out: Vec<Option<Result<Written, WriteError>>> = msgs.iter().map(|_| None).collect();
    // One array per column, one element per message.
    fn column<T>(msgs: &[&NewMessage], f: impl Fn(&NewMessage) -> T) -> sea_orm::Value
    where
        Vec<T>: Into<sea_orm::Value>,
    {
        msgs.iter().map(|m| f(m)).collect::<Vec<T>>().into()
    }
    let values = vec![
        column(msgs, |m| m.conversation_id),
        column(msgs, |m| m.client_msg_id.clone()),
        column(msgs, |m| m.sender.kind().to_owned()),
        column(msgs, |m| m.sender.id()),
        column(msgs, |m| m.content.clone()),
        Utc::now().into(),
    ];
    let rows = db
        .query_all_raw(sea_orm::Statement::from_sql_and_values(
            sea_orm::DbBackend::Postgres,
            append_sql(),
            values,
        ))
        .await?;
    // Every returned row is of one of the batch's conversations, which are distinct.
    let position: HashMap<i64, usize> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| (m.conversation_id, i))
        .collect();
    for row in rows {
        let message = message::Model::from_query_result(&row, "m_")?;
        let Some(&i) = position.get(&message.conversation_id) else {
            continue;
        };
        out[i] = Some(if row.try_get::<bool>("", "fresh")? {
            let conversation = conversation::Model::from_query_result(&row, "c_")?;
            Ok(Written::Stored {
                message,
                // A message changes nothing but `last_seq`: "before" is the same conversation.
                before: conversation.clone(),
                conversation,
            })
        } else {
            same_sender(message, msgs[i].sender)
        });
    }

    // Say why the others were refused (rare: read only then).
    let refused: Vec<i64> = msgs
        .iter()
        .zip(&out)
        .filter(|(_, slot)| slot.is_none())
        .map(|(m, _)| m.conversation_id)
        .collect();
    if !refused.is_empty() {
        let found: HashMap<i64, conversation::Model> = conversation::Entity::find()
            .filter(conversation::Column::Id.is_in(refused))
            .all(db)
            .await?
            .into_iter()
            .map(|c| (c.id, c))
            .collect();
        for (slot, m) in out.iter_mut().zip(msgs) {
            if slot.is_none() {
                *slot = Some(Err(match found.get(&m.conversation_id) {
                    None => WriteError::NotFound,
                    Some(c) => refusal(c, m.sender),
                }));
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|r| r.unwrap_or(Err(WriteError::Unavailable)))
        .collect())
}

/// How the `client_msg_id` of every system message begins (`system-<seq>`). Clients may not
/// send an id of this shape (`http::ws::check_send`): one sent ahead would take the id of a
/// future system message and make that assignment, transfer or close fail; and on SQLite
/// system messages are stored beside the writer that recognises re-sent ids
/// (`conversations::client_ids`).
pub const SYSTEM_ID_PREFIX: &str = "system-";

/// The text of [`append_many`]'s statement. Its parameters: the conversations, client message
/// ids, sender kinds, sender ids and contents as five arrays of one element per message, then
/// the time stored as `created_at`. Each returned row is a message (columns `m_*`): a re-send's
/// first copy (`fresh` false), or a new one with its conversation as now (`fresh`, `c_*`).
///
/// The `UPDATE`'s condition on `locked` is uncorrelated, so PostgreSQL evaluates it once
/// before the `UPDATE` touches any row (an init plan): every row is locked, in id order, first.
/// `c.id = ANY(…)` keeps the `UPDATE` on the primary key in the generic plan a prepared
/// statement ends up with (it does not know the arrays' length and would scan the table).
/// The re-send lookup is a `LATERAL` subquery for the same reason: it is a lookup in the
/// unique index per message whatever the plan, never a join over the whole `messages` table
/// (the writer plans this statement once, see `storage::writer_connection`).
pub fn append_sql() -> &'static str {
    static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        use sea_orm::{IdenStatic, Iterable};
        let columns = |table: &str, prefix: &str, names: Vec<&'static str>| {
            names
                .into_iter()
                .map(|c| format!("{table}.{c} AS {prefix}{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let message_columns: Vec<&str> = message::Column::iter().map(|c| c.as_str()).collect();
        let conversation_columns: Vec<&str> =
            conversation::Column::iter().map(|c| c.as_str()).collect();
        let m = columns("m", "m_", message_columns);
        let c = columns("c", "c_", conversation_columns.clone());
        let nulls = conversation_columns
            .iter()
            .map(|c| format!("NULL AS c_{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "WITH v AS (
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::text[])
                     AS v(conversation_id, client_msg_id, sender_kind, sender_id, content)
             ),
             resent AS (
                 SELECT m.* FROM v CROSS JOIN LATERAL (
                     SELECT * FROM messages m
                     WHERE m.conversation_id = v.conversation_id
                       AND m.client_msg_id = v.client_msg_id
                 ) m
             ),
             locked AS (
                 SELECT id FROM conversations WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE
             ),
             bumped AS (
                 UPDATE conversations c SET last_seq = c.last_seq + 1
                 FROM v
                 WHERE (SELECT count(*) FROM locked) > 0
                   AND c.id = ANY($1::bigint[]) AND v.conversation_id = c.id
                   AND NOT EXISTS (SELECT 1 FROM resent r
                                   WHERE r.conversation_id = v.conversation_id)
                   AND CASE v.sender_kind
                         WHEN '{visitor}' THEN c.visitor_id = v.sender_id AND c.status <> '{closed}'
                         ELSE c.agent_id = v.sender_id AND c.status = '{active}'
                       END
                 RETURNING c.*
             ),
             stored AS (
                 INSERT INTO messages
                     (conversation_id, seq, client_msg_id, sender_kind, sender_id, content, created_at)
                 SELECT v.conversation_id, b.last_seq, v.client_msg_id, v.sender_kind, v.sender_id,
                        v.content, $6
                 FROM bumped b JOIN v ON v.conversation_id = b.id
                 RETURNING *
             )
             SELECT true AS fresh, {m}, {c} FROM stored m JOIN bumped c ON c.id = m.conversation_id
             UNION ALL
             SELECT false, {m}, {nulls} FROM resent m",
            visitor = Participant::Visitor(0).kind(),
            closed = ConversationStatus::Closed.as_str(),
            active = ConversationStatus::Active.as_str(),
        )
    });
    &SQL
}

impl Change {
    pub fn conversation_id(&self) -> i64 {
        match self {
            Change::Assign {
                conversation_id, ..
            }
            | Change::Transfer {
                conversation_id, ..
            }
            | Change::Requeue {
                conversation_id, ..
            }
            | Change::Close {
                conversation_id, ..
            } => *conversation_id,
        }
    }
}

/// Applies a state change and records it as a system message. Each change is a conditional
/// update: it applies only from the state it was decided in, so a stale decision changes
/// nothing.
pub async fn apply(db: &impl ConnectionTrait, change: &Change) -> Result<Written, WriteError> {
    use conversation::Column as C;
    let now = Utc::now();
    let id = change.conversation_id();
    let status = |s: ConversationStatus| Expr::val(s.as_str());
    let (update, content) = match change {
        Change::Assign { agent, .. } => (
            bump(id)
                .filter(C::Status.eq(ConversationStatus::Queued.as_str()))
                .col_expr(C::Status, status(ConversationStatus::Active))
                .col_expr(C::AgentId, Expr::val(agent.id))
                .col_expr(C::AssignedAt, Expr::val(now)),
            json!({"kind": "event", "event": "assigned", "agent": agent}),
        ),
        Change::Transfer { from, to, .. } => (
            bump(id)
                .filter(C::Status.eq(ConversationStatus::Active.as_str()))
                .filter(C::AgentId.eq(*from))
                .col_expr(C::AgentId, Expr::val(to.id))
                .col_expr(C::AssignedAt, Expr::val(now)),
            json!({"kind": "event", "event": "transferred", "from_agent_id": from,
                   "to_agent_id": to.id, "agent": to}),
        ),
        Change::Requeue {
            from,
            to_team,
            reason,
            ..
        } => {
            let mut u = bump(id)
                .filter(C::Status.eq(ConversationStatus::Active.as_str()))
                .filter(C::AgentId.eq(*from))
                .col_expr(C::Status, status(ConversationStatus::Queued))
                .col_expr(C::AgentId, Expr::val(Option::<i64>::None));
            if let Some((team_id, _)) = to_team {
                u = u.col_expr(C::TeamId, Expr::val(*team_id));
            }
            (
                u,
                json!({"kind": "event", "event": "requeued", "from_agent_id": from,
                       "reason": reason, "to_team": to_team.as_ref().map(|t| &t.1)}),
            )
        }
        Change::Close { by, .. } => {
            let mut u = bump(id)
                .filter(C::Status.ne(ConversationStatus::Closed.as_str()))
                // Closed while still queued: the visitor gave up waiting.
                .col_expr(
                    C::Abandoned,
                    Expr::col(C::Status).eq(ConversationStatus::Queued.as_str()),
                )
                .col_expr(C::Status, status(ConversationStatus::Closed))
                .col_expr(C::ClosedAt, Expr::val(now))
                .col_expr(C::ClosedBy, Expr::val(by.as_str()));
            match by {
                Closer::Visitor(v) => u = u.filter(C::VisitorId.eq(*v)),
                Closer::Agent(a) => u = u.filter(C::AgentId.eq(*a)),
                Closer::System => {}
            }
            (
                u,
                json!({"kind": "event", "event": "closed", "by": by.as_str()}),
            )
        }
    };
    let before = load(db, id).await?;
    let Some(conversation) = returning(db, update).await? else {
        return Err(match ConversationStatus::of(&before) {
            ConversationStatus::Closed => WriteError::Closed,
            _ if matches!(change, Change::Close { .. }) => WriteError::NotParticipant,
            _ => WriteError::Stale,
        });
    };
    let message = insert(
        db,
        &conversation,
        &format!("{SYSTEM_ID_PREFIX}{}", conversation.last_seq),
        "system",
        None,
        content.to_string(),
    )
    .await?;
    Ok(Written::Stored {
        message,
        conversation,
        before,
    })
}

/// Stores how far a participant has read (never moving backwards).
pub async fn set_read(
    db: &impl ConnectionTrait,
    conversation_id: i64,
    reader: Participant,
    seq: i64,
) -> Result<Written, WriteError> {
    let conv = load(db, conversation_id).await?;
    let is_participant = match reader {
        Participant::Visitor(v) => conv.visitor_id == v,
        Participant::Agent(a) => conv.agent_id == Some(a),
    };
    if !is_participant {
        return Err(WriteError::NotParticipant);
    }
    let seq = seq.clamp(0, conv.last_seq);
    let key = (conversation_id, reader.kind().to_owned(), reader.id());
    match read_position::Entity::find_by_id(key).one(db).await? {
        Some(existing) if existing.seq >= seq => {}
        Some(existing) => {
            let mut am: read_position::ActiveModel = existing.into();
            am.seq = Set(seq);
            am.updated_at = Set(Utc::now());
            am.update(db).await?;
        }
        None => {
            read_position::ActiveModel {
                conversation_id: Set(conversation_id),
                reader_kind: Set(reader.kind().to_owned()),
                reader_id: Set(reader.id()),
                seq: Set(seq),
                updated_at: Set(Utc::now()),
            }
            .insert(db)
            .await?;
        }
    }
    Ok(Written::ReadStored)
}

/// `UPDATE conversations SET last_seq = last_seq + 1 WHERE id = …`, to be narrowed by the
/// caller's conditions. The row lock it takes serialises appends to one conversation.
fn bump(id: i64) -> sea_orm::UpdateMany<conversation::Entity> {
    conversation::Entity::update_many()
        .col_expr(
            conversation::Column::LastSeq,
            Expr::col(conversation::Column::LastSeq).add(1),
        )
        .filter(conversation::Column::Id.eq(id))
}

/// Runs the update with `RETURNING *`: the conversation as it now is, or none if the
/// conditions did not hold.
async fn returning(
    db: &impl ConnectionTrait,
    update: sea_orm::UpdateMany<conversation::Entity>,
) -> Result<Option<conversation::Model>, WriteError> {
    Ok(update.exec_with_returning(db).await?.into_iter().next())
}

async fn load(db: &impl ConnectionTrait, id: i64) -> Result<conversation::Model, WriteError> {
    conversation::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or(WriteError::NotFound)
}

fn refusal(c: &conversation::Model, sender: Participant) -> WriteError {
    let mine = match sender {
        Participant::Visitor(v) => c.visitor_id == v,
        Participant::Agent(a) => c.agent_id == Some(a),
    };
    if ConversationStatus::of(c) == ConversationStatus::Closed {
        WriteError::Closed
    } else if mine {
        // An agent's own conversation that is not active cannot happen; treat as changed.
        WriteError::Stale
    } else {
        WriteError::NotParticipant
    }
}

fn same_sender(existing: message::Model, sender: Participant) -> Result<Written, WriteError> {
    if existing.sender_kind == sender.kind() && existing.sender_id == Some(sender.id()) {
        Ok(Written::Duplicate { message: existing })
    } else {
        Err(WriteError::ClientMsgIdReused)
    }
}

async fn insert(
    db: &impl ConnectionTrait,
    conversation: &conversation::Model,
    client_msg_id: &str,
    sender_kind: &str,
    sender_id: Option<i64>,
    content: String,
) -> Result<message::Model, DbErr> {
    message::ActiveModel {
        conversation_id: Set(conversation.id),
        seq: Set(conversation.last_seq),
        client_msg_id: Set(client_msg_id.to_owned()),
        sender_kind: Set(sender_kind.to_owned()),
        sender_id: Set(sender_id),
        content: Set(content),
        created_at: Set(Utc::now()),
        ..Default::default()
    }
    .insert(db)
    .await
}

/// The SQLite writer thread's append: the same rules as [`append_many`], one message at a time
/// on a synchronous connection inside the writer's transaction. Each statement is prepared
/// once per connection and reused (fixed SQL text), and nothing crosses a thread, so a message
/// costs a few microseconds of SQLite work rather than a round trip per statement. Beside it,
/// for the same reason, the sockets' opening reads on `storage::reader`'s connections.
pub mod sync {
    use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
    use entity::tenant::{conversation, message};
    use rusqlite::types::Type;
    use rusqlite::{Connection, OptionalExtension, Row, params};

    use super::{NewMessage, WriteError, Written, refusal, same_sender};
    use crate::conversations::Participant;
    use crate::conversations::client_ids::ClientIds;

    // Macros rather than consts so that every statement is one literal: no text is built
    // per message, and the statement cache finds each by the same key.
    macro_rules! message_columns {
        () => {
            "id, conversation_id, seq, client_msg_id, sender_kind, sender_id, content, created_at"
        };
    }
    // The same list twice, the second qualified by the alias `c` for joins; `conversation_row`
    // reads either by position.
    macro_rules! conversation_columns {
        () => {
            "id, visitor_id, team_id, status, agent_id, last_seq, queued_at, created_at, \
             assigned_at, closed_at, closed_by, abandoned"
        };
        (c) => {
            "c.id, c.visitor_id, c.team_id, c.status, c.agent_id, c.last_seq, c.queued_at, \
             c.created_at, c.assigned_at, c.closed_at, c.closed_by, c.abandoned"
        };
    }
    // No index leads with `client_msg_id` on SQLite (`conversations::client_ids`): this reads
    // the conversation's rows through `uq_messages_seq`, and runs only when the writer may
    // have stored the id.
    const FIND_RESENT: &str = concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages WHERE conversation_id = ?1 AND client_msg_id = ?2"
    );
    const BUMP_FOR_VISITOR: &str = concat!(
        "UPDATE conversations SET last_seq = last_seq + 1 ",
        "WHERE id = ?1 AND visitor_id = ?2 AND status <> 'closed' RETURNING ",
        conversation_columns!()
    );
    const BUMP_FOR_AGENT: &str = concat!(
        "UPDATE conversations SET last_seq = last_seq + 1 ",
        "WHERE id = ?1 AND agent_id = ?2 AND status = 'active' RETURNING ",
        conversation_columns!()
    );
    const FIND_CONVERSATION: &str = concat!(
        "SELECT ",
        conversation_columns!(),
        " FROM conversations WHERE id = ?1"
    );
    const INSERT_MESSAGE: &str = "INSERT INTO messages \
         (conversation_id, seq, client_msg_id, sender_kind, sender_id, content, created_at) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)";

    /// The opening query of a visitor's socket (see `store::visitor_with_open_conversation`):
    /// the visitor row joined with its conversation that is not closed, if any (at most one).
    const VISITOR_WITH_OPEN_CONVERSATION: &str = concat!(
        "SELECT ",
        conversation_columns!(c),
        " FROM visitors v LEFT JOIN conversations c ",
        "ON c.visitor_id = v.id AND c.status <> 'closed' WHERE v.id = ?1 LIMIT 1"
    );

    /// The opening query of an agent's socket (see `store::agent_with_active_conversations`):
    /// its active conversations by id, each row with the agent's role last, or one row of
    /// NULLs and the role for an agent without any.
    const AGENT_WITH_ACTIVE_CONVERSATIONS: &str = concat!(
        "SELECT ",
        conversation_columns!(c),
        ", a.role FROM agents a LEFT JOIN conversations c ",
        "ON c.agent_id = a.id AND c.status = 'active' WHERE a.id = ?1 ORDER BY c.id"
    );

    /// A page of a conversation's log; on a read connection (`storage::reader`). The limit is
    /// bound like SeaORM's, which the build's `SQLITE_ENABLE_QPSG` keeps from re-planning.
    const MESSAGES_AFTER: &str = concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages WHERE conversation_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
    );

    /// Statements a writer connection keeps prepared: the five of the writer above and
    /// `client_ids`' one, with room to spare (read connections keep their own,
    /// `storage::reader`).
    pub const STATEMENT_CACHE: usize = 16;

    /// Appends one message; `Err` is a storage failure (the transaction must roll back).
    /// `ids` is the writer's memory of the ids stored (see `conversations::client_ids`); it
    /// must be forgotten if the transaction rolls back.
    pub fn append(
        db: &Connection,
        ids: &mut ClientIds,
        m: &NewMessage,
        now: DateTime<Utc>,
    ) -> rusqlite::Result<Result<Written, WriteError>> {
        // A re-send is answered with the first copy; nothing is stored. The rows are read
        // only for an id the writer may have stored (a re-send, seldom anything else).
        if ids.may_hold(db, m.conversation_id, &m.client_msg_id)? {
            let existing = db
                .prepare_cached(FIND_RESENT)?
                .query_row(params![m.conversation_id, m.client_msg_id], message_row)
                .optional()?;
            if let Some(e) = existing {
                return Ok(same_sender(e, m.sender));
            }
        }
        // Allocate the seq; only the visitor (until closed) or the agent (while active) may
        // write, so a refused sender simply updates nothing.
        let bump = match m.sender {
            Participant::Visitor(_) => BUMP_FOR_VISITOR,
            Participant::Agent(_) => BUMP_FOR_AGENT,
        };
        let conv = db
            .prepare_cached(bump)?
            .query_row(params![m.conversation_id, m.sender.id()], conversation_row)
            .optional()?;
        let Some(conv) = conv else {
            // Say why (rare: read only then).
            let found = db
                .prepare_cached(FIND_CONVERSATION)?
                .query_row(params![m.conversation_id], conversation_row)
                .optional()?;
            return Ok(Err(match found {
                None => WriteError::NotFound,
                Some(c) => refusal(&c, m.sender),
            }));
        };
        db.prepare_cached(INSERT_MESSAGE)?.execute(params![
            m.conversation_id,
            conv.last_seq,
            m.client_msg_id,
            m.sender.kind(),
            m.sender.id(),
            m.content,
            // The text sqlx writes for a `DateTime<Utc>`, so that SeaORM reads it back the
            // same as the rows it wrote itself.
            now.to_rfc3339_opts(SecondsFormat::AutoSi, false),
        ])?;
        ids.stored(m.conversation_id, &m.client_msg_id);
        let message = message::Model {
            id: db.last_insert_rowid(),
            conversation_id: m.conversation_id,
            seq: conv.last_seq,
            client_msg_id: m.client_msg_id.clone(),
            sender_kind: m.sender.kind().to_owned(),
            sender_id: Some(m.sender.id()),
            content: m.content.clone(),
            created_at: now,
        };
        // A message changes nothing but `last_seq`: "before" is the same conversation.
        Ok(Ok(Written::Stored {
            message,
            before: conv.clone(),
            conversation: conv,
        }))
    }

    /// `None`: no such visitor; `Some(None)`: the visitor has no open conversation. On a read
    /// connection (`storage::reader`), outside the writer.
    pub fn visitor_with_open_conversation(
        db: &Connection,
        visitor_id: i64,
    ) -> rusqlite::Result<Option<Option<conversation::Model>>> {
        db.prepare_cached(VISITOR_WITH_OPEN_CONVERSATION)?
            .query_row(params![visitor_id], |r| {
                // The LEFT JOIN's NULLs: a visitor without an open conversation.
                match r.get::<_, Option<i64>>(0)? {
                    None => Ok(None),
                    Some(_) => conversation_row(r).map(Some),
                }
            })
            .optional()
    }

    /// `None`: no such agent; else its stored role and its active conversations by id. On a
    /// read connection (`storage::reader`), outside the writer.
    pub fn agent_with_active_conversations(
        db: &Connection,
        agent_id: i64,
    ) -> rusqlite::Result<Option<(String, Vec<conversation::Model>)>> {
        let mut statement = db.prepare_cached(AGENT_WITH_ACTIVE_CONVERSATIONS)?;
        let mut rows = statement.query(params![agent_id])?;
        let mut found: Option<(String, Vec<conversation::Model>)> = None;
        while let Some(r) = rows.next()? {
            let (_, conversations) = match &mut found {
                Some(found) => found,
                None => found.insert((r.get(12)?, Vec::new())),
            };
            // The LEFT JOIN's NULLs: an agent without active conversations.
            if r.get::<_, Option<i64>>(0)?.is_some() {
                conversations.push(conversation_row(r)?);
            }
        }
        Ok(found)
    }

    /// A conversation by id; on a read connection (`storage::reader`).
    pub fn conversation(db: &Connection, id: i64) -> rusqlite::Result<Option<conversation::Model>> {
        db.prepare_cached(FIND_CONVERSATION)?
            .query_row(params![id], conversation_row)
            .optional()
    }

    /// Messages with `seq > after_seq`, ascending, at most `limit`; on a read connection
    /// (`storage::reader`).
    pub fn messages_after(
        db: &Connection,
        conversation_id: i64,
        after_seq: i64,
        limit: i64,
    ) -> rusqlite::Result<Vec<message::Model>> {
        db.prepare_cached(MESSAGES_AFTER)?
            .query_map(params![conversation_id, after_seq, limit], message_row)?
            .collect()
    }

    fn message_row(r: &Row<'_>) -> rusqlite::Result<message::Model> {
        Ok(message::Model {
            id: r.get(0)?,
            conversation_id: r.get(1)?,
            seq: r.get(2)?,
            client_msg_id: r.get(3)?,
            sender_kind: r.get(4)?,
            sender_id: r.get(5)?,
            content: r.get(6)?,
            created_at: time(r, 7)?,
        })
    }

    fn conversation_row(r: &Row<'_>) -> rusqlite::Result<conversation::Model> {
        Ok(conversation::Model {
            id: r.get(0)?,
            visitor_id: r.get(1)?,
            team_id: r.get(2)?,
            status: r.get(3)?,
            agent_id: r.get(4)?,
            last_seq: r.get(5)?,
            queued_at: time(r, 6)?,
            created_at: time(r, 7)?,
            assigned_at: opt_time(r, 8)?,
            closed_at: opt_time(r, 9)?,
            closed_by: r.get(10)?,
            abandoned: r.get(11)?,
        })
    }

    fn opt_time(r: &Row<'_>, i: usize) -> rusqlite::Result<Option<DateTime<Utc>>> {
        match r.get_ref(i)?.as_str_or_null()? {
            None => Ok(None),
            Some(s) => parse_time(s).map(Some).ok_or_else(|| bad_time(i)),
        }
    }

    fn time(r: &Row<'_>, i: usize) -> rusqlite::Result<DateTime<Utc>> {
        parse_time(r.get_ref(i)?.as_str()?).ok_or_else(|| bad_time(i))
    }

    /// Timestamps as sqlx stores them (RFC 3339), or SQLite's own `YYYY-MM-DD HH:MM:SS[.f]`
    /// in UTC, which sqlx also accepts.
    fn parse_time(s: &str) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(s)
            .map(|t| t.with_timezone(&Utc))
            .ok()
            .or_else(|| {
                NaiveDateTime::parse_from_str(s, "%F %T%.f")
                    .ok()
                    .map(|t| t.and_utc())
            })
    }

    fn bad_time(i: usize) -> rusqlite::Error {
        rusqlite::Error::FromSqlConversionFailure(i, Type::Text, "not a timestamp".into())
    }

    #[cfg(test)]
    mod tests {
        use migration::{MigratorTrait, TenantMigrator};
        use rusqlite::types::Value;

        use super::*;
        use crate::conversations::client_ids::IDS_OF_CONVERSATION;

        /// No index leads with `client_msg_id` on SQLite: the writer's reads by id must still
        /// go through the conversation's part of `uq_messages_seq`, never the whole table.
        #[tokio::test]
        async fn the_writers_reads_by_id_search_the_seq_index() {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("tenant.db");
            let db = sea_orm::Database::connect(format!("sqlite://{}?mode=rwc", path.display()))
                .await
                .expect("connect");
            TenantMigrator::up(&db, None).await.expect("migrate");
            db.close().await.expect("close");
            let db = Connection::open(&path).expect("open");
            for sql in [FIND_RESENT, IDS_OF_CONVERSATION] {
                let mut plan = db
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .expect("prepare");
                let values: Vec<Value> = (0..plan.parameter_count())
                    .map(|i| match i {
                        0 => Value::Integer(1),
                        _ => Value::Text("x".into()),
                    })
                    .collect();
                let steps: Vec<String> = plan
                    .query_map(rusqlite::params_from_iter(values), |r| r.get(3))
                    .expect("plan")
                    .collect::<Result<_, _>>()
                    .expect("rows");
                assert!(
                    steps
                        .iter()
                        .any(|s| s.starts_with("SEARCH messages USING INDEX uq_messages_seq")),
                    "{sql}: {steps:?}"
                );
                assert!(
                    !steps.iter().any(|s| s.starts_with("SCAN")),
                    "{sql}: {steps:?}"
                );
            }
        }
    }
}
