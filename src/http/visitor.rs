//! Visitor endpoints (contract §4 "Visitors"): sessions, opening a conversation, and the
//! long-poll pair for clients that cannot hold a WebSocket.

use std::time::Duration;

use actix_web::{HttpResponse, web};

use crate::tenancy::extract::TenantCall;
use crate::trace_context::TraceContext;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::AuthVisitor;
use super::ws::check_send;
use super::{ApiError, JsonBody, Query};
use crate::accounts::{GENERAL_TEAM, TokenKind, parse_name, teams};
use crate::actors::conversation::{Submit, event_frames, write_error_code};
use crate::actors::{queue, visitor};
use crate::conversations::log::{Closer, NewMessage, WriteError, Written};
use crate::conversations::{ConversationStatus, MessageView, Participant, store};
use crate::metrics::{Channel, ConnKind, Direction};
use crate::protocol::{ClientContent, ServerFrame};
use crate::startup::AppState;
use crate::storage::writer::WriteOp;
use crate::tenancy::Tenant;

/// The longest a long-poll may wait (contract: at most 30 seconds).
const MAX_WAIT_SECS: u64 = 30;
/// What a long-poll waits when the client does not say.
const DEFAULT_WAIT_SECS: u64 = 25;
/// Most events one long-poll answer carries; the client polls again for the rest at once.
const EVENTS_PER_POLL: u64 = 200;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SessionBody {
    name: Option<String>,
    visitor_token: Option<String>,
}

