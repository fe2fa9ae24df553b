//! The bare relay: the baseline Kefu is measured against.
//!
//! It accepts the frames and the few HTTP calls the scenarios make, and does the least work
//! that gives the same answers: fake tokens and ids for provisioning, a queue that pairs each
//! conversation with an online agent (and says `assigned`, with a system message as seq 1 like
//! Kefu), seqs counted per conversation in memory, acks, `message` frames forwarded to the
//! other party, and long-poll from an in-memory buffer of what the visitor has not fetched yet.
//! No storage, no tenancy, no auth beyond parsing the fake token, no actors: one task per
//! connection, a lock per conversation. The history read answers from one byte per message
//! (who sent it), which is all the stored-count check looks at.
//!
//! With `--store` (the `store` module) it also commits every message to a SQLite file before
//! acking and forwarding it, as Kefu does, to tell what durable storage costs on a machine
//! from what Kefu's own work costs.
//!
//! Not done, as a relay needs none of it: client_msg_id de-duplication, passwords, `sync`
//! replay (answered with `synced` at once), `close`, `transfer`, typing and read receipts.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::protocol::Side;

mod store;
use store::Store;

/// Largest request body, as Kefu's default.
const MAX_BODY: usize = 64 * 1024;

/// Longest long-poll wait, as the contract's.
const MAX_WAIT_SECS: u64 = 30;

/// Most events in one long-poll answer, and most messages in one history page.
const PAGE: usize = 500;

/// Events kept for a visitor who is neither connected nor polling; older ones are dropped so a
/// visitor that went away cannot grow the relay without bound.
const LP_BUFFER_MAX: usize = 10_000;

/// Server-side read buffer: frames are small, and the relay's memory per idle connection is
/// one of the figures it exists to give.
const WS_READ_BUFFER: usize = 4 * 1024;

/// Capacity an agent gets when its creation names none, as Kefu's default.
const DEFAULT_MAX_CONCURRENT: usize = 5;

const KIND_VISITOR: u8 = 0;
const KIND_AGENT: u8 = 1;
const KIND_SYSTEM: u8 = 2;

type Tx = mpsc::UnboundedSender<Utf8Bytes>;
type Body = Full<Bytes>;

/// A visitor or an agent, and its open WebSockets.
struct Party {
    side: Side,
    id: i64,
    name: String,
    max_concurrent: usize,
    /// Conversations assigned to an agent (changed under the queue lock).
    active: AtomicUsize,
    conns: Mutex<Vec<(u64, Tx)>>,
    conversations: Mutex<Vec<i64>>,
}

struct Conv {
    id: i64,
    visitor: Arc<Party>,
    inner: Mutex<ConvInner>,
    /// Wakes long-polls when something is buffered for the visitor.
    buffered: Notify,
}

#[derive(Default)]
struct ConvInner {
    agent: Option<Arc<Party>>,
    last_seq: i64,
    /// Sender kind of each message, by seq.
    kinds: Vec<u8>,
    /// Frames for a visitor without a WebSocket, with the seq they belong to.
    lp_buffer: VecDeque<(i64, Utf8Bytes)>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Arc<Conv>>,
    online: Vec<Arc<Party>>,
    next: usize,
}

#[derive(Default)]
struct State {
    next_id: AtomicI64,
    next_conn: AtomicU64,
    emails: Mutex<HashMap<String, i64>>,
    parties: RwLock<HashMap<(Side, i64), Arc<Party>>>,
    convs: RwLock<HashMap<i64, Arc<Conv>>>,
    queue: Mutex<Queue>,
    /// The log every message is committed to before it is acked and forwarded, when the
    /// relay was started with one (`--store`).
    store: Option<Store>,
}

