//! Cluster mode: several Kefu nodes share the tenants through NATS and PostgreSQL.
//!
//! Storage stays the truth: every write is committed in the tenant's PostgreSQL database
//! before anything is said about it. What travels over NATS is a *notice*, a hint that lets
//! another node deliver a frame now; a notice that is lost costs latency, never data, because
//! every client can resync by `seq`.
//!
//! - Subjects are sharded by tenant (see [`subject`]); a node subscribes only to the subjects
//!   of the actors it hosts right now (its agents', visitors', conversations' and, while it
//!   holds the lease, the tenant queue's) and unsubscribes when they stop.
//! - Every notice carries the tenant, the sending node and a W3C `traceparent` in headers.
//! - One node per tenant runs the queue: it holds the tenant's lease ([`lease`]); the others
//!   forward queue operations to it with NATS request/reply.
//!
//! docs/cluster.md tells the whole story, failures included.

pub mod lease;
pub mod subject;

use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

pub use lease::Leases;

use crate::trace_context::TraceContext;

/// Header naming the node that published a notice (a node ignores its own).
pub const HDR_NODE: &str = "Kefu-Node";
/// Header naming the tenant (id) a notice belongs to; checked against the subject.
pub const HDR_TENANT: &str = "Kefu-Tenant";
/// W3C trace context of the work that produced the notice.
pub const HDR_TRACEPARENT: &str = "traceparent";
/// On the notice of a stored write: `<conversation id>:<seq>`, so that the receiving hub
/// keeps the conversation's order (its payload is the write's frames, one per line).
pub const HDR_SEQ: &str = "Kefu-Seq";
/// When the notice was handed to the publisher (Unix time, microseconds): the receiving node
/// times the trip (`kefu_cluster_notice_seconds`). Across machines it includes their clocks'
/// offset.
pub const HDR_SENT: &str = "Kefu-Sent";

/// Notices waiting for the publisher. When it is full (NATS unreachable for long), notices
/// are dropped rather than the actors blocked: they are hints, storage has the data.
const OUTBOX: usize = 65_536;

/// How long a node waits for a new subscription to be confirmed by the server before it
/// lets the client in anyway (frames missed meanwhile come back by resync).
const SUBSCRIBE_CONFIRM: Duration = Duration::from_secs(2);

/// How long a forwarded queue operation waits for the queue's node to answer.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Longest pause between two reconnection attempts to NATS: a restarted server is found
/// again within this, and a dead one is not hammered.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("cluster mode needs KEFU_DATABASE_URL=postgres://… (SQLite files are per node)")]
    NeedsPostgres,
    #[error("queue lease: {0}")]
    Lease(#[from] sea_orm::sqlx::Error),
}

/// A notice as received.
pub struct Notice {
    pub tenant: i64,
    /// Who published it.
    pub node: String,
    /// The sender's trace (a malformed or missing header starts a new one).
    pub trace: TraceContext,
    pub payload: Bytes,
    /// A stored write's conversation and `seq` ([`HDR_SEQ`]).
    pub seq: Option<(i64, i64)>,
    /// Where to answer (queue requests only).
    pub reply: Option<Subject>,
}

/// This node's membership in the cluster. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    node: String,
    client: async_nats::Client,
    /// Ordered, non-blocking publishing for callers that are not async (actors).
    outbox: mpsc::Sender<Outgoing>,
    /// Subject → its subscription on this node.
    listeners: DashMap<String, Listener>,
    /// Queue leases held by this node.
    leases: Leases,
    /// Where this node's cluster tasks run: the runtime `connect` was called on, which is
    /// also where the client's own connection task runs (`startup` calls it on the first actor
    /// thread, so notices reach and leave the actors without a thread hop).
    runtime: tokio::runtime::Handle,
}

struct Outgoing {
    subject: String,
    headers: HeaderMap,
    payload: Bytes,
}

