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
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::Realtime;
use super::conversation::change;
use crate::accounts::{agents, teams};
use crate::conversations::log::{Change, Closer, WriteError, Written};
use crate::conversations::{ConversationStatus, store};
use crate::protocol::{AgentRef, AgentStatus, ServerFrame};
use crate::tenancy::TenantRecord;

/// How often the queue looks for abandoned visitors and retries after a storage failure.
const TICK: Duration = Duration::from_secs(1);

/// Cluster mode: a node whose presence heartbeat is older than this is taken for dead, and
/// its agents for disconnected (their grace period starts). Heartbeats come every second.
pub const PRESENCE_EXPIRY: Duration = Duration::from_secs(5);

/// Cluster mode: how often the queue compares itself with storage. Operations forwarded from
/// other nodes can be lost (NATS down, a node killed mid-request); storage has every queued
/// and active conversation, so the queue picks up what it missed within this.
const RECONCILE: Duration = Duration::from_secs(3);

pub struct QueueActor {
    rt: Realtime,
    tenant: Arc<TenantRecord>,
    /// team id → its queued conversations, head first.
    queues: HashMap<i64, VecDeque<Queued>>,
    /// Agents connected somewhere (or within their grace period).
    agents: HashMap<i64, Presence>,
    /// node → the agents connected there and their status, with the time of its last report.
    /// An agent's presence is the union over the nodes (online wins over away).
    nodes: HashMap<String, NodeReport>,
    /// agent id → the conversations it holds (also for agents not present).
    holding: HashMap<i64, HashSet<i64>>,
    /// Grace timers of agents who lost every connection.
    graces: HashMap<i64, SpawnHandle>,
    /// team id → slug, for the metrics' `team` label (loaded at start, reloaded on a miss).
    team_slugs: HashMap<i64, String>,
    /// Conversations closed while queued since this actor started (for the numbers).
    pub abandoned: u64,
}

/// What the queue needs of a queued conversation (also sent between nodes).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Waiting {
    pub conversation_id: i64,
    pub visitor_id: i64,
    pub team_id: i64,
    pub queued_at: DateTime<Utc>,
}

impl From<&conversation::Model> for Waiting {
    fn from(c: &conversation::Model) -> Self {
        Self {
            conversation_id: c.id,
            visitor_id: c.visitor_id,
            team_id: c.team_id,
            queued_at: c.queued_at,
        }
    }
}

struct NodeReport {
    at: Instant,
    agents: HashMap<i64, AgentStatus>,
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
    fn new(c: &Waiting, present: bool) -> Self {
        Self {
            conversation_id: c.conversation_id,
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
            nodes: HashMap::new(),
            team_slugs: HashMap::new(),
            holding: HashMap::new(),
            graces: HashMap::new(),
            abandoned: 0,
        }
    }

    fn queued(&self, c: &Waiting) -> Queued {
        Queued::new(c, self.rt.visitor_present(self.tenant.id, c.visitor_id))
    }

    /// Joins a conversation at the back of its team's queue (new arrivals).
    fn push_back(&mut self, c: &Waiting) {
        let q = self.queued(c);
        self.queues.entry(c.team_id).or_default().push_back(q);
    }

    /// Joins a conversation at the head of its team's queue (returned conversations).
    fn push_front(&mut self, c: &Waiting) {
        let q = self.queued(c);
        self.queues.entry(c.team_id).or_default().push_front(q);
    }

