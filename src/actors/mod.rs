//! The real-time core: actors and the registry that finds them.
//!
//! - [`conversation::ConversationActor`]: one per live conversation. Every write to the
//!   conversation's log from this node passes through it, in order; it acknowledges the sender
//!   after the group-commit writer has committed, then delivers to the participants.
//! - [`agent::AgentActor`]: one per online agent, fanning frames out to all of the agent's
//!   connections (two browser tabs both receive) and reporting presence to the queue.
//! - [`visitor::VisitorActor`]: the same for a visitor, plus the wake-ups of long-polls.
//! - [`order::SeqOrder`]: what a hub keeps so that its connections get each conversation's
//!   writes in `seq` order, with no gap or repeat, however they reached this node.
//! - [`queue::QueueActor`]: one per tenant: queues per team, agents' presence and load, and
//!   the decisions (assign, transfer, requeue, close, abandon).
//!
//! Actors run on a small pool of arbiters owned by [`Realtime`], except visitors' hubs, which
//! start on the HTTP worker of the socket that needs them first (see [`Place`]); stopping
//! the server's workers and then the pool stops every actor of this server. Connections run
//! on the HTTP workers and talk to actors only through their addresses and a
//! [`conn::ConnHandle`].
//!
//! [`Realtime`] is also the bus. On a single node it delivers to the actors of this process;
//! in cluster mode ([`crate::cluster`]) it also publishes each frame as a notice for the nodes
//! hosting the other participants, forwards queue operations to the node holding the
//! tenant's queue, reports this node's agents to it every second, and takes a queue over
//! when its lease is free.

pub mod agent;
pub mod conn;
pub mod conversation;
pub mod order;
pub mod queue;
pub mod visitor;

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use actix::{Actor, Addr, Arbiter, ArbiterHandle, Supervisor};
use bytestring::ByteString;
use dashmap::DashMap;
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::cluster::{Cluster, Notice, subject};
use crate::governance::{Dependency, Governance};
use crate::protocol::AgentStatus;
use crate::settings::RealtimeSettings;
use crate::storage::writer::Writers;
use crate::tenancy::{TenancyError, TenantRecord, Tenants};
use crate::trace_context::TraceContext;
use agent::AgentActor;
use conn::ConnHandle;
use conversation::ConversationActor;
use queue::{QueueActor, QueueOp, QueueReply};
use visitor::VisitorActor;

/// A tenant's key in the registry maps: (tenant id, actor id).
type Key = (i64, i64);

/// Hands a stored write to the hub under `key` on this node, if there is one. Without a hub
/// here to order against, the sender's connection is elsewhere or closing: its ack, if it
/// rides with this copy, goes straight to it.
fn deliver_write<A>(hubs: &DashMap<Key, Addr<A>>, key: Key, write: order::DeliverWrite)
where
    A: Actor<Context = actix::Context<A>> + actix::Handler<order::DeliverWrite>,
{
    if let Some(hub) = hubs.get(&key) {
        hub.do_send(write);
    } else if let Some((origin, ack)) = write.ack {
        origin.push(ack);
    }
}

/// Hands a notice another node published for an agent or visitor to its hub here: a stored
/// write (its frames, in order behind the others of its conversation) or a single frame.
fn deliver_here<A>(hubs: &DashMap<Key, Addr<A>>, kind: &'static str, id: i64, n: Notice)
where
    A: Actor<Context = actix::Context<A>>
        + actix::Handler<conn::Deliver>
        + actix::Handler<order::DeliverWrite>,
{
    tracing::debug!(
        trace_id = %n.trace.trace_id,
        from = %n.node,
        tenant_id = n.tenant,
        kind,
        id,
        "delivering a frame from another node"
    );
    let Some(hub) = hubs.get(&(n.tenant, id)).map(|h| h.clone()) else {
        return;
    };
    let Ok(payload) = ByteString::try_from(n.payload) else {
        tracing::warn!(from = %n.node, "notice that is not UTF-8 dropped");
        return;
    };
    match n.seq {
        Some((conversation_id, seq)) => hub.do_send(order::DeliverWrite {
            conversation_id,
            seq,
            frames: split_frames(&payload),
            except: None,
            ack: None,
        }),
        None => hub.do_send(conn::Deliver {
            frame: payload,
            except: None,
        }),
    }
}

/// The frames of a write travel in one notice, one per line: compact JSON has no raw line
/// breaks (they are escaped inside strings).
fn join_frames(frames: &[ByteString]) -> bytes::Bytes {
    let mut out = Vec::with_capacity(frames.iter().map(|f| f.len() + 1).sum());
    for (i, f) in frames.iter().enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(f.as_bytes());
    }
    out.into()
}

fn split_frames(payload: &ByteString) -> Arc<[ByteString]> {
    payload.split('\n').map(|f| payload.slice_ref(f)).collect()
}

