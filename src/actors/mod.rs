//! The real-time core: actors and the registry that finds them.
//!
//! - [`conversation::ConversationActor`]: one per live conversation. Every write to the
//!   conversation's log from this node passes through it, in order; it acknowledges the sender
//!   after the group-commit writer has committed, then delivers to the participants.
//! - [`agent::AgentActor`]: one per online agent, fanning frames out to all of the agent's
//!   connections (two browser tabs both receive) and reporting presence to the queue.
//! - [`visitor::VisitorActor`]: the same for a visitor, plus the wake-ups of long-polls.
//! - [`queue::QueueActor`]: one per tenant: queues per team, agents' presence and load, and
//!   the decisions (assign, transfer, requeue, close, abandon).
//!
//! Actors run on a small pool of arbiters owned by [`Realtime`], so stopping the pool stops
//! every actor of this server. Connections run on the HTTP workers and talk to actors only
//! through their addresses and a [`conn::ConnHandle`].

pub mod agent;
pub mod conn;
pub mod conversation;
pub mod queue;
pub mod visitor;

use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::{Actor, Addr, Arbiter, ArbiterHandle, Supervisor};
use bytestring::ByteString;
use dashmap::DashMap;
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

use crate::settings::RealtimeSettings;
use crate::storage::writer::Writers;
use crate::tenancy::{TenancyError, TenantRecord, Tenants};
use agent::AgentActor;
use conversation::ConversationActor;
use queue::QueueActor;
use visitor::VisitorActor;

/// A tenant's key in the registry maps: (tenant id, actor id).
type Key = (i64, i64);

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
    /// Where actors run; spread by a hash of their key.
    arbiters: Vec<ArbiterHandle>,
    /// The arbiters themselves, stopped at shutdown.
    owned: Mutex<Vec<Arbiter>>,
    /// Cancelled at shutdown: every connection closes with 1001.
    shutdown: CancellationToken,
    /// Source of connection ids (unique per process).
    next_conn: AtomicU64,
}

impl Realtime {
    /// Starts the actor pool: `threads` arbiters (at least one).
    pub fn start(
        node_id: String,
        settings: RealtimeSettings,
        tenants: Tenants,
        threads: usize,
    ) -> Self {
        let owned: Vec<Arbiter> = (0..threads.max(1)).map(|_| Arbiter::new()).collect();
        let arbiters = owned.iter().map(Arbiter::handle).collect();
        Self {
            inner: Arc::new(Inner {
                node_id,
                settings,
                tenants,
                writers: Writers::default(),
                conversations: DashMap::new(),
                agents: DashMap::new(),
                visitors: DashMap::new(),
                queues: DashMap::new(),
                visitor_sockets: DashMap::new(),
                arbiters,
                owned: Mutex::new(owned),
                shutdown: CancellationToken::new(),
                next_conn: AtomicU64::new(1),
            }),
        }
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
    }

    fn arbiter_for(&self, key: &impl Hash) -> &ArbiterHandle {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        let i = (h.finish() as usize) % self.inner.arbiters.len();
        &self.inner.arbiters[i]
    }

    /// The conversation's actor on this node, started if needed.
    pub fn conversation(&self, tenant: &Arc<TenantRecord>, id: i64) -> Addr<ConversationActor> {
        let key = (tenant.id, id);
        // Read lock first: every message looks its conversation up.
        if let Some(a) = live(&self.inner.conversations, &key) {
            return a;
        }
        let rt = self.clone();
        let t = tenant.clone();
        let arbiter = self.arbiter_for(&("conv", key)).clone();
        let mut entry = self.inner.conversations.entry(key).or_insert_with(|| {
            let (rt, t) = (rt.clone(), t.clone());
            ConversationActor::start_in_arbiter(&arbiter, move |_| {
                ConversationActor::new(rt, t, id)
            })
        });
        if !entry.connected() {
            *entry = ConversationActor::start_in_arbiter(&arbiter, move |_| {
                ConversationActor::new(rt, t, id)
            });
        }
        entry.clone()
    }

    /// The tenant's queue on this node, started (and rebuilt from storage) if needed.
    pub fn queue(&self, tenant: &Arc<TenantRecord>) -> Addr<QueueActor> {
        if let Some(a) = live(&self.inner.queues, &tenant.id) {
            return a;
        }
        let rt = self.clone();
        let t = tenant.clone();
        let arbiter = self.arbiter_for(&("queue", tenant.id)).clone();
        let mut entry = self.inner.queues.entry(tenant.id).or_insert_with(|| {
            let (rt, t) = (rt.clone(), t.clone());
            Supervisor::start_in_arbiter(&arbiter, move |_| QueueActor::new(rt, t))
        });
        if !entry.connected() {
            *entry = Supervisor::start_in_arbiter(&arbiter, move |_| QueueActor::new(rt, t));
        }
        entry.clone()
    }