/// Locks a mutex; a panic elsewhere left plain data behind, still good enough for a relay.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An error in Kefu's shape.
struct Refusal(StatusCode, &'static str, String);

/// A status and a JSON body; the hyper server and any other front end make their response
/// of it.
type Answer = std::result::Result<(StatusCode, String), Refusal>;

impl State {
    fn id(&self) -> i64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn register(&self, side: Side, name: String, max_concurrent: usize) -> Arc<Party> {
        let id = self.id();
        let p = Arc::new(Party {
            side,
            id,
            name,
            max_concurrent,
            active: AtomicUsize::new(0),
            conns: Mutex::new(Vec::new()),
            conversations: Mutex::new(Vec::new()),
        });
        self.parties
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert((side, id), p.clone());
        p
    }

    fn party(&self, side: Side, id: i64) -> Option<Arc<Party>> {
        self.parties
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(side, id))
            .cloned()
    }

    fn conv(&self, id: i64) -> Option<Arc<Conv>> {
        self.convs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// The party on `side` a fake token names: `agent.<id>` or `visitor.<id>`.
    fn by_token(&self, side: Side, token: &str) -> Option<Arc<Party>> {
        let id = token.strip_prefix(side.as_str())?.strip_prefix('.')?;
        self.party(side, id.parse().ok()?)
    }

    /// Pairs waiting conversations with online agents that have room, round robin.
    fn assign_waiting(&self) {
        let mut pairs = Vec::new();
        {
            let mut q = lock(&self.queue);
            while !q.waiting.is_empty() && !q.online.is_empty() {
                let n = q.online.len();
                let free = (0..n).map(|k| (q.next + k) % n).find(|&i| {
                    q.online[i].active.load(Ordering::Relaxed) < q.online[i].max_concurrent
                });
                let Some(i) = free else { break };
                q.next = (i + 1) % n;
                let agent = q.online[i].clone();
                agent.active.fetch_add(1, Ordering::Relaxed);
                if let Some(conv) = q.waiting.pop_front() {
                    pairs.push((conv, agent));
                }
            }
        }
        for (conv, agent) in pairs {
            self.assign(&conv, agent);
        }
    }

    fn assign(&self, conv: &Conv, agent: Arc<Party>) {
        lock(&agent.conversations).push(conv.id);
        let mut inner = lock(&conv.inner);
        inner.agent = Some(agent.clone());
        let (id, seq) = (self.id(), next_seq(&mut inner, KIND_SYSTEM));
        let assigned: Utf8Bytes = json!({
            "type": "assigned", "conversation_id": conv.id,
            "agent": {"id": agent.id, "name": agent.name}
        })
        .to_string()
        .into();
        let system: Utf8Bytes = json!({
            "type": "message", "conversation_id": conv.id, "id": id, "seq": seq,
            "client_msg_id": null, "sender": {"kind": "system", "id": null},
            "content": {"kind": "event", "event": "assigned", "agent_id": agent.id},
            "created_at": now()
        })
        .to_string()
        .into();
        for f in [assigned, system] {
            send_all(&agent, &f);
            to_visitor(conv, &mut inner, seq, f);
        }
        drop(inner);
        conv.buffered.notify_waiters();
    }

    /// Gives the message its seq and forwards it; the ack goes on `ack_to` (the sender's
    /// socket). Without a store nothing is kept but the sender's kind, and the ack and the
    /// forwarding happen here, under the conversation's lock, so on each socket the ack is
    /// ordered with the messages of the other party. With a store, the same follow-up runs
    /// on the store's writer once the message is committed: queued under the lock, in seq
    /// order, and run in queue order.
    fn relay_message(
        &self,
        conv: &Arc<Conv>,
        sender: &Arc<Party>,
        client_msg_id: &str,
        content: &RawValue,
        ack_to: Option<(&Tx, &str)>,
    ) -> std::result::Result<Relayed, Refusal> {
        let mut inner = lock(&conv.inner);
        let agent = inner.agent.clone();
        let mine = match sender.side {
            Side::Visitor => conv.visitor.id == sender.id,
            Side::Agent => agent.as_ref().is_some_and(|a| a.id == sender.id),
        };
        if !mine {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                "forbidden",
                "not your conversation",
            ));
        }
        let kind = match sender.side {
            Side::Visitor => KIND_VISITOR,
            Side::Agent => KIND_AGENT,
        };
        let (id, seq, created_at) = (self.id(), next_seq(&mut inner, kind), now());
        let cmid = Value::from(client_msg_id);
        let ack = ack_to.map(|(tx, reference)| {
            let ack = format!(
                r#"{{"type":"ack","ref":{},"conversation_id":{},"client_msg_id":{cmid},"id":{id},"seq":{seq}}}"#,
                Value::from(reference),
                conv.id
            );
            (tx.clone(), Utf8Bytes::from(ack))
        });
        let frame: Utf8Bytes = format!(
            r#"{{"type":"message","conversation_id":{},"id":{id},"seq":{seq},"client_msg_id":{cmid},"sender":{{"kind":"{}","id":{}}},"content":{},"created_at":"{created_at}"}}"#,
            conv.id,
            sender.side.as_str(),
            sender.id,
            content.get()
        )
        .into();
        let delivery = Delivery {
            conv: conv.clone(),
            seq,
            sender: sender.side,
            agent,
            ack,
            frame,
        };
        let Some(store) = &self.store else {
            let buffered = delivery.deliver(&mut inner);
            drop(inner);
            if buffered {
                conv.buffered.notify_waiters();
            }
            return Ok(Relayed {
                id,
                seq,
                created_at,
                committed: None,
            });
        };
        let (committed, told) = oneshot::channel();
        let row = store::Row {
            id,
            conversation_id: conv.id,
            seq,
            client_msg_id: client_msg_id.to_owned(),
            sender_kind: sender.side.as_str(),
            sender_id: sender.id,
            content: content.get().to_owned(),
            created_at: created_at.clone(),
        };
        store.append(
            row,
            Box::new(move || {
                let buffered = delivery.deliver(&mut lock(&delivery.conv.inner));
                if buffered {
                    delivery.conv.buffered.notify_waiters();
                }
                let _ = committed.send(());
            }),
        );
        Ok(Relayed {
            id,
            seq,
            created_at,
            committed: Some(told),
        })
    }
}

