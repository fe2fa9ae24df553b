//! The conversation actor: the single path, on this node, by which a conversation's log grows.
//!
//! It handles one write at a time ([`AtomicResponse`]), so what it acknowledges and delivers
//! leaves in `seq` order; the group-commit writer still batches across conversations. The
//! hubs keep that order per connection ([`super::order`]), also against writes of the same
//! conversation made on other nodes.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;
use serde_json::Value;
use tracing::Instrument;

use super::Realtime;
use super::conn::ConnHandle;
use super::order::DeliverWrite;
use crate::conversations::log::{Change, WriteError, Written};
use crate::conversations::{MessageView, Participant};
use crate::governance::Compartment;
use crate::governance::breaker::Breaker;
use crate::protocol::{AgentRef, ServerFrame, error_frame};
use crate::storage::writer::WriteOp;
use crate::tenancy::TenantRecord;
use crate::trace_context::TraceContext;

/// A conversation actor with no work for this long stops; the next write starts a new one.
const IDLE_STOP: Duration = Duration::from_secs(300);

/// How often an actor looks whether it has been idle for [`IDLE_STOP`]: it stops between
/// `IDLE_STOP` and `IDLE_STOP + IDLE_CHECK` after its last work. One timer for the actor's
/// life, where re-arming a timer on every write cost a timer-wheel insert and removal per
/// message.
const IDLE_CHECK: Duration = Duration::from_secs(30);

pub struct ConversationActor {
    rt: Realtime,
    tenant: Arc<TenantRecord>,
    id: i64,
    /// Visitor and agent as of the last write seen here (for relaying typing).
    participants: Option<(i64, Option<i64>)>,
    /// When it last had work; it stops once this is [`IDLE_STOP`] ago.
    last_active: tokio::time::Instant,
    /// The tenant database's circuit breaker, looked up once rather than on every write.
    breaker: Arc<Breaker>,
}

impl ConversationActor {
    pub fn new(rt: Realtime, tenant: Arc<TenantRecord>, id: i64) -> Self {
        let breaker = rt.governance().breakers.tenant_db(&tenant.slug);
        Self {
            breaker,
            rt,
            tenant,
            id,
            participants: None,
            last_active: tokio::time::Instant::now(),
        }
    }

    fn touch(&mut self) {
        self.last_active = tokio::time::Instant::now();
    }

    /// Sends the frames of a stored write to everyone concerned, and its ack to the
    /// connection it came from: through that connection's hub when the sender is one of the
    /// recipients, so that the ack keeps its place in the conversation's order there.
    fn deliver(
        &mut self,
        written: &Written,
        mut ack: Option<(ConnHandle, ByteString)>,
        sender: Option<Participant>,
        trace: Option<&TraceContext>,
    ) {
        let Written::Stored {
            message,
            conversation: conv,
            before,
        } = written
        else {
            return;
        };
        self.participants = Some((conv.visitor_id, conv.agent_id));
        let view = MessageView::from(message.clone());
        let mut frames = vec![ServerFrame::Message(&view).encode()];
        frames.extend(event_frames(&view));
        let write = DeliverWrite {
            conversation_id: self.id,
            seq: view.seq,
            frames: frames.into(),
            except: ack.as_ref().map(|(c, _)| c.id),
            ack: None,
        };
        // The ack rides with the sender's own copy of the write.
        let mut with_ack = |to: Participant| DeliverWrite {
            ack: if sender == Some(to) { ack.take() } else { None },
            ..write.clone()
        };
        let tenant = self.tenant.id;
        let to_visitor = with_ack(Participant::Visitor(conv.visitor_id));
        let to_agent = conv.agent_id.map(|a| (a, with_ack(Participant::Agent(a))));
        self.rt
            .write_to_participants(tenant, conv.visitor_id, to_visitor, to_agent, trace);
        // The agent who just lost the conversation (transfer, requeue, close) is told too.
        if let Some(old) = before.agent_id
            && Some(old) != conv.agent_id
        {
            self.rt
                .write_to_agent(tenant, old, with_ack(Participant::Agent(old)), trace);
        }
        // The sender is not a participant (someone overseeing): no order to keep.
        if let Some((origin, ack)) = ack {
            origin.push(ack);
        }
    }
}

/// The dedicated frames (`assigned`, `transferred`, `closed`) that go with a system message,
/// built from the message alone so that long-poll replays can show them too.
pub fn event_frames(view: &MessageView) -> Vec<ByteString> {
    event_frames_of(view).unwrap_or_default()
}

