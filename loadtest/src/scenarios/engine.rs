//! The conversation engine under `chat`, `longpoll` and `ramp`.
//!
//! Setup provisions a tenant, its agents (each signed in, each on a WebSocket) and one visitor
//! per conversation (on a WebSocket, or on long-poll), lets the server's queue assign every
//! conversation, and waits until both sides of each have seen the assignment. Then the run is a
//! series of phases, each a fixed total rate for a fixed time: every connection task sends on
//! its own open-loop schedule and reads what arrives, checking each seq as it comes and timing
//! each message against the stamp its sender wrote into it. After each phase the engine drains
//! (waits until everything sent was acknowledged and everything acknowledged was read); at the
//! end it stops the tasks, collects their trackers, and reckons loss and the stored history.
//!
//! One task per connection owns that connection and its trackers outright, so the hot path
//! takes no lock except the short one of the shared latency recorder.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt, stream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::check::{Seen, SeqTracker, lost};
use crate::client::{Target, TenantHandle, VisitorLogin, WsStream, await_hello};
use crate::progress::Progress;
use crate::protocol::{
    Events, ServerFrame, Side, client_msg_id, parse_stamp, phase_of_client_msg_id, send_frame,
    stamp_text,
};
use crate::report::StoredCheck;
use crate::schedule::{Schedule, next_slot};
use crate::stats::{Clock, CounterSnapshot, Counters, PhaseData, Recorder};

/// Time between publishing a phase and its first slot, so every task has seen the plan before
/// its first send is due and no task starts the phase already late.
const PHASE_LEAD: Duration = Duration::from_millis(100);

/// How often the drain loop and the progress line look at the counters.
const POLL_EVERY: Duration = Duration::from_millis(25);

/// How often the progress line is redrawn during a phase.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// Time a connection task gets to close its socket and hand back its trackers at the end.
const PEER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause after a failed long-poll before the next, so a refusing server is not hammered.
const POLL_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Longest wait for a new connection's `hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Concurrent history reads of the stored-count check.
const STORED_CHECK_CONCURRENCY: usize = 16;

/// Kefu accepts `max_concurrent` from 0 to 1000.
const MAX_CONCURRENT_LIMIT: usize = 1000;

/// What the engine needs to know; the scenarios fill it from their own configs.
#[derive(Clone)]
pub(crate) struct EngineConfig {
    pub url: String,
    /// Where the agents connect their WebSockets, when not `url` (the other node of a
    /// cluster pair). Provisioning, visitors and the stored check use `url`.
    pub agent_url: Option<String>,
    pub platform_key: String,
    pub conversations: usize,
    /// 0: one agent per conversation.
    pub agents: usize,
    /// `Some(wait)`: visitors use long-poll with this `wait` (seconds).
    pub longpoll_wait: Option<u32>,
    pub assign_timeout: Duration,
    pub drain_timeout: Duration,
    pub provision_concurrency: usize,
    pub progress: Progress,
}

/// What every connection task is told to do.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Control {
    Idle,
    Run(PhasePlan),
    Stop,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct PhasePlan {
    pub idx: u32,
    /// Messages per second from each side of each conversation.
    pub per_side_rate: f64,
    pub start: Instant,
    pub end: Instant,
}

/// State shared by all connection tasks of a run.
pub(crate) struct Shared {
    pub counters: Counters,
    pub recorder: Recorder,
    pub clock: Clock,
    /// Sides (visitor or agent, per conversation) that have seen their conversation assigned.
    ready: AtomicUsize,
    /// (phase, connection tasks whose timetable for that phase has no slot left).
    schedules_done: Mutex<(u32, usize)>,
}

impl Shared {
    fn new() -> Self {
        Self {
            counters: Counters::default(),
            recorder: Recorder::new(),
            clock: Clock::new(),
            ready: AtomicUsize::new(0),
            schedules_done: Mutex::new((0, 0)),
        }
    }

