//! WebSocket endpoints (`/ws/agent`, `/ws/visitor`) and the connection loop.
//!
//! One task per connection `select!`s over the socket, the connection's bounded outbound queue,
//! a heartbeat and the server's shutdown. It never waits on a write to storage: sends go to the
//! conversation actor, whose ack comes back through the outbound queue.

use std::sync::Arc;
use std::time::Duration;

use actix_web::{HttpMessage, HttpRequest, HttpResponse, web};
use actix_ws::{AggregatedMessage, CloseCode, CloseReason, ProtocolError};
use entity::tenant::conversation;
use governor::DefaultDirectRateLimiter;
use sea_orm::DatabaseConnection;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;

use super::ApiError;
use super::auth::{bearer, verified};
use crate::accounts::{Role, TokenKind, agents};
use crate::actors::conn::{Alarm, Attach, ConnHandle, Detach, Kill};
use crate::actors::conversation::{Origin, Submit, Typing};
use crate::actors::{Found, Realtime};
use crate::actors::{agent, queue};
use crate::conversations::log::{Closer, NewMessage, SYSTEM_ID_PREFIX};
use crate::conversations::{
    ConversationStatus, ConversationSummary, MessageView, Participant, store,
};
use crate::governance::{Limit, Limits};
use crate::metrics::{self, Channel, ConnKind, Direction};
use crate::protocol::{
    ClientContent, ClientFrame, ParsedFrame, ServerFrame, error_frame, parse_client_frame,
};
use crate::startup::AppState;
use crate::storage::reader::SqliteReader;
use crate::storage::writer::WriteOp;
use crate::tenancy::{Tenant, TenantRecord};
use crate::trace_context::TraceContext;

/// Longest `client_msg_id`: long enough for a UUID with a prefix, short enough to index.
pub const MAX_CLIENT_MSG_ID: usize = 64;

/// Close codes of our own (4000-4999 is the application range).
const CLOSE_IDLE: u16 = 4000;
const CLOSE_TOO_SLOW: u16 = 4001;
const CLOSE_SUSPENDED: u16 = 4003;

#[derive(Deserialize)]
pub struct TokenQuery {
    token: Option<String>,
}

/// Who is at the other end of a connection.
#[derive(Clone, Copy, Debug)]
pub enum Who {
    Agent { id: i64, role: Role },
    Visitor { id: i64 },
}

impl Who {
    fn conn_kind(self) -> ConnKind {
        match self {
            Who::Agent { .. } => ConnKind::AgentWebSocket,
            Who::Visitor { .. } => ConnKind::VisitorWebSocket,
        }
    }

    /// What a message from this side is: visitors write in, agents write out.
    fn direction(self) -> Direction {
        match self {
            Who::Agent { .. } => Direction::Outbound,
            Who::Visitor { .. } => Direction::Inbound,
        }
    }

    fn participant(self) -> Participant {
        match self {
            Who::Agent { id, .. } => Participant::Agent(id),
            Who::Visitor { id } => Participant::Visitor(id),
        }
    }
}

/// `GET /ws/agent?token=…`
pub async fn agent_ws(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    super::Query(q): super::Query<TokenQuery>,
) -> Result<HttpResponse, ApiError> {
    let token = bearer(&req).or(q.token);
    let (tenant, id) = verified(&state, &req, token, TokenKind::Agent).await?;
    let (response, session, stream) = handshake(&req, body)?;
    // The least role until the stored one is read below; no frame is handled before `start`.
    let who = Who::Agent {
        id,
        role: Role::Agent,
    };
    let mut opening = Opening::attach(&req, &state, &tenant, who).await;
    // Whether the agent still exists, its role (read from storage on every connection, so a
    // demotion takes effect at once) and its active conversations, in one query.
    let (role, conversations) =
        store::agent_with_active_conversations(&tenant.db, tenant.reader.as_deref(), id)
            .await
            .map_err(|e| ApiError::Tenancy(e.into()))?
            .ok_or(ApiError::InvalidToken)?;
    opening.confirm(Who::Agent {
        id,
        role: agents::stored_role(&role),
    });
    opening.start(session, stream, &conversations).await;
    Ok(response)
}