/// A message given its seq: its id, seq and time, and (with a store) what tells when it is
/// committed.
struct Relayed {
    id: i64,
    seq: i64,
    created_at: String,
    committed: Option<Committed>,
}

/// Told once a message is committed to the store.
type Committed = oneshot::Receiver<()>;

/// What a relayed message owes once it may be told: the sender's ack and the frame for the
/// other party.
struct Delivery {
    conv: Arc<Conv>,
    seq: i64,
    sender: Side,
    /// The conversation's agent when the message was given its seq.
    agent: Option<Arc<Party>>,
    /// The sender's socket and its ack; `None` for a long-poll visitor's post.
    ack: Option<(Tx, Utf8Bytes)>,
    frame: Utf8Bytes,
}

impl Delivery {
    /// Sends the ack and the frame; true when the frame went into the long-poll buffer.
    fn deliver(&self, inner: &mut ConvInner) -> bool {
        if let Some((tx, ack)) = &self.ack {
            let _ = tx.send(ack.clone());
        }
        match self.sender {
            Side::Visitor => {
                if let Some(a) = &self.agent {
                    send_all(a, &self.frame);
                }
                // A long-poll visitor reads its own messages back in the event stream, so the
                // stream has no gaps; a visitor on a socket has its ack.
                self.ack.is_none() && to_visitor(&self.conv, inner, self.seq, self.frame.clone())
            }
            Side::Agent => to_visitor(&self.conv, inner, self.seq, self.frame.clone()),
        }
    }
}

fn next_seq(inner: &mut ConvInner, kind: u8) -> i64 {
    inner.last_seq += 1;
    inner.kinds.push(kind);
    inner.last_seq
}

fn send_all(party: &Party, frame: &Utf8Bytes) -> bool {
    let conns = lock(&party.conns);
    for (_, tx) in conns.iter() {
        let _ = tx.send(frame.clone());
    }
    !conns.is_empty()
}