    /// Joins a conversation the queue missed where its `queued_at` puts it.
    fn insert_in_order(&mut self, c: &Waiting) {
        let q = self.queued(c);
        let queue = self.queues.entry(c.team_id).or_default();
        let at = queue
            .iter()
            .position(|e| (e.queued_at, e.conversation_id) > (q.queued_at, q.conversation_id))
            .unwrap_or(queue.len());
        queue.insert(at, q);
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

    /// The slug of a team, for metrics. A team made since the last load is looked up in the
    /// background; meanwhile its id stands in.
    fn team_slug(&mut self, team_id: i64, ctx: &mut Context<Self>) -> String {
        if let Some(slug) = self.team_slugs.get(&team_id) {
            return slug.clone();
        }
        let rt = self.rt.clone();
        let tenant = self.tenant.clone();
        let load = async move {
            let db = rt.db(&tenant).await.ok()?;
            teams::list(&db).await.ok()
        };
        ctx.spawn(load.into_actor(self).map(|teams, act, _| {
            if let Some(teams) = teams {
                act.team_slugs = teams.into_iter().map(|t| (t.id, t.slug)).collect();
            }
        }));
        team_id.to_string()
    }

    /// Cluster mode: decisions are made only while this node holds the tenant's lease. An
    /// actor that finds it lost stops at once (the node that took over rebuilt from storage).
    fn may_decide(&mut self, ctx: &mut Context<Self>) -> bool {
        let ok = self.rt.owns_queue(self.tenant.id);
        if !ok {
            tracing::warn!(tenant = %self.tenant.slug, "queue lease lost; this node stops deciding");
            ctx.stop();
        }
        ok
    }

    /// What the nodes say about an agent: online anywhere wins over away; none: gone.
    fn reported(&self, agent_id: i64) -> Option<AgentStatus> {
        let mut best = None;
        for r in self.nodes.values() {
            match r.agents.get(&agent_id) {
                Some(AgentStatus::Online) => return Some(AgentStatus::Online),
                Some(AgentStatus::Away) => best = Some(AgentStatus::Away),
                None => {}
            }
        }
        best
    }

    /// Brings an agent's presence in line with what the nodes report: arrival (or return
    /// within the grace period), a status change, or departure (the grace period starts).
    fn settle(&mut self, agent_id: i64, ctx: &mut Context<Self>) {
        let now = self.reported(agent_id);
        let was = self.agents.get(&agent_id).map(|p| p.status);
        match (now, was) {
            (Some(s), None | Some(PresenceStatus::Gone)) => {
                if let Some(h) = self.graces.remove(&agent_id) {
                    ctx.cancel_future(h);
                }
                self.refresh_agent(agent_id, Some(presence_of(s)), ctx);
            }
            (Some(s), Some(_)) => {
                if let Some(p) = self.agents.get_mut(&agent_id)
                    && p.status != presence_of(s)
                {
                    p.status = presence_of(s);
                    self.pump(ctx);
                }
            }
            (None, None | Some(PresenceStatus::Gone)) => {}
            (None, Some(_)) => {
                if let Some(p) = self.agents.get_mut(&agent_id) {
                    p.status = PresenceStatus::Gone;
                }
                if self.load(agent_id) == 0 {
                    self.agents.remove(&agent_id);
                } else {
                    self.start_grace(agent_id, ctx);
                }
            }
        }
    }

    /// Forgets nodes that stopped reporting (cluster mode): their agents count as gone.
    fn expire_nodes(&mut self, ctx: &mut Context<Self>) {
        let me = self.rt.node_id();
        let dead: Vec<String> = self
            .nodes
            .iter()
            .filter(|(n, r)| n.as_str() != me && r.at.elapsed() >= PRESENCE_EXPIRY)
            .map(|(n, _)| n.clone())
            .collect();
        for n in dead {
            tracing::warn!(node = %n, tenant = %self.tenant.slug, "node silent; its agents count as disconnected");
            if let Some(r) = self.nodes.remove(&n) {
                for a in r.agents.keys() {
                    self.settle(*a, ctx);
                }
            }
        }
    }

    /// Compares the queue with storage and adopts what storage says (cluster mode).
    fn reconcile(&mut self, ctx: &mut Context<Self>) {
        let rt = self.rt.clone();
        let tenant = self.tenant.clone();
        let load = async move {
            let db = rt.db(&tenant).await.ok()?;
            let queued = store::queued(&db).await.ok()?;
            let active = store::active(&db).await.ok()?;
            Some((queued, active))
        };
        ctx.wait(load.into_actor(self).map(|loaded, act, ctx| {
            let Some((queued, active)) = loaded else {
                return;
            };
            let in_storage: HashSet<i64> = queued.iter().map(|c| c.id).collect();
            for q in act.queues.values_mut() {
                q.retain(|e| in_storage.contains(&e.conversation_id));
            }
            let known: HashSet<i64> = act
                .queues
                .values()
                .flatten()
                .map(|q| q.conversation_id)
                .collect();
            let missed: Vec<Waiting> = queued
                .iter()
                .filter(|c| !known.contains(&c.id))
                .map(Waiting::from)
                .collect();
            if !missed.is_empty() {
                tracing::info!(tenant = %act.tenant.slug, missed = missed.len(), "queue picked up conversations from storage");
            }
            for w in &missed {
                act.insert_in_order(w);
            }
            act.holding.clear();
            for c in &active {
                if let Some(a) = c.agent_id {
                    act.holding.entry(a).or_default().insert(c.id);
                }
            }
            let absent: Vec<i64> = act
                .holding
                .keys()
                .copied()
                .filter(|a| !act.agents.contains_key(a) && !act.graces.contains_key(a))
                .collect();
            for a in absent {
                act.start_grace(a, ctx);
            }
            act.pump(ctx);
        }));
    }

    /// Assigns while there is someone to assign to, one storage write at a time.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if !self.may_decide(ctx) {
            return;
        }
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
                    let team = act.team_slug(q.team_id, ctx);
                    crate::metrics::global().queue_waited(
                        &act.tenant.slug,
                        &team,
                        Utc::now() - q.queued_at,
                    );
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
                    self.rt.to_visitor(tenant, e.visitor_id, frame, None, None);
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
                act.push_front(&Waiting::from(c));
            }
            act.pump(ctx);
        }));
    }

    /// Closes queued conversations whose visitor has been gone too long.
    fn abandon_stale(&mut self, ctx: &mut Context<Self>) {
        if !self.may_decide(ctx) {
            return;
        }
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
        if !self.may_decide(ctx) {
            return;
        }
        let rt = self.rt.clone();
        let tenant = self.tenant.clone();
        let rebuild = async move {
            let db = rt.db(&tenant).await.ok()?;
            let queued = store::queued(&db).await.ok()?;
            let active = store::active(&db).await.ok()?;
            let teams = teams::list(&db).await.ok()?;
            Some((queued, active, teams))
        };
        ctx.wait(rebuild.into_actor(self).map(|loaded, act, ctx| {
            let Some((queued, active, teams)) = loaded else {
                tracing::error!(tenant = %act.tenant.slug, "could not rebuild the queue from storage");
                return;
            };
            act.team_slugs = teams.into_iter().map(|t| (t.id, t.slug)).collect();
            for c in &queued {
                act.push_back(&Waiting::from(c));
            }
            for c in &active {
                if let Some(a) = c.agent_id {
                    act.holding.entry(a).or_default().insert(c.id);
                }
            }
            // The agents connected to this node are known at once; other nodes report
            // within a heartbeat.
            let here = act.rt.local_presence(act.tenant.id);
            let me = act.rt.node_id().to_owned();
            act.nodes.insert(
                me,
                NodeReport {
                    at: Instant::now(),
                    agents: here.iter().copied().collect(),
                },
            );
            for (a, _) in &here {
                act.settle(*a, ctx);
            }
            // Agents holding conversations and not (yet) reported: their grace starts now.
            let holders: Vec<i64> = act.holding.keys().copied().collect();
            for a in holders {
                if act.reported(a).is_none() {
                    act.start_grace(a, ctx);
                }
            }
            tracing::info!(tenant = %act.tenant.slug, queued = queued.len(), active = active.len(), "queue rebuilt");
        }));
        ctx.run_interval(TICK, |act, ctx| {
            act.expire_nodes(ctx);
            act.abandon_stale(ctx);
        });
        if self.rt.clustered() {
            ctx.run_interval(RECONCILE, |act, ctx| act.reconcile(ctx));
        }
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.rt.forget_queue(self.tenant.id, &ctx.address());
    }
}