/// `GET /ws/visitor?token=…`
pub async fn visitor_ws(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    super::Query(q): super::Query<TokenQuery>,
) -> Result<HttpResponse, ApiError> {
    let token = bearer(&req).or(q.token);
    let (tenant, id) = verified(&state, &req, token, TokenKind::Visitor).await?;
    let (response, session, stream) = handshake(&req, body)?;
    let opening = Opening::attach(&req, &state, &tenant, Who::Visitor { id }).await;
    // Whether the visitor still exists, and its open conversation. Refused, `opening`
    // detaches the connection as it is dropped.
    let open = store::visitor_with_open_conversation(&tenant.db, tenant.reader.as_deref(), id)
        .await
        .map_err(|e| ApiError::Tenancy(e.into()))?
        .ok_or(ApiError::InvalidToken)?;
    let conversations: Vec<_> = open.into_iter().collect();
    opening.start(session, stream, &conversations).await;
    Ok(response)
}

/// Checks that the request is a WebSocket upgrade and prepares the 101 answer.
fn handshake(
    req: &HttpRequest,
    body: web::Payload,
) -> Result<(HttpResponse, actix_ws::Session, actix_ws::MessageStream), ApiError> {
    actix_ws::handle(req, body)
        .map_err(|e| ApiError::BadRequest(format!("WebSocket upgrade refused: {e}")))
}

/// A connection attached to its hub whose `hello` is not yet read. The order matters:
/// attached (and, in cluster mode, subscribed) before the snapshot `hello` gives is read, so
/// whatever is stored after the snapshot is queued on this connection, behind `hello`.
///
/// Dropped before it starts (the upgrade refused, or the client gone while the handler
/// waited), it detaches the connection again: a hub must not count a socket that never opened.
struct Opening {
    /// `None` once started: the running connection owns these and detaches itself.
    parts: Option<(Connection, Outbound, Arc<Alarm>)>,
}

impl Opening {
    async fn attach(req: &HttpRequest, state: &AppState, tenant: &Tenant, who: Who) -> Self {
        // The upgrade request's trace: frames without a `traceparent` of their own continue it.
        let trace = req
            .extensions()
            .get::<TraceContext>()
            .cloned()
            .unwrap_or_else(TraceContext::root);
        let (conn, out, alarm) = Connection::new(
            state.realtime.clone(),
            state.limits.clone(),
            tenant,
            who,
            trace,
        );
        // Owned by the opening before the hub is asked, so that a handler dropped while it
        // waits for the hub detaches too.
        let opening = Self {
            parts: Some((conn, out, alarm)),
        };
        if let Some((conn, _, _)) = &opening.parts {
            conn.attach().await;
        }
        opening
    }

    /// Who it is, as storage has it now (an agent's role is read after attaching).
    fn confirm(&mut self, who: Who) {
        if let Some((conn, _, _)) = &mut self.parts {
            conn.who = who;
        }
    }

    /// Sends `hello` with `conversations` and runs the connection in a task of its own.
    ///
    /// `hello` is queued on the session before the handler returns the 101, so the dispatcher
    /// finds it when it writes the response head and both leave in one write: one `send` and
    /// one wake-up of the client per connection instead of two (docs/benchmarks.md, "Idle
    /// connections").
    async fn start(
        mut self,
        mut session: actix_ws::Session,
        stream: actix_ws::MessageStream,
        conversations: &[conversation::Model],
    ) {
        let Some((conn, _, _)) = &self.parts else {
            return;
        };
        // A fresh session's queue has room: this does not wait. Should it fail (the client
        // gone already) or the handler be dropped here, `self` detaches as it is dropped.
        if session.text(conn.hello(conversations)).await.is_err() {
            return;
        }
        let Some((conn, out, alarm)) = self.parts.take() else {
            return;
        };
        actix_web::rt::spawn(tracing::Instrument::instrument(
            conn.run(session, stream, out, alarm),
            tracing::Span::current(),
        ));
    }
}

impl Drop for Opening {
    fn drop(&mut self) {
        if let Some((conn, _, _)) = self.parts.take() {
            conn.detach();
        }
    }
}

type Outbound = tokio::sync::mpsc::Receiver<bytestring::ByteString>;