/// To the visitor's sockets, or into the long-poll buffer when it has none; true when buffered.
fn to_visitor(conv: &Conv, inner: &mut ConvInner, seq: i64, frame: Utf8Bytes) -> bool {
    if send_all(&conv.visitor, &frame) {
        return false;
    }
    if inner.lp_buffer.len() >= LP_BUFFER_MAX {
        inner.lp_buffer.pop_front();
    }
    inner.lp_buffer.push_back((seq, frame));
    true
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn refuse(status: StatusCode, code: &'static str, message: impl Into<String>) -> Refusal {
    Refusal(status, code, message.into())
}

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn json_response(status: StatusCode, v: Value) -> Answer {
    Ok((status, v.to_string()))
}

impl Refusal {
    fn answer(self) -> (StatusCode, String) {
        let Refusal(status, code, message) = self;
        let body = json!({"error": {"code": code, "message": message}}).to_string();
        (status, body)
    }
}

/// The relay's work behind a server of another kind: `examples/actix_relay.rs` serves it on
/// Kefu's WebSocket stack (actix-web and actix-ws) to tell that stack's cost per message from
/// Kefu's own (docs/benchmarks.md, "The relay on Kefu's stack").
#[derive(Clone, Default)]
pub struct Core(Arc<State>);

impl Core {
    /// Answers any call but a WebSocket upgrade or a long-poll: status and JSON body.
    pub fn answer(
        &self,
        method: &Method,
        path: &str,
        query: Option<&str>,
        bearer: Option<&str>,
        body: &[u8],
    ) -> (StatusCode, String) {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        answer(&self.0, method, &segments, query, bearer, body).unwrap_or_else(Refusal::answer)
    }

    /// The socket of the party `token` names on `side`, registered, with what is queued for
    /// it and its `hello`; `None` for an unknown token.
    pub fn connect(
        &self,
        side: Side,
        token: &str,
    ) -> Option<(Conn, mpsc::UnboundedReceiver<Utf8Bytes>, String)> {
        let party = self.0.by_token(side, token)?;
        Some(Conn::open(self.0.clone(), party))
    }
}

/// A running relay started by [`start`]; dropping it stops accepting (open sockets live on
/// until their clients close them).
pub struct RelayHandle {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl RelayHandle {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Binds `addr` (port 0 for any free port) and serves on the current runtime.
/// With `store`, every message is committed to that SQLite file (created if missing) before
/// it is acked and forwarded.
pub async fn start(addr: SocketAddr, store: Option<&Path>) -> Result<RelayHandle> {
    let state = State {
        store: store.map(Store::open).transpose()?,
        ..State::default()
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let addr = listener.local_addr()?;
    let accept = tokio::spawn(serve(listener, Arc::new(state)));
    Ok(RelayHandle { addr, accept })
}

/// Accepts connections forever.
async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(_) => {
                // Out of files or similar: back off instead of spinning on the error.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(None)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Body>, Infallible> {
    Ok(route(&state, req).await.unwrap_or_else(|refusal| {
        let (status, body) = refusal.answer();
        respond(status, body)
    }))
}

async fn route(
    state: &Arc<State>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Body>, Refusal> {
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    if req.method() == Method::GET {
        match segments.as_slice() {
            ["ws", "agent"] => return upgrade(state, req, Side::Agent),
            ["ws", "visitor"] => return upgrade(state, req, Side::Visitor),
            _ => {}
        }
    }
    // Owned, as the body is read below by consuming the request.
    let query = req.uri().query().map(str::to_owned);
    let bearer = bearer(req.headers()).map(str::to_owned);
    let (status, body) = match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["api", "v1", "visitor", "conversations", id, "events"]) => {
            let id = parse_id(id)?;
            events(state, query.as_deref(), bearer.as_deref(), id).await?
        }
        (Method::POST, ["api", "v1", "visitor", "conversations", id, "messages"]) => {
            let id = parse_id(id)?;
            let body = read_body(req).await?;
            let (answer, committed) = post_message(state, bearer.as_deref(), id, &body)?;
            if let Some(committed) = committed
                && committed.await.is_err()
            {
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "dependency_unavailable",
                    "the relay's log failed",
                ));
            }
            answer
        }
        (method, segments) => {
            let body = read_body(req).await?;
            answer(
                state,
                &method,
                segments,
                query.as_deref(),
                bearer.as_deref(),
                &body,
            )?
        }
    };
    Ok(respond(status, body))
}

async fn read_body(req: Request<Incoming>) -> std::result::Result<Bytes, Refusal> {
    Ok(Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| {
            refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "body too large",
            )
        })?
        .to_bytes())
}

/// Every call but the upgrades and long-poll, once its body is read.
fn answer(
    state: &State,
    method: &Method,
    segments: &[&str],
    query: Option<&str>,
    bearer: Option<&str>,
    body: &[u8],
) -> Answer {
    match (method.clone(), segments) {
        (Method::GET, ["healthz"]) => {
            json_response(StatusCode::OK, json!({"status": "ok", "node": "relay"}))
        }
        (Method::POST, ["platform", "v1", "tenants"]) => create_tenant(state, parse(body)?),
        (Method::POST, ["api", "v1", "auth", "login"]) => login(state, parse(body)?),
        (Method::POST, ["api", "v1", "agents"]) => create_agent(state, parse(body)?),
        (Method::POST, ["api", "v1", "visitor", "sessions"]) => {
            let v = state.register(Side::Visitor, "Visitor".into(), 0);
            json_response(
                StatusCode::CREATED,
                json!({"visitor_id": v.id, "visitor_token": format!("visitor.{}", v.id)}),
            )
        }
        (Method::POST, ["api", "v1", "visitor", "conversations"]) => {
            open_conversation(state, bearer)
        }
        // Reached only through `Core`, which has no store: nothing to wait for. The hyper
        // server answers posts in `route`, after the commit.
        (Method::POST, ["api", "v1", "visitor", "conversations", id, "messages"]) => {
            let id = parse_id(id)?;
            post_message(state, bearer, id, body).map(|(answer, _)| answer)
        }
        (Method::GET, ["api", "v1", "conversations", id, "messages"]) => {
            let id = parse_id(id)?;
            history(state, query, id)
        }
        _ => Err(refuse(StatusCode::NOT_FOUND, "not_found", "no such route")),
    }
}