    fn schedules_done(&self) -> std::sync::MutexGuard<'_, (u32, usize)> {
        // Plain numbers behind the lock: a panic elsewhere cannot leave them half-written.
        self.schedules_done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A connection task has made the last send of `phase` (or had none to make).
    fn schedule_done(&self, phase: u32) {
        let mut done = self.schedules_done();
        if done.0 == phase {
            done.1 += 1;
        }
    }
}

/// Called when a phase's schedule is made and after each of its sends: once it has no slot
/// left (or never had one), drops it and tells the engine. Never called on a schedule already
/// dropped after a send, so each task reports each phase once.
fn retire(schedule: &mut Option<Schedule>, shared: &Shared, phase: u32) {
    if schedule.as_ref().is_none_or(Schedule::is_done) {
        shared.schedule_done(phase);
        *schedule = None;
    }
}

/// What a connection task hands back when it stops.
struct PeerResult {
    side: Side,
    trackers: HashMap<i64, SeqTracker>,
}

/// One phase's measurements.
pub(crate) struct PhaseOutcome {
    pub duration: Duration,
    pub data: PhaseData,
    /// Whether the drain finished before its timeout.
    pub settled: bool,
}

impl PhaseOutcome {
    pub fn throughput(&self) -> f64 {
        self.data.acked as f64 / self.duration.as_secs_f64().max(f64::EPSILON)
    }

    /// Acknowledged in this phase but, once drained, not read by the other side.
    pub fn undelivered(&self) -> u64 {
        self.data.acked.saturating_sub(self.data.delivered)
    }

    pub fn unacked(&self) -> u64 {
        self.data.sent.saturating_sub(self.data.acked)
    }
}

/// The reckoning at the end of a run.
pub(crate) struct Final {
    pub counters: CounterSnapshot,
    pub lost: u64,
    pub unacked: u64,
    pub stored: Option<StoredCheck>,
    /// Connection tasks that did not stop in time (their trackers are missing).
    pub stuck_peers: u64,
}

pub(crate) struct Engine {
    cfg: EngineConfig,
    target: Target,
    tenant: TenantHandle,
    shared: Arc<Shared>,
    control: watch::Sender<Control>,
    peers: Vec<JoinHandle<PeerResult>>,
    conversations: Vec<i64>,
    pub agents: usize,
    pub setup: Duration,
}