struct Connection {
    rt: Realtime,
    tenant: Arc<TenantRecord>,
    db: DatabaseConnection,
    /// Where `sync` reads its replay on SQLite (see `conversations::store::get`).
    reader: Option<Arc<SqliteReader>>,
    who: Who,
    conn: ConnHandle,
    limiter: DefaultDirectRateLimiter,
    /// The tenant-wide limits (messages per second across all connections).
    limits: Limits,
    /// Frames refused for flooding so far; past the limit the connection is closed.
    refused: u32,
    /// The trace of the upgrade request; each frame's work is a child of it (or of the
    /// frame's own `traceparent`).
    trace: TraceContext,
}

impl Connection {
    fn new(
        rt: Realtime,
        limits: Limits,
        tenant: &Tenant,
        who: Who,
        trace: TraceContext,
    ) -> (Self, Outbound, Arc<Alarm>) {
        let s = rt.settings();
        let (conn, out, alarm) = ConnHandle::new(rt.next_conn_id(), s.outbound_buffer);
        let limiter = limits.connection_frames(s.frames_per_sec, s.frame_burst);
        (
            Self {
                rt,
                tenant: tenant.record.clone(),
                db: tenant.db.clone(),
                reader: tenant.reader.clone(),
                who,
                conn,
                limiter,
                limits,
                refused: 0,
                trace,
            },
            out,
            alarm,
        )
    }
}