impl Supervised for QueueActor {
    fn restarting(&mut self, _: &mut Context<Self>) {
        // Storage is the truth: forget everything and rebuild in `started`.
        self.queues.clear();
        self.holding.clear();
        self.graces.clear();
        self.nodes.clear();
    }
}

/// A visitor opened a conversation; answers its queue position.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Enqueue(pub Waiting);

impl Handler<Enqueue> for QueueActor {
    type Result = usize;

    fn handle(&mut self, Enqueue(c): Enqueue, ctx: &mut Context<Self>) -> usize {
        if let Some(p) = self.position(c.conversation_id) {
            return p;
        }
        self.push_back(&c);
        let position = self.position(c.conversation_id).unwrap_or(0);
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

fn presence_of(s: AgentStatus) -> PresenceStatus {
    match s {
        AgentStatus::Online => PresenceStatus::Online,
        AgentStatus::Away => PresenceStatus::Away,
    }
}

/// A node says an agent connected (with its status), changed status, or lost its last
/// connection there (`None`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct PresenceChanged {
    pub node: String,
    pub agent_id: i64,
    pub status: Option<AgentStatus>,
}

impl Handler<PresenceChanged> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: PresenceChanged, ctx: &mut Context<Self>) {
        let report = self.nodes.entry(msg.node).or_insert_with(|| NodeReport {
            at: Instant::now(),
            agents: HashMap::new(),
        });
        report.at = Instant::now();
        match msg.status {
            Some(s) => report.agents.insert(msg.agent_id, s),
            None => report.agents.remove(&msg.agent_id),
        };
        self.settle(msg.agent_id, ctx);
    }
}