/// What differs between agents' hubs and visitors' hubs, for [`Realtime::hub`].
struct HubKind<A: Actor> {
    /// For logs and for choosing an actor thread.
    name: &'static str,
    /// The registry's map of these hubs.
    hubs: fn(&Inner) -> &DashMap<Key, Addr<A>>,
    /// The subjects a hub of this kind listens on in cluster mode: its own and its writes'.
    subjects: [fn(i64, i64) -> String; 2],
    place: Place,
}

/// Agents' hubs: few, busy, beside the conversations on the actor threads.
const AGENT_HUBS: HubKind<AgentActor> = HubKind {
    name: "agent",
    hubs: |i| &i.agents,
    subjects: [subject::agent, subject::agent_writes],
    place: Place::ActorThreads,
};

/// Visitors' hubs: many, mostly idle, started where their first socket opens.
const VISITOR_HUBS: HubKind<VisitorActor> = HubKind {
    name: "visitor",
    hubs: |i| &i.visitors,
    subjects: [subject::visitor, subject::visitor_writes],
    place: Place::Here,
};

/// Which thread a new actor runs on.
#[derive(Clone, Copy)]
enum Place {
    /// One of [`Realtime`]'s actor threads, chosen by the actor's key: conversations and
    /// agents' hubs, which are few and busy, and exchange most of their messages there.
    ActorThreads,
    /// The caller's own thread when it has an arbiter (an HTTP worker opening a socket), else
    /// as [`Place::ActorThreads`]: visitors' hubs, one per idle visitor, mostly started by
    /// the visitor's first socket. Started there, a hub costs the opening no hand-over to
    /// another thread and no wake-up of it, a sixth of the server's CPU per connection
    /// opened; a message then costs the socket's worker the hub's share of its delivery
    /// instead of the actor thread, which measured within noise for visitors' hubs and not
    /// for agents' (docs/benchmarks.md, "Visitors' hubs on their socket's worker").
    Here,
}

/// What a registry lookup found.
pub enum Found<A: Actor> {
    Running(Addr<A>),
    /// Started by this lookup.
    Started(Addr<A>),
}

/// Cluster mode: how often a node reports its agents to each queue, checks its leases and
/// tries to take over queues nobody runs. Takeover after a node dies needs about one tick.
const CLUSTER_TICK: Duration = Duration::from_secs(1);

/// Cluster mode: how long a queue operation keeps trying to reach (or become) the queue's
/// node before the caller is told the queue is unavailable.
const QUEUE_CALL_DEADLINE: Duration = Duration::from_secs(6);

/// How often a node checks whether the tenants it hosts connections of are still active: a
/// tenant suspended elsewhere (another node, the command line) loses its sockets within this.
const TENANT_CHECK: Duration = Duration::from_secs(5);

/// Pause between two tries of a queue operation whose node did not answer.
const QUEUE_CALL_RETRY: Duration = Duration::from_millis(200);

/// The tenant's queue could not be reached (restarting, or changing nodes).
#[derive(Debug, thiserror::Error)]
#[error("the queue is not reachable right now; try again")]
pub struct QueueUnavailable;

/// The registered actor under `key` if it is still running.
fn live<K: Eq + Hash, A: Actor>(map: &DashMap<K, Addr<A>>, key: &K) -> Option<Addr<A>> {
    map.get(key).filter(|a| a.connected()).map(|a| a.clone())
}

/// The cloneable handle to the real-time core of this node.
#[derive(Clone)]
pub struct Realtime {
    inner: Arc<Inner>,
}

struct Inner {
    /// This node's name, sent in `hello`.
    node_id: String,
    settings: RealtimeSettings,
    /// For tenant databases.
    tenants: Tenants,
    /// Group-commit writers, one per tenant.
    writers: Writers,
    conversations: DashMap<Key, Addr<ConversationActor>>,
    agents: DashMap<Key, Addr<AgentActor>>,
    visitors: DashMap<Key, Addr<VisitorActor>>,
    queues: DashMap<i64, Addr<QueueActor>>,
    /// Visitors with at least one open socket on this node, and how many (the queue asks this
    /// when a conversation joins it, to know whether its visitor is still there).
    visitor_sockets: DashMap<Key, usize>,
    /// Agents connected to this node and their status: what this node reports to queues.
    presence: DashMap<Key, AgentStatus>,
    /// Cluster mode: tenants with actors on this node (their queues must be running
    /// somewhere; this node reports to them and takes them over when free).
    active_tenants: DashMap<i64, Arc<TenantRecord>>,
    /// Cluster mode: NATS and the queue leases. `None` on a single node.
    cluster: Option<Cluster>,
    /// Circuit breakers and bulkheads, shared by actors and HTTP handlers.
    governance: Governance,
    /// Where actors run; spread by a hash of their key.
    arbiters: Vec<ArbiterHandle>,
    /// The arbiters themselves, stopped at shutdown.
    owned: Mutex<Vec<Arbiter>>,
    /// Cancelled at shutdown: every connection closes with 1001.
    shutdown: CancellationToken,
    /// Source of connection ids (unique per process).
    next_conn: AtomicU64,
}