impl Connection {
    async fn run(
        mut self,
        mut session: actix_ws::Session,
        stream: actix_ws::MessageStream,
        mut out: Outbound,
        alarm: Arc<Alarm>,
    ) {
        let s = self.rt.settings();
        let (heartbeat, idle_timeout, flood_limit) = (
            Duration::from_secs(s.heartbeat_secs),
            Duration::from_secs(s.idle_timeout_secs),
            s.flood_limit,
        );
        let mut stream = stream
            .max_frame_size(s.max_frame_bytes)
            .aggregate_continuations()
            .max_continuation_size(s.max_frame_bytes);
        let _open = metrics::global().connection(self.who.conn_kind());
        tracing::debug!(conn = self.conn.id, who = ?self.who, "connection open");

        // Both made once and polled in place: the loop polls them each time it wakes, and
        // made afresh each time they would register and unregister a waiter under a lock.
        // The shutdown token is this connection's own child, so that its lock is not one that
        // every connection of the node takes on every frame.
        let shutdown = self.rt.shutdown_token().child_token();
        let cancelled = shutdown.cancelled();
        let raised = alarm.raised();
        tokio::pin!(cancelled, raised);
        let mut ticker = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        let mut last_heard = Instant::now();
        let reason: Option<CloseReason> = loop {
            tokio::select! {
                biased;
                _ = &mut cancelled => break Some(close(CloseCode::Away, "server shutting down")),
                why = &mut raised => break Some(match why {
                    Kill::TooSlow => close(CloseCode::Other(CLOSE_TOO_SLOW), "too slow: reconnect and sync"),
                    Kill::Suspended => close(CloseCode::Other(CLOSE_SUSPENDED), "the tenant is suspended"),
                }),
                frame = out.recv() => match frame {
                    Some(f) => if session.text(f).await.is_err() { break None },
                    None => break None,
                },
                msg = stream.recv() => {
                    last_heard = Instant::now();
                    match msg {
                        None => break None,
                        Some(Ok(AggregatedMessage::Text(text))) => {
                            if self.limiter.check().is_err() {
                                metrics::global().rate_limited(&self.tenant.slug, Limit::ConnectionFrames);
                                self.refused += 1;
                                if self.refused >= flood_limit {
                                    break Some(close(CloseCode::Policy, "flooding"));
                                }
                                self.conn.push(error_frame(None, "rate_limited", "too many frames; slow down"));
                                continue;
                            }
                            self.handle_text(&text);
                        }
                        Some(Ok(AggregatedMessage::Binary(_))) => {
                            self.conn.push(error_frame(None, "unsupported_frame", "binary frames are not supported; send JSON text"));
                        }
                        Some(Ok(AggregatedMessage::Ping(bytes))) => {
                            if session.pong(&bytes).await.is_err() { break None }
                        }
                        Some(Ok(AggregatedMessage::Pong(_))) => {}
                        Some(Ok(AggregatedMessage::Close(_))) => break Some(close(CloseCode::Normal, "bye")),
                        Some(Err(ProtocolError::Overflow)) => {
                            break Some(close(CloseCode::Size, "frame too large"));
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "WebSocket protocol error");
                            break Some(close(CloseCode::Protocol, "protocol error"));
                        }
                    }
                }
                _ = ticker.tick() => {
                    if last_heard.elapsed() >= idle_timeout {
                        break Some(close(CloseCode::Other(CLOSE_IDLE), "idle timeout"));
                    }
                    if session.ping(b"").await.is_err() { break None }
                }
            }
        };
        self.detach();
        tracing::debug!(conn = self.conn.id, reason = ?reason, "connection closed");
        let _ = session.close(reason).await;
    }

    /// The first frame: who this is and the open conversations with their `last_seq`.
    fn hello(&self, conversations: &[conversation::Model]) -> bytestring::ByteString {
        let (role, id) = match self.who {
            Who::Agent { id, .. } => ("agent", id),
            Who::Visitor { id } => ("visitor", id),
        };
        let conversations: Vec<ConversationSummary> = conversations
            .iter()
            .map(ConversationSummary::from)
            .collect();
        ServerFrame::Hello {
            node: self.rt.node_id(),
            role,
            id,
            conversations: &conversations,
        }
        .encode()
    }

    async fn attach(&self) {
        // Twice: a running hub may be stopping right now; the second one is new. A hub started
        // here is born with this connection and needs no `Attach`.
        for _ in 0..2 {
            let conn = Some(&self.conn);
            let ok = match self.who {
                Who::Agent { id, .. } => match self.rt.agent_hub_with(&self.tenant, id, conn) {
                    Found::Started(_) => true,
                    Found::Running(hub) => hub.send(Attach(self.conn.clone())).await.is_ok(),
                },
                Who::Visitor { id } => match self.rt.visitor_hub_with(&self.tenant, id, conn) {
                    Found::Started(_) => true,
                    Found::Running(hub) => hub.send(Attach(self.conn.clone())).await.is_ok(),
                },
            };
            if ok {
                let (agent, visitor) = match self.who {
                    Who::Agent { id, .. } => (Some(id), None),
                    Who::Visitor { id } => (None, Some(id)),
                };
                self.rt.hub_listening(self.tenant.id, agent, visitor).await;
                return;
            }
        }
        tracing::warn!("could not attach the connection to its hub");
    }

    /// Sends a close or transfer to the tenant's queue (wherever it runs) and tells this
    /// connection if it was refused; success shows as the frames every participant gets.
    fn ask_queue(&self, reference: Option<Value>, op: queue::QueueOp) {
        let rt = self.rt.clone();
        let tenant = self.tenant.clone();
        let conn = self.conn.clone();
        actix_web::rt::spawn(async move {
            let refusal = match rt.queue_call(&tenant, op).await {
                Ok(queue::QueueReply::Done(Err(r))) => r,
                Ok(_) => return,
                Err(_) => queue::Refusal::Unavailable,
            };
            let (code, text) = refusal.code_and_text();
            conn.push(error_frame(reference.as_ref(), code, &text));
        });
    }

    fn detach(&self) {
        match self.who {
            Who::Agent { id, .. } => self
                .rt
                .agent_hub(&self.tenant, id)
                .do_send(Detach(self.conn.id)),
            Who::Visitor { id } => self
                .rt
                .visitor_hub(&self.tenant, id)
                .do_send(Detach(self.conn.id)),
        }
    }

    fn refuse(&self, reference: Option<&Value>, code: &str, message: &str) {
        self.conn.push(error_frame(reference, code, message));
    }

    fn origin(&self, reference: Option<Value>) -> Origin {
        Origin {
            conn: self.conn.clone(),
            reference,
        }
    }

    fn handle_text(&mut self, text: &str) {
        let ParsedFrame {
            reference,
            traceparent,
            frame,
        } = match parse_client_frame(text) {
            Ok(parsed) => parsed,
            Err(e) => return self.refuse(e.reference.as_ref(), e.code, &e.message),
        };
        let trace = traceparent.unwrap_or_else(|| self.trace.child());
        let r = reference.as_ref();
        match frame {
            ClientFrame::Ping => self.conn.push(ServerFrame::Pong { reference: r }.encode()),
            ClientFrame::Send {
                conversation_id,
                client_msg_id,
                content,
            } => {
                if let Err(refusal) =
                    check_send(&client_msg_id, &content, self.rt.settings().max_text_chars)
                {
                    return self.refuse(r, refusal.code, &refusal.message);
                }
                if let Err(limited) = self.limits.message(&self.tenant) {
                    return self.refuse(r, "rate_limited", limited.message());
                }
                metrics::global().message(
                    &self.tenant.slug,
                    Channel::WebSocket,
                    self.who.direction(),
                );
                let op = WriteOp::Message(NewMessage {
                    conversation_id,
                    client_msg_id,
                    sender: self.who.participant(),
                    // Serialising a validated enum of strings cannot fail.
                    content: serde_json::to_string(&content).unwrap_or_default(),
                });
                let submit = Submit {
                    op,
                    origin: Some(self.origin(reference)),
                    trace: Some(trace),
                };
                self.submit(conversation_id, submit);
            }
            ClientFrame::Sync {
                conversation_id,
                after_seq,
            } => {
                let (db, who, conn) = (self.db.clone(), self.who, self.conn.clone());
                actix_web::rt::spawn(replay(
                    db,
                    self.reader.clone(),
                    who,
                    conn,
                    conversation_id,
                    after_seq.max(0),
                    reference,
                ));
            }
            ClientFrame::Read {
                conversation_id,
                seq,
            } => {
                let submit = Submit {
                    op: WriteOp::Read {
                        conversation_id,
                        reader: self.who.participant(),
                        seq,
                    },
                    origin: Some(self.origin(reference)),
                    trace: Some(trace),
                };
                self.submit(conversation_id, submit);
            }
            ClientFrame::Typing { conversation_id } => {
                self.rt
                    .conversation(&self.tenant, conversation_id)
                    .do_send(Typing {
                        from: self.who.participant(),
                        except: Some(self.conn.id),
                    });
            }
            ClientFrame::Close { conversation_id } => {
                let by = match self.who {
                    Who::Agent { id, .. } => Closer::Agent(id),
                    Who::Visitor { id } => Closer::Visitor(id),
                };
                self.ask_queue(
                    reference,
                    queue::QueueOp::Close {
                        conversation_id,
                        by,
                    },
                );
            }
            ClientFrame::Status { status } => match self.who {
                Who::Agent { id, .. } => self
                    .rt
                    .agent_hub(&self.tenant, id)
                    .do_send(agent::SetStatus(status)),
                Who::Visitor { .. } => self.refuse(r, "forbidden", "only agents have a status"),
            },
            ClientFrame::Transfer {
                conversation_id,
                to_agent_id,
                to_team,
            } => {
                let Who::Agent { id, .. } = self.who else {
                    return self.refuse(r, "forbidden", "only agents transfer conversations");
                };
                let to = match (to_agent_id, to_team) {
                    (Some(a), None) => queue::TransferTarget::Agent(a),
                    (None, Some(t)) => queue::TransferTarget::Team(t),
                    _ => {
                        return self.refuse(
                            r,
                            "invalid_frame",
                            "transfer: give exactly one of to_agent_id and to_team",
                        );
                    }
                };
                self.ask_queue(
                    reference,
                    queue::QueueOp::Transfer {
                        conversation_id,
                        from_agent: id,
                        to,
                    },
                );
            }
        }
    }

    /// Hands a write to the conversation's actor without waiting for it.
    fn submit(&self, conversation_id: i64, submit: Submit) {
        let addr = self.rt.conversation(&self.tenant, conversation_id);
        match addr.try_send(submit) {
            Ok(()) => {}
            // It stopped between lookup and send: the registry now starts a fresh one.
            Err(actix::prelude::SendError::Closed(submit)) => {
                self.rt
                    .conversation(&self.tenant, conversation_id)
                    .do_send(submit);
            }
            Err(actix::prelude::SendError::Full(submit)) => {
                let r = submit.origin.as_ref().and_then(|o| o.reference.as_ref());
                self.refuse(
                    r,
                    "overloaded",
                    "the conversation is busy; send again shortly",
                );
            }
        }
    }
}

