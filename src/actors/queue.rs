//! The tenant queue: one actor per tenant holds every team's queue, the presence and load of
//! the tenant's agents, and makes every decision that changes who holds a conversation. Being
//! one actor, it never gives one conversation to two agents or an agent more than its
//! `max_concurrent`; the conditional updates in the log make storage refuse it too.
//!
//! Assignment: the conversation queued earliest (across the teams it could go to) goes first,
//! to an online agent of its team with free capacity, the least loaded first, ties broken by
//! who has waited longest since their last assignment.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use chrono::{DateTime, Utc};
use entity::tenant::conversation;
use tokio::time::Instant;

use super::Realtime;
use super::conversation::{Origin, change};
use crate::accounts::{agents, teams};
use crate::conversations::log::{Change, Closer, WriteError, Written};
use crate::conversations::{ConversationStatus, store};
use crate::protocol::{AgentRef, AgentStatus, ServerFrame, error_frame};
use crate::tenancy::TenantRecord;

/// How often the queue looks for abandoned visitors and retries after a storage failure.
const TICK: Duration = Duration::from_secs(1);

pub struct QueueActor {
    rt: Realtime,
    tenant: Arc<TenantRecord>,
    /// team id → its queued conversations, head first.
    queues: HashMap<i64, VecDeque<Queued>>,
    /// Agents present on this node (or within their grace period).
    agents: HashMap<i64, Presence>,
    /// agent id → the conversations it holds (also for agents not present).
    holding: HashMap<i64, HashSet<i64>>,
    /// Grace timers of agents who lost every connection.
    graces: HashMap<i64, SpawnHandle>,
    /// Conversations closed while queued since this actor started (for the numbers).
    pub abandoned: u64,
}

struct Queued {
    conversation_id: i64,
    visitor_id: i64,
    team_id: i64,
    queued_at: DateTime<Utc>,
    /// Last sign of the visitor (a socket, a poll, a message).
    last_seen: Instant,
    /// The visitor has a socket open right now.
    present: bool,
    /// The position last announced to the visitor (0: none yet).
    announced: usize,
}

