//! A small WebSocket client for the tests, and the steps every chat test repeats.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::helpers::{Api, TestTenant};

/// How long a test waits for a frame it expects. Generous: this bounds a failing test, it does
/// not measure speed.
const FRAME_WAIT: Duration = Duration::from_secs(10);

type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Ws {
    stream: Stream,
    pub hello: Value,
}

impl Ws {
    /// Connects to `path` (`/ws/agent` or `/ws/visitor`) on the tenant's host with a token.
    pub async fn connect(
        app: &impl Api,
        host: &str,
        path: &str,
        token: &str,
    ) -> Result<Ws, StatusCode> {
        let mut req = format!("ws://127.0.0.1:{}{}?token={}", app.port(), path, token)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("Host", host.parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok((stream, _)) => {
                let mut ws = Ws {
                    stream,
                    hello: Value::Null,
                };
                ws.hello = ws.recv().await;
                assert_eq!(ws.hello["type"], "hello", "first frame is hello");
                Ok(ws)
            }
            Err(WsError::Http(res)) => Err(StatusCode::from_u16(res.status().as_u16()).unwrap()),
            Err(e) => panic!("connect failed: {e}"),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.stream
            .send(Message::text(v.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.stream.send(m).await.unwrap();
    }

    /// The next text frame as JSON (pings are answered by tungstenite itself).
    pub async fn recv(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + FRAME_WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .expect("a frame within the wait")
                .expect("the connection is open")
                .expect("a valid frame");
            match msg {
                Message::Text(t) => return serde_json::from_str(&t).unwrap(),
                Message::Close(c) => panic!("closed by the server: {c:?}"),
                _ => {}
            }
        }
    }

    /// Skips frames until one of type `ty` arrives.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        self.recv_where(|f| f["type"] == ty).await
    }

    /// Skips frames until one matches (all within one wait).
    pub async fn recv_where(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        let mut skipped = Vec::new();
        let found = tokio::time::timeout(FRAME_WAIT, async {
            loop {
                let f = self.recv().await;
                if pred(&f) {
                    return f;
                }
                skipped.push(f);
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no matching frame; got instead: {skipped:?}"))
    }

    /// Waits for the server to close the connection and returns the close code.
    pub async fn closed_with(&mut self) -> u16 {
        loop {
            let msg = tokio::time::timeout(FRAME_WAIT, self.stream.next())
                .await
                .expect("closed within the wait");
            match msg {
                Some(Ok(Message::Close(Some(frame)))) => return frame.code.into(),
                Some(Ok(Message::Close(None))) | None => return 1005,
                Some(Err(_)) => return 1006,
                Some(Ok(_)) => {}
            }
        }
    }

    /// Asserts nothing but pings arrives for `d`.
    pub async fn silent_for(&mut self, d: Duration) {
        if let Ok(Some(Ok(Message::Text(t)))) = tokio::time::timeout(d, self.stream.next()).await {
            panic!("unexpected frame: {t}");
        }
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }

    /// Sends a text message and returns its ack.
    pub async fn say(&mut self, conversation_id: i64, client_msg_id: &str, text: &str) -> Value {
        self.send(json!({"type": "send", "ref": client_msg_id, "conversation_id": conversation_id,
                         "client_msg_id": client_msg_id, "content": {"kind": "text", "text": text}}))
            .await;
        self.recv_where(|f| {
            f["ref"] == client_msg_id && (f["type"] == "ack" || f["type"] == "error")
        })
        .await
    }

    /// Waits for a `message` frame with this text.
    pub async fn heard(&mut self, text: &str) -> Value {
        self.recv_where(|f| f["type"] == "message" && f["content"]["text"] == text)
            .await
    }
}

/// A visitor with a token, and its open conversation.
pub struct Visitor {
    pub id: i64,
    pub token: String,
}

pub async fn new_visitor(app: &impl Api, t: &TestTenant) -> Visitor {
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            "/api/v1/visitor/sessions",
            None,
            Some(json!({"name": "Guest"})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let body: Value = res.json().await.unwrap();
    Visitor {
        id: body["visitor_id"].as_i64().unwrap(),
        token: body["visitor_token"].as_str().unwrap().to_owned(),
    }
}

/// Opens a conversation for the visitor; returns the response body.
pub async fn open_conversation(
    app: &impl Api,
    t: &TestTenant,
    v: &Visitor,
    team: Option<&str>,
) -> Value {
    let body = team.map(|t| json!({"team": t}));
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            "/api/v1/visitor/conversations",
            Some(&v.token),
            body,
        )
        .await;
    assert!(res.status().is_success(), "{}", res.status());
    res.json().await.unwrap()
}

/// A conversation assigned to a new agent online with room for one: the agent's socket (its
/// `assigned` frame read), the visitor and the conversation id.
pub async fn assigned_conversation(
    app: &impl Api,
    t: &TestTenant,
    agent_email: &str,
) -> (Ws, Visitor, i64) {
    let (_, _, mut agent) = agent_online(app, t, agent_email, 1).await;
    let v = new_visitor(app, t).await;
    let conv = open_conversation(app, t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;
    (agent, v, conv)
}

/// An agent connected over WebSocket.
pub async fn agent_online(
    app: &impl Api,
    t: &TestTenant,
    email: &str,
    max_concurrent: i64,
) -> (i64, String, Ws) {
    let (id, token) = app.create_agent(t, email, "agent").await;
    set_capacity(app, t, id, max_concurrent).await;
    let ws = Ws::connect(app, &t.domain, "/ws/agent", &token)
        .await
        .unwrap();
    (id, token, ws)
}

pub async fn set_capacity(app: &impl Api, t: &TestTenant, agent_id: i64, max_concurrent: i64) {
    let res = app
        .call(
            Method::PATCH,
            Some(&t.domain),
            &format!("/api/v1/agents/{agent_id}"),
            Some(&t.admin_token),
            Some(json!({"max_concurrent": max_concurrent})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

/// The stored messages of a conversation, as the admin sees them.
pub async fn history(app: &impl Api, t: &TestTenant, conversation_id: i64) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page: Value = app
            .call(
                Method::GET,
                Some(&t.domain),
                &format!(
                    "/api/v1/conversations/{conversation_id}/messages?after_seq={after}&limit=500"
                ),
                Some(&t.admin_token),
                None,
            )
            .await
            .json()
            .await
            .unwrap();
        let msgs = page["messages"].as_array().unwrap().clone();
        if msgs.is_empty() {
            return out;
        }
        after = msgs.last().unwrap()["seq"].as_i64().unwrap();
        out.extend(msgs);
    }
}

/// Asserts seq runs 1, 2, 3, … without gaps or repeats.
pub fn assert_gap_free(msgs: &[Value]) {
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(
            m["seq"].as_i64().unwrap(),
            i as i64 + 1,
            "seq gap or repeat at {i}: {msgs:?}"
        );
    }
}