fn parse_id(s: &str) -> std::result::Result<i64, Refusal> {
    s.parse()
        .map_err(|_| refuse(StatusCode::NOT_FOUND, "not_found", "no such id"))
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> std::result::Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
            e.to_string(),
        )
    })
}

fn query<'a>(query: Option<&'a str>, key: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

fn bearer(headers: &header::HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn visitor_of(state: &State, bearer: Option<&str>) -> std::result::Result<Arc<Party>, Refusal> {
    bearer
        .and_then(|t| state.by_token(Side::Visitor, t))
        .ok_or_else(|| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "not a visitor token",
            )
        })
}

fn visitor_conv(
    state: &State,
    bearer: Option<&str>,
    id: i64,
) -> std::result::Result<(Arc<Party>, Arc<Conv>), Refusal> {
    let visitor = visitor_of(state, bearer)?;
    let conv = state
        .conv(id)
        .filter(|c| c.visitor.id == visitor.id)
        .ok_or_else(|| refuse(StatusCode::NOT_FOUND, "not_found", "no such conversation"))?;
    Ok((visitor, conv))
}

#[derive(Deserialize)]
struct NewTenant {
    slug: String,
    name: String,
    domains: Vec<String>,
    admin: NewAdmin,
}

#[derive(Deserialize)]
struct NewAdmin {
    email: String,
}

fn create_tenant(state: &State, t: NewTenant) -> Answer {
    let admin = state.register(Side::Agent, "Admin".into(), DEFAULT_MAX_CONCURRENT);
    lock(&state.emails).insert(t.admin.email.to_ascii_lowercase(), admin.id);
    json_response(
        StatusCode::CREATED,
        json!({"id": state.id(), "slug": t.slug, "name": t.name, "status": "active",
               "domains": t.domains, "admin": {"id": admin.id, "email": t.admin.email}}),
    )
}

#[derive(Deserialize)]
struct Login {
    email: String,
}

fn login(state: &State, l: Login) -> Answer {
    let id = lock(&state.emails)
        .get(&l.email.to_ascii_lowercase())
        .copied()
        .ok_or_else(|| {
            refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_credentials",
                "unknown email",
            )
        })?;
    json_response(
        StatusCode::OK,
        json!({"token": format!("agent.{id}"),
               "agent": {"id": id, "email": l.email, "name": "Agent", "role": "agent"}}),
    )
}

#[derive(Deserialize)]
struct NewAgent {
    email: String,
    name: String,
    #[serde(default)]
    max_concurrent: Option<usize>,
}

fn create_agent(state: &State, a: NewAgent) -> Answer {
    let max = a.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT);
    let p = state.register(Side::Agent, a.name.clone(), max);
    lock(&state.emails).insert(a.email.to_ascii_lowercase(), p.id);
    json_response(
        StatusCode::CREATED,
        json!({"id": p.id, "email": a.email, "name": a.name, "role": "agent",
               "max_concurrent": max, "teams": ["general"]}),
    )
}

fn open_conversation(state: &State, bearer: Option<&str>) -> Answer {
    let visitor = visitor_of(state, bearer)?;
    if let Some(&id) = lock(&visitor.conversations).first() {
        return json_response(
            StatusCode::OK,
            json!({"conversation_id": id, "status": "active", "queue_position": 0}),
        );
    }
    let conv = Arc::new(Conv {
        id: state.id(),
        visitor: visitor.clone(),
        inner: Mutex::new(ConvInner::default()),
        buffered: Notify::new(),
    });
    lock(&visitor.conversations).push(conv.id);
    state
        .convs
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(conv.id, conv.clone());
    let position = {
        let mut q = lock(&state.queue);
        q.waiting.push_back(conv.clone());
        q.waiting.len()
    };
    state.assign_waiting();
    json_response(
        StatusCode::CREATED,
        json!({"conversation_id": conv.id, "status": "queued", "queue_position": position}),
    )
}

#[derive(Deserialize)]
struct PostedMessage<'a> {
    #[serde(borrow)]
    client_msg_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    content: &'a RawValue,
}