fn close(code: CloseCode, description: &str) -> CloseReason {
    CloseReason {
        code,
        description: Some(description.to_owned()),
    }
}

/// Why a `send` was refused before anything was stored.
pub struct SendRefusal {
    /// Error-frame code.
    pub code: &'static str,
    /// The field at fault (for HTTP's `validation_failed`).
    pub field: &'static str,
    pub message: String,
}

/// Checks a `send` before anything is stored.
pub fn check_send(
    client_msg_id: &str,
    content: &ClientContent,
    max_chars: usize,
) -> Result<(), SendRefusal> {
    let id_ok = !client_msg_id.is_empty()
        && client_msg_id.len() <= MAX_CLIENT_MSG_ID
        && client_msg_id.bytes().all(|b| b.is_ascii_graphic());
    if !id_ok {
        return Err(SendRefusal {
            code: "invalid_frame",
            field: "client_msg_id",
            message: format!(
                "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID} visible ASCII characters"
            ),
        });
    }
    if client_msg_id.starts_with(SYSTEM_ID_PREFIX) {
        return Err(SendRefusal {
            code: "invalid_frame",
            field: "client_msg_id",
            message: format!(
                "client_msg_id may not begin with \"{SYSTEM_ID_PREFIX}\" (system messages' ids)"
            ),
        });
    }
    let ClientContent::Text { text } = content;
    if text.trim().is_empty() {
        return Err(SendRefusal {
            code: "invalid_frame",
            field: "content.text",
            message: "content.text is empty".into(),
        });
    }
    if text.chars().count() > max_chars {
        return Err(SendRefusal {
            code: "message_too_long",
            field: "content.text",
            message: format!("content.text is longer than {max_chars} characters"),
        });
    }
    Ok(())
}

