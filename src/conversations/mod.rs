//! Conversations (会话) and their message log: the data side of the real-time core.
//!
//! - [`store`]: reads and the few writes that are not part of a conversation's log.
//! - [`log`]: the writes that append to a conversation's log (messages, and the system
//!   messages that record assignment, transfer, requeue and close). They allocate `seq` inside
//!   the database, under the conversation row's lock, so `seq` stays gap-free and unique even
//!   when several writers (or nodes) append to the same conversation at once. They run only
//!   inside the group-commit writer ([`crate::storage::writer`]).
//! - [`client_ids`]: how the SQLite writer recognises a re-sent `client_msg_id` without a
//!   unique index.

pub mod client_ids;
pub mod log;
pub mod store;

use chrono::{DateTime, Utc};
use entity::tenant::{conversation, message};
use serde::Serialize;
use serde_json::value::RawValue;

/// Where a conversation is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConversationStatus {
    /// Waiting in its team's queue for an agent.
    Queued,
    /// Held by one agent.
    Active,
    Closed,
}

impl ConversationStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Active => "active",
            Self::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queued" => Some(Self::Queued),
            "active" => Some(Self::Active),
            "closed" => Some(Self::Closed),
            _ => None,
        }
    }

    pub fn of(c: &conversation::Model) -> Self {
        // Rows are only written from `as_str`; an unknown value is treated as closed, the
        // state in which nothing more can happen to it.
        Self::parse(&c.status).unwrap_or(Self::Closed)
    }
}

/// Someone who takes part in a conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Participant {
    Visitor(i64),
    Agent(i64),
}

impl Participant {
    pub fn kind(self) -> &'static str {
        match self {
            Self::Visitor(_) => "visitor",
            Self::Agent(_) => "agent",
        }
    }

    pub fn id(self) -> i64 {
        match self {
            Self::Visitor(id) | Self::Agent(id) => id,
        }
    }
}

/// Who sent a message, as frames show it.
#[derive(Clone, Debug, Serialize)]
pub struct SenderView {
    /// `visitor`, `agent` or `system`.
    pub kind: String,
    pub id: Option<i64>,
}

/// A stored message, as frames and the history API show it.
#[derive(Clone, Debug, Serialize)]
pub struct MessageView {
    pub conversation_id: i64,
    pub id: i64,
    pub seq: i64,
    pub client_msg_id: String,
    pub sender: SenderView,
    /// Kept as the JSON text that was stored: never re-parsed on the way out.
    pub content: Box<RawValue>,
    #[serde(serialize_with = "crate::protocol::rfc3339")]
    pub created_at: DateTime<Utc>,
}

impl From<message::Model> for MessageView {
    fn from(m: message::Model) -> Self {
        let content = RawValue::from_string(m.content).unwrap_or_else(|_| {
            // Only valid JSON is ever stored; should a row be damaged, show null rather
            // than fail the whole history.
            RawValue::from_string("null".to_owned()).expect("null is JSON")
        });
        Self {
            conversation_id: m.conversation_id,
            id: m.id,
            seq: m.seq,
            client_msg_id: m.client_msg_id,
            sender: SenderView {
                kind: m.sender_kind,
                id: m.sender_id,
            },
            content,
            created_at: m.created_at,
        }
    }
}

/// An open conversation as `hello` lists it.
#[derive(Clone, Debug, Serialize)]
pub struct ConversationSummary {
    pub conversation_id: i64,
    pub status: ConversationStatus,
    pub last_seq: i64,
    pub agent_id: Option<i64>,
}

impl From<&conversation::Model> for ConversationSummary {
    fn from(c: &conversation::Model) -> Self {
        Self {
            conversation_id: c.id,
            status: ConversationStatus::of(c),
            last_seq: c.last_seq,
            agent_id: c.agent_id,
        }
    }
}

/// A conversation as the HTTP API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct ConversationView {
    pub id: i64,
    pub visitor_id: i64,
    pub team_id: i64,
    pub status: ConversationStatus,
    pub agent_id: Option<i64>,
    pub last_seq: i64,
    pub created_at: DateTime<Utc>,
    pub queued_at: DateTime<Utc>,
    pub assigned_at: Option<DateTime<Utc>>,
    pub closed_at: Option<DateTime<Utc>>,
    pub closed_by: Option<String>,
    pub abandoned: bool,
}

impl From<conversation::Model> for ConversationView {
    fn from(c: conversation::Model) -> Self {
        Self {
            status: ConversationStatus::of(&c),
            id: c.id,
            visitor_id: c.visitor_id,
            team_id: c.team_id,
            agent_id: c.agent_id,
            last_seq: c.last_seq,
            created_at: c.created_at,
            queued_at: c.queued_at,
            assigned_at: c.assigned_at,
            closed_at: c.closed_at,
            closed_by: c.closed_by,
            abandoned: c.abandoned,
        }
    }
}