/// The threads actors run on (arbiters), started before [`Realtime`] so that the cluster's
/// connection can be made on one of them ([`ActorThreads::run_on_first`]). Dropped without
/// being handed to [`Realtime::start`] (a start-up that failed), they stop.
pub struct ActorThreads(Vec<Arbiter>);

impl ActorThreads {
    /// `threads` arbiters (at least one).
    pub fn start(threads: usize) -> Self {
        Self((0..threads.max(1)).map(|_| Arbiter::new()).collect())
    }

    /// Runs `work` on the first actor thread and returns its output; `None` if that thread
    /// has stopped. Tasks `work` spawns stay on that thread.
    pub async fn run_on_first<F>(&self, work: F) -> Option<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = self.0.first()?.spawn(async move {
            let _ = tx.send(work.await);
        });
        if !sent {
            return None;
        }
        rx.await.ok()
    }
}

impl Drop for ActorThreads {
    fn drop(&mut self) {
        for arbiter in self.0.drain(..) {
            arbiter.stop();
        }
    }
}

impl Realtime {
    /// Starts the real-time core on `threads`. In cluster mode, `cluster` should have been
    /// connected on the first of them (see `startup`).
    pub fn start(
        node_id: String,
        settings: RealtimeSettings,
        tenants: Tenants,
        mut threads: ActorThreads,
        cluster: Option<Cluster>,
        governance: Governance,
    ) -> Self {
        let owned: Vec<Arbiter> = std::mem::take(&mut threads.0);
        let arbiters = owned.iter().map(Arbiter::handle).collect();
        let rt = Self {
            inner: Arc::new(Inner {
                node_id,
                settings,
                tenants,
                writers: Writers::new(cluster.is_some()),
                conversations: DashMap::new(),
                agents: DashMap::new(),
                visitors: DashMap::new(),
                queues: DashMap::new(),
                visitor_sockets: DashMap::new(),
                presence: DashMap::new(),
                active_tenants: DashMap::new(),
                cluster,
                governance,
                arbiters,
                owned: Mutex::new(owned),
                shutdown: CancellationToken::new(),
                next_conn: AtomicU64::new(1),
            }),
        };
        if let Some(c) = &rt.inner.cluster {
            c.runtime().spawn(cluster_loop(Arc::downgrade(&rt.inner)));
        }
        tokio::spawn(watch_tenants(Arc::downgrade(&rt.inner)));
        rt
    }

    /// Closes every connection of a tenant on this node (it was suspended).
    pub fn kill_tenant(&self, tenant_id: i64, why: conn::Kill) {
        for hub in self.inner.agents.iter().filter(|e| e.key().0 == tenant_id) {
            hub.value().do_send(conn::KillAll(why));
        }
        for hub in self
            .inner
            .visitors
            .iter()
            .filter(|e| e.key().0 == tenant_id)
        {
            hub.value().do_send(conn::KillAll(why));
        }
    }

    pub fn governance(&self) -> &Governance {
        &self.inner.governance
    }

    /// Is this node part of a cluster?
    pub fn clustered(&self) -> bool {
        self.inner.cluster.is_some()
    }

    pub fn cluster(&self) -> Option<&Cluster> {
        self.inner.cluster.as_ref()
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }

    pub fn settings(&self) -> &RealtimeSettings {
        &self.inner.settings
    }

    pub fn writers(&self) -> &Writers {
        &self.inner.writers
    }