fn event_frames_of(view: &MessageView) -> Option<Vec<ByteString>> {
    if view.sender.kind != "system" {
        return None;
    }
    let content: Value = serde_json::from_str(view.content.get()).ok()?;
    let conversation_id = view.conversation_id;
    let int = |k: &str| content[k].as_i64();
    let assigned = || {
        let agent: AgentRef = serde_json::from_value(content["agent"].clone()).ok()?;
        Some(
            ServerFrame::Assigned {
                conversation_id,
                agent: &agent,
            }
            .encode(),
        )
    };
    let frame = match content["event"].as_str()? {
        "assigned" => assigned()?,
        // The new agent (and the visitor) also get `assigned`, naming who holds it now.
        "transferred" => {
            let transferred = ServerFrame::Transferred {
                conversation_id,
                from_agent_id: int("from_agent_id"),
                to_agent_id: int("to_agent_id"),
                to_team: None,
            }
            .encode();
            return Some(
                [Some(transferred), assigned()]
                    .into_iter()
                    .flatten()
                    .collect(),
            );
        }
        "requeued" => ServerFrame::Transferred {
            conversation_id,
            from_agent_id: int("from_agent_id"),
            to_agent_id: None,
            to_team: Some(content["to_team"].as_str().unwrap_or_default()),
        }
        .encode(),
        "closed" => ServerFrame::Closed {
            conversation_id,
            by: content["by"].as_str().unwrap_or("system"),
        }
        .encode(),
        _ => return None,
    };
    Some(vec![frame])
}

impl Actor for ConversationActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Bursts of sends wait here rather than fail; the writer applies backpressure.
        ctx.set_mailbox_capacity(1024);
        ctx.run_interval(IDLE_CHECK, |act, ctx| {
            if act.last_active.elapsed() >= IDLE_STOP {
                ctx.stop();
            }
        });
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.rt
            .forget_conversation((self.tenant.id, self.id), &ctx.address());
    }
}

/// Where a write came from, to acknowledge it there.
#[derive(Clone)]
pub struct Origin {
    pub conn: ConnHandle,
    pub reference: Option<Value>,
}

/// Write to the log, then acknowledge and deliver.
#[derive(Message)]
#[rtype(result = "Result<Written, WriteError>")]
pub struct Submit {
    pub op: WriteOp,
    pub origin: Option<Origin>,
    /// The trace of the request or frame that caused the write (none: the queue's own
    /// decisions, which start a trace of their own where one is needed).
    pub trace: Option<TraceContext>,
}

impl Handler<Submit> for ConversationActor {
    type Result = AtomicResponse<Self, Result<Written, WriteError>>;

    fn handle(&mut self, msg: Submit, _: &mut Context<Self>) -> Self::Result {
        let received = std::time::Instant::now();
        self.touch();
        let rt = self.rt.clone();
        let tenant = self.tenant.clone();
        let op = msg.op.clone();
        let breaker = self.breaker.clone();
        let span = tracing::debug_span!(
            "write",
            tenant = %tenant.slug,
            conversation_id = self.id,
            trace_id = msg.trace.as_ref().map_or("", |t| t.trace_id.as_str()),
        );
        let write = async move {
            let governance = rt.governance();
            // The tenant's compartment first: a refusal there must not use up a probe of a
            // half-open breaker.
            let _place = governance
                .bulkheads
                .enter(Compartment::TenantDbWrites, tenant.id)
                .map_err(|_| WriteError::Overloaded)?;
            breaker.check().map_err(|_| WriteError::Unavailable)?;
            let result = match rt.db(&tenant).await {
                Ok(db) => rt.writers().write(tenant.id, &db, op).await,
                Err(_) => Err(WriteError::Unavailable),
            };
            breaker.record(!matches!(
                result,
                Err(WriteError::Storage(_) | WriteError::Unavailable)
            ));
            result
        }
        .instrument(span);
        AtomicResponse::new(Box::pin(write.into_actor(self).map(
            move |result, act, _| {
                // A message is not echoed to the connection it came from (that one gets the ack);
                // a change is, as its confirmation.
                let except = match &msg.op {
                    WriteOp::Message(_) | WriteOp::Read { .. } => {
                        msg.origin.as_ref().map(|o| o.conn.id)
                    }
                    WriteOp::Change(_) => None,
                };
                match (&result, &msg.origin, &msg.op) {
                    (Ok(written), origin, op) => {
                        let mut ack = None;
                        if let (Some(origin), WriteOp::Message(m)) = (origin, op) {
                            let stored = match written {
                                Written::Stored { message, .. } => Some((message, false)),
                                Written::Duplicate { message } => Some((message, true)),
                                Written::ReadStored => None,
                            };
                            if let Some((message, duplicate)) = stored {
                                let frame = ServerFrame::Ack {
                                    reference: origin.reference.as_ref(),
                                    conversation_id: m.conversation_id,
                                    client_msg_id: &message.client_msg_id,
                                    id: message.id,
                                    seq: message.seq,
                                    created_at: message.created_at,
                                    duplicate,
                                }
                                .encode();
                                if duplicate {
                                    // Nothing new to order it against.
                                    origin.conn.push(frame);
                                } else {
                                    ack = Some((origin.conn.clone(), frame));
                                }
                            }
                        }
                        let sender = match op {
                            WriteOp::Message(m) => Some(m.sender),
                            _ => None,
                        };
                        act.deliver(written, ack, sender, msg.trace.as_ref());
                        if let (WriteOp::Change(_), Written::Stored { .. }) = (op, written) {
                            act.rt.conversation_changed(act.tenant.id, act.id);
                        }
                        crate::metrics::global().delivered(&act.tenant.slug, received.elapsed());
                        if let WriteOp::Read {
                            conversation_id,
                            reader,
                            seq,
                        } = op
                        {
                            act.relay_read(
                                *conversation_id,
                                *reader,
                                *seq,
                                except,
                                msg.trace.as_ref(),
                            );
                        }
                    }
                    (Err(e), Some(origin), _) => {
                        let (code, text) = write_error_code(e);
                        origin
                            .conn
                            .push(error_frame(origin.reference.as_ref(), code, &text));
                    }
                    (Err(_), None, _) => {}
                }
                result
            },
        )))
    }
}