    /// The queue if it runs on this node (for notices that matter only to a live queue).
    pub fn queue_if_running(&self, tenant_id: i64) -> Option<Addr<QueueActor>> {
        self.inner.queues.get(&tenant_id).map(|a| a.clone())
    }

    /// The agent's hub, started if needed.
    pub fn agent_hub(&self, tenant: &Arc<TenantRecord>, agent_id: i64) -> Addr<AgentActor> {
        let key = (tenant.id, agent_id);
        if let Some(a) = live(&self.inner.agents, &key) {
            return a;
        }
        let rt = self.clone();
        let t = tenant.clone();
        let arbiter = self.arbiter_for(&("agent", key)).clone();
        let mut entry = self.inner.agents.entry(key).or_insert_with(|| {
            let (rt, t) = (rt.clone(), t.clone());
            AgentActor::start_in_arbiter(&arbiter, move |_| AgentActor::new(rt, t, agent_id))
        });
        if !entry.connected() {
            *entry =
                AgentActor::start_in_arbiter(&arbiter, move |_| AgentActor::new(rt, t, agent_id));
        }
        entry.clone()
    }

    /// The visitor's hub, started if needed.
    pub fn visitor_hub(&self, tenant: &Arc<TenantRecord>, visitor_id: i64) -> Addr<VisitorActor> {
        let key = (tenant.id, visitor_id);
        if let Some(a) = live(&self.inner.visitors, &key) {
            return a;
        }
        let rt = self.clone();
        let t = tenant.clone();
        let arbiter = self.arbiter_for(&("visitor", key)).clone();
        let mut entry = self.inner.visitors.entry(key).or_insert_with(|| {
            let (rt, t) = (rt.clone(), t.clone());
            VisitorActor::start_in_arbiter(&arbiter, move |_| VisitorActor::new(rt, t, visitor_id))
        });
        if !entry.connected() {
            *entry = VisitorActor::start_in_arbiter(&arbiter, move |_| {
                VisitorActor::new(rt, t, visitor_id)
            });
        }
        entry.clone()
    }

    /// Like [`Self::to_agent`], but the answer comes once the hub has queued the frame on the
    /// agent's sockets. A conversation waits for it before its next write, so that the ack of
    /// that write (queued straight on the sender's socket) cannot overtake this frame.
    pub fn to_agent_ordered(
        &self,
        tenant_id: i64,
        agent_id: i64,
        frame: ByteString,
        except: Option<u64>,
    ) -> Option<actix::dev::Request<AgentActor, conn::Deliver>> {
        let hub = self.inner.agents.get(&(tenant_id, agent_id))?;
        Some(hub.send(conn::Deliver { frame, except }))
    }

    /// [`Self::to_agent_ordered`] for a visitor.
    pub fn to_visitor_ordered(
        &self,
        tenant_id: i64,
        visitor_id: i64,
        frame: ByteString,
        except: Option<u64>,
    ) -> Option<actix::dev::Request<VisitorActor, conn::Deliver>> {
        let hub = self.inner.visitors.get(&(tenant_id, visitor_id))?;
        Some(hub.send(conn::Deliver { frame, except }))
    }

    /// Delivers a frame to every connection of an agent on this node (none: nothing to do).
    pub fn to_agent(&self, tenant_id: i64, agent_id: i64, frame: ByteString, except: Option<u64>) {
        if let Some(a) = self.inner.agents.get(&(tenant_id, agent_id)) {
            a.do_send(conn::Deliver { frame, except });
        }
    }

    /// Delivers a frame to every connection (and long-poll) of a visitor on this node.
    pub fn to_visitor(
        &self,
        tenant_id: i64,
        visitor_id: i64,
        frame: ByteString,
        except: Option<u64>,
    ) {
        if let Some(a) = self.inner.visitors.get(&(tenant_id, visitor_id)) {
            a.do_send(conn::Deliver { frame, except });
        }
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

    /// Forgets an actor that stopped, unless a successor has taken its place.
    fn forget_conversation(&self, key: Key, addr: &Addr<ConversationActor>) {
        self.inner.conversations.remove_if(&key, |_, a| a == addr);
    }

    fn forget_agent(&self, key: Key, addr: &Addr<AgentActor>) {
        self.inner.agents.remove_if(&key, |_, a| a == addr);
    }

    fn forget_visitor(&self, key: Key, addr: &Addr<VisitorActor>) {
        self.inner.visitors.remove_if(&key, |_, a| a == addr);
    }
}