impl Queued {
    fn from_model(c: &conversation::Model, present: bool) -> Self {
        Self {
            conversation_id: c.id,
            visitor_id: c.visitor_id,
            team_id: c.team_id,
            queued_at: c.queued_at,
            last_seen: Instant::now(),
            present,
            announced: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PresenceStatus {
    Online,
    Away,
    /// Every connection is gone; the grace period runs.
    Gone,
}

struct Presence {
    name: String,
    teams: HashSet<i64>,
    max_concurrent: usize,
    status: PresenceStatus,
    /// For ties: the agent whose last assignment is oldest goes first.
    last_assigned: Instant,
}

impl QueueActor {
    pub fn new(rt: Realtime, tenant: Arc<TenantRecord>) -> Self {
        Self {
            rt,
            tenant,
            queues: HashMap::new(),
            agents: HashMap::new(),
            holding: HashMap::new(),
            graces: HashMap::new(),
            abandoned: 0,
        }
    }

    fn queued(&self, c: &conversation::Model) -> Queued {
        Queued::from_model(c, self.rt.visitor_present(self.tenant.id, c.visitor_id))
    }

    /// Joins a conversation at the back of its team's queue (new arrivals).
    fn push_back(&mut self, c: &conversation::Model) {
        let q = self.queued(c);
        self.queues.entry(c.team_id).or_default().push_back(q);
    }

    /// Joins a conversation at the head of its team's queue (returned conversations).
    fn push_front(&mut self, c: &conversation::Model) {
        let q = self.queued(c);
        self.queues.entry(c.team_id).or_default().push_front(q);
    }

    fn load(&self, agent_id: i64) -> usize {
        self.holding.get(&agent_id).map_or(0, HashSet::len)
    }

    fn position(&self, conversation_id: i64) -> Option<usize> {
        self.queues.values().find_map(|q| {
            q.iter()
                .position(|e| e.conversation_id == conversation_id)
                .map(|i| i + 1)
        })
    }

    fn remove_queued(&mut self, conversation_id: i64) -> Option<Queued> {
        for q in self.queues.values_mut() {
            if let Some(i) = q.iter().position(|e| e.conversation_id == conversation_id) {
                return q.remove(i);
            }
        }
        None
    }

    fn release(&mut self, agent_id: Option<i64>, conversation_id: i64) {
        if let Some(a) = agent_id
            && let Some(set) = self.holding.get_mut(&a)
        {
            set.remove(&conversation_id);
        }
    }

    /// The next assignment to make: (team, agent), or none.
    fn pick(&self) -> Option<(i64, i64)> {
        let mut heads: Vec<&Queued> = self.queues.values().filter_map(VecDeque::front).collect();
        heads.sort_by_key(|q| (q.queued_at, q.conversation_id));
        heads.into_iter().find_map(|head| {
            self.agents
                .iter()
                .filter(|(id, p)| {
                    p.status == PresenceStatus::Online
                        && p.teams.contains(&head.team_id)
                        && self.load(**id) < p.max_concurrent
                })
                .min_by_key(|(id, p)| (self.load(**id), p.last_assigned, **id))
                .map(|(id, _)| (head.team_id, *id))
        })
    }

    /// Assigns while there is someone to assign to, one storage write at a time.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let Some((team, agent_id)) = self.pick() else {
            self.announce_positions();
            return;
        };
        let Some(q) = self.queues.get_mut(&team).and_then(VecDeque::pop_front) else {
            return;
        };
        let Some(p) = self.agents.get_mut(&agent_id) else {
            return;
        };
        p.last_assigned = Instant::now();
        let agent = AgentRef {
            id: agent_id,
            name: p.name.clone(),
        };
        self.holding
            .entry(agent_id)
            .or_default()
            .insert(q.conversation_id);
        let submit = self
            .rt
            .conversation(&self.tenant, q.conversation_id)
            .send(change(Change::Assign {
                conversation_id: q.conversation_id,
                agent,
            }));
        ctx.wait(submit.into_actor(self).map(move |res, act, ctx| {
            match res {
                Ok(Ok(_)) => {
                    tracing::debug!(conversation_id = q.conversation_id, agent_id, "assigned");
                    crate::metrics::global()
                        .queue_waited(&act.tenant.slug, Utc::now() - q.queued_at);
                }
                // Closed or gone meanwhile: it simply leaves the queue.
                Ok(Err(WriteError::Stale | WriteError::Closed | WriteError::NotFound)) => {
                    act.release(Some(agent_id), q.conversation_id);
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "assignment not stored; retrying shortly");
                    act.release(Some(agent_id), q.conversation_id);
                    act.queues.entry(q.team_id).or_default().push_front(q);
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "conversation actor unavailable; retrying shortly");
                    act.release(Some(agent_id), q.conversation_id);
                    act.queues.entry(q.team_id).or_default().push_front(q);
                    return;
                }
            }
            act.pump(ctx);
        }));
    }

    /// Tells every queued visitor whose place changed where it now is.
    fn announce_positions(&mut self) {
        let tenant = self.tenant.id;
        for q in self.queues.values_mut() {
            for (i, e) in q.iter_mut().enumerate() {
                if e.announced != i + 1 {
                    e.announced = i + 1;
                    let frame = ServerFrame::Queue {
                        conversation_id: e.conversation_id,
                        position: i + 1,
                    }
                    .encode();
                    self.rt.to_visitor(tenant, e.visitor_id, frame, None);
                }
            }
        }
    }

    fn start_grace(&mut self, agent_id: i64, ctx: &mut Context<Self>) {
        if let Some(h) = self.graces.remove(&agent_id) {
            ctx.cancel_future(h);
        }
        let grace = Duration::from_secs(self.rt.settings().agent_grace_secs);
        let h = ctx.run_later(grace, move |act, ctx| act.grace_expired(agent_id, ctx));
        self.graces.insert(agent_id, h);
    }

    /// The agent did not come back: its conversations go back to the head of their queues.
    fn grace_expired(&mut self, agent_id: i64, ctx: &mut Context<Self>) {
        self.graces.remove(&agent_id);
        if self
            .agents
            .get(&agent_id)
            .is_some_and(|p| p.status != PresenceStatus::Gone)
        {
            return;
        }
        self.agents.remove(&agent_id);
        let held: Vec<i64> = self
            .holding
            .remove(&agent_id)
            .unwrap_or_default()
            .into_iter()
            .collect();
        if held.is_empty() {
            return;
        }
        tracing::info!(
            agent_id,
            conversations = held.len(),
            "agent did not return; requeueing"
        );
        let rt = self.rt.clone();
        let tenant = self.tenant.clone();
        let requeue = async move {
            let mut back = Vec::new();
            for id in held {
                let res = rt
                    .conversation(&tenant, id)
                    .send(change(Change::Requeue {
                        conversation_id: id,
                        from: agent_id,
                        to_team: None,
                        reason: "agent_left",
                    }))
                    .await;
                if let Ok(Ok(Written::Stored { conversation, .. })) = res {
                    back.push(conversation);
                }
            }
            back
        };
        ctx.wait(requeue.into_actor(self).map(|back, act, ctx| {
            // Pushed to the front in reverse, so they keep their original order at the head.
            for c in back.iter().rev() {
                act.push_front(c);
            }
            act.pump(ctx);
        }));
    }

    /// Closes queued conversations whose visitor has been gone too long.
    fn abandon_stale(&mut self, ctx: &mut Context<Self>) {
        let limit = Duration::from_secs(self.rt.settings().queue_abandon_secs);
        let stale: Vec<i64> = self
            .queues
            .values()
            .flatten()
            .filter(|q| !q.present && q.last_seen.elapsed() >= limit)
            .map(|q| q.conversation_id)
            .collect();
        if stale.is_empty() {
            self.pump(ctx);
            return;
        }
        for id in &stale {
            self.remove_queued(*id);
        }
        let rt = self.rt.clone();
        let tenant = self.tenant.clone();
        let close = async move {
            let mut closed = 0u64;
            for id in stale {
                let res = rt
                    .conversation(&tenant, id)
                    .send(change(Change::Close {
                        conversation_id: id,
                        by: Closer::System,
                    }))
                    .await;
                if matches!(res, Ok(Ok(_))) {
                    closed += 1;
                }
            }
            closed
        };
        ctx.wait(close.into_actor(self).map(|closed, act, ctx| {
            act.abandoned += closed;
            tracing::info!(closed, "abandoned queued conversations closed");
            act.pump(ctx);
        }));
    }

    /// Loads an agent's capacity and teams (when it arrives or is changed).
    fn refresh_agent(
        &mut self,
        agent_id: i64,
        status: Option<PresenceStatus>,
        ctx: &mut Context<Self>,
    ) {
        let rt = self.rt.clone();
        let tenant = self.tenant.clone();
        let load = async move {
            let db = rt.db(&tenant).await.ok()?;
            let agent = agents::find(&db, agent_id).await.ok()?;
            let teams = agents::team_ids(&db, agent_id).await.ok()?;
            Some((agent, teams))
        };
        ctx.wait(load.into_actor(self).map(move |loaded, act, ctx| {
            match loaded {
                Some((Some(agent), teams)) => {
                    let entry = act.agents.entry(agent_id).or_insert_with(|| Presence {
                        name: agent.name.clone(),
                        teams: HashSet::new(),
                        max_concurrent: 0,
                        status: status.unwrap_or(PresenceStatus::Online),
                        last_assigned: Instant::now(),
                    });
                    entry.name = agent.name;
                    entry.teams = teams.into_iter().collect();
                    entry.max_concurrent = usize::try_from(agent.max_concurrent).unwrap_or(0);
                    if let Some(s) = status {
                        entry.status = s;
                    }
                }
                // Deleted: treat as gone for good, right away.
                Some((None, _)) => {
                    if let Some(p) = act.agents.get_mut(&agent_id) {
                        p.status = PresenceStatus::Gone;
                    }
                    act.grace_expired(agent_id, ctx);
                }
                None => tracing::warn!(agent_id, "could not load agent for the queue"),
            }
            act.pump(ctx);
        }));
    }
}