impl ConversationActor {
    fn relay_read(
        &mut self,
        conversation_id: i64,
        reader: Participant,
        seq: i64,
        except: Option<u64>,
        trace: Option<&TraceContext>,
    ) {
        let frame = ServerFrame::Read {
            conversation_id,
            seq,
            by: reader.kind(),
        }
        .encode();
        self.relay(frame, reader, except, trace);
    }

    /// Sends a frame to the other side of the conversation (typing, read).
    fn relay(
        &mut self,
        frame: ByteString,
        from: Participant,
        except: Option<u64>,
        trace: Option<&TraceContext>,
    ) {
        let Some((visitor, agent)) = self.participants else {
            return;
        };
        let tenant = self.tenant.id;
        match from {
            Participant::Visitor(_) => {
                if let Some(a) = agent {
                    self.rt.to_agent(tenant, a, frame, except, trace);
                }
            }
            Participant::Agent(_) => self.rt.to_visitor(tenant, visitor, frame, except, trace),
        }
    }
}

/// The error code and text of a refused write, as frames and HTTP show it.
pub fn write_error_code(e: &WriteError) -> (&'static str, String) {
    let code = match e {
        WriteError::NotFound => "conversation_not_found",
        WriteError::Closed => "conversation_closed",
        WriteError::NotParticipant => "not_participant",
        WriteError::Stale => "conflict",
        WriteError::ClientMsgIdReused => "client_msg_id_reused",
        WriteError::Storage(_) | WriteError::Unavailable => "dependency_unavailable",
        WriteError::Overloaded => "overloaded",
    };
    let text = match e {
        WriteError::Storage(_) | WriteError::Unavailable => {
            "storage is unavailable; nothing was stored, send again".to_owned()
        }
        other => other.to_string(),
    };
    (code, text)
}

/// Relay `typing` from a participant to the other side (not stored).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Typing {
    pub from: Participant,
    pub except: Option<u64>,
}

impl Handler<Typing> for ConversationActor {
    type Result = ResponseActFuture<Self, ()>;

    fn handle(&mut self, msg: Typing, _: &mut Context<Self>) -> Self::Result {
        self.touch();
        let rt = self.rt.clone();
        let tenant = self.tenant.clone();
        let id = self.id;
        let known = self.participants;
        Box::pin(
            async move {
                match known {
                    Some(p) => Some(p),
                    None => {
                        let db = rt.db(&tenant).await.ok()?;
                        // Through the pool: a read on this thread would hold every actor on it.
                        let c = crate::conversations::store::get(&db, None, id)
                            .await
                            .ok()??;
                        Some((c.visitor_id, c.agent_id))
                    }
                }
            }
            .into_actor(self)
            .map(move |participants, act, _| {
                act.participants = participants;
                // Only a participant's typing is relayed.
                let is_participant = match (msg.from, participants) {
                    (Participant::Visitor(v), Some((pv, _))) => v == pv,
                    (Participant::Agent(a), Some((_, pa))) => Some(a) == pa,
                    _ => false,
                };
                if is_participant {
                    let frame = ServerFrame::Typing {
                        conversation_id: act.id,
                        from: msg.from.kind(),
                    }
                    .encode();
                    act.relay(frame, msg.from, msg.except, None);
                }
            }),
        )
    }
}

/// Another node changed who holds this conversation: what is cached here is stale.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Changed;

impl Handler<Changed> for ConversationActor {
    type Result = ();

    fn handle(&mut self, _: Changed, _: &mut Context<Self>) {
        self.participants = None;
    }
}

/// Applies a state change decided by the queue (through the same ordered path as messages).
pub fn change(change: Change) -> Submit {
    Submit {
        op: WriteOp::Change(change),
        origin: None,
        trace: None,
    }
}