/// A live subscription; dropping it unsubscribes.
struct Listener {
    task: tokio::task::AbortHandle,
    /// Becomes `true` once the server has confirmed the subscription.
    ready: watch::Receiver<bool>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Cluster {
    /// Connects to NATS and to the lease database. Fails at once when NATS cannot be reached
    /// at start-up (a misconfigured node should say so); later outages are ridden out by
    /// reconnecting.
    pub async fn connect(
        nats_url: &str,
        node: &str,
        platform_db_url: &str,
    ) -> Result<Self, ClusterError> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("kefu {node}"))
            // A node delivers to its own hubs directly; the broker need not send its notices
            // back to it.
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                (Duration::from_millis(100) * u32::try_from(attempts).unwrap_or(u32::MAX))
                    .min(MAX_RECONNECT_DELAY)
            })
            .event_callback(|event| async move {
                tracing::info!(%event, "nats connection event");
            })
            .connect(nats_url)
            .await
            .map_err(|e| ClusterError::Connect {
                url: nats_url.to_owned(),
                reason: e.to_string(),
            })?;
        // `retry_on_initial_connect` returns before the first connection: wait for it, but
        // not forever.
        if tokio::time::timeout(Duration::from_secs(5), client.flush())
            .await
            .map_or(true, |r| r.is_err())
        {
            return Err(ClusterError::Connect {
                url: nats_url.to_owned(),
                reason: "no answer within 5 s".to_owned(),
            });
        }
        let leases = Leases::connect(platform_db_url).await?;
        let (outbox, rx) = mpsc::channel(OUTBOX);
        let runtime = tokio::runtime::Handle::current();
        runtime.spawn(publisher(client.clone(), rx));
        Ok(Self {
            inner: Arc::new(Inner {
                node: node.to_owned(),
                client,
                outbox,
                listeners: DashMap::new(),
                leases,
                runtime,
            }),
        })
    }

    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn leases(&self) -> &Leases {
        &self.inner.leases
    }

    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.inner.runtime
    }

    /// Is the NATS connection up right now?
    pub fn connected(&self) -> bool {
        matches!(
            self.inner.client.connection_state(),
            async_nats::connection::State::Connected
        )
    }

    /// The headers of a notice: who sends it, for which tenant, in which trace (a child of
    /// the work that caused it, or a new trace).
    fn headers(&self, tenant: i64, trace: Option<&TraceContext>) -> HeaderMap {
        let trace = trace.map_or_else(TraceContext::root, TraceContext::child);
        let mut h = HeaderMap::new();
        h.insert(HDR_NODE, self.inner.node.as_str());
        h.insert(HDR_TENANT, tenant.to_string().as_str());
        h.insert(HDR_TRACEPARENT, trace.header().as_str());
        h.insert(
            HDR_SENT,
            chrono::Utc::now().timestamp_micros().to_string().as_str(),
        );
        h
    }

    /// Publishes a notice without waiting. Notices from one caller leave in the order given.
    pub fn publish(
        &self,
        tenant: i64,
        subject: String,
        payload: Bytes,
        trace: Option<&TraceContext>,
    ) {
        self.send(subject, self.headers(tenant, trace), payload);
    }

    /// Publishes the frames of a stored write (`seq` of `conversation`), one per line.
    pub fn publish_write(
        &self,
        tenant: i64,
        subject: String,
        frames: Bytes,
        (conversation, seq): (i64, i64),
        trace: Option<&TraceContext>,
    ) {
        let mut headers = self.headers(tenant, trace);
        headers.insert(HDR_SEQ, format!("{conversation}:{seq}").as_str());
        self.send(subject, headers, frames);
    }

    fn send(&self, subject: String, headers: HeaderMap, payload: Bytes) {
        let out = Outgoing {
            subject,
            headers,
            payload,
        };
        if self.inner.outbox.try_send(out).is_err() {
            tracing::warn!("cluster outbox full; notice dropped (clients resync)");
        }
    }

    /// Asks the subscriber of `subject` and waits for its answer.
    pub async fn request(
        &self,
        tenant: i64,
        subject: String,
        payload: Bytes,
    ) -> Result<Bytes, async_nats::RequestError> {
        let request = async_nats::Request::new()
            .payload(payload)
            .headers(self.headers(tenant, None))
            .timeout(Some(REQUEST_TIMEOUT));
        let reply = self.inner.client.send_request(subject, request).await?;
        Ok(reply.payload)
    }

    /// Answers a request.
    pub fn respond(&self, reply: Subject, payload: Bytes) {
        let client = self.inner.client.clone();
        self.inner.runtime.spawn(async move {
            if let Err(e) = client.publish(reply, payload).await {
                tracing::warn!(error = %e, "could not answer a cluster request");
            }
        });
    }

    /// Subscribes to `subject` (once; later calls keep the first subscription) and hands
    /// every notice of another node that belongs to `tenant` to `handler`.
    pub fn listen<F>(&self, tenant: i64, subject: String, handler: F)
    where
        F: Fn(Notice) + Send + 'static,
    {
        if self.inner.listeners.contains_key(&subject) {
            return;
        }
        let (ready_tx, ready) = watch::channel(false);
        let client = self.inner.client.clone();
        let me = self.inner.node.clone();
        let s = subject.clone();
        let task = self.inner.runtime.spawn(async move {
            let mut sub = match client.subscribe(s.clone()).await {
                Ok(sub) => sub,
                Err(e) => {
                    tracing::warn!(subject = %s, error = %e, "could not subscribe");
                    return;
                }
            };
            let _ = client.flush().await;
            let _ = ready_tx.send(true);
            while let Some(msg) = sub.next().await {
                let header = |name: &str| {
                    msg.headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.as_str().to_owned())
                };
                let node = header(HDR_NODE).unwrap_or_default();
                if node == me {
                    continue;
                }
                // A notice for another tenant on this subject would be a bug or an attack
                // on a shared broker: never act on it.
                if header(HDR_TENANT).and_then(|t| t.parse().ok()) != Some(tenant) {
                    tracing::warn!(subject = %s, "notice with a foreign or missing tenant dropped");
                    continue;
                }
                if let Some(sent) = header(HDR_SENT).and_then(|t| t.parse::<i64>().ok()) {
                    // A clock behind the sender's counts as no time at all.
                    let micros = chrono::Utc::now().timestamp_micros() - sent;
                    crate::metrics::global()
                        .notice_arrived(Duration::from_micros(u64::try_from(micros).unwrap_or(0)));
                }
                handler(Notice {
                    tenant,
                    node,
                    trace: header(HDR_TRACEPARENT)
                        .and_then(|t| TraceContext::parse(&t))
                        .unwrap_or_else(TraceContext::root),
                    seq: header(HDR_SEQ).and_then(|s| parse_seq(&s)),
                    payload: msg.payload,
                    reply: msg.reply,
                });
            }
        });
        let listener = Listener {
            task: task.abort_handle(),
            ready,
        };
        // Lost a race with another caller: theirs stays, ours is dropped (and aborted).
        self.inner.listeners.entry(subject).or_insert(listener);
    }

    /// Waits (briefly) until the subscription to `subject` is confirmed.
    pub async fn ready(&self, subject: &str) {
        let Some(mut ready) = self.inner.listeners.get(subject).map(|l| l.ready.clone()) else {
            return;
        };
        let _ = tokio::time::timeout(SUBSCRIBE_CONFIRM, ready.wait_for(|r| *r)).await;
    }

    /// Drops the subscription to `subject`.
    pub fn unlisten(&self, subject: &str) {
        self.inner.listeners.remove(subject);
    }

    /// How many subjects this node listens to (tests, metrics).
    pub fn listening(&self) -> usize {
        self.inner.listeners.len()
    }

    /// Is this node subscribed to `subject`?
    pub fn listens_to(&self, subject: &str) -> bool {
        self.inner.listeners.contains_key(subject)
    }

    /// Leaves the cluster: every subscription ends.
    pub fn close(&self) {
        self.inner.listeners.clear();
    }
}

/// Reads a [`HDR_SEQ`] value.
fn parse_seq(value: &str) -> Option<(i64, i64)> {
    let (conversation, seq) = value.split_once(':')?;
    Some((conversation.parse().ok()?, seq.parse().ok()?))
}

/// Publishes the outbox in order.
async fn publisher(client: async_nats::Client, mut rx: mpsc::Receiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        if let Err(e) = client
            .publish_with_headers(out.subject, out.headers, out.payload)
            .await
        {
            tracing::warn!(error = %e, "notice not published (clients resync)");
        }
    }
}