/// A node's periodic report of every agent connected to it (cluster mode): keeps the node
/// alive in the queue's eyes and corrects anything a lost notice left wrong.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Heartbeat {
    pub node: String,
    pub agents: Vec<(i64, AgentStatus)>,
}

impl Handler<Heartbeat> for QueueActor {
    type Result = ();

    fn handle(&mut self, msg: Heartbeat, ctx: &mut Context<Self>) {
        let agents: HashMap<i64, AgentStatus> = msg.agents.into_iter().collect();
        let mut affected: HashSet<i64> = agents.keys().copied().collect();
        let old = self.nodes.insert(
            msg.node,
            NodeReport {
                at: Instant::now(),
                agents,
            },
        );
        if let Some(old) = old {
            affected.extend(old.agents.keys());
        }
        for a in affected {
            self.settle(a, ctx);
        }
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

/// Why the queue refused an operation (sent back to the node that asked).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    NotFound,
    Closed,
    NotParticipant,
    Stale,
    AgentUnavailable,
    UnknownTeam,
    Unavailable,
}

impl From<&WriteError> for Refusal {
    fn from(e: &WriteError) -> Self {
        match e {
            WriteError::NotFound => Self::NotFound,
            WriteError::Closed => Self::Closed,
            WriteError::NotParticipant => Self::NotParticipant,
            WriteError::Stale | WriteError::ClientMsgIdReused => Self::Stale,
            WriteError::Storage(_) | WriteError::Unavailable | WriteError::Overloaded => {
                Self::Unavailable
            }
        }
    }
}

impl Refusal {
    /// The error code and text of the refusal, as frames and HTTP show it.
    pub fn code_and_text(self) -> (&'static str, String) {
        match self {
            Self::AgentUnavailable => (
                "agent_unavailable",
                "that agent is not online with free capacity".to_owned(),
            ),
            Self::UnknownTeam => ("unknown_team", "no such team".to_owned()),
            other => super::conversation::write_error_code(&other.as_write_error()),
        }
    }

