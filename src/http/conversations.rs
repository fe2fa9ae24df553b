//! Conversation history for agents (contract §4): an agent sees its own conversations and the
//! queued ones; supervisors and admins see all.

use actix_web::{HttpResponse, web};
use serde::Deserialize;
use serde_json::json;

use super::auth::AuthAgent;
use super::ws::{Who, may_read};
use super::{ApiError, Query};
use crate::accounts::Role;
use crate::conversations::store::{self, ListFilter};
use crate::conversations::{ConversationStatus, ConversationView, MessageView};

/// Default page size of listings.
const DEFAULT_LIMIT: u64 = 50;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
    before_id: Option<i64>,
    limit: Option<u64>,
}

fn who(agent: &AuthAgent) -> Who {
    Who::Agent {
        id: agent.id,
        role: agent.role,
    }
}

/// `GET /api/v1/conversations?status=queued|active|closed&before_id=&limit=` (newest first)
pub async fn list(agent: AuthAgent, Query(q): Query<ListQuery>) -> Result<HttpResponse, ApiError> {
    let status = q
        .status
        .as_deref()
        .map(|s| {
            ConversationStatus::parse(s)
                .ok_or_else(|| ApiError::validation("status", "must be queued, active or closed"))
        })
        .transpose()?;
    let filter = ListFilter {
        status,
        agent_scope: (agent.role == Role::Agent).then_some(agent.id),
        before_id: q.before_id,
        limit: q.limit.unwrap_or(DEFAULT_LIMIT),
    };
    let list: Vec<ConversationView> = store::list(&agent.tenant.db, filter)
        .await
        .map_err(|e| ApiError::Tenancy(e.into()))?
        .into_iter()
        .map(ConversationView::from)
        .collect();
    Ok(HttpResponse::Ok().json(json!({"conversations": list})))
}

async fn readable(
    agent: &AuthAgent,
    id: i64,
) -> Result<entity::tenant::conversation::Model, ApiError> {
    store::get(&agent.tenant.db, agent.tenant.reader.as_deref(), id)
        .await
        .map_err(|e| ApiError::Tenancy(e.into()))?
        .filter(|c| may_read(who(agent), c))
        .ok_or_else(|| ApiError::NotFound("no such conversation".into()))
}

/// `GET /api/v1/conversations/{id}`
pub async fn get(agent: AuthAgent, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
    let c = readable(&agent, *id).await?;
    Ok(HttpResponse::Ok().json(ConversationView::from(c)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagesQuery {
    #[serde(default)]
    after_seq: i64,
    limit: Option<u64>,
}

/// `GET /api/v1/conversations/{id}/messages?after_seq=N&limit=M` (ascending by `seq`)
pub async fn messages(
    agent: AuthAgent,
    id: web::Path<i64>,
    Query(q): Query<MessagesQuery>,
) -> Result<HttpResponse, ApiError> {
    let c = readable(&agent, *id).await?;
    let page = store::messages_after(
        &agent.tenant.db,
        agent.tenant.reader.as_deref(),
        c.id,
        q.after_seq.max(0),
        q.limit.unwrap_or(store::MAX_PAGE),
    )
    .await
    .map_err(|e| ApiError::Tenancy(e.into()))?;
    let messages: Vec<MessageView> = page.into_iter().map(MessageView::from).collect();
    Ok(HttpResponse::Ok().json(json!({"messages": messages, "last_seq": c.last_seq})))
}