    /// Cancelled when the server is stopping.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.inner.shutdown.clone()
    }

    pub fn next_conn_id(&self) -> u64 {
        self.inner.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// The tenant's database (its pool may have been closed while idle; this reopens it).
    pub async fn db(&self, tenant: &TenantRecord) -> Result<DatabaseConnection, TenancyError> {
        Ok(self.inner.tenants.storage().tenant(&tenant.db_name).await?)
    }

    /// Stops the real-time core: connections are told to close (1001), writers finish what
    /// they accepted, then every actor stops.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        self.inner.writers.flush().await;
        if let Some(c) = &self.inner.cluster {
            // Given up explicitly so that another node takes the queues over at once.
            for t in c.leases().held() {
                c.leases().release(t).await;
            }
        }
        self.stop_now();
    }

    /// Stops every actor at once, without waiting for writers (what was not yet committed was
    /// not acknowledged either). For teardown where nothing can be awaited.
    pub fn stop_now(&self) {
        self.inner.shutdown.cancel();
        let owned =
            std::mem::take(&mut *self.inner.owned.lock().unwrap_or_else(|e| e.into_inner()));
        for arbiter in owned {
            arbiter.stop();
        }
        self.inner.conversations.clear();
        self.inner.agents.clear();
        self.inner.visitors.clear();
        self.inner.queues.clear();
        if let Some(c) = &self.inner.cluster {
            c.close();
        }
    }

    fn arbiter_for(&self, key: &impl Hash) -> &ArbiterHandle {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let i = (h.finish() as usize) % self.inner.arbiters.len();
        &self.inner.arbiters[i]
    }

    /// Cluster mode: remembers that this node has actors of `tenant`.
    fn touch_tenant(&self, tenant: &Arc<TenantRecord>) {
        if self.inner.cluster.is_some() && !self.inner.active_tenants.contains_key(&tenant.id) {
            self.inner.active_tenants.insert(tenant.id, tenant.clone());
        }
    }

    /// Cluster mode: subscribes `subject` for the hub or actor of `key`, handing each notice
    /// to `deliver` on this node.
    fn listen<F>(&self, tenant: &Arc<TenantRecord>, subject: String, deliver: F)
    where
        F: Fn(&Realtime, Notice) + Send + 'static,
    {
        let Some(c) = &self.inner.cluster else {
            return;
        };
        self.touch_tenant(tenant);
        let weak = Arc::downgrade(&self.inner);
        c.listen(tenant.id, subject, move |notice| {
            if let Some(inner) = weak.upgrade() {
                deliver(&Realtime { inner }, notice);
            }
        });
    }

    /// Finds the running actor under `key` in `map`, or starts one with `make` where `place`
    /// says (then the caller sets up what a new actor needs, its subscription).
    fn start_registered<A>(
        &self,
        map: &DashMap<Key, Addr<A>>,
        kind: &'static str,
        key: Key,
        place: Place,
        make: impl Fn() -> A + Clone + Send + 'static,
    ) -> Found<A>
    where
        A: Actor<Context = actix::Context<A>>,
    {
        // Read lock first: every message looks its conversation up.
        if let Some(a) = live(map, &key) {
            return Found::Running(a);
        }
        let here = matches!(place, Place::Here) && Arbiter::try_current().is_some();
        let start = || {
            if here {
                return make().start();
            }
            let make = make.clone();
            A::start_in_arbiter(self.arbiter_for(&(kind, key)), move |_| make())
        };
        let mut entry = map.entry(key).or_insert_with(start);
        if !entry.connected() {
            *entry = start();
        }
        Found::Started(entry.clone())
    }

    /// The conversation's actor on this node, started if needed.
    pub fn conversation(&self, tenant: &Arc<TenantRecord>, id: i64) -> Addr<ConversationActor> {
        let (rt, t) = (self.clone(), tenant.clone());
        let make = move || ConversationActor::new(rt.clone(), t.clone(), id);
        let conversations = &self.inner.conversations;
        match self.start_registered(
            conversations,
            "conv",
            (tenant.id, id),
            Place::ActorThreads,
            make,
        ) {
            Found::Running(running) => running,
            Found::Started(started) => {
                self.listen(
                    tenant,
                    subject::conversation(tenant.id, id),
                    move |rt, n| {
                        if let Some(a) = live(&rt.inner.conversations, &(n.tenant, id)) {
                            a.do_send(conversation::Changed);
                        }
                    },
                );
                started
            }
        }
    }

    /// Tells the other nodes that a conversation changed hands (their actors for it forget
    /// what they cached).
    pub fn conversation_changed(&self, tenant_id: i64, id: i64) {
        if let Some(c) = &self.inner.cluster {
            c.publish(
                tenant_id,
                subject::conversation(tenant_id, id),
                bytes::Bytes::from(id.to_string()),
                None,
            );
        }
    }

    /// May this node's queue actor for `tenant_id` make decisions? Always on a single node;
    /// in cluster mode only while this node holds the tenant's lease.
    pub fn owns_queue(&self, tenant_id: i64) -> bool {
        self.inner
            .cluster
            .as_ref()
            .is_none_or(|c| c.leases().holds(tenant_id))
    }

    /// The tenant's queue on this node, started (and rebuilt from storage) if needed. In
    /// cluster mode only the lease holder calls this.
    fn local_queue(&self, tenant: &Arc<TenantRecord>) -> Addr<QueueActor> {
        if let Some(a) = live(&self.inner.queues, &tenant.id) {
            return a;
        }
        let rt = self.clone();
        let t = tenant.clone();
        let arbiter = self.arbiter_for(&("queue", tenant.id)).clone();
        let clustered = self.clustered();
        // On one node a supervisor restarts a stopped queue in place; in a cluster a queue
        // stops because its lease is gone, and must stay stopped.
        let start = move || {
            let (rt, t) = (rt.clone(), t.clone());
            if clustered {
                QueueActor::start_in_arbiter(&arbiter, move |_| QueueActor::new(rt, t))
            } else {
                Supervisor::start_in_arbiter(&arbiter, move |_| QueueActor::new(rt, t))
            }
        };
        let mut entry = self.inner.queues.entry(tenant.id).or_insert_with(&start);
        if !entry.connected() {
            *entry = start();
        }
        entry.clone()
    }

    /// The tenant's queue if it runs on this node (numbers that only a live queue has; in a
    /// cluster only the lease holder has it).
    pub fn queue_if_running(&self, tenant_id: i64) -> Option<Addr<QueueActor>> {
        live(&self.inner.queues, &tenant_id)
    }

    fn forget_queue(&self, tenant_id: i64, addr: &Addr<QueueActor>) {
        self.inner.queues.remove_if(&tenant_id, |_, a| a == addr);
    }

    /// Asks the tenant's queue, wherever it runs, and waits for the answer.
    pub async fn queue_call(
        &self,
        tenant: &Arc<TenantRecord>,
        op: QueueOp,
    ) -> Result<QueueReply, QueueUnavailable> {
        let Some(c) = &self.inner.cluster else {
            return op
                .ask(&self.local_queue(tenant))
                .await
                .map_err(|_| QueueUnavailable);
        };
        self.touch_tenant(tenant);
        let payload = bytes::Bytes::from(serde_json::to_vec(&op).map_err(|_| QueueUnavailable)?);
        let deadline = tokio::time::Instant::now() + QUEUE_CALL_DEADLINE;
        let breaker = self.inner.governance.breakers.get(Dependency::Nats, "node");
        loop {
            if c.leases().holds(tenant.id) {
                return op
                    .ask(&self.local_queue(tenant))
                    .await
                    .map_err(|_| QueueUnavailable);
            }
            // While the bus is known to be down, fail fast rather than wait out the deadline.
            if breaker.check().is_err() {
                return Err(QueueUnavailable);
            }
            if !c.connected() {
                breaker.record(false);
                if tokio::time::Instant::now() >= deadline {
                    return Err(QueueUnavailable);
                }
                tokio::time::sleep(QUEUE_CALL_RETRY).await;
                continue;
            }
            let answer = c
                .request(tenant.id, subject::queue(tenant.id), payload.clone())
                .await;
            // "No responders" is an answer from a working bus; timeouts and errors are not.
            breaker.record(match &answer {
                Ok(_) => true,
                Err(e) => e.kind() == async_nats::RequestErrorKind::NoResponders,
            });
            match answer {
                Ok(answer) => {
                    return serde_json::from_slice(&answer).map_err(|e| {
                        tracing::warn!(error = %e, "undecodable queue answer");
                        QueueUnavailable
                    });
                }
                Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                    // Nobody runs the queue: take it, if it is really free.
                    if self.take_queue(tenant).await {
                        continue;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "queue request failed; retrying"),
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QueueUnavailable);
            }
            tokio::time::sleep(QUEUE_CALL_RETRY).await;
        }
    }

    /// Tells the tenant's queue, wherever it runs, without waiting. Notices from one caller
    /// arrive in order; a notice lost in cluster mode is corrected by the next heartbeat or
    /// reconciliation with storage.
    pub fn queue_tell(&self, tenant: &Arc<TenantRecord>, op: QueueOp) {
        match &self.inner.cluster {
            None => {
                if op.only_if_running() {
                    if let Some(q) = live(&self.inner.queues, &tenant.id) {
                        op.tell(&q);
                    }
                } else {
                    op.tell(&self.local_queue(tenant));
                }
            }
            Some(c) => {
                self.touch_tenant(tenant);
                if c.leases().holds(tenant.id) {
                    op.tell(&self.local_queue(tenant));
                } else if let Ok(payload) = serde_json::to_vec(&op) {
                    c.publish(tenant.id, subject::queue(tenant.id), payload.into(), None);
                }
            }
        }
    }

    /// Cluster mode: takes the tenant's queue if its lease is free, then listens for the
    /// operations other nodes forward. True if this node runs it now.
    async fn take_queue(&self, tenant: &Arc<TenantRecord>) -> bool {
        let Some(c) = &self.inner.cluster else {
            return true;
        };
        if !c.leases().try_acquire(tenant.id).await {
            return false;
        }
        if !c.listens_to(&subject::queue(tenant.id)) {
            tracing::info!(tenant = %tenant.slug, node = %self.node_id(), "this node runs the tenant's queue now");
        }
        self.local_queue(tenant);
        self.listen(tenant, subject::queue(tenant.id), |rt, n| {
            rt.serve_queue_op(n);
        });
        c.ready(&subject::queue(tenant.id)).await;
        true
    }

    /// Answers a queue operation forwarded by another node.
    fn serve_queue_op(&self, n: Notice) {
        if !self.owns_queue(n.tenant) {
            // Not ours (any more): no answer, and the asking node retries elsewhere.
            return;
        }
        let Some(queue) = live(&self.inner.queues, &n.tenant) else {
            return;
        };
        let op: QueueOp = match serde_json::from_slice(&n.payload) {
            Ok(op) => op,
            Err(e) => {
                tracing::warn!(error = %e, node = %n.node, "undecodable queue operation dropped");
                return;
            }
        };
        match (op.wants_reply(), n.reply, &self.inner.cluster) {
            (true, Some(reply), Some(c)) => {
                let c = c.clone();
                c.clone().runtime().spawn(async move {
                    if let Ok(answer) = op.ask(&queue).await
                        && let Ok(bytes) = serde_json::to_vec(&answer)
                    {
                        c.respond(reply, bytes.into());
                    }
                });
            }
            _ => {
                tracing::trace!(trace_id = %n.trace.trace_id, node = %n.node, "queue notice");
                op.tell(&queue);
            }
        }
    }

    /// An agent connected to this node (`Some` status), changed status, or lost its last
    /// connection here (`None`): remembered for heartbeats and told to the queue.
    pub fn agent_presence(
        &self,
        tenant: &Arc<TenantRecord>,
        agent_id: i64,
        status: Option<AgentStatus>,
    ) {
        let key = (tenant.id, agent_id);
        match status {
            Some(s) => {
                self.inner.presence.insert(key, s);
            }
            None => {
                self.inner.presence.remove(&key);
            }
        }
        self.queue_tell(
            tenant,
            QueueOp::Presence {
                node: self.node_id().to_owned(),
                agent_id,
                status,
            },
        );
    }

    /// The tenant's agents connected to this node, with their status.
    pub fn local_presence(&self, tenant_id: i64) -> Vec<(i64, AgentStatus)> {
        self.inner
            .presence
            .iter()
            .filter(|e| e.key().0 == tenant_id)
            .map(|e| (e.key().1, *e.value()))
            .collect()
    }

    /// The agent's hub, started if needed.
    pub fn agent_hub(&self, tenant: &Arc<TenantRecord>, agent_id: i64) -> Addr<AgentActor> {
        match self.agent_hub_with(tenant, agent_id, None) {
            Found::Running(hub) | Found::Started(hub) => hub,
        }
    }

    /// The agent's hub, started with `conn` already in it if it was not running: a hub that
    /// has just started cannot be stopping, so the connection needs no `Attach` and no wait
    /// for its answer (docs/benchmarks.md, "Opening"). A running hub is returned as found.
    pub fn agent_hub_with(
        &self,
        tenant: &Arc<TenantRecord>,
        agent_id: i64,
        conn: Option<&ConnHandle>,
    ) -> Found<AgentActor> {
        let (rt, t, conn) = (self.clone(), tenant.clone(), conn.cloned());
        let make = move || AgentActor::new(rt.clone(), t.clone(), agent_id, conn.clone());
        self.hub(tenant, agent_id, AGENT_HUBS, make)
    }

    /// The visitor's hub, started if needed.
    pub fn visitor_hub(&self, tenant: &Arc<TenantRecord>, visitor_id: i64) -> Addr<VisitorActor> {
        match self.visitor_hub_with(tenant, visitor_id, None) {
            Found::Running(hub) | Found::Started(hub) => hub,
        }
    }

    /// [`Self::agent_hub_with`] for a visitor.
    pub fn visitor_hub_with(
        &self,
        tenant: &Arc<TenantRecord>,
        visitor_id: i64,
        conn: Option<&ConnHandle>,
    ) -> Found<VisitorActor> {
        let (rt, t, conn) = (self.clone(), tenant.clone(), conn.cloned());
        let make = move || VisitorActor::new(rt.clone(), t.clone(), visitor_id, conn.clone());
        self.hub(tenant, visitor_id, VISITOR_HUBS, make)
    }

    /// An agent's or visitor's hub in `kind.hubs`, started with `make` if none runs; a hub
    /// started here listens for other nodes' notices on its `kind.subjects`: its own (frames
    /// for it alone) and the writes of its conversations (see [`subject::write`]).
    fn hub<A>(
        &self,
        tenant: &Arc<TenantRecord>,
        id: i64,
        kind: HubKind<A>,
        make: impl Fn() -> A + Clone + Send + 'static,
    ) -> Found<A>
    where
        A: Actor<Context = actix::Context<A>>
            + actix::Handler<conn::Deliver>
            + actix::Handler<order::DeliverWrite>,
    {
        let HubKind {
            name: kind,
            hubs,
            subjects,
            place,
        } = kind;
        let found = self.start_registered(hubs(&self.inner), kind, (tenant.id, id), place, make);
        if let Found::Started(_) = found {
            for subject in subjects {
                self.listen(tenant, subject(tenant.id, id), move |rt, n| {
                    deliver_here(hubs(&rt.inner), kind, id, n);
                });
            }
        }
        found
    }

    /// Cluster mode: waits until frames published for this agent (or visitor) reach this
    /// node, so that a client told "hello" misses nothing sent after it.
    pub async fn hub_listening(&self, tenant_id: i64, agent: Option<i64>, visitor: Option<i64>) {
        let Some(c) = &self.inner.cluster else {
            return;
        };
        if let Some(a) = agent {
            c.ready(&subject::agent(tenant_id, a)).await;
            c.ready(&subject::agent_writes(tenant_id, a)).await;
        }
        if let Some(v) = visitor {
            c.ready(&subject::visitor(tenant_id, v)).await;
            c.ready(&subject::visitor_writes(tenant_id, v)).await;
        }
    }

    /// Hands a stored write to the connections of both participants of its conversation: to
    /// their hubs on this node (which keep the conversation's order, see [`order`]) and, in
    /// cluster mode, as one notice for every node hosting either of them: its subject names
    /// both ([`subject::write`]), so a write is published once, not once per participant.
    /// `to_visitor` and `to_agent` differ only in the ack, which stays on this node (only its
    /// sender is here).
    pub fn write_to_participants(
        &self,
        tenant_id: i64,
        visitor_id: i64,
        to_visitor: order::DeliverWrite,
        to_agent: Option<(i64, order::DeliverWrite)>,
        trace: Option<&TraceContext>,
    ) {
        if let Some(c) = &self.inner.cluster {
            let subject = subject::write(tenant_id, visitor_id, to_agent.as_ref().map(|(a, _)| *a));
            let at = (to_visitor.conversation_id, to_visitor.seq);
            c.publish_write(
                tenant_id,
                subject,
                join_frames(&to_visitor.frames),
                at,
                trace,
            );
        }
        deliver_write(&self.inner.visitors, (tenant_id, visitor_id), to_visitor);
        if let Some((agent_id, write)) = to_agent {
            deliver_write(&self.inner.agents, (tenant_id, agent_id), write);
        }
    }

    /// Hands a stored write to an agent who is not (or no longer) its conversation's agent:
    /// to its hub here and, in cluster mode, as a notice on the agent's own subject.
    pub fn write_to_agent(
        &self,
        tenant_id: i64,
        agent_id: i64,
        write: order::DeliverWrite,
        trace: Option<&TraceContext>,
    ) {
        if let Some(c) = &self.inner.cluster {
            let subject = subject::agent(tenant_id, agent_id);
            let at = (write.conversation_id, write.seq);
            c.publish_write(tenant_id, subject, join_frames(&write.frames), at, trace);
        }
        deliver_write(&self.inner.agents, (tenant_id, agent_id), write);
    }

    /// Delivers a frame to every connection of an agent: on this node directly, and in
    /// cluster mode also to the node(s) hosting the agent (as part of `trace`).
    pub fn to_agent(
        &self,
        tenant_id: i64,
        agent_id: i64,
        frame: ByteString,
        except: Option<u64>,
        trace: Option<&TraceContext>,
    ) {
        let subject = || subject::agent(tenant_id, agent_id);
        if let Some(hub) = self.hub_for(
            &self.inner.agents,
            (tenant_id, agent_id),
            subject,
            &frame,
            trace,
        ) {
            hub.do_send(conn::Deliver { frame, except });
        }
    }

    /// Delivers a frame to every connection (and long-poll) of a visitor, wherever they are.
    pub fn to_visitor(
        &self,
        tenant_id: i64,
        visitor_id: i64,
        frame: ByteString,
        except: Option<u64>,
        trace: Option<&TraceContext>,
    ) {
        let subject = || subject::visitor(tenant_id, visitor_id);
        if let Some(hub) = self.hub_for(
            &self.inner.visitors,
            (tenant_id, visitor_id),
            subject,
            &frame,
            trace,
        ) {
            hub.do_send(conn::Deliver { frame, except });
        }
    }

    /// Publishes a frame for the nodes hosting its recipient (cluster mode; the subject is
    /// only built then), and returns the recipient's hub on this node, if it has one.
    fn hub_for<A: Actor>(
        &self,
        hubs: &DashMap<Key, Addr<A>>,
        key: Key,
        subject: impl FnOnce() -> String,
        frame: &ByteString,
        trace: Option<&TraceContext>,
    ) -> Option<Addr<A>> {
        if let Some(c) = &self.inner.cluster {
            c.publish(key.0, subject(), frame.as_bytes().clone(), trace);
        }
        hubs.get(&key).map(|hub| hub.clone())
    }

    /// Counts a visitor's socket in (`true`) or out.
    fn visitor_socket(&self, tenant_id: i64, visitor_id: i64, open: bool) {
        let key = (tenant_id, visitor_id);
        if open {
            *self.inner.visitor_sockets.entry(key).or_default() += 1;
        } else {
            self.inner.visitor_sockets.remove_if_mut(&key, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
    }

    /// Has the visitor a socket open on this node?
    pub fn visitor_present(&self, tenant_id: i64, visitor_id: i64) -> bool {
        self.inner
            .visitor_sockets
            .contains_key(&(tenant_id, visitor_id))
    }

    /// Forgets an actor that stopped, unless a successor has taken its place (and then its
    /// subscription, which a successor would have kept).
    fn forget_conversation(&self, key: Key, addr: &Addr<ConversationActor>) {
        if self
            .inner
            .conversations
            .remove_if(&key, |_, a| a == addr)
            .is_some()
        {
            self.unlisten(subject::conversation(key.0, key.1));
        }
    }

    fn forget_agent(&self, key: Key, addr: &Addr<AgentActor>) {
        if self
            .inner
            .agents
            .remove_if(&key, |_, a| a == addr)
            .is_some()
        {
            self.unlisten(subject::agent(key.0, key.1));
            self.unlisten(subject::agent_writes(key.0, key.1));
        }
    }

    fn forget_visitor(&self, key: Key, addr: &Addr<VisitorActor>) {
        if self
            .inner
            .visitors
            .remove_if(&key, |_, a| a == addr)
            .is_some()
        {
            self.unlisten(subject::visitor(key.0, key.1));
            self.unlisten(subject::visitor_writes(key.0, key.1));
        }
    }

    fn unlisten(&self, subject: String) {
        if let Some(c) = &self.inner.cluster {
            c.unlisten(&subject);
        }
    }
}

/// Every [`TENANT_CHECK`]: closes the connections of tenants that are no longer active
/// (suspended through another node or the command line; the node that suspends closes its
/// own at once).
async fn watch_tenants(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(TENANT_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let rt = Realtime { inner };
        if rt.inner.shutdown.is_cancelled() {
            return;
        }
        let hosted: std::collections::HashSet<i64> = rt
            .inner
            .agents
            .iter()
            .map(|e| e.key().0)
            .chain(rt.inner.visitors.iter().map(|e| e.key().0))
            .collect();
        if hosted.is_empty() {
            continue;
        }
        let Ok(records) = rt.inner.tenants.all_records().await else {
            continue;
        };
        for t in records {
            if hosted.contains(&t.id) && t.status != crate::tenancy::TenantStatus::Active {
                tracing::info!(tenant = %t.slug, "tenant not active; closing its connections");
                rt.kill_tenant(t.id, conn::Kill::Suspended);
            }
        }
    }
}

/// Cluster mode, every [`CLUSTER_TICK`]: drops queues whose lease was lost, takes over
/// queues nobody runs, reports this node's agents to every queue, and forgets tenants it no
/// longer hosts anything of.
async fn cluster_loop(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(CLUSTER_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let rt = Realtime { inner };
        if rt.inner.shutdown.is_cancelled() {
            return;
        }
        let Some(c) = rt.inner.cluster.clone() else {
            return;
        };
        for lost in c.leases().verify().await {
            tracing::warn!(
                tenant_id = lost,
                "queue lease lost; stopping this node's queue"
            );
            c.unlisten(&subject::queue(lost));
            if let Some(q) = rt.inner.queues.get(&lost).map(|q| q.clone()) {
                q.do_send(queue::Retire);
            }
        }
        let tenants: Vec<Arc<TenantRecord>> = rt
            .inner
            .active_tenants
            .iter()
            .map(|e| e.value().clone())
            .collect();
        for tenant in tenants {
            let t = tenant.id;
            let hosts_something = rt.inner.agents.iter().any(|e| e.key().0 == t)
                || rt.inner.visitors.iter().any(|e| e.key().0 == t)
                || rt.inner.conversations.iter().any(|e| e.key().0 == t);
            if !hosts_something && !c.leases().holds(t) {
                rt.inner.active_tenants.remove(&t);
                continue;
            }
            if !c.leases().holds(t) {
                rt.take_queue(&tenant).await;
            }
            let agents = rt.local_presence(t);
            if !agents.is_empty() {
                rt.queue_tell(
                    &tenant,
                    QueueOp::Heartbeat {
                        node: rt.node_id().to_owned(),
                        agents,
                    },
                );
            }
        }
    }
}