/// A long-poll visitor's message: the answer, and (with a store) what tells when the message
/// is committed, which the answer must wait for.
fn post_message(
    state: &State,
    bearer: Option<&str>,
    id: i64,
    body: &[u8],
) -> std::result::Result<((StatusCode, String), Option<Committed>), Refusal> {
    let (visitor, conv) = visitor_conv(state, bearer, id)?;
    let m: PostedMessage = parse(body)?;
    let r = state.relay_message(&conv, &visitor, &m.client_msg_id, m.content, None)?;
    let answer = json_response(
        StatusCode::CREATED,
        json!({
            "id": r.id,
            "seq": r.seq,
            "client_msg_id": m.client_msg_id,
            "created_at": r.created_at
        }),
    )?;
    Ok((answer, r.committed))
}

async fn events(
    state: &State,
    query_string: Option<&str>,
    bearer: Option<&str>,
    id: i64,
) -> Answer {
    let (_, conv) = visitor_conv(state, bearer, id)?;
    let after: i64 = query(query_string, "after_seq")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let wait: u64 = query(query_string, "wait")
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.min(MAX_WAIT_SECS));
    loop {
        let woken = conv.buffered.notified();
        tokio::pin!(woken);
        // Registered before looking, so a frame buffered in between still wakes this poll.
        woken.as_mut().enable();
        let (frames, last) = {
            let mut inner = lock(&conv.inner);
            // The visitor asking after N has everything up to N.
            while inner.lp_buffer.front().is_some_and(|(s, _)| *s <= after) {
                inner.lp_buffer.pop_front();
            }
            let frames: Vec<Utf8Bytes> = inner
                .lp_buffer
                .iter()
                .take(PAGE)
                .map(|(_, f)| f.clone())
                .collect();
            let last = inner
                .lp_buffer
                .iter()
                .take(PAGE)
                .map(|(s, _)| *s)
                .max()
                .unwrap_or(after);
            (frames, last)
        };
        if !frames.is_empty() || tokio::time::Instant::now() >= deadline {
            let mut out = String::from(r#"{"events":["#);
            for (i, f) in frames.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(f.as_str());
            }
            out.push_str(&format!(r#"],"last_seq":{last}}}"#));
            return Ok((StatusCode::OK, out));
        }
        let _ = tokio::time::timeout_at(deadline, woken).await;
    }
}

fn history(state: &State, query_string: Option<&str>, id: i64) -> Answer {
    let conv = state
        .conv(id)
        .ok_or_else(|| refuse(StatusCode::NOT_FOUND, "not_found", "no such conversation"))?;
    let after = query(query_string, "after_seq")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let limit = query(query_string, "limit")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(PAGE)
        .min(PAGE);
    let inner = lock(&conv.inner);
    let messages: Vec<Value> = inner
        .kinds
        .iter()
        .enumerate()
        .skip(after)
        .take(limit)
        .map(|(i, k)| {
            let kind = match *k {
                KIND_VISITOR => "visitor",
                KIND_AGENT => "agent",
                _ => "system",
            };
            json!({"conversation_id": conv.id, "seq": i + 1, "sender": {"kind": kind}})
        })
        .collect();
    drop(inner);
    json_response(StatusCode::OK, json!({ "messages": messages }))
}

fn upgrade(
    state: &Arc<State>,
    mut req: Request<Incoming>,
    side: Side,
) -> std::result::Result<Response<Body>, Refusal> {
    let party = query(req.uri().query(), "token")
        .or_else(|| bearer(req.headers()))
        .and_then(|t| state.by_token(side, t))
        .ok_or_else(|| refuse(StatusCode::UNAUTHORIZED, "invalid_token", "unknown token"))?;
    let is_ws = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()));
    let (true, Some(accept)) = (is_ws, key) else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "not a WebSocket upgrade",
        ));
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let state = state.clone();
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let config = WebSocketConfig::default().read_buffer_size(WS_READ_BUFFER);
            let ws = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            connection(state, party, ws).await;
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    Ok(r)
}

/// A client frame, as far as the relay reads it.
#[derive(Deserialize)]
struct ClientFrame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    #[serde(default, rename = "ref", borrow)]
    reference: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    conversation_id: Option<i64>,
    #[serde(default, borrow)]
    client_msg_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
}

async fn connection<S>(state: Arc<State>, party: Arc<Party>, ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (conn, mut rx, hello) = Conn::open(state, party);
    let (mut sink, mut stream) = ws.split();
    // Written before anything queued on `rx`, so it is the first frame.
    if sink.send(Message::text(hello)).await.is_ok() {
        relay_frames(&conn, &mut rx, &mut sink, &mut stream).await;
    }
}