/// `POST /api/v1/visitor/sessions`: a new visitor, or the same one for a valid token.
pub async fn create_session(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    tenant: Tenant,
    body: Option<JsonBody<SessionBody>>,
) -> Result<HttpResponse, ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    state
        .limits
        .visitor_session(&tenant.record, state.limits.client_ip(&req))?;
    let known = match &body.visitor_token {
        Some(t) => match state.tokens.verify(t) {
            Some(c) if c.tid == tenant.record.id => match c.subject(TokenKind::Visitor) {
                Some(id) => store::find_visitor(&tenant.db, id).await.map_err(db_err)?,
                None => None,
            },
            _ => None,
        },
        None => None,
    };
    let visitor = match known {
        Some(v) => v,
        None => {
            let name = match body.name.as_deref() {
                Some(n) => parse_name("name", n)?,
                None => "Visitor".to_owned(),
            };
            store::create_visitor(&tenant.db, &name)
                .await
                .map_err(db_err)?
        }
    };
    let token = state.tokens.issue_visitor(tenant.record.id, visitor.id);
    Ok(HttpResponse::Created().json(json!({
        "visitor_id": visitor.id,
        "visitor_token": token,
        "name": visitor.name,
    })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct OpenBody {
    team: Option<String>,
}

/// `POST /api/v1/visitor/conversations`: opens a conversation in a team's queue, or returns
/// the visitor's open one (200).
pub async fn open_conversation(
    state: web::Data<AppState>,
    visitor: AuthVisitor,
    body: Option<JsonBody<OpenBody>>,
) -> Result<HttpResponse, ApiError> {
    let db = &visitor.tenant.db;
    let slug = body
        .and_then(|b| b.0.team)
        .unwrap_or_else(|| GENERAL_TEAM.to_owned());
    let team = teams::find_by_slug(db, &slug)
        .await?
        .ok_or_else(|| ApiError::validation("team", format!("no such team {slug:?}")))?;
    let (conv, created) = store::open_conversation(db, visitor.id, team.id)
        .await
        .map_err(db_err)?;
    let position = match ConversationStatus::of(&conv) {
        ConversationStatus::Queued => match state
            .realtime
            .queue_call(
                &visitor.tenant.record,
                queue::QueueOp::Enqueue((&conv).into()),
            )
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
        {
            queue::QueueReply::Position(p) => p.unwrap_or(0),
            _ => 0,
        },
        _ => 0,
    };
    let body = json!({
        "conversation_id": conv.id,
        "status": ConversationStatus::of(&conv),
        "queue_position": position,
        "agent_id": conv.agent_id,
        "last_seq": conv.last_seq,
    });
    Ok(if created {
        HttpResponse::Created().json(body)
    } else {
        HttpResponse::Ok().json(body)
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendBody {
    client_msg_id: String,
    content: ClientContent,
}

/// `POST /api/v1/visitor/conversations/{id}/messages`: 201 once durably stored, 200 for a
/// re-sent `client_msg_id`.
pub async fn send_message(
    state: web::Data<AppState>,
    visitor: AuthVisitor,
    id: web::Path<i64>,
    trace: Option<web::ReqData<TraceContext>>,
    JsonBody(body): JsonBody<SendBody>,
) -> Result<HttpResponse, ApiError> {
    check_send(
        &body.client_msg_id,
        &body.content,
        state.realtime.settings().max_text_chars,
    )
    .map_err(|r| ApiError::validation(r.field, r.message))?;
    state.limits.message(&visitor.tenant.record)?;
    crate::metrics::global().message(
        &visitor.tenant.record.slug,
        Channel::LongPoll,
        Direction::Inbound,
    );
    let op = WriteOp::Message(NewMessage {
        conversation_id: *id,
        client_msg_id: body.client_msg_id,
        sender: Participant::Visitor(visitor.id),
        content: serde_json::to_string(&body.content).unwrap_or_default(),
    });
    let written = state
        .realtime
        .conversation(&visitor.tenant.record, *id)
        .send(Submit {
            op,
            origin: None,
            trace: trace.map(web::ReqData::into_inner),
        })
        .await
        .map_err(|_| ApiError::Unavailable("the conversation is restarting; send again".into()))?
        .map_err(write_err)?;
    let (m, status) = match written {
        Written::Stored { message, .. } => (message, actix_web::http::StatusCode::CREATED),
        Written::Duplicate { message } => (message, actix_web::http::StatusCode::OK),
        Written::ReadStored => return Err(ApiError::Internal("unexpected write result".into())),
    };
    Ok(HttpResponse::build(status).json(json!({
        "id": m.id, "seq": m.seq, "client_msg_id": m.client_msg_id, "created_at": m.created_at,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[serde(default)]
    after_seq: i64,
    wait: Option<u64>,
}

/// `GET /api/v1/visitor/conversations/{id}/events?after_seq=N&wait=25`
pub async fn events(
    req: actix_web::HttpRequest,
    state: web::Data<AppState>,
    visitor: AuthVisitor,
    id: web::Path<i64>,
    Query(q): Query<EventsQuery>,
) -> Result<HttpResponse, ApiError> {
    let (db, reader) = (&visitor.tenant.db, visitor.tenant.reader.as_deref());
    let conv = store::get(db, reader, *id)
        .await
        .map_err(db_err)?
        .filter(|c| c.visitor_id == visitor.id)
        .ok_or_else(|| ApiError::NotFound("no such conversation of yours".into()))?;
    let wait = Duration::from_secs(q.wait.unwrap_or(DEFAULT_WAIT_SECS).min(MAX_WAIT_SECS));
    let _open = crate::metrics::global().connection(ConnKind::LongPoll);
    let after = q.after_seq.max(0);
    // Register for a wake-up before reading, so nothing stored in between is slept through.
    let wake = state
        .realtime
        .visitor_hub(&visitor.tenant.record, visitor.id)
        .send(visitor::Wait)
        .await
        .ok();
    state
        .realtime
        .hub_listening(visitor.tenant.record.id, None, Some(visitor.id))
        .await;
    let mut page = store::messages_after(db, reader, conv.id, after, EVENTS_PER_POLL)
        .await
        .map_err(db_err)?;
    if page.is_empty()
        && !wait.is_zero()
        && let Some(wake) = wake
    {
        // Waiting is not using the database: the poll leaves the tenant's bulkhead while it
        // sleeps, or a tenant could hold only as many long-polls as the compartment's size.
        TenantCall::leave(&req);
        let _ = tokio::time::timeout(wait, wake).await;
        page = store::messages_after(db, reader, conv.id, after, EVENTS_PER_POLL)
            .await
            .map_err(db_err)?;
    }
    let mut last_seq = after;
    let mut events: Vec<Value> = Vec::with_capacity(page.len() + 1);
    for m in page {
        last_seq = m.seq;
        let view = MessageView::from(m);
        events.push(ServerFrame::Message(&view).to_value());
        for event in event_frames(&view) {
            if let Ok(v) = serde_json::from_str(&event) {
                events.push(v);
            }
        }
    }
    if let Ok(queue::QueueReply::Position(Some(position))) = state
        .realtime
        .queue_call(
            &visitor.tenant.record,
            queue::QueueOp::Position {
                conversation_id: conv.id,
            },
        )
        .await
    {
        events.push(
            ServerFrame::Queue {
                conversation_id: conv.id,
                position,
            }
            .to_value(),
        );
    }
    Ok(HttpResponse::Ok().json(json!({"events": events, "last_seq": last_seq})))
}

/// `POST /api/v1/visitor/conversations/{id}/close`: the visitor leaves (addition to the
/// contract, for long-poll clients; WebSocket clients send `close`).
pub async fn close(
    state: web::Data<AppState>,
    visitor: AuthVisitor,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    let reply = state
        .realtime
        .queue_call(
            &visitor.tenant.record,
            queue::QueueOp::Close {
                conversation_id: *id,
                by: Closer::Visitor(visitor.id),
            },
        )
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    if let queue::QueueReply::Done(Err(refusal)) = reply {
        return Err(write_err(refusal.as_write_error()));
    }
    Ok(HttpResponse::NoContent().finish())
}

/// Storage errors of these handlers.
fn db_err(e: sea_orm::DbErr) -> ApiError {
    ApiError::Tenancy(e.into())
}

/// A refused write as an HTTP error.
pub fn write_err(e: WriteError) -> ApiError {
    let (code, text) = write_error_code(&e);
    match e {
        WriteError::NotFound | WriteError::NotParticipant => ApiError::NotFound(text),
        WriteError::Closed | WriteError::Stale | WriteError::ClientMsgIdReused => {
            ApiError::Conflict {
                code,
                message: text,
            }
        }
        WriteError::Storage(_) | WriteError::Unavailable => ApiError::Unavailable(text),
        WriteError::Overloaded => ApiError::Overloaded(text),
    }
}