impl Actor for QueueActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(4096);
        let rt = self.rt.clone();
        let tenant = self.tenant.clone();
        let rebuild = async move {
            let db = rt.db(&tenant).await.ok()?;
            let queued = store::queued(&db).await.ok()?;
            let active = store::active(&db).await.ok()?;
            Some((queued, active))
        };
        ctx.wait(rebuild.into_actor(self).map(|loaded, act, ctx| {
            let Some((queued, active)) = loaded else {
                tracing::error!(tenant = %act.tenant.slug, "could not rebuild the queue from storage");
                return;
            };
            for c in &queued {
                act.push_back(c);
            }
            for c in &active {
                if let Some(a) = c.agent_id {
                    act.holding.entry(a).or_default().insert(c.id);
                }
            }
            // Agents holding conversations are not connected yet: their grace starts now.
            let holders: Vec<i64> = act.holding.keys().copied().collect();
            for a in holders {
                if !act.agents.contains_key(&a) {
                    act.start_grace(a, ctx);
                }
            }
            tracing::info!(tenant = %act.tenant.slug, queued = queued.len(), active = active.len(), "queue rebuilt");
        }));
        ctx.run_interval(TICK, |act, ctx| act.abandon_stale(ctx));
    }
}

impl Supervised for QueueActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        // Storage is the truth: forget everything and rebuild in `started`.
        self.queues.clear();
        self.holding.clear();
        self.graces.clear();
    }
}