/// One open WebSocket of a party, whatever serves it: registered while it lives.
pub struct Conn {
    state: Arc<State>,
    party: Arc<Party>,
    id: u64,
    /// Where acks and errors for this socket's own frames go.
    tx: Tx,
}

impl Conn {
    /// Registers the socket; returns it, what is queued for it, and its `hello`.
    fn open(
        state: Arc<State>,
        party: Arc<Party>,
    ) -> (Self, mpsc::UnboundedReceiver<Utf8Bytes>, String) {
        let (tx, rx) = mpsc::unbounded_channel::<Utf8Bytes>();
        let id = state.next_conn.fetch_add(1, Ordering::Relaxed);
        // Registered before `hello` is built, so nothing assigned in between is missed: it is
        // either in `hello` or queued behind it (or both, which clients take in their stride).
        let first = {
            let mut conns = lock(&party.conns);
            conns.push((id, tx.clone()));
            conns.len() == 1
        };
        let hello = {
            let convs: Vec<Value> = lock(&party.conversations)
                .iter()
                .filter_map(|c| state.conv(*c))
                .map(|c| {
                    let inner = lock(&c.inner);
                    let status = if inner.agent.is_some() {
                        "active"
                    } else {
                        "queued"
                    };
                    json!({"conversation_id": c.id, "status": status, "last_seq": inner.last_seq})
                })
                .collect();
            json!({"type": "hello", "node": "relay", "conversations": convs}).to_string()
        };
        if party.side == Side::Agent && first {
            lock(&state.queue).online.push(party.clone());
            state.assign_waiting();
        }
        let conn = Self {
            state,
            party,
            id,
            tx,
        };
        (conn, rx, hello)
    }

    /// Handles one text frame the client sent.
    pub fn frame(&self, text: &str) {
        on_frame(&self.state, &self.party, &self.tx, text);
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let last = {
            let mut conns = lock(&self.party.conns);
            conns.retain(|(id, _)| *id != self.id);
            conns.is_empty()
        };
        if self.party.side == Side::Agent && last {
            lock(&self.state.queue)
                .online
                .retain(|p| p.id != self.party.id);
        }
    }
}