    /// The write error this refusal stands for (transfer-only refusals read as not found).
    pub fn as_write_error(self) -> WriteError {
        match self {
            Self::NotFound | Self::UnknownTeam => WriteError::NotFound,
            Self::Closed => WriteError::Closed,
            Self::NotParticipant => WriteError::NotParticipant,
            Self::Stale | Self::AgentUnavailable => WriteError::Stale,
            Self::Unavailable => WriteError::Unavailable,
        }
    }
}

/// Close a conversation (visitor leaving, agent finishing).
#[derive(Message)]
#[rtype(result = "Result<(), Refusal>")]
pub struct Close {
    pub conversation_id: i64,
    pub by: Closer,
}

impl Handler<Close> for QueueActor {
    type Result = AtomicResponse<Self, Result<(), Refusal>>;

    fn handle(&mut self, msg: Close, _: &mut Context<Self>) -> Self::Result {
        let submit = self
            .rt
            .conversation(&self.tenant, msg.conversation_id)
            .send(change(Change::Close {
                conversation_id: msg.conversation_id,
                by: msg.by,
            }));
        AtomicResponse::new(Box::pin(submit.into_actor(self).map(
            move |res, act, ctx| {
                let written = res
                    .map_err(|_| Refusal::Unavailable)?
                    .map_err(|e| Refusal::from(&e))?;
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
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransferTarget {
    Agent(i64),
    Team(String),
}

/// An agent hands a conversation to another agent or back to a team's queue.
#[derive(Message)]
#[rtype(result = "Result<(), Refusal>")]
pub struct Transfer {
    pub conversation_id: i64,
    pub from_agent: i64,
    pub to: TransferTarget,
}

impl Handler<Transfer> for QueueActor {
    type Result = AtomicResponse<Self, Result<(), Refusal>>;

    fn handle(&mut self, msg: Transfer, _: &mut Context<Self>) -> Self::Result {
        let id = msg.conversation_id;
        let from = msg.from_agent;
        match msg.to {
            TransferTarget::Agent(to) => {
                let available = to != from
                    && self.agents.get(&to).is_some_and(|p| {
                        p.status == PresenceStatus::Online && self.load(to) < p.max_concurrent
                    });
                if !available {
                    return AtomicResponse::new(Box::pin(fut::ready(Err(
                        Refusal::AgentUnavailable,
                    ))));
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
                        .send(change(Change::Transfer {
                            conversation_id: id,
                            from,
                            to: AgentRef { id: to, name },
                        }));
                AtomicResponse::new(Box::pin(submit.into_actor(self).map(
                    move |res, act, ctx| {
                        let res = match res {
                            Ok(Ok(_)) => {
                                act.release(Some(from), id);
                                Ok(())
                            }
                            Ok(Err(e)) => {
                                act.release(Some(to), id);
                                Err(Refusal::from(&e))
                            }
                            Err(_) => {
                                act.release(Some(to), id);
                                Err(Refusal::Unavailable)
                            }
                        };
                        act.pump(ctx);
                        res
                    },
                )))
            }
            TransferTarget::Team(slug) => {
                let rt = self.rt.clone();
                let tenant = self.tenant.clone();
                let fut = async move {
                    let db = rt.db(&tenant).await.map_err(|_| Refusal::Unavailable)?;
                    let team = teams::find_by_slug(&db, &slug)
                        .await
                        .map_err(|_| Refusal::Unavailable)?
                        .ok_or(Refusal::UnknownTeam)?;
                    rt.conversation(&tenant, id)
                        .send(change(Change::Requeue {
                            conversation_id: id,
                            from,
                            to_team: Some((team.id, team.slug)),
                            reason: "transfer",
                        }))
                        .await
                        .map_err(|_| Refusal::Unavailable)?
                        .map_err(|e| Refusal::from(&e))
                };
                AtomicResponse::new(Box::pin(fut.into_actor(self).map(move |res, act, ctx| {
                    let res = match res {
                        Ok(Written::Stored { conversation, .. }) => {
                            act.release(Some(from), id);
                            act.push_front(&Waiting::from(&conversation));
                            Ok(())
                        }
                        Ok(_) => Ok(()),
                        Err(r) => Err(r),
                    };
                    act.pump(ctx);
                    res
                })))
            }
        }
    }
}

/// Stops the queue on this node (its lease was lost or given up).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

impl Handler<Retire> for QueueActor {
    type Result = ();

    fn handle(&mut self, _: Retire, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// A queue operation as it travels between nodes (and is dispatched locally).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum QueueOp {
    Enqueue(Waiting),
    Position {
        conversation_id: i64,
    },
    Close {
        conversation_id: i64,
        by: Closer,
    },
    Transfer {
        conversation_id: i64,
        from_agent: i64,
        to: TransferTarget,
    },
    AgentChanged {
        agent_id: i64,
    },
    VisitorSeen {
        visitor_id: i64,
        present: Option<bool>,
    },
    Presence {
        node: String,
        agent_id: i64,
        status: Option<AgentStatus>,
    },
    Heartbeat {
        node: String,
        agents: Vec<(i64, AgentStatus)>,
    },
    /// The tenant's live numbers (dashboard, metrics).
    Snapshot,
}

/// The answer to a [`QueueOp`] that wants one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueReply {
    /// Enqueue (0: not queued) and Position (none: not queued).
    Position(Option<usize>),
    Done(Result<(), Refusal>),
    Snapshot(crate::metrics::numbers::QueueSnapshot),
}

impl QueueOp {
    /// Operations whose caller waits for a [`QueueReply`]; the others are notices.
    pub fn wants_reply(&self) -> bool {
        matches!(
            self,
            Self::Enqueue(_)
                | Self::Position { .. }
                | Self::Close { .. }
                | Self::Transfer { .. }
                | Self::Snapshot
        )
    }

    /// Notices that only matter to a queue already running (they do not start one).
    pub fn only_if_running(&self) -> bool {
        matches!(self, Self::AgentChanged { .. } | Self::VisitorSeen { .. })
    }

    /// Hands a notice to the local queue actor, in order.
    pub fn tell(self, queue: &Addr<QueueActor>) {
        match self {
            Self::AgentChanged { agent_id } => queue.do_send(AgentChanged { agent_id }),
            Self::VisitorSeen {
                visitor_id,
                present,
            } => queue.do_send(VisitorSeen {
                visitor_id,
                present,
            }),
            Self::Presence {
                node,
                agent_id,
                status,
            } => queue.do_send(PresenceChanged {
                node,
                agent_id,
                status,
            }),
            Self::Heartbeat { node, agents } => queue.do_send(Heartbeat { node, agents }),
            asked => {
                // Callers route by `wants_reply`; an operation that wants an answer sent as a
                // notice would lose its answer, so it is asked and the answer dropped.
                let queue = queue.clone();
                actix::spawn(async move {
                    let _ = asked.ask(&queue).await;
                });
            }
        }
    }

    /// Asks the local queue actor and waits for its answer.
    pub async fn ask(self, queue: &Addr<QueueActor>) -> Result<QueueReply, MailboxError> {
        Ok(match self {
            Self::Enqueue(w) => QueueReply::Position(Some(queue.send(Enqueue(w)).await?)),
            Self::Position { conversation_id } => {
                QueueReply::Position(queue.send(Position(conversation_id)).await?)
            }
            Self::Close {
                conversation_id,
                by,
            } => QueueReply::Done(
                queue
                    .send(Close {
                        conversation_id,
                        by,
                    })
                    .await?,
            ),
            Self::Transfer {
                conversation_id,
                from_agent,
                to,
            } => QueueReply::Done(
                queue
                    .send(Transfer {
                        conversation_id,
                        from_agent,
                        to,
                    })
                    .await?,
            ),
            Self::Snapshot => QueueReply::Snapshot(queue.send(Snapshot).await?),
            notice => {
                notice.tell(queue);
                QueueReply::Done(Ok(()))
            }
        })
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
                }
                .to_owned(),
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
