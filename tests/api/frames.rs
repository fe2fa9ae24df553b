//! Bad input on WebSockets: each gets an `error` frame with a documented code (or a documented
//! close code), nothing is stored, and other connections carry on.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{Api, Backend, spawn_app, spawn_app_with};
use crate::on_both;
use crate::ws::{
    Ws, agent_online, assert_gap_free, assigned_conversation, history, new_visitor,
    open_conversation,
};

async fn bad_frames_get_error_frames_and_store_nothing(backend: Backend) {
    let app = spawn_app_with(backend, |s| s.realtime.max_text_chars = 100).await;
    let t = app.create_tenant("frames").await;
    let (_, _, mut agent) = agent_online(&app, &t, "a@example.com", 2).await;
    let v = new_visitor(&app, &t).await;
    let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;
    // Another visitor, with a conversation of its own.
    let other = new_visitor(&app, &t).await;
    let other_conv = open_conversation(&app, &t, &other, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();

    let send = |conversation_id: i64, id: &str, text: &str| {
        json!({"type": "send", "ref": id, "conversation_id": conversation_id, "client_msg_id": id,
               "content": {"kind": "text", "text": text}})
    };
    let cases = vec![
        (Message::text("not json at all"), "malformed_frame"),
        (Message::text("[1, 2, 3]"), "malformed_frame"),
        (
            Message::text(json!({"ref": "x"}).to_string()),
            "invalid_frame",
        ),
        (
            Message::text(json!({"type": "dance", "ref": "x"}).to_string()),
            "unknown_type",
        ),
        (
            Message::text(json!({"type": "send", "ref": "x", "conversation_id": conv}).to_string()),
            "invalid_frame",
        ),
        (
            Message::text(
                json!({"type": "send", "ref": "x", "conversation_id": "one", "client_msg_id": "x",
                              "content": {"kind": "text", "text": "hi"}})
                .to_string(),
            ),
            "invalid_frame",
        ),
        (
            Message::text(
                json!({"type": "send", "ref": "x", "conversation_id": conv, "client_msg_id": "x",
                              "content": {"kind": "image", "url": "http://x"}})
                .to_string(),
            ),
            "invalid_frame",
        ),
        (
            Message::text(send(conv, "", "empty id").to_string()),
            "invalid_frame",
        ),
        (
            Message::text(send(conv, "blank", "   ").to_string()),
            "invalid_frame",
        ),
        // System messages' ids are reserved: one sent ahead would block a later close.
        (
            Message::text(send(conv, "system-9", "a system id").to_string()),
            "invalid_frame",
        ),
        (
            Message::text(send(conv, "long", &"字".repeat(101)).to_string()),
            "message_too_long",
        ),
        (
            Message::text(send(other_conv, "theirs", "not my conversation").to_string()),
            "not_participant",
        ),
        (
            Message::text(send(999_999, "ghost", "nobody").to_string()),
            "conversation_not_found",
        ),
        (
            Message::text(json!({"type": "status", "status": "online"}).to_string()),
            "forbidden",
        ),
        (
            Message::text(
                json!({"type": "transfer", "conversation_id": conv, "to_team": "general"})
                    .to_string(),
            ),
            "forbidden",
        ),
        (
            Message::binary(vec![0u8, 159, 146, 150]),
            "unsupported_frame",
        ),
    ];
    for (msg, code) in cases {
        let shown = format!("{msg:?}");
        visitor.send_raw(msg).await;
        let err = visitor.recv_type("error").await;
        assert_eq!(err["code"], code, "for {shown}: {err}");
        assert!(err["message"].is_string());
    }
    // Nor read someone else's.
    visitor
        .send(json!({"type": "sync", "ref": "s", "conversation_id": other_conv, "after_seq": 0}))
        .await;
    assert_eq!(
        visitor.recv_type("error").await["code"],
        "conversation_not_found"
    );

    // The connection is still fine, and so is everyone else's.
    assert_eq!(
        visitor.say(conv, "ok", "after all that").await["type"],
        "ack"
    );
    agent.heard("after all that").await;
    let stored = history(&app, &t, conv).await;
    assert_gap_free(&stored);
    assert_eq!(stored.len(), 2, "the assignment and the one good message");
    assert_eq!(history(&app, &t, other_conv).await.len(), 1);
}

async fn closed_conversations_take_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("shut").await;
    let (_, _, mut agent) = agent_online(&app, &t, "a@example.com", 2).await;
    let v = new_visitor(&app, &t).await;
    let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;
    agent
        .send(json!({"type": "close", "conversation_id": conv}))
        .await;
    agent.recv_type("closed").await;
    assert_eq!(
        agent.say(conv, "late", "too late").await["code"],
        "conversation_closed"
    );
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            &format!("/api/v1/visitor/conversations/{conv}/messages"),
            Some(&v.token),
            Some(json!({"client_msg_id": "late", "content": {"kind": "text", "text": "hello?"}})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(
        history(&app, &t, conv).await.len(),
        2,
        "assigned and closed"
    );
}

async fn oversized_frames_close_with_1009(backend: Backend) {
    let app = spawn_app_with(backend, |s| s.realtime.max_frame_bytes = 2048).await;
    let t = app.create_tenant("big").await;
    let v = new_visitor(&app, &t).await;
    let mut ws = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let mut bystander = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    ws.send_raw(Message::text("x".repeat(4096))).await;
    assert_eq!(ws.closed_with().await, 1009);
    bystander.send(json!({"type": "ping", "ref": 1})).await;
    assert_eq!(bystander.recv_type("pong").await["ref"], 1);
}

async fn flooding_is_refused_then_closed(backend: Backend) {
    let app = spawn_app_with(backend, |s| {
        s.realtime.frames_per_sec = 5;
        s.realtime.frame_burst = 5;
        s.realtime.flood_limit = 20;
    })
    .await;
    let t = app.create_tenant("flood").await;
    let v = new_visitor(&app, &t).await;
    let mut ws = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let mut bystander = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    for i in 0..10 {
        ws.send(json!({"type": "ping", "ref": i})).await;
    }
    assert_eq!(ws.recv_type("error").await["code"], "rate_limited");
    for i in 0..40 {
        ws.send(json!({"type": "ping", "ref": i})).await;
    }
    assert_eq!(ws.closed_with().await, 1008);
    bystander
        .send(json!({"type": "ping", "ref": "still here"}))
        .await;
    assert_eq!(bystander.recv_type("pong").await["ref"], "still here");
}

async fn tokens_are_checked_before_the_upgrade(backend: Backend) {
    let app = spawn_app(backend).await;
    let a = app.create_tenant("wsa").await;
    let b = app.create_tenant("wsb").await;
    let va = new_visitor(&app, &a).await;
    let (_, agent_a) = app.create_agent(&a, "a@example.com", "agent").await;
    // Wrong tenant, wrong kind, garbage.
    assert_eq!(
        Ws::connect(&app, &b.domain, "/ws/visitor", &va.token)
            .await
            .err(),
        Some(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        Ws::connect(&app, &b.domain, "/ws/agent", &agent_a)
            .await
            .err(),
        Some(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        Ws::connect(&app, &a.domain, "/ws/agent", &va.token)
            .await
            .err(),
        Some(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        Ws::connect(&app, &a.domain, "/ws/visitor", &agent_a)
            .await
            .err(),
        Some(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        Ws::connect(&app, &a.domain, "/ws/visitor", "garbage")
            .await
            .err(),
        Some(StatusCode::UNAUTHORIZED)
    );
    assert_eq!(
        Ws::connect(&app, "nobody.test", "/ws/visitor", &va.token)
            .await
            .err(),
        Some(StatusCode::NOT_FOUND)
    );
    // Well signed, for a visitor that does not exist: the socket is attached before the
    // lookup that refuses it, and must not stay counted as the visitor's.
    let ghost = 999_999;
    let token = app.state.tokens.issue_visitor(a.id, ghost);
    assert_eq!(
        Ws::connect(&app, &a.domain, "/ws/visitor", &token)
            .await
            .err(),
        Some(StatusCode::UNAUTHORIZED)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while app.state.realtime.visitor_present(a.id, ghost) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the refused socket is still counted"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Tenant B's agent cannot touch tenant A's conversation, though the ids are the same numbers.
async fn conversations_do_not_cross_tenants(backend: Backend) {
    let app = spawn_app(backend).await;
    let a = app.create_tenant("xa").await;
    let b = app.create_tenant("xb").await;
    let (mut agent_a, v, conv) = assigned_conversation(&app, &a, "a@example.com").await;
    let mut visitor_a = Ws::connect(&app, &a.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    visitor_a
        .say(conv, "secret", "my policy number is 42")
        .await;

    let (_, b_sup) = app.create_agent(&b, "sup@example.com", "supervisor").await;
    let mut sup_b = Ws::connect(&app, &b.domain, "/ws/agent", &b_sup)
        .await
        .unwrap();
    sup_b
        .send(json!({"type": "sync", "ref": "s", "conversation_id": conv, "after_seq": 0}))
        .await;
    assert_eq!(
        sup_b.recv_type("error").await["code"],
        "conversation_not_found"
    );
    assert_eq!(
        sup_b.say(conv, "x", "hello from b").await["code"],
        // In B's database that conversation does not exist at all.
        "conversation_not_found"
    );
    let res = app
        .call(
            Method::GET,
            Some(&b.domain),
            &format!("/api/v1/conversations/{conv}/messages"),
            Some(&b.admin_token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    agent_a.heard("my policy number is 42").await;
    agent_a.silent_for(Duration::from_millis(200)).await;
}

/// Agents see their own conversations and the queue; supervisors see everything.
async fn history_visibility_follows_roles(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("vis").await;
    let (a_id, a_token, mut a) = agent_online(&app, &t, "a@example.com", 1).await;
    let (_, b_token) = app.create_agent(&t, "b@example.com", "agent").await;
    let (_, sup) = app.create_agent(&t, "s@example.com", "supervisor").await;
    let v1 = new_visitor(&app, &t).await;
    let c1 = open_conversation(&app, &t, &v1, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    a.recv_type("assigned").await;
    let v2 = new_visitor(&app, &t).await;
    let c2 = open_conversation(&app, &t, &v2, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    let ids = |token: String| {
        let app = &app;
        let domain = t.domain.clone();
        async move {
            let list: serde_json::Value = app
                .call(
                    Method::GET,
                    Some(&domain),
                    "/api/v1/conversations",
                    Some(&token),
                    None,
                )
                .await
                .json()
                .await
                .unwrap();
            let mut ids: Vec<i64> = list["conversations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["id"].as_i64().unwrap())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(ids(a_token.clone()).await, [c1, c2]);
    assert_eq!(
        ids(b_token.clone()).await,
        [c2],
        "b sees the queue, not a's conversation"
    );
    assert_eq!(ids(sup.clone()).await, [c1, c2]);
    let res = app
        .call(
            Method::GET,
            Some(&t.domain),
            &format!("/api/v1/conversations/{c1}"),
            Some(&b_token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let c: serde_json::Value = app
        .call(
            Method::GET,
            Some(&t.domain),
            &format!("/api/v1/conversations/{c1}"),
            Some(&sup),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(c["agent_id"], a_id);
    let active: serde_json::Value = app
        .call(
            Method::GET,
            Some(&t.domain),
            "/api/v1/conversations?status=queued",
            Some(&sup),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(active["conversations"].as_array().unwrap().len(), 1);
    let res = app
        .call(
            Method::GET,
            Some(&t.domain),
            "/api/v1/conversations?status=bogus",
            Some(&sup),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

/// Stopping the server tells every socket 1001 (going away).
async fn shutdown_closes_sockets_with_1001(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("bye").await;
    let v = new_visitor(&app, &t).await;
    let mut ws = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let stopper = app.stopper.clone();
    actix_web::rt::spawn(async move { stopper.stop().await });
    assert_eq!(ws.closed_with().await, 1001);
}

/// A socket's role is the stored one: a supervisor's socket may read another agent's
/// conversation, a plain agent's may not.
async fn socket_roles_are_the_stored_ones(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("sockrole").await;
    let (_holder, _, conv) = assigned_conversation(&app, &t, "a@example.com").await;
    let sync = json!({"type": "sync", "ref": "s", "conversation_id": conv, "after_seq": 0});
    let (_, other) = app.create_agent(&t, "b@example.com", "agent").await;
    let mut other = Ws::connect(&app, &t.domain, "/ws/agent", &other)
        .await
        .unwrap();
    other.send(sync.clone()).await;
    assert_eq!(
        other.recv_type("error").await["code"],
        "conversation_not_found"
    );
    let (_, sup) = app.create_agent(&t, "s@example.com", "supervisor").await;
    let mut sup = Ws::connect(&app, &t.domain, "/ws/agent", &sup)
        .await
        .unwrap();
    sup.send(sync).await;
    assert_eq!(sup.recv_type("synced").await["conversation_id"], conv);
}

/// The server's end of a socket sends each frame at once (`TCP_NODELAY`): with Nagle's
/// algorithm on, a frame written right behind an unacknowledged one (a heartbeat ping) waited
/// for the client's delayed ACK, 20-45 ms. The option is the server's own and cannot be seen
/// from the client, so this reads it off the accepted socket, which lives in this process.
#[actix_web::test]
async fn sockets_send_frames_without_delay() {
    let app = spawn_app(Backend::Sqlite).await;
    let t = app.create_tenant("nodelay").await;
    let v = new_visitor(&app, &t).await;
    let _ws = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let mut accepted = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // SAFETY: the descriptor is open in this process while it is read here; one closed
        // (or closed and reused) meanwhile by another test's thread only makes the calls
        // below fail or describe another socket, which the port check filters out.
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        let sock = socket2::SockRef::from(&fd);
        let server_end = sock
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .is_some_and(|a| a.port() == app.port)
            && sock.peer_addr().is_ok();
        if server_end && let Ok(on) = sock.tcp_nodelay() {
            accepted.push(on);
        }
    }
    assert!(!accepted.is_empty(), "the accepted socket was not found");
    assert!(
        accepted.iter().all(|&on| on),
        "TCP_NODELAY is off: {accepted:?}"
    );
}

on_both!(
    socket_roles_are_the_stored_ones,
    bad_frames_get_error_frames_and_store_nothing,
    closed_conversations_take_nothing,
    oversized_frames_close_with_1009,
    flooding_is_refused_then_closed,
    tokens_are_checked_before_the_upgrade,
    conversations_do_not_cross_tenants,
    history_visibility_follows_roles,
    shutdown_closes_sockets_with_1001,
);
