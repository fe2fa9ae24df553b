//! Cluster mode over real processes: Kefu nodes as child processes of the test, a NATS server
//! of the test's own on a free port, and the real PostgreSQL. Nodes are killed with SIGKILL
//! and the broker is stopped and restarted; nothing acknowledged may be lost or duplicated,
//! and no conversation may go to two agents.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use kefu::storage::writer::WriteOp;

use crate::helpers::{Api, TestTenant, postgres_server, random_suffix};
use crate::ws::{
    Visitor, Ws, assert_gap_free, history, new_visitor, open_conversation, set_capacity,
};

/// How long a node may take to come up (migrations on a fresh platform database included).
const NODE_START: Duration = Duration::from_secs(30);

/// Bounds a wait for the cluster to settle (a takeover, a reconnection). Generous: this
/// bounds a failing test, it does not measure speed.
const SETTLE: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A `nats-server` of this test's own, so that stopping it touches no other test.
struct Nats {
    port: u16,
    /// HTTP monitoring (`/connz?subs=1` lists each connection's subscriptions).
    monitor: u16,
    child: Option<Child>,
}

impl Nats {
    async fn start() -> Self {
        let mut nats = Nats {
            port: free_port(),
            monitor: free_port(),
            child: None,
        };
        nats.restart().await;
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The subjects each node is subscribed to, by node name.
    async fn subscriptions(&self) -> HashMap<String, HashSet<String>> {
        let connz: Value = reqwest::get(format!("http://127.0.0.1:{}/connz?subs=1", self.monitor))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let mut out = HashMap::new();
        for c in connz["connections"].as_array().unwrap() {
            let Some(name) = c["name"].as_str().and_then(|n| n.strip_prefix("kefu ")) else {
                continue;
            };
            let subs = c["subscriptions_list"]
                .as_array()
                .map(|l| {
                    l.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            out.insert(name.to_owned(), subs);
        }
        out
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill(&mut c);
        }
    }

    async fn restart(&mut self) {
        self.stop();
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-m",
                &self.monitor.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server runs (scripts/test installs it)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + NODE_START;
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One Kefu process.
struct Node {
    name: String,
    port: u16,
    child: Child,
    client: reqwest::Client,
    platform_key: String,
    log: PathBuf,
}

impl Api for Node {
    fn port(&self) -> u16 {
        self.port
    }
    fn client(&self) -> &reqwest::Client {
        &self.client
    }
    fn platform_key(&self) -> &str {
        &self.platform_key
    }
}

impl Node {
    /// SIGKILL: no goodbye, no flush, no lease released; the kernel closes its sockets.
    fn kill(&mut self) {
        kill(&mut self.child);
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill(&mut self.child);
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- last lines of node {} ---", self.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Nodes sharing one platform database and one NATS server.
struct TestCluster {
    /// First, so nodes stop (and show their logs) before their directory goes.
    nodes: Vec<Node>,
    nats: Nats,
    database_url: String,
    platform_key: String,
    jwt_secret: String,
    dir: tempfile::TempDir,
    /// Extra settings every node gets.
    env: Vec<(String, String)>,
}

impl TestCluster {
    async fn start(nodes: usize) -> Self {
        Self::start_with(nodes, &[]).await
    }

    /// Like [`TestCluster::start`], with extra `KEFU_*` settings for every node.
    async fn start_with(nodes: usize, env: &[(&str, &str)]) -> Self {
        let mut c = TestCluster {
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            nodes: Vec::new(),
            nats: Nats::start().await,
            database_url: format!("{}/kt_{}", postgres_server(), random_suffix()),
            platform_key: format!("cluster-platform-key-{}", random_suffix()),
            jwt_secret: format!("cluster-jwt-secret-{}", random_suffix()),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        // One at a time: the first creates and migrates the platform database.
        for i in 0..nodes {
            let node = c.spawn_node(&format!("n{}", i + 1)).await;
            c.nodes.push(node);
        }
        c
    }

    async fn spawn_node(&self, name: &str) -> Node {
        let port = free_port();
        let data = self.dir.path().join(name);
        std::fs::create_dir_all(&data).expect("node dir");
        let log = data.join("log");
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_kefu"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("KEFU_LISTEN", format!("127.0.0.1:{port}"))
            .env("KEFU_DATA_DIR", &data)
            .env("KEFU_DATABASE_URL", &self.database_url)
            .env("KEFU_NATS_URL", self.nats.url())
            .env("KEFU_NODE_ID", name)
            .env("KEFU_PLATFORM_KEY", &self.platform_key)
            .env("KEFU_JWT_SECRET", &self.jwt_secret)
            .env("KEFU_WORKERS", "1")
            .env("KEFU_TENANT_POOLS__CONNECTIONS", "3")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("the kefu binary runs");
        let node = Node {
            name: name.to_owned(),
            port,
            child,
            client: reqwest::Client::new(),
            platform_key: self.platform_key.clone(),
            log,
        };
        let deadline = tokio::time::Instant::now() + NODE_START;
        loop {
            if let Ok(r) = node.client.get(node.url("/readyz")).send().await
                && r.status() == StatusCode::OK
            {
                return node;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node {name} did not become ready; log:\n{}",
                std::fs::read_to_string(&node.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Creates an agent (through `via`) with a capacity, and connects it to `to`.
async fn agent_on(
    via: &Node,
    to: &Node,
    t: &TestTenant,
    email: &str,
    max_concurrent: i64,
) -> (i64, String, Ws) {
    let (id, token) = via.create_agent(t, email, "agent").await;
    set_capacity(via, t, id, max_concurrent).await;
    let ws = Ws::connect(to, &t.domain, "/ws/agent", &token)
        .await
        .unwrap();
    (id, token, ws)
}

/// A conversation split across two nodes: the visitor's socket on the first, its agent on
/// the second, already assigned.
struct Split {
    t: TestTenant,
    agent_id: i64,
    agent: Ws,
    v: Visitor,
    visitor: Ws,
    conv: i64,
}

async fn split_conversation(c: &TestCluster, prefix: &str) -> Split {
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let t = n1.create_tenant(prefix).await;
    let (agent_id, _, mut agent) = agent_on(n1, n2, &t, &format!("a@{prefix}.test"), 5).await;
    let v = new_visitor(n1, &t).await;
    let visitor = visitor_socket(n1, &t, &v).await;
    let conv = open_conversation(n1, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;
    Split {
        t,
        agent_id,
        agent,
        v,
        visitor,
        conv,
    }
}

/// Connects a visitor's socket to `node`.
async fn visitor_socket(node: &Node, t: &TestTenant, v: &Visitor) -> Ws {
    Ws::connect(node, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap()
}

/// Replays a conversation after `after` on `ws` and returns the messages, up to `synced`.
async fn sync(ws: &mut Ws, conversation_id: i64, after: i64) -> Vec<Value> {
    let reference = format!("sync-{}", random_suffix());
    ws.send(json!({"type": "sync", "ref": reference, "conversation_id": conversation_id, "after_seq": after}))
        .await;
    let mut out = Vec::new();
    loop {
        let f = ws.recv().await;
        if f["type"] == "synced" && f["ref"] == reference.as_str() {
            return out;
        }
        if f["type"] == "message" && f["conversation_id"] == conversation_id {
            out.push(f);
        }
    }
}

/// The system events of a conversation's stored log, by name.
fn events(log: &[Value]) -> Vec<String> {
    log.iter()
        .filter(|m| m["sender"]["kind"] == "system")
        .filter_map(|m| m["content"]["event"].as_str().map(str::to_owned))
        .collect()
}

#[actix_web::test]
async fn a_conversation_split_across_three_nodes() {
    let c = TestCluster::start(3).await;
    let [n1, n2, n3] = &c.nodes[..] else {
        unreachable!()
    };
    let t = n1.create_tenant("clu").await;
    let (agent_id, _, mut agent) = agent_on(n1, n2, &t, "a@clu.test", 5).await;
    let v = new_visitor(n3, &t).await;
    let mut visitor = visitor_socket(n3, &t, &v).await;
    let opened = open_conversation(n3, &t, &v, None).await;
    let conv = opened["conversation_id"].as_i64().unwrap();

    // The queue (on whichever node holds it) assigns; both sides hear it across nodes.
    let assigned = agent.recv_type("assigned").await;
    assert_eq!(assigned["conversation_id"], conv);
    visitor.recv_type("assigned").await;

    // The visitor's second tab, on n1: it hears what the visitor writes on n3 (a write is
    // published once, for the nodes of both participants) as well as the agent.
    let mut visitor_tab = visitor_socket(n1, &t, &v).await;

    // Visitor on n3 → agent on n2, and back.
    let ack = visitor.say(conv, "v-1", "hello from n3").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    agent.heard("hello from n3").await;
    visitor_tab.heard("hello from n3").await;
    let ack = agent.say(conv, "a-1", "hello from n2").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    visitor.heard("hello from n2").await;
    visitor_tab.heard("hello from n2").await;

    // Typing crosses too.
    agent
        .send(json!({"type": "typing", "conversation_id": conv}))
        .await;
    visitor.recv_type("typing").await;

    // A long-poll on n1 gets the agent's next message.
    let poll = {
        let url = n1.url(&format!(
            "/api/v1/visitor/conversations/{conv}/events?after_seq=3&wait=10"
        ));
        let req = n1
            .client()
            .get(url)
            .header("Host", &t.domain)
            .bearer_auth(&v.token);
        actix_web::rt::spawn(async move { req.send().await.unwrap().json::<Value>().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    agent.say(conv, "a-2", "to the poller").await;
    let polled = poll.await.unwrap().unwrap();
    assert!(
        polled["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["content"]["text"] == "to the poller"),
        "{polled}"
    );

    // Tenant isolation on the bus: a notice on this agent's subject, or on the subject of
    // this conversation's writes, that names another tenant is dropped by the node.
    let nats = async_nats::connect(c.nats.url()).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Kefu-Node", "intruder");
    headers.insert("Kefu-Tenant", (t.id + 1000).to_string().as_str());
    let forged = json!({"type": "message", "conversation_id": conv, "content": {"kind": "text", "text": "forged"}});
    for subject in [
        format!("kefu.{}.agent.{agent_id}", t.id),
        format!("kefu.{}.write.{}.{agent_id}", t.id, v.id),
    ] {
        nats.publish_with_headers(subject, headers.clone(), forged.to_string().into())
            .await
            .unwrap();
    }
    nats.flush().await.unwrap();
    visitor.heard("to the poller").await;
    agent.silent_for(Duration::from_millis(500)).await;
    visitor.silent_for(Duration::from_millis(100)).await;

    let log = history(n1, &t, conv).await;
    assert_gap_free(&log);
    assert_eq!(events(&log), ["assigned"]);

    // n2 heard the visitor's writes from n3 through the broker and timed each trip.
    let metrics = n2
        .platform(reqwest::Method::GET, "/metrics", None)
        .await
        .text()
        .await
        .unwrap();
    let trips: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("kefu_cluster_notice_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no notice histogram: {metrics}"));
    assert!(trips >= 2, "{trips} notices timed");

    // Each node listens only to the subjects of what it hosts: the agent's subject on n2
    // (where its hub is), the visitor's on n3 and n1 (socket, long-poll), never elsewhere;
    // the queue's on exactly one node. The same for the subjects of their conversations'
    // writes: a write is published once, on a subject naming both participants, and each
    // side's node hears it through a wildcard on its own participant.
    let subs = c.nats.subscriptions().await;
    let agent_subject = format!("kefu.{}.agent.{agent_id}", t.id);
    let visitor_subject = format!("kefu.{}.visitor.{}", t.id, v.id);
    let agent_writes = format!("kefu.{}.write.*.{agent_id}", t.id);
    let visitor_writes = format!("kefu.{}.write.{}.*", t.id, v.id);
    let queue_subject = format!("kefu.{}.queue", t.id);
    // (n1's long-poll hub may have stopped by now: n1 is not checked for the visitor.)
    for (subject, on, not_on) in [
        (&agent_subject, &["n2"], &["n1", "n3"][..]),
        (&agent_writes, &["n2"], &["n1", "n3"]),
        (&visitor_subject, &["n3"], &["n2"]),
        (&visitor_writes, &["n3"], &["n2"]),
    ] {
        for node in on {
            assert!(subs[*node].contains(subject), "{node} {subject} {subs:?}");
        }
        for node in not_on {
            assert!(!subs[*node].contains(subject), "{node} {subject} {subs:?}");
        }
    }
    let queue_holders = subs.values().filter(|s| s.contains(&queue_subject)).count();
    assert_eq!(queue_holders, 1, "{subs:?}");
    for s in subs.values().flatten() {
        assert!(
            s.starts_with(&format!("kefu.{}.", t.id)) || s.starts_with("_INBOX."),
            "{s}"
        );
    }
}

#[actix_web::test]
async fn an_agent_whose_node_dies_and_does_not_return_loses_conversations_to_one_other_agent() {
    // Short grace: the dead node's heartbeat expires (5 s), then 1 s of grace.
    let mut c = TestCluster::start_with(2, &[("KEFU_REALTIME__AGENT_GRACE_SECS", "1")]).await;
    let t = c.nodes[0].create_tenant("gon").await;
    let (_, _, mut gone) = agent_on(&c.nodes[0], &c.nodes[1], &t, "gone@gon.test", 1).await;
    let v = new_visitor(&c.nodes[0], &t).await;
    let mut visitor = visitor_socket(&c.nodes[0], &t, &v).await;
    let conv = open_conversation(&c.nodes[0], &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    gone.recv_type("assigned").await;
    // A second agent, full until the first one's conversation comes back.
    let (other_id, _, mut other) =
        agent_on(&c.nodes[0], &c.nodes[0], &t, "other@gon.test", 1).await;
    c.nodes[1].kill();

    let f = tokio::time::timeout(SETTLE, other.recv_type("assigned"))
        .await
        .expect("requeued and assigned after the grace period");
    assert_eq!(f["conversation_id"], conv);
    let f = visitor
        .recv_where(|f| f["type"] == "assigned" && f["agent"]["id"] == other_id)
        .await;
    assert_eq!(f["conversation_id"], conv);
    other.silent_for(Duration::from_secs(1)).await;
    let log = history(&c.nodes[0], &t, conv).await;
    assert_gap_free(&log);
    assert_eq!(events(&log), ["assigned", "requeued", "assigned"]);
}

#[actix_web::test]
async fn a_node_killed_mid_conversation_loses_nothing() {
    let mut c = TestCluster::start(2).await;
    let Split {
        t,
        agent_id,
        mut agent,
        v,
        mut visitor,
        conv,
    } = split_conversation(&c, "kil").await;

    // The visitor sends 20 messages without waiting, and node 1 dies while they go.
    let mut acked: HashMap<String, i64> = HashMap::new();
    for i in 0..20 {
        let id = format!("m-{i}");
        visitor
            .send(
                json!({"type": "send", "ref": id, "conversation_id": conv, "client_msg_id": id,
                         "content": {"kind": "text", "text": id}}),
            )
            .await;
    }
    // Some acks arrive before the kill; the rest are unknown to the client.
    for _ in 0..5 {
        let f = visitor.recv_type("ack").await;
        acked.insert(
            f["client_msg_id"].as_str().unwrap().to_owned(),
            f["seq"].as_i64().unwrap(),
        );
    }
    c.nodes[0].kill();

    // The visitor reconnects to node 2, resyncs, and re-sends what it has no ack for.
    let mut visitor = visitor_socket(&c.nodes[1], &t, &v).await;
    let replay = sync(&mut visitor, conv, 0).await;
    for id in acked.keys() {
        assert!(
            replay.iter().any(|m| m["client_msg_id"] == id.as_str()),
            "{id} was acknowledged before the kill and comes back by resync"
        );
    }
    for i in 0..20 {
        let id = format!("m-{i}");
        if acked.contains_key(&id) {
            continue;
        }
        let ack = visitor.say(conv, &id, &id).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        acked.insert(id, ack["seq"].as_i64().unwrap());
    }

    // Every message exactly once, gap-free, and the conversation still with its agent.
    let log = history(&c.nodes[1], &t, conv).await;
    assert_gap_free(&log);
    let texts: Vec<&str> = log
        .iter()
        .filter(|m| m["sender"]["kind"] == "visitor")
        .map(|m| m["content"]["text"].as_str().unwrap())
        .collect();
    let unique: HashSet<&str> = texts.iter().copied().collect();
    assert_eq!(texts.len(), 20, "{texts:?}");
    assert_eq!(unique.len(), 20);
    for (id, seq) in &acked {
        assert!(
            log.iter()
                .any(|m| m["client_msg_id"] == id.as_str() && m["seq"] == *seq),
            "acked {id} at {seq} is stored there"
        );
    }
    assert_eq!(events(&log), ["assigned"], "never requeued or reassigned");
    let ack = agent.say(conv, "a-after", "still here").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    visitor.heard("still here").await;

    // The agent's node dies too: the agent comes back on a fresh node within its grace
    // period and keeps the conversation.
    let n3 = c.spawn_node("n3").await;
    c.nodes[1].kill();
    let token = n3.login(&t.domain, "a@kil.test", "agent-password-1").await;
    let mut agent = Ws::connect(&n3, &t.domain, "/ws/agent", &token)
        .await
        .unwrap();
    let mine: Vec<i64> = agent.hello["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["conversation_id"].as_i64().unwrap())
        .collect();
    assert_eq!(mine, [conv], "{}", agent.hello);
    let ack = agent.say(conv, "a-n3", "from n3").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let log = history(&n3, &t, conv).await;
    assert_gap_free(&log);
    assert_eq!(events(&log), ["assigned"]);
    assert!(
        log.iter()
            .all(|m| m["sender"]["kind"] != "agent" || m["sender"]["id"] == agent_id)
    );
}

#[actix_web::test]
async fn the_queue_moves_when_its_node_dies_and_assigns_each_visitor_once() {
    let mut c = TestCluster::start(2).await;
    let t = c.nodes[0].create_tenant("que").await;
    // Node 1 opens the conversations, so it takes the queue (nobody else has the tenant).
    let mut visitors = Vec::new();
    let mut convs = Vec::new();
    for _ in 0..5 {
        let v = new_visitor(&c.nodes[0], &t).await;
        let opened = open_conversation(&c.nodes[0], &t, &v, None).await;
        assert_eq!(opened["status"], "queued");
        convs.push(opened["conversation_id"].as_i64().unwrap());
        visitors.push(v);
    }
    // The visitors wait on node 2.
    let mut sockets = Vec::new();
    for v in &visitors {
        sockets.push(visitor_socket(&c.nodes[1], &t, v).await);
    }
    c.nodes[0].kill();

    // Node 2 takes the queue over (rebuilt from storage); an agent arrives there.
    let (agent_id, _, mut agent) = agent_on(&c.nodes[1], &c.nodes[1], &t, "a@que.test", 10).await;
    let mut assigned = HashSet::new();
    let deadline = tokio::time::Instant::now() + SETTLE;
    while assigned.len() < convs.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "assigned only {assigned:?}"
        );
        let f = agent.recv_type("assigned").await;
        assert!(
            assigned.insert(f["conversation_id"].as_i64().unwrap()),
            "assigned twice: {f}"
        );
    }
    assert_eq!(assigned, convs.iter().copied().collect());
    for ws in &mut sockets {
        let f = ws.recv_type("assigned").await;
        assert_eq!(f["agent"]["id"], agent_id);
    }
    for conv in &convs {
        let log = history(&c.nodes[1], &t, *conv).await;
        assert_eq!(events(&log), ["assigned"], "conversation {conv}");
    }
    agent.silent_for(Duration::from_secs(1)).await;
}

#[actix_web::test]
async fn nats_restarts_and_nodes_recover_by_themselves() {
    let mut c = TestCluster::start(2).await;
    let Split {
        t,
        mut agent,
        mut visitor,
        conv,
        ..
    } = split_conversation(&c, "nat").await;
    let ack = visitor.say(conv, "before", "before").await;
    let before = ack["seq"].as_i64().unwrap();
    agent.heard("before").await;

    // The broker goes away: sends are still stored and acknowledged.
    c.nats.stop();
    let mut during = Vec::new();
    for i in 0..3 {
        let ack = visitor
            .say(conv, &format!("during-{i}"), &format!("during-{i}"))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        during.push(ack["seq"].as_i64().unwrap());
    }

    // The agent answers through its own node meanwhile: before its ack, its node hands it
    // what the visitor's node stored (no notice came: read from storage), in order.
    agent
        .send(
            json!({"type": "send", "ref": "answer", "conversation_id": conv,
                     "client_msg_id": "answer", "content": {"kind": "text", "text": "answer"}}),
        )
        .await;
    let mut filled = Vec::new();
    let ack = loop {
        let f = agent.recv().await;
        match f["type"].as_str() {
            Some("ack") => break f,
            Some("message") if f["conversation_id"] == conv => {
                filled.push(f["seq"].as_i64().unwrap());
            }
            _ => assert_ne!(f["type"], "error", "{f}"),
        }
    };
    assert_eq!(ack["seq"].as_i64().unwrap(), during[2] + 1, "{ack}");
    assert_eq!(filled, during, "what the agent got before its ack");

    // It comes back on the same port; the nodes reconnect and resubscribe by themselves:
    // new messages cross again.
    c.nats.restart().await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut i = 0;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no delivery after NATS came back"
        );
        i += 1;
        let text = format!("after-{i}");
        visitor.say(conv, &text, &text).await;
        let got = tokio::time::timeout(
            Duration::from_millis(700),
            agent.recv_where(|f| f["type"] == "message" && f["content"]["text"] == text.as_str()),
        )
        .await;
        if got.is_ok() {
            break;
        }
    }

    // What was sent meanwhile comes by resync, each exactly once.
    let replay = sync(&mut agent, conv, before).await;
    let seqs: Vec<i64> = replay.iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    for s in &during {
        assert_eq!(seqs.iter().filter(|x| *x == s).count(), 1, "{seqs:?}");
    }
    let log = history(&c.nodes[1], &t, conv).await;
    assert_gap_free(&log);
}

#[actix_web::test]
async fn two_nodes_writing_one_conversation_keep_seq_gap_free() {
    let c = TestCluster::start(2).await;
    let [n1, n2] = &c.nodes[..] else {
        unreachable!()
    };
    let t = n1.create_tenant("seq").await;
    let (_, _, mut agent) = agent_on(n1, n2, &t, "a@seq.test", 5).await;
    let v = new_visitor(n1, &t).await;
    let conv = open_conversation(n1, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;

    // The visitor on both nodes at once, and the agent, all sending together; each visitor
    // socket also re-sends some of the other's ids (idempotency across nodes).
    let mut on1 = visitor_socket(n1, &t, &v).await;
    let mut on2 = visitor_socket(n2, &t, &v).await;
    let seen = tokio::join!(
        send_all(&mut on1, conv, "v1", true),
        send_all(&mut on2, conv, "v2", true),
        send_all(&mut agent, conv, "ag", false),
    );
    // Every socket saw the conversation in order, each seq once, as a message or as the ack of
    // its own send, although the writes came from two nodes.
    for (who, seqs) in [
        ("visitor on 1", seen.0),
        ("visitor on 2", seen.1),
        ("agent", seen.2),
    ] {
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "{who} saw {seqs:?}"
        );
    }

    let log = history(n2, &t, conv).await;
    assert_gap_free(&log);
    let ids: Vec<&str> = log
        .iter()
        .filter(|m| m["sender"]["kind"] != "system")
        .map(|m| m["client_msg_id"].as_str().unwrap())
        .collect();
    let unique: HashSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "a client_msg_id stored twice");
    // 3 × 40 sends, of which 2 × 10 share 10 ids.
    assert_eq!(ids.len(), 3 * N - N / 4, "{ids:?}");
}

/// Sends per sender in [`two_nodes_writing_one_conversation_keep_seq_gap_free`].
const N: usize = 40;

/// Sends `N` messages without waiting, then waits for all their acks. With `shared`, every
/// fourth id is one the other visitor socket sends too. Returns the seqs the socket saw
/// meanwhile, in arrival order: messages, and the acks of its sends that stored something.
async fn send_all(ws: &mut Ws, conv: i64, prefix: &str, shared: bool) -> Vec<i64> {
    for i in 0..N {
        let id = if shared && i % 4 == 0 {
            format!("shared-{i}")
        } else {
            format!("{prefix}-{i}")
        };
        ws.send(
            json!({"type": "send", "ref": format!("{prefix}-{i}"), "conversation_id": conv,
                       "client_msg_id": id, "content": {"kind": "text", "text": id}}),
        )
        .await;
    }
    let mut acks = 0;
    let mut seen = Vec::new();
    while acks < N {
        let f = ws.recv().await;
        match f["type"].as_str() {
            Some("ack") => {
                acks += 1;
                // A duplicate's ack names the first copy's seq; and a node that filled a gap
                // from storage may have shown this socket its own message before its ack.
                let seq = f["seq"].as_i64().unwrap();
                if f["duplicate"] != true && !seen.contains(&seq) {
                    seen.push(seq);
                }
            }
            Some("message") if f["conversation_id"] == conv => {
                seen.push(f["seq"].as_i64().unwrap());
            }
            _ => assert_ne!(f["type"], "error", "{f}"),
        }
    }
    seen
}

#[actix_web::test]
async fn cluster_mode_needs_postgres() {
    let out = Command::new(env!("CARGO_BIN_EXE_kefu"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEFU_NATS_URL", "nats://127.0.0.1:4222")
        .env("KEFU_DATA_DIR", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KEFU_DATABASE_URL"), "{err}");
}

#[actix_web::test]
async fn the_nats_breaker_opens_while_the_broker_is_down_and_closes_after() {
    let mut c = TestCluster::start_with(
        2,
        &[
            ("KEFU_BREAKERS__MIN_CALLS", "3"),
            ("KEFU_BREAKERS__OPEN_SECS", "1"),
        ],
    )
    .await;
    let t = c.nodes[0].create_tenant("nbr").await;
    // Node 1 opens a conversation, so it runs the queue.
    let v = new_visitor(&c.nodes[0], &t).await;
    open_conversation(&c.nodes[0], &t, &v, None).await;
    let breaker_state = |metrics: &str, state: &str| {
        metrics.contains(&format!(
            "kefu_circuit_breaker_state{{dependency=\"nats\",scope=\"node\",state=\"{state}\"}} 1"
        ))
    };

    // The broker goes: node 2 cannot reach the queue; refused, and once the breaker is open,
    // refused without trying.
    c.nats.stop();
    let mut visitors = Vec::new();
    for _ in 0..5 {
        let v = new_visitor(&c.nodes[1], &t).await;
        let res = c.nodes[1]
            .call(
                reqwest::Method::POST,
                Some(&t.domain),
                "/api/v1/visitor/conversations",
                Some(&v.token),
                None,
            )
            .await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        visitors.push(v);
    }
    let metrics = c.nodes[1]
        .platform(reqwest::Method::GET, "/metrics", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(breaker_state(&metrics, "open"), "{metrics}");

    // The broker returns: a probe goes through and the breaker closes; the conversations
    // stored meanwhile are in the queue (reconciled from storage).
    c.nats.restart().await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        let res = c.nodes[1]
            .call(
                reqwest::Method::POST,
                Some(&t.domain),
                "/api/v1/visitor/conversations",
                Some(&visitors[0].token),
                None,
            )
            .await;
        if res.status().is_success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = c.nodes[1]
        .platform(reqwest::Method::GET, "/metrics", None)
        .await
        .text()
        .await
        .unwrap();
    assert!(breaker_state(&metrics, "closed"), "{metrics}");
}

#[actix_web::test]
async fn a_trace_id_follows_a_message_from_an_http_request_to_another_nodes_delivery() {
    let c = TestCluster::start_with(2, &[("RUST_LOG", "info,kefu::actors=debug")]).await;
    let Split {
        t,
        mut agent,
        v,
        conv,
        ..
    } = split_conversation(&c, "trc").await;
    let [n1, n2] = &c.nodes[..] else {
        unreachable!()
    };

    // A long-poll send on node 1, in the caller's trace...
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let res = n1
        .client()
        .post(n1.url(&format!("/api/v1/visitor/conversations/{conv}/messages")))
        .header("Host", &t.domain)
        .header("traceparent", format!("00-{trace_id}-b7ad6b7169203331-01"))
        .bearer_auth(&v.token)
        .json(&json!({"client_msg_id": "traced", "content": {"kind": "text", "text": "traced"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    agent.heard("traced").await;

    // ...is in node 1's log for the request, and in node 2's for the delivery it caused.
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        let log1 = std::fs::read_to_string(&n1.log).unwrap_or_default();
        let log2 = std::fs::read_to_string(&n2.log).unwrap_or_default();
        let sent = log1
            .lines()
            .any(|l| l.contains(trace_id) && l.contains("request"));
        let delivered = log2
            .lines()
            .any(|l| l.contains(trace_id) && l.contains("delivering a frame from another node"));
        if sent && delivered {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "trace {trace_id} not followed: sent {sent}, delivered {delivered}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_web::test]
async fn suspending_a_tenant_on_one_node_closes_its_sockets_on_the_others() {
    let c = TestCluster::start(2).await;
    let Split {
        t,
        mut agent,
        mut visitor,
        ..
    } = split_conversation(&c, "sus").await;
    let res = c.nodes[0]
        .platform(
            reqwest::Method::POST,
            &format!("/platform/v1/tenants/{}/suspend", t.slug),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    // The visitor is on the node that suspended, the agent on the other one.
    assert_eq!(visitor.closed_with().await, 4003);
    assert_eq!(agent.closed_with().await, 4003);
}

/// In cluster mode a writer batch locks its conversations in id order before writing any, so
/// two nodes' batches sharing conversations cannot deadlock. One batch holds a message to B and
/// the close of A (A < B) while another transaction holds A: the batch waits for A without
/// having touched B. Taking locks as the statements go (messages first, then changes) would
/// have locked B and then waited for A, the order another node's batch may take the other way.
#[actix_web::test]
async fn cluster_writer_batches_lock_conversations_in_id_order() {
    use kefu::conversations::log::{Change, Closer};
    lock_order_case("lockorder", |(a, va), (b, vb)| {
        (
            WriteOp::Change(Change::Close {
                conversation_id: a,
                by: Closer::Visitor(va),
            }),
            message(b, vb, "b-1"),
        )
    })
    .await;
}

/// The same for the usual batch, messages only, which is a single statement without a
/// transaction around it: its `UPDATE` takes the rows in id order too.
#[actix_web::test]
async fn cluster_message_batches_lock_conversations_in_id_order() {
    lock_order_case("lockorder-msgs", |(a, va), (b, vb)| {
        (message(b, vb, "b-1"), message(a, va, "a-1"))
    })
    .await;
}

fn message(conversation_id: i64, visitor: i64, client_msg_id: &str) -> WriteOp {
    use kefu::conversations::Participant;
    use kefu::conversations::log::NewMessage;
    WriteOp::Message(NewMessage {
        conversation_id,
        client_msg_id: client_msg_id.to_owned(),
        sender: Participant::Visitor(visitor),
        content: r#"{"type":"text","text":"hi"}"#.to_owned(),
    })
}

/// Opens conversations A < B, holds A's row in another transaction, and has a writer in
/// cluster mode run the two operations `ops((A, its visitor), (B, its visitor))` as one
/// batch: B must still be free while the batch waits for A, and both must succeed once A is
/// released.
async fn lock_order_case(
    slug: &str,
    ops: impl FnOnce((i64, i64), (i64, i64)) -> (WriteOp, WriteOp),
) {
    use kefu::conversations::Participant;
    use kefu::storage::writer::Writers;
    use sea_orm::sqlx::{self, Connection, Executor};

    let app = crate::helpers::spawn_app(crate::helpers::Backend::Postgres).await;
    let t = app.create_tenant(slug).await;
    let (va, vb) = (new_visitor(&app, &t).await, new_visitor(&app, &t).await);
    let a = open_conversation(&app, &t, &va, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    let b = open_conversation(&app, &t, &vb, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    assert!(a < b);
    let storage = app.state.tenants.storage();
    let db_name = storage.tenant_db_name(&t.slug);
    let db = storage.tenant(&db_name).await.unwrap();
    let writers = Writers::new(true);
    // The writer exists and waits for work before the batch is queued.
    let warm_up = WriteOp::Read {
        conversation_id: b,
        reader: Participant::Visitor(vb.id),
        seq: 0,
    };
    writers.write(t.id, &db, warm_up).await.unwrap();

    let url = format!("{}/{db_name}", postgres_server());
    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    holder.execute("BEGIN").await.unwrap();
    holder
        .execute(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM conversations WHERE id = {a} FOR UPDATE"
        )))
        .await
        .unwrap();
    // Both are queued before the writer runs again (one runtime thread): one batch.
    let (first, second) = ops((a, va.id), (b, vb.id));
    let batch = {
        let (writers, db, tenant) = (writers.clone(), db.clone(), t.id);
        actix_web::rt::spawn(async move {
            futures_util::join!(
                writers.write(tenant, &db, first),
                writers.write(tenant, &db, second)
            )
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut probe = sqlx::PgConnection::connect(&url).await.unwrap();
    probe.execute("BEGIN").await.unwrap();
    let b_free = probe
        .execute(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM conversations WHERE id = {b} FOR UPDATE NOWAIT"
        )))
        .await;
    probe.execute("ROLLBACK").await.unwrap();
    holder.execute("ROLLBACK").await.unwrap();
    let (first, second) = batch.await.unwrap();
    assert!(b_free.is_ok(), "the batch locked B before A: {b_free:?}");
    assert!(first.is_ok() && second.is_ok(), "{first:?} {second:?}");
}

/// A tenant's writer on PostgreSQL plans its statement once, on its first batch, and keeps
/// that generic plan for the connection's life (`storage::writer_connection`). A new tenant's
/// tables are nearly empty when that happens, and a plan that scans them whole would be kept
/// while they grow to millions of rows: the plan must find every row by key.
#[actix_web::test]
async fn the_writers_one_plan_finds_rows_by_key_on_a_new_tenants_tables() {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};

    let app = crate::helpers::spawn_app(crate::helpers::Backend::Postgres).await;
    let t = app.create_tenant("writerplan").await;
    let storage = app.state.tenants.storage();
    let db = storage
        .tenant(&storage.tenant_db_name(&t.slug))
        .await
        .unwrap();
    let writer = kefu::storage::writer_connection(&db).expect("a PostgreSQL tenant");
    // One connection: the statement prepared here is the one explained below.
    writer
        .execute_unprepared(&format!(
            "PREPARE append(bigint[], text[], text[], bigint[], text[], timestamptz) AS {}",
            kefu::conversations::log::append_sql()
        ))
        .await
        .unwrap();
    let rows = writer
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "EXPLAIN EXECUTE append('{1,2}', '{a,b}', '{visitor,agent}', '{1,2}', '{x,y}', now())",
        ))
        .await
        .unwrap();
    let plan: Vec<String> = rows
        .iter()
        .map(|r| r.try_get::<String>("", "QUERY PLAN").unwrap())
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("$1"), "not a generic plan:\n{plan}");
    assert!(!plan.contains("Seq Scan"), "a table scanned whole:\n{plan}");
    assert!(
        plan.contains("Index Scan using uq_messages_client_msg_id on messages"),
        "re-sends not looked up by key:\n{plan}"
    );
    writer.close().await;
}