impl Engine {
    /// Provisions everything and waits until every conversation is assigned.
    pub async fn start(cfg: EngineConfig) -> Result<Engine> {
        let started = Instant::now();
        let n = cfg.conversations;
        if n == 0 {
            bail!("a run needs at least one conversation");
        }
        let agents = if cfg.agents == 0 { n } else { cfg.agents };
        let max_concurrent = n.div_ceil(agents);
        if max_concurrent > MAX_CONCURRENT_LIMIT {
            bail!(
                "{n} conversations over {agents} agents needs max_concurrent {max_concurrent}, \
                 above Kefu's limit of {MAX_CONCURRENT_LIMIT}; use more agents"
            );
        }
        let progress = cfg.progress.clone();
        progress.stage("creating the tenant");
        let target = Target::new(&cfg.url).await?;
        let agent_target = match &cfg.agent_url {
            Some(url) => Target::new(url).await.context("--agent-url")?,
            None => target.clone(),
        };
        let tenant = target.create_tenant(&cfg.platform_key).await?;
        let shared = Arc::new(Shared::new());
        let (control, _) = watch::channel(Control::Idle);
        let concurrency = cfg.provision_concurrency.max(1);

        // Agents first, so each conversation finds an online agent the moment it is opened.
        progress.bar(agents as u64, "agents created, signed in and connected");
        let mut peers = Vec::with_capacity(agents + n);
        let mut made = stream::iter(0..agents)
            .map(|i| {
                let (target, agent_target, tenant, shared) =
                    (&target, &agent_target, &tenant, &shared);
                let rx = control.subscribe();
                async move {
                    let login = target.create_agent(tenant, i, max_concurrent).await?;
                    let mut st = PeerState::new(Side::Agent, login.id, shared.clone());
                    let ws = open_ws(
                        agent_target,
                        &tenant.domain,
                        "/ws/agent",
                        &login.token,
                        &mut st,
                    )
                    .await
                    .with_context(|| format!("agent {i}'s WebSocket"))?;
                    anyhow::Ok(tokio::spawn(ws_peer(ws, st, rx)))
                }
            })
            .buffer_unordered(concurrency);
        let mut done = 0;
        while let Some(peer) = made.next().await {
            peers.push(peer?);
            done += 1;
            progress.set(done, "agents created, signed in and connected");
        }
        drop(made);

        progress.bar(n as u64, "visitors and conversations opened");
        let mut conversations = Vec::with_capacity(n);
        let mut made = stream::iter(0..n)
            .map(|_| {
                let (target, tenant, shared) = (&target, &tenant, &shared);
                let rx = control.subscribe();
                let wait = cfg.longpoll_wait;
                async move {
                    let visitor = target.visitor_session(&tenant.domain).await?;
                    let mut st = PeerState::new(Side::Visitor, visitor.id, shared.clone());
                    let (conv, peer) = match wait {
                        None => {
                            // The socket is open (its `hello` read) before the conversation
                            // exists, so the `assigned` frame cannot be missed.
                            let ws = open_ws(
                                target,
                                &tenant.domain,
                                "/ws/visitor",
                                &visitor.token,
                                &mut st,
                            )
                            .await
                            .context("a visitor's WebSocket")?;
                            let peer = tokio::spawn(ws_peer(ws, st, rx));
                            let conv = target
                                .create_conversation(&tenant.domain, &visitor.token)
                                .await?;
                            (conv, peer)
                        }
                        Some(wait) => {
                            let conv = target
                                .create_conversation(&tenant.domain, &visitor.token)
                                .await?;
                            // A long-poll visitor needs no assignment to send or to poll.
                            shared.ready.fetch_add(1, Ordering::Relaxed);
                            let lp = LongPoll {
                                target: target.clone(),
                                domain: tenant.domain.as_str().into(),
                                visitor,
                                conversation_id: conv,
                                wait,
                            };
                            (conv, tokio::spawn(lp.run(st, rx)))
                        }
                    };
                    anyhow::Ok((conv, peer))
                }
            })
            .buffer_unordered(concurrency);
        let mut done = 0;
        while let Some(made) = made.next().await {
            let (conv, peer) = made?;
            conversations.push(conv);
            peers.push(peer);
            done += 1;
            progress.set(done, "visitors and conversations opened");
        }
        drop(made);

        let want = 2 * n;
        progress.bar(want as u64, "sides that saw their conversation assigned");
        let deadline = Instant::now() + cfg.assign_timeout;
        loop {
            let ready = shared.ready.load(Ordering::Relaxed);
            progress.set(ready as u64, "sides that saw their conversation assigned");
            if ready >= want {
                break;
            }
            if Instant::now() >= deadline {
                let _ = control.send(Control::Stop);
                bail!(
                    "only {ready} of {want} sides saw their conversation assigned within {:?} \
                     (are the agents online and is the queue assigning?)",
                    cfg.assign_timeout
                );
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
        Ok(Engine {
            cfg,
            target,
            tenant,
            shared,
            control,
            peers,
            conversations,
            agents,
            setup: started.elapsed(),
        })
    }

    /// Runs one phase at `total_rate` messages per second (both sides of all conversations
    /// together) for `duration`, then drains.
    pub async fn run_phase(
        &mut self,
        idx: u32,
        total_rate: f64,
        duration: Duration,
    ) -> PhaseOutcome {
        let n = self.conversations.len();
        let start = Instant::now() + PHASE_LEAD;
        let end = start + duration;
        let plan = PhasePlan {
            idx,
            per_side_rate: total_rate / (2 * n) as f64,
            start,
            end,
        };
        *self.shared.schedules_done() = (idx, 0);
        self.control.send_replace(Control::Run(plan));
        let progress = &self.cfg.progress;
        let title = format!("{total_rate:.0} msg/s");
        progress.bar(duration.as_secs().max(1), title.clone());
        loop {
            let now = Instant::now();
            if now >= end {
                break;
            }
            tokio::time::sleep(PROGRESS_EVERY.min(end - now)).await;
            let c = self.shared.counters.snapshot();
            progress.set(
                Instant::now().saturating_duration_since(start).as_secs(),
                format!(
                    "s ({title}) sent {} acked {} read {} lost? {} dup {} reord {}",
                    c.sent,
                    c.acked,
                    c.delivered,
                    c.acked.saturating_sub(c.delivered),
                    c.duplicated,
                    c.reordered
                ),
            );
        }
        let settled = self.drain(self.cfg.drain_timeout).await;
        PhaseOutcome {
            duration,
            data: self.shared.recorder.phase(idx),
            settled,
        }
    }

    /// Waits until every send is answered and every acknowledged message was read, or until
    /// `timeout`; tells which.
    pub async fn drain(&self, timeout: Duration) -> bool {
        self.cfg
            .progress
            .stage("draining: waiting for the last acks and deliveries");
        let deadline = Instant::now() + timeout;
        loop {
            // A task that ended (its connection dropped) sends no more; count only live ones.
            let live = self.peers.iter().filter(|p| !p.is_finished()).count();
            let schedules_done = self.shared.schedules_done().1 >= live;
            if schedules_done && self.shared.counters.snapshot().settled() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL_EVERY).await;
        }
    }

    pub fn conversations(&self) -> usize {
        self.conversations.len()
    }

    /// Stops every connection, reckons loss from the trackers, and (when asked) compares the
    /// server's stored history with the acks.
    pub async fn finish(mut self, check_stored: bool) -> Final {
        self.control.send_replace(Control::Stop);
        self.cfg.progress.stage("closing connections");
        let mut visitors: HashMap<i64, SeqTracker> = HashMap::new();
        let mut agents: HashMap<i64, SeqTracker> = HashMap::new();
        let mut stuck_peers = 0;
        for peer in self.peers.drain(..) {
            let abort = peer.abort_handle();
            match tokio::time::timeout(PEER_STOP_TIMEOUT, peer).await {
                Ok(Ok(r)) => {
                    let map = match r.side {
                        Side::Visitor => &mut visitors,
                        Side::Agent => &mut agents,
                    };
                    map.extend(r.trackers);
                }
                _ => {
                    abort.abort();
                    stuck_peers += 1;
                }
            }
        }
        let mut lost_total = 0;
        for conv in &self.conversations {
            let (v, a) = (visitors.get(conv), agents.get(conv));
            if let Some(v) = v {
                lost_total += lost(v, a);
            }
            if let Some(a) = a {
                lost_total += lost(a, v);
            }
        }
        let counters = self.shared.counters.snapshot();
        let unacked = counters
            .sent
            .saturating_sub(counters.acked + counters.send_failures);
        let stored = if check_stored {
            self.cfg.progress.stage("reading the stored history back");
            Some(self.stored_check(&visitors, &agents).await)
        } else {
            None
        };
        Final {
            counters,
            lost: lost_total,
            unacked,
            stored,
            stuck_peers,
        }
    }

    async fn stored_check(
        &self,
        visitors: &HashMap<i64, SeqTracker>,
        agents: &HashMap<i64, SeqTracker>,
    ) -> StoredCheck {
        let acked_in = |c: &i64| {
            visitors.get(c).map_or(0, SeqTracker::own_acked_count)
                + agents.get(c).map_or(0, SeqTracker::own_acked_count)
        };
        let (target, tenant) = (&self.target, &self.tenant);
        let mut reads = stream::iter(self.conversations.iter().copied())
            .map(|c| async move { (c, target.stored_count(tenant, c).await) })
            .buffer_unordered(STORED_CHECK_CONCURRENCY);
        let mut check = StoredCheck::default();
        while let Some((c, count)) = reads.next().await {
            check.conversations += 1;
            let acked = acked_in(&c);
            check.acked += acked;
            match count {
                Ok(count) => {
                    check.stored += count.parties;
                    if count.parties != acked {
                        check.mismatched += 1;
                    }
                }
                Err(_) => check.unreadable += 1,
            }
        }
        check
    }
}

/// One party's view: its trackers and what it sends in.
struct PeerState {
    side: Side,
    id: i64,
    shared: Arc<Shared>,
    trackers: HashMap<i64, SeqTracker>,
    /// Conversations this party was assigned and sends in, round robin.
    sending: Vec<i64>,
    next_conv: usize,
    sent: u64,
}

impl PeerState {
    fn new(side: Side, id: i64, shared: Arc<Shared>) -> Self {
        Self {
            side,
            id,
            shared,
            trackers: HashMap::new(),
            sending: Vec::new(),
            next_conv: 0,
            sent: 0,
        }
    }