/// A visitor opened a conversation; answers its queue position.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Enqueue(pub conversation::Model);

impl Handler<Enqueue> for QueueActor {
    type Result = usize;

    fn handle(&mut self, Enqueue(c): Enqueue, ctx: &mut Context<Self>) -> usize {
        if let Some(p) = self.position(c.id) {
            return p;
        }
        if ConversationStatus::of(&c) != ConversationStatus::Queued {
            return 0;
        }
        self.push_back(&c);
        let position = self.position(c.id).unwrap_or(0);
        self.pump(ctx);
        position
    }
}

/// Where a conversation is in its queue (None: not queued).
#[derive(Message)]
#[rtype(result = "Option<usize>")]
pub struct Position(pub i64);

impl Handler<Position> for QueueActor {
    type Result = Option<usize>;

    fn handle(&mut self, Position(id): Position, _: &mut Context<Self>) -> Option<usize> {
        self.position(id)
    }
}

/// An agent's first connection opened.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentPresent {
    pub agent_id: i64,
    pub status: AgentStatus,
}

fn presence_of(s: AgentStatus) -> PresenceStatus {
    match s {
        AgentStatus::Online => PresenceStatus::Online,
        AgentStatus::Away => PresenceStatus::Away,
    }
}

impl Handler<AgentPresent> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: AgentPresent, ctx: &mut Context<Self>) {
        if let Some(h) = self.graces.remove(&msg.agent_id) {
            ctx.cancel_future(h);
        }
        self.refresh_agent(msg.agent_id, Some(presence_of(msg.status)), ctx);
    }
}

/// An agent's last connection closed: the grace period starts.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentAbsent {
    pub agent_id: i64,
}

impl Handler<AgentAbsent> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: AgentAbsent, ctx: &mut Context<Self>) {
        if let Some(p) = self.agents.get_mut(&msg.agent_id) {
            p.status = PresenceStatus::Gone;
        }
        if self.load(msg.agent_id) == 0 {
            self.agents.remove(&msg.agent_id);
        } else {
            self.start_grace(msg.agent_id, ctx);
        }
    }
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentStatusChanged {
    pub agent_id: i64,
    pub status: AgentStatus,
}

impl Handler<AgentStatusChanged> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: AgentStatusChanged, ctx: &mut Context<Self>) {
        if let Some(p) = self.agents.get_mut(&msg.agent_id) {
            p.status = presence_of(msg.status);
        }
        self.pump(ctx);
    }
}

/// An agent was changed or deleted over HTTP (capacity, teams).
#[derive(Message)]
#[rtype(result = "()")]
pub struct AgentChanged {
    pub agent_id: i64,
}

impl Handler<AgentChanged> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: AgentChanged, ctx: &mut Context<Self>) {
        if self.agents.contains_key(&msg.agent_id) {
            self.refresh_agent(msg.agent_id, None, ctx);
        }
    }
}

/// A sign of life from a visitor: `present` when a socket opened or closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct VisitorSeen {
    pub visitor_id: i64,
    pub present: Option<bool>,
}

impl Handler<VisitorSeen> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: VisitorSeen, _: &mut Context<Self>) {
        for q in self.queues.values_mut().flatten() {
            if q.visitor_id == msg.visitor_id {
                q.last_seen = Instant::now();
                if let Some(p) = msg.present {
                    q.present = p;
                }
            }
        }
    }
}

/// Close a conversation (visitor leaving, agent finishing).
#[derive(Message)]
#[rtype(result = "Result<(), WriteError>")]
pub struct Close {
    pub conversation_id: i64,
    pub by: Closer,
    pub origin: Option<Origin>,
}

impl Handler<Close> for QueueActor {
    type Result = AtomicResponse<Self, Result<(), WriteError>>;

    fn handle(&mut self, msg: Close, _: &mut Context<Self>) -> Self::Result {
        let submit = self
            .rt
            .conversation(&self.tenant, msg.conversation_id)
            .send(super::conversation::Submit {
                op: crate::storage::writer::WriteOp::Change(Change::Close {
                    conversation_id: msg.conversation_id,
                    by: msg.by,
                }),
                origin: msg.origin,
            });
        AtomicResponse::new(Box::pin(submit.into_actor(self).map(
            move |res, act, ctx| {
                let written = res.map_err(|_| WriteError::Unavailable)??;
                if let Written::Stored { before, .. } = written {
                    match ConversationStatus::of(&before) {
                        ConversationStatus::Queued => {
                            act.remove_queued(before.id);
                            act.abandoned += 1;
                        }
                        ConversationStatus::Active => act.release(before.agent_id, before.id),
                        ConversationStatus::Closed => {}
                    }
                    act.pump(ctx);
                }
                Ok(())
            },
        )))
    }
}

