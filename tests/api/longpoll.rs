//! Long-poll visitors, alone and beside WebSocket clients in the same conversation.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Api, Backend, TestApp, TestTenant, spawn_app};
use crate::on_both;
use crate::ws::{Visitor, Ws, assigned_conversation, new_visitor, open_conversation};

async fn poll(
    app: &TestApp,
    t: &TestTenant,
    v: &Visitor,
    conv: i64,
    after: i64,
    wait: u64,
) -> Value {
    let res = app
        .call(
            Method::GET,
            Some(&t.domain),
            &format!("/api/v1/visitor/conversations/{conv}/events?after_seq={after}&wait={wait}"),
            Some(&v.token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    res.json().await.unwrap()
}

fn texts(events: &Value) -> Vec<String> {
    events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "message" && e["content"]["kind"] == "text")
        .map(|e| e["content"]["text"].as_str().unwrap().to_owned())
        .collect()
}

async fn long_poll_and_websocket_side_by_side(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("lp").await;
    let (mut agent, v, conv) = assigned_conversation(&app, &t, "a@example.com").await;
    let mut ws_tab = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();

    // Answers at once when something newer exists: the assignment.
    let first = poll(&app, &t, &v, conv, 0, 25).await;
    let types: Vec<&str> = first["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["message", "assigned"]);
    let mut after = first["last_seq"].as_i64().unwrap();
    assert_eq!(after, 1);

    // Waits, and wakes the moment a message arrives.
    let (app2, t2, v2) = (&app, &t, &v);
    let waiting = poll(app2, t2, v2, conv, after, 25);
    let speaking = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        agent.say(conv, "a1", "hello from the agent").await
    };
    let started = tokio::time::Instant::now();
    let (woken, ack) = tokio::join!(waiting, speaking);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "woken by the message, not the timeout"
    );
    assert_eq!(texts(&woken), ["hello from the agent"]);
    assert_eq!(woken["last_seq"], ack["seq"]);
    after = woken["last_seq"].as_i64().unwrap();
    // The WebSocket tab got the same message.
    assert_eq!(
        ws_tab.heard("hello from the agent").await["seq"],
        ack["seq"]
    );

    // The long-poll side sends; the agent and the WebSocket tab both hear it.
    let res = app
        .call(Method::POST, Some(&t.domain), &format!("/api/v1/visitor/conversations/{conv}/messages"), Some(&v.token),
              Some(json!({"client_msg_id": "lp-1", "content": {"kind": "text", "text": "sent by long-poll"}})))
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let stored: Value = res.json().await.unwrap();
    assert_eq!(agent.heard("sent by long-poll").await["seq"], stored["seq"]);
    assert_eq!(
        ws_tab.heard("sent by long-poll").await["seq"],
        stored["seq"]
    );
    let next = poll(&app, &t, &v, conv, after, 0).await;
    assert_eq!(texts(&next), ["sent by long-poll"]);

    // Nothing new: an empty answer after the wait (0 here), with last_seq unchanged.
    let empty = poll(&app, &t, &v, conv, next["last_seq"].as_i64().unwrap(), 0).await;
    assert_eq!(empty["events"], json!([]));
    assert_eq!(empty["last_seq"], next["last_seq"]);
}

async fn queued_long_poll_visitors_see_their_position(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("lpq").await;
    let v1 = new_visitor(&app, &t).await;
    let v2 = new_visitor(&app, &t).await;
    open_conversation(&app, &t, &v1, None).await;
    let c2 = open_conversation(&app, &t, &v2, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    let events = poll(&app, &t, &v2, c2, 0, 0).await;
    let queue: Vec<&Value> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "queue")
        .collect();
    assert_eq!(queue[0]["position"], 2);
}

async fn long_poll_refuses_what_is_not_yours(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("lpx").await;
    let v1 = new_visitor(&app, &t).await;
    let v2 = new_visitor(&app, &t).await;
    let c1 = open_conversation(&app, &t, &v1, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    let res = app
        .call(
            Method::GET,
            Some(&t.domain),
            &format!("/api/v1/visitor/conversations/{c1}/events?after_seq=0&wait=0"),
            Some(&v2.token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            &format!("/api/v1/visitor/conversations/{c1}/messages"),
            Some(&v2.token),
            Some(json!({"client_msg_id": "x", "content": {"kind": "text", "text": "not mine"}})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::NOT_FOUND);
    for body in [
        json!({"client_msg_id": "", "content": {"kind": "text", "text": "x"}}),
        json!({"client_msg_id": "system-3", "content": {"kind": "text", "text": "x"}}),
        json!({"client_msg_id": "x", "content": {"kind": "text", "text": "x".repeat(4001)}}),
        json!({"client_msg_id": "x", "content": {"kind": "video"}}),
        json!({"client_msg_id": "x"}),
    ] {
        let res = app
            .call(
                Method::POST,
                Some(&t.domain),
                &format!("/api/v1/visitor/conversations/{c1}/messages"),
                Some(&v1.token),
                Some(body),
            )
            .await;
        assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    }
    let res = app
        .call(
            Method::GET,
            Some(&t.domain),
            &format!("/api/v1/visitor/conversations/{c1}/events?after_seq=zero"),
            Some(&v1.token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // A visitor token is not an agent token, and an unknown team is refused.
    let res = app
        .call(
            Method::GET,
            Some(&t.domain),
            "/api/v1/conversations",
            Some(&v1.token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let v3 = new_visitor(&app, &t).await;
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            "/api/v1/visitor/conversations",
            Some(&v3.token),
            Some(json!({"team": "nope"})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Sessions: a valid token returns the same visitor; the open conversation is returned again.
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            "/api/v1/visitor/sessions",
            None,
            Some(json!({"visitor_token": v1.token})),
        )
        .await;
    let again: Value = res.json().await.unwrap();
    assert_eq!(again["visitor_id"], v1.id);
    let reopened = open_conversation(&app, &t, &v1, None).await;
    assert_eq!(reopened["conversation_id"], c1);
}

on_both!(
    long_poll_and_websocket_side_by_side,
    queued_long_poll_visitors_see_their_position,
    long_poll_refuses_what_is_not_yours,
);