    fn count(&self, seen: Seen) {
        let c = &self.shared.counters;
        match seen {
            Seen::Late => Counters::add(&c.reordered, 1),
            Seen::Duplicate | Seen::Conflict => Counters::add(&c.duplicated, 1),
            Seen::Invalid => Counters::add(&c.errors, 1),
            Seen::New | Seen::AckOfRead | Seen::Echo | Seen::SystemRepeat => {}
        }
    }

    fn error(&self) {
        Counters::add(&self.shared.counters.errors, 1);
    }

    fn assigned(&mut self, conv: i64) {
        if !self.sending.contains(&conv) {
            self.sending.push(conv);
            self.trackers.entry(conv).or_default();
            self.shared.ready.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_text(&mut self, text: &str, at: Instant) {
        match serde_json::from_str::<ServerFrame>(text) {
            Ok(f) => self.on_frame(&f, at),
            Err(_) => self.error(),
        }
    }

    fn on_frame(&mut self, f: &ServerFrame<'_>, at: Instant) {
        match f.kind.as_ref() {
            "message" => self.on_message(f, at),
            "ack" => match (f.conversation_id, f.seq, f.id) {
                (Some(conv), Some(seq), Some(id)) => {
                    let phase = f
                        .client_msg_id
                        .as_deref()
                        .and_then(phase_of_client_msg_id)
                        .unwrap_or(0);
                    self.on_ack(conv, seq, id, phase, true);
                }
                _ => self.error(),
            },
            "assigned" => match f.conversation_id {
                Some(conv) => self.assigned(conv),
                None => self.error(),
            },
            "hello" => {
                for c in f.conversations.iter().flatten() {
                    if c.status.as_deref() == Some("active") {
                        self.assigned(c.conversation_id);
                    }
                }
            }
            "error" => {
                self.error();
                // Only sends carry a ref: an error with one is a refused send.
                if f.reference.is_some() {
                    Counters::add(&self.shared.counters.send_failures, 1);
                }
            }
            _ => {}
        }
    }

    fn on_message(&mut self, f: &ServerFrame<'_>, at: Instant) {
        let (Some(conv), Some(seq), Some(id), Some(sender)) =
            (f.conversation_id, f.seq, f.id, f.sender.as_ref())
        else {
            return self.error();
        };
        let system = sender.kind == "system";
        let own = sender.kind == self.side.as_str() && sender.id == Some(self.id);
        let seen = self
            .trackers
            .entry(conv)
            .or_default()
            .deliver(seq, id, system, true);
        self.count(seen);
        if !seen.is_first() || system || own {
            return;
        }
        let s = &self.shared;
        Counters::add(&s.counters.delivered, 1);
        let stamp = f
            .content
            .as_ref()
            .and_then(|c| c.text.as_deref())
            .and_then(parse_stamp);
        if let Some((sent_nanos, phase)) = stamp {
            s.recorder
                .record_latency(conv, phase, s.clock.since(sent_nanos, at));
        }
    }

    fn on_ack(&mut self, conv: i64, seq: i64, id: i64, phase: u32, ordered: bool) {
        let seen = self.trackers.entry(conv).or_default().ack(seq, id, ordered);
        self.count(seen);
        if seen.is_first_ack() {
            Counters::add(&self.shared.counters.acked, 1);
            self.shared.recorder.record_ack(conv, phase);
        }
    }

    /// The schedule of this party for a phase: its conversations share one timetable, round
    /// robin, at the per-side rate times their number.
    fn schedule(&self, plan: &PhasePlan) -> Option<Schedule> {
        let rate = plan.per_side_rate * self.sending.len() as f64;
        Schedule::new(plan.start, plan.end, rate, rand::random::<f64>())
    }

    /// The next conversation to send in and the next client_msg_id.
    fn next_send(&mut self, phase: u32) -> Option<(i64, String)> {
        let conv = *self
            .sending
            .get(self.next_conv % self.sending.len().max(1))?;
        self.next_conv += 1;
        self.sent += 1;
        Some((conv, client_msg_id(phase, self.side, self.id, self.sent)))
    }

    fn record_send(&self, conv: i64, phase: u32, slot: Instant, written: Instant) {
        Counters::add(&self.shared.counters.sent, 1);
        self.shared
            .recorder
            .record_send(conv, phase, written.saturating_duration_since(slot));
    }

    fn into_result(self) -> PeerResult {
        PeerResult {
            side: self.side,
            trackers: self.trackers,
        }
    }
}

/// The next instruction, and the receiver to wait for the one after. A gone engine reads as
/// `Stop`. Made once per instruction and kept in the `select!` loop, rather than re-made after
/// every frame read as `changed()` would be.
async fn next_control(
    mut control: watch::Receiver<Control>,
) -> (Control, watch::Receiver<Control>) {
    let now = match control.changed().await {
        Ok(()) => *control.borrow_and_update(),
        Err(_) => Control::Stop,
    };
    (now, control)
}

/// Connects and reads up to the server's `hello`, feeding what arrives to the party's state.
async fn open_ws(
    target: &Target,
    domain: &str,
    path: &str,
    token: &str,
    st: &mut PeerState,
) -> Result<WsStream> {
    let mut ws = target.ws_connect(domain, path, token, None).await?;
    tokio::time::timeout(
        HELLO_TIMEOUT,
        await_hello(&mut ws, |text| st.on_text(text, Instant::now())),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no hello within {HELLO_TIMEOUT:?}"))??;
    Ok(ws)
}

/// A party on a WebSocket: reads frames, sends on schedule, obeys the control channel.
async fn ws_peer(
    mut ws: WsStream,
    mut st: PeerState,
    control: watch::Receiver<Control>,
) -> PeerResult {
    let mut schedule: Option<Schedule> = None;
    let mut phase = 0;
    let mut changes = Box::pin(next_control(control));
    loop {
        tokio::select! {
            frame = ws.next() => {
                let at = Instant::now();
                match frame {
                    Some(Ok(Message::Text(text))) => st.on_text(text.as_str(), at),
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                        Counters::add(&st.shared.counters.disconnects, 1);
                        break;
                    }
                    Some(Ok(_)) => {}
                }
            }
            slot = next_slot(&mut schedule) => {
                let Some(slot) = slot else {
                    retire(&mut schedule, &st.shared, phase);
                    continue;
                };
                if let Some((conv, cmid)) = st.next_send(phase) {
                    let written = Instant::now();
                    let text = stamp_text(st.shared.clock.nanos(written), phase);
                    let frame = send_frame(conv, &cmid, &text);
                    if ws.send(Message::text(frame)).await.is_err() {
                        Counters::add(&st.shared.counters.disconnects, 1);
                        break;
                    }
                    st.record_send(conv, phase, slot, written);
                }
                retire(&mut schedule, &st.shared, phase);
            }
            (now, control) = &mut changes => {
                changes = Box::pin(next_control(control));
                match now {
                    Control::Run(plan) => {
                        phase = plan.idx;
                        schedule = st.schedule(&plan);
                        retire(&mut schedule, &st.shared, phase);
                    }
                    Control::Idle => schedule = None,
                    Control::Stop => {
                        let _ = tokio::time::timeout(PEER_STOP_TIMEOUT, ws.close(None)).await;
                        break;
                    }
                }
            }
        }
    }
    st.into_result()
}

/// A visitor on long-poll: one loop polls the conversation's events, the schedule POSTs the
/// visitor's messages (each in its own task, so a slow answer never delays the next send).
struct LongPoll {
    target: Target,
    domain: Arc<str>,
    visitor: VisitorLogin,
    conversation_id: i64,
    wait: u32,
}

impl LongPoll {
    async fn run(self, mut st: PeerState, control: watch::Receiver<Control>) -> PeerResult {
        let conv = self.conversation_id;
        st.sending.push(conv);
        st.trackers.entry(conv).or_default();
        let shared = st.shared.clone();
        let st = Arc::new(Mutex::new(st));
        let this = Arc::new(self);
        let poller = tokio::spawn(this.clone().poll(st.clone(), control.clone()));
        let mut posts = JoinSet::new();
        let mut schedule: Option<Schedule> = None;
        let mut phase = 0;
        let mut changes = Box::pin(next_control(control));
        loop {
            tokio::select! {
                slot = next_slot(&mut schedule) => {
                    let Some(slot) = slot else {
                        retire(&mut schedule, &shared, phase);
                        continue;
                    };
                    let Some((_, cmid)) = lock(&st).next_send(phase) else {
                        retire(&mut schedule, &shared, phase);
                        continue;
                    };
                    let written = Instant::now();
                    let text = stamp_text(shared.clock.nanos(written), phase);
                    lock(&st).record_send(conv, phase, slot, written);
                    let (this, st) = (this.clone(), st.clone());
                    posts.spawn(async move {
                        let posted = this
                            .target
                            .post_visitor_message(&this.domain, &this.visitor.token, conv, &cmid, &text)
                            .await;
                        let mut st = lock(&st);
                        match posted {
                            Ok(p) => st.on_ack(conv, p.seq, p.id, phase, false),
                            Err(_) => {
                                st.error();
                                Counters::add(&st.shared.counters.send_failures, 1);
                            }
                        }
                    });
                    retire(&mut schedule, &shared, phase);
                }
                Some(_) = posts.join_next(), if !posts.is_empty() => {}
                (now, control) = &mut changes => {
                    changes = Box::pin(next_control(control));
                    match now {
                        Control::Run(plan) => {
                            phase = plan.idx;
                            schedule = lock(&st).schedule(&plan);
                            retire(&mut schedule, &shared, phase);
                        }
                        Control::Idle => schedule = None,
                        Control::Stop => break,
                    }
                }
            }
        }
        // The drain already waited for the answers; whatever is still out is abandoned.
        posts.abort_all();
        let abort = poller.abort_handle();
        if tokio::time::timeout(PEER_STOP_TIMEOUT, poller)
            .await
            .is_err()
        {
            abort.abort();
        }
        let mut st = lock(&st);
        PeerResult {
            side: st.side,
            trackers: std::mem::take(&mut st.trackers),
        }
    }

    async fn poll(
        self: Arc<Self>,
        st: Arc<Mutex<PeerState>>,
        mut control: watch::Receiver<Control>,
    ) {
        let conv = self.conversation_id;
        let mut after = 0i64;
        loop {
            let polled = tokio::select! {
                r = self.target.poll_events(&self.domain, &self.visitor.token, conv, after, self.wait) => r,
                _ = control.wait_for(|c| matches!(c, Control::Stop)) => return,
            };
            let body = match polled {
                Ok(body) => body,
                Err(_) => {
                    lock(&st).error();
                    tokio::time::sleep(POLL_RETRY_PAUSE).await;
                    continue;
                }
            };
            let at = Instant::now();
            let mut st = lock(&st);
            match serde_json::from_slice::<Events>(&body) {
                Ok(events) => {
                    let mut newest = None;
                    for f in &events.events {
                        st.on_frame(f, at);
                        if f.kind == "message" {
                            newest = newest.max(f.seq);
                        }
                    }
                    // Resume after the newest message received; the server's `last_seq` only
                    // counts when it sent no message (it may be the conversation's last seq
                    // while the events were cut to a page).
                    after = after.max(newest.or(events.last_seq).unwrap_or(after));
                }
                Err(_) => st.error(),
            }
        }
    }
}

/// Locks a long-poll visitor's state. A poisoned lock means a task panicked mid-update of
/// counters and trackers; the data is still the best there is, so use it.
fn lock(st: &Mutex<PeerState>) -> std::sync::MutexGuard<'_, PeerState> {
    st.lock().unwrap_or_else(|e| e.into_inner())
}