/// Reads the client's frames and writes what is queued for it until either side ends.
async fn relay_frames<Si, St>(
    conn: &Conn,
    rx: &mut mpsc::UnboundedReceiver<Utf8Bytes>,
    sink: &mut Si,
    stream: &mut St,
) where
    Si: futures_util::Sink<Message> + Unpin,
    St: futures_util::Stream<
            Item = std::result::Result<Message, tokio_tungstenite::tungstenite::Error>,
        > + Unpin,
{
    loop {
        tokio::select! {
            incoming = stream.next() => match incoming {
                Some(Ok(Message::Text(t))) => conn.frame(t.as_str()),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            out = rx.recv() => {
                let Some(frame) = out else { break };
                // Everything already queued goes in one flush: one write for a burst.
                if sink.feed(Message::Text(frame)).await.is_err() {
                    break;
                }
                let mut failed = false;
                while let Ok(frame) = rx.try_recv() {
                    if sink.feed(Message::Text(frame)).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || sink.flush().await.is_err() {
                    break;
                }
            }
        }
    }
}

fn on_frame(state: &State, party: &Arc<Party>, tx: &Tx, text: &str) {
    let error = |reference: Option<&str>, code: &str, message: &str| {
        let _ = tx.send(
            json!({"type": "error", "ref": reference, "code": code, "message": message})
                .to_string()
                .into(),
        );
    };
    let Ok(f) = serde_json::from_str::<ClientFrame>(text) else {
        return error(None, "malformed_frame", "not a frame");
    };
    let reference = f.reference.as_deref();
    match f.kind.as_ref() {
        "send" => {
            let (Some(conv_id), Some(cmid), Some(content)) =
                (f.conversation_id, f.client_msg_id.as_deref(), f.content)
            else {
                return error(
                    reference,
                    "validation_failed",
                    "send needs conversation_id, client_msg_id, content",
                );
            };
            let Some(conv) = state.conv(conv_id) else {
                return error(reference, "not_found", "no such conversation");
            };
            if let Err(Refusal(_, code, message)) = state.relay_message(
                &conv,
                party,
                cmid,
                content,
                Some((tx, reference.unwrap_or(""))),
            ) {
                error(reference, code, &message);
            }
        }
        "ping" => {
            let _ = tx.send(Utf8Bytes::from_static(r#"{"type":"pong"}"#));
        }
        "sync" => {
            if let Some(conv) = f.conversation_id.and_then(|c| state.conv(c)) {
                let last = lock(&conv.inner).last_seq;
                let _ = tx.send(
                    json!({"type": "synced", "conversation_id": conv.id, "last_seq": last})
                        .to_string()
                        .into(),
                );
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Target;

    #[tokio::test]
    async fn provisions_pairs_and_relays_with_seqs_and_acks() {
        let relay = start("127.0.0.1:0".parse().unwrap(), None).await.unwrap();
        let target = Target::new(&relay.url()).await.unwrap();
        let tenant = target.create_tenant("any").await.unwrap();
        let agent = target.create_agent(&tenant, 1, 1).await.unwrap();
        let mut agent_ws = target
            .ws_connect(&tenant.domain, "/ws/agent", &agent.token, None)
            .await
            .unwrap();
        let visitor = target.visitor_session(&tenant.domain).await.unwrap();
        let mut visitor_ws = target
            .ws_connect(&tenant.domain, "/ws/visitor", &visitor.token, None)
            .await
            .unwrap();
        let conv = target
            .create_conversation(&tenant.domain, &visitor.token)
            .await
            .unwrap();
        async fn next(ws: &mut crate::client::WsStream) -> Value {
            loop {
                if let Some(Ok(Message::Text(t))) = ws.next().await {
                    return serde_json::from_str(t.as_str()).unwrap();
                }
            }
        }
        assert_eq!(next(&mut agent_ws).await["type"], "hello");
        assert_eq!(next(&mut visitor_ws).await["type"], "hello");
        assert_eq!(next(&mut agent_ws).await["type"], "assigned");
        let sys = next(&mut agent_ws).await;
        assert_eq!(
            (sys["seq"].as_i64(), sys["sender"]["kind"].as_str()),
            (Some(1), Some("system"))
        );
        assert_eq!(next(&mut visitor_ws).await["type"], "assigned");
        assert_eq!(next(&mut visitor_ws).await["seq"], 1);

        visitor_ws
            .send(Message::text(crate::protocol::send_frame(conv, "c1", "hi")))
            .await
            .unwrap();
        let ack = next(&mut visitor_ws).await;
        assert_eq!(
            (
                ack["type"].as_str(),
                ack["seq"].as_i64(),
                ack["ref"].as_str()
            ),
            (Some("ack"), Some(2), Some("c1"))
        );
        let msg = next(&mut agent_ws).await;
        assert_eq!(msg["seq"], 2);
        assert_eq!(msg["content"]["text"], "hi");
        assert_eq!(msg["sender"]["kind"], "visitor");

        let count = target.stored_count(&tenant, conv).await.unwrap();
        assert_eq!(
            count,
            crate::client::StoredCount {
                parties: 1,
                system: 1
            }
        );
    }

    #[tokio::test]
    async fn long_poll_answers_at_once_when_something_is_buffered_and_waits_otherwise() {
        let relay = start("127.0.0.1:0".parse().unwrap(), None).await.unwrap();
        let target = Target::new(&relay.url()).await.unwrap();
        let tenant = target.create_tenant("any").await.unwrap();
        let agent = target.create_agent(&tenant, 1, 1).await.unwrap();
        let _agent_ws = target
            .ws_connect(&tenant.domain, "/ws/agent", &agent.token, None)
            .await
            .unwrap();
        let visitor = target.visitor_session(&tenant.domain).await.unwrap();
        let conv = target
            .create_conversation(&tenant.domain, &visitor.token)
            .await
            .unwrap();
        let body = target
            .poll_events(&tenant.domain, &visitor.token, conv, 0, 5)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["last_seq"], 1);
        assert_eq!(v["events"][0]["type"], "assigned");

        let posted = target
            .post_visitor_message(&tenant.domain, &visitor.token, conv, "m1", "hello")
            .await
            .unwrap();
        assert_eq!(posted.seq, 2);
        let body = target
            .poll_events(&tenant.domain, &visitor.token, conv, 1, 5)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["events"][0]["seq"], 2, "{v}");

        let started = tokio::time::Instant::now();
        let body = target
            .poll_events(&tenant.domain, &visitor.token, conv, 2, 1)
            .await
            .unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["events"].as_array().map(Vec::len), Some(0));
        assert!(started.elapsed() >= Duration::from_millis(900));
    }
}