/// Where a transfer goes.
#[derive(Clone, Debug)]
pub enum TransferTarget {
    Agent(i64),
    Team(String),
}

/// An agent hands a conversation to another agent or back to a team's queue.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Transfer {
    pub conversation_id: i64,
    pub from_agent: i64,
    pub to: TransferTarget,
    pub origin: Origin,
}

impl Handler<Transfer> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: Transfer, ctx: &mut Context<Self>) {
        let refuse = |origin: &Origin, code: &str, text: &str| {
            origin
                .conn
                .push(error_frame(origin.reference.as_ref(), code, text));
        };
        let id = msg.conversation_id;
        let from = msg.from_agent;
        match msg.to.clone() {
            TransferTarget::Agent(to) => {
                let available = to != from
                    && self.agents.get(&to).is_some_and(|p| {
                        p.status == PresenceStatus::Online && self.load(to) < p.max_concurrent
                    });
                if !available {
                    refuse(
                        &msg.origin,
                        "agent_unavailable",
                        "that agent is not online with free capacity",
                    );
                    return;
                }
                let name = self
                    .agents
                    .get(&to)
                    .map(|p| p.name.clone())
                    .unwrap_or_default();
                self.holding.entry(to).or_default().insert(id);
                let submit =
                    self.rt
                        .conversation(&self.tenant, id)
                        .send(super::conversation::Submit {
                            op: crate::storage::writer::WriteOp::Change(Change::Transfer {
                                conversation_id: id,
                                from,
                                to: AgentRef { id: to, name },
                            }),
                            origin: Some(msg.origin),
                        });
                ctx.wait(submit.into_actor(self).map(move |res, act, ctx| {
                    if matches!(res, Ok(Ok(_))) {
                        act.release(Some(from), id);
                    } else {
                        act.release(Some(to), id);
                    }
                    act.pump(ctx);
                }));
            }
            TransferTarget::Team(slug) => {
                let rt = self.rt.clone();
                let tenant = self.tenant.clone();
                let origin = msg.origin.clone();
                let fut = async move {
                    let db = rt.db(&tenant).await.map_err(|_| WriteError::Unavailable)?;
                    let team = teams::find_by_slug(&db, &slug)
                        .await
                        .map_err(|_| WriteError::Unavailable)?
                        .ok_or(WriteError::NotFound)?;
                    rt.conversation(&tenant, id)
                        .send(super::conversation::Submit {
                            op: crate::storage::writer::WriteOp::Change(Change::Requeue {
                                conversation_id: id,
                                from,
                                to_team: Some((team.id, team.slug)),
                                reason: "transfer",
                            }),
                            origin: Some(origin),
                        })
                        .await
                        .map_err(|_| WriteError::Unavailable)?
                };
                ctx.wait(fut.into_actor(self).map(move |res, act, ctx| {
                    match res {
                        Ok(Written::Stored { conversation, .. }) => {
                            act.release(Some(from), id);
                            act.push_front(&conversation);
                        }
                        Err(WriteError::NotFound) => {
                            refuse(&msg.origin, "unknown_team", "no such team");
                        }
                        // Other refusals were answered by the conversation actor.
                        _ => {}
                    }
                    act.pump(ctx);
                }));
            }
        }
    }
}

/// The tenant's live numbers, for `/metrics` and the supervisor dashboard.
#[derive(Message)]
#[rtype(result = "crate::metrics::numbers::QueueSnapshot")]
pub struct Snapshot;

impl Handler<Snapshot> for QueueActor {
    type Result = MessageResult<Snapshot>;

    fn handle(&mut self, _: Snapshot, _: &mut Context<Self>) -> Self::Result {
        use crate::metrics::numbers::{AgentPresence, QueueSnapshot};
        let agents = self
            .agents
            .iter()
            .map(|(id, p)| AgentPresence {
                id: *id,
                status: match p.status {
                    PresenceStatus::Online => "online",
                    PresenceStatus::Away => "away",
                    PresenceStatus::Gone => "disconnected",
                },
            })
            .collect();
        let queues = self
            .queues
            .iter()
            .map(|(team, q)| (*team, (q.len(), q.front().map(|e| e.queued_at))))
            .collect();
        MessageResult(QueueSnapshot {
            agents,
            queues,
            active: self.holding.values().map(HashSet::len).sum(),
            abandoned: self.abandoned,
        })
    }
}