/// May `who` read this conversation? Its visitor, its agent, any agent while it is queued, and
/// supervisors and admins always.
pub fn may_read(who: Who, c: &entity::tenant::conversation::Model) -> bool {
    match who {
        Who::Visitor { id } => c.visitor_id == id,
        Who::Agent { id, role } => {
            role.oversees()
                || c.agent_id == Some(id)
                || ConversationStatus::of(c) == ConversationStatus::Queued
        }
    }
}

/// `sync`: replays everything after `after_seq` from storage, then `synced`.
async fn replay(
    db: DatabaseConnection,
    reader: Option<Arc<SqliteReader>>,
    who: Who,
    conn: ConnHandle,
    conversation_id: i64,
    mut after: i64,
    reference: Option<Value>,
) {
    let r = reference.as_ref();
    let conv = match store::get(&db, reader.as_deref(), conversation_id).await {
        Ok(Some(c)) if may_read(who, &c) => c,
        Ok(_) => {
            conn.push(error_frame(
                r,
                "conversation_not_found",
                "no such conversation of yours",
            ));
            return;
        }
        Err(e) => return sync_failed(&conn, r, &e),
    };
    loop {
        let page =
            match store::messages_after(&db, reader.as_deref(), conv.id, after, store::MAX_PAGE)
                .await
            {
                Ok(p) => p,
                Err(e) => return sync_failed(&conn, r, &e),
            };
        let full = page.len() as u64 == store::MAX_PAGE;
        for m in page {
            after = m.seq;
            let view = MessageView::from(m);
            if !conn.push_wait(ServerFrame::Message(&view).encode()).await {
                return;
            }
        }
        if !full {
            break;
        }
    }
    conn.push_wait(
        ServerFrame::Synced {
            reference: r,
            conversation_id,
            last_seq: after,
        }
        .encode(),
    )
    .await;
}

/// Storage failed a `sync`: the client is told so and may send it again.
fn sync_failed(conn: &ConnHandle, reference: Option<&Value>, e: &sea_orm::DbErr) {
    tracing::warn!(error = %e, "sync failed");
    conn.push(error_frame(
        reference,
        "dependency_unavailable",
        "storage is unavailable; sync again",
    ));
}

#[cfg(test)]
mod tests {
    /// Every socket's connection buffers and frame queue come from the actix-http and actix-ws
    /// in `vendor/`, patched for memory (vendor/README.md): about 6 KB of resident memory per
    /// idle WebSocket. An update that needs another version of either would make cargo skip
    /// the patch with only a warning and quietly bring the published crate back.
    #[test]
    fn actix_http_and_actix_ws_are_the_patched_ones_in_vendor() {
        let lock = include_str!("../../Cargo.lock");
        for name in ["actix-http", "actix-ws"] {
            let entries: Vec<&str> = lock
                .split("[[package]]")
                .filter(|p| p.contains(&format!("\nname = \"{name}\"\n")))
                .collect();
            assert!(!entries.is_empty(), "Cargo.lock lists no {name}");
            for entry in entries {
                assert!(
                    !entry.contains("source = "),
                    "{name} comes from a registry, not from vendor/{name}:{entry}"
                );
            }
        }
    }
}
