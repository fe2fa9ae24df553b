//! The tenant queue: order, positions, assignment rules (contract rule 4), transfer, close,
//! abandonment and the agent grace period.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Api, Backend, TestApp, TestTenant, spawn_app, spawn_app_with};
use crate::on_both;
use crate::ws::{Ws, agent_online, new_visitor, open_conversation, set_capacity};

async fn conversation(app: &TestApp, t: &TestTenant, id: i64) -> Value {
    app.call(
        Method::GET,
        Some(&t.domain),
        &format!("/api/v1/conversations/{id}"),
        Some(&t.admin_token),
        None,
    )
    .await
    .json()
    .await
    .unwrap()
}

/// Polls until `pred` holds for the conversation (the queue's timers run on real time).
async fn eventually(
    app: &TestApp,
    t: &TestTenant,
    id: i64,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let c = conversation(app, t, id).await;
        if pred(&c) {
            return c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition never held: {c}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn first_come_first_served_with_positions(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("fifo").await;
    let mut visitors = Vec::new();
    for i in 0..3 {
        let v = new_visitor(&app, &t).await;
        let mut ws = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
            .await
            .unwrap();
        let opened = open_conversation(&app, &t, &v, None).await;
        assert_eq!(opened["queue_position"], i + 1);
        let q = ws.recv_type("queue").await;
        assert_eq!(q["position"], i + 1);
        visitors.push((opened["conversation_id"].as_i64().unwrap(), ws));
    }
    let (agent_id, _, mut agent) = agent_online(&app, &t, "a@example.com", 1).await;
    let first = agent.recv_type("assigned").await;
    assert_eq!(first["conversation_id"], visitors[0].0);
    visitors[0].1.recv_type("assigned").await;
    // Everyone behind moves up by one.
    assert_eq!(visitors[1].1.recv_type("queue").await["position"], 1);
    assert_eq!(visitors[2].1.recv_type("queue").await["position"], 2);
    // The agent is full: nothing more until it frees capacity by closing.
    agent
        .send(json!({"type": "close", "conversation_id": visitors[0].0}))
        .await;
    let closed = visitors[0].1.recv_type("closed").await;
    assert_eq!(closed["by"], "agent");
    let next = agent.recv_type("assigned").await;
    assert_eq!(next["conversation_id"], visitors[1].0);
    assert_eq!(next["agent"]["id"], agent_id);
    assert_eq!(visitors[2].1.recv_type("queue").await["position"], 1);
}

async fn least_loaded_then_longest_idle(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("lb").await;
    let (a_id, _, mut a) = agent_online(&app, &t, "a@example.com", 3).await;
    // B connects later, so on a tie A has waited longer.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (b_id, _, mut b) = agent_online(&app, &t, "b@example.com", 3).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let v = new_visitor(&app, &t).await;
        let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
            .as_i64()
            .unwrap();
        let c = eventually(&app, &t, conv, |c| c["status"] == "active").await;
        got.push(c["agent_id"].as_i64().unwrap());
    }
    assert_eq!(got, [a_id, b_id, a_id, b_id]);
    for _ in 0..2 {
        a.recv_type("assigned").await;
        b.recv_type("assigned").await;
    }
}

/// Rule 4 under pressure: many visitors arrive while agents flip between away and online.
async fn no_double_assignment_and_no_agent_over_capacity(backend: Backend) {
    const VISITORS: usize = 24;
    const AGENTS: usize = 5;
    const CAPACITY: i64 = 2;
    let app = spawn_app(backend).await;
    let t = app.create_tenant("rule4").await;
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(agent_online(&app, &t, &format!("agent{i}@example.com"), CAPACITY).await);
    }
    let mut opens = Vec::new();
    for _ in 0..VISITORS {
        let v = new_visitor(&app, &t).await;
        let (client, domain, port, token) = (
            app.client.clone(),
            t.domain.clone(),
            app.port,
            v.token.clone(),
        );
        opens.push(actix_web::rt::spawn(async move {
            client
                .post(format!(
                    "http://127.0.0.1:{port}/api/v1/visitor/conversations"
                ))
                .header("Host", domain)
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    // Meanwhile agents toggle status.
    for round in 0..6 {
        for (i, (_, _, ws)) in agents.iter_mut().enumerate() {
            let status = if (i + round) % 2 == 0 {
                "away"
            } else {
                "online"
            };
            ws.send(json!({"type": "status", "status": status})).await;
        }
    }
    for o in opens {
        assert_eq!(o.await.unwrap(), 201);
    }
    for (_, _, ws) in agents.iter_mut() {
        ws.send(json!({"type": "status", "status": "online"})).await;
    }
    // Settle: exactly AGENTS * CAPACITY become active.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let active = loop {
        let list: Value = app
            .call(
                Method::GET,
                Some(&t.domain),
                "/api/v1/conversations?status=active&limit=100",
                Some(&t.admin_token),
                None,
            )
            .await
            .json()
            .await
            .unwrap();
        let active = list["conversations"].as_array().unwrap().clone();
        if active.len() == AGENTS * CAPACITY as usize || tokio::time::Instant::now() > deadline {
            break active;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(active.len(), AGENTS * CAPACITY as usize);
    let mut per_agent: HashMap<i64, usize> = HashMap::new();
    for c in &active {
        *per_agent
            .entry(c["agent_id"].as_i64().unwrap())
            .or_default() += 1;
    }
    assert!(
        per_agent.values().all(|n| *n as i64 <= CAPACITY),
        "{per_agent:?}"
    );
    // No conversation was ever announced to two agents.
    let mut owner: HashMap<i64, i64> = HashMap::new();
    for (id, _, ws) in agents.iter_mut() {
        let mut mine = HashSet::new();
        while mine.len() < per_agent.get(id).copied().unwrap_or(0) {
            let f = ws.recv_type("assigned").await;
            mine.insert(f["conversation_id"].as_i64().unwrap());
        }
        for c in mine {
            assert!(
                owner.insert(c, *id).is_none(),
                "conversation {c} assigned twice"
            );
        }
    }
}

async fn raising_capacity_or_coming_back_assigns_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("cap").await;
    let (agent_id, _, mut agent) = agent_online(&app, &t, "a@example.com", 1).await;
    let v1 = new_visitor(&app, &t).await;
    open_conversation(&app, &t, &v1, None).await;
    agent.recv_type("assigned").await;
    let v2 = new_visitor(&app, &t).await;
    let c2 = open_conversation(&app, &t, &v2, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    assert_eq!(conversation(&app, &t, c2).await["status"], "queued");
    set_capacity(&app, &t, agent_id, 2).await;
    assert_eq!(agent.recv_type("assigned").await["conversation_id"], c2);

    agent
        .send(json!({"type": "status", "status": "away"}))
        .await;
    assert_eq!(agent.recv_type("status").await["status"], "away");
    set_capacity(&app, &t, agent_id, 3).await;
    let v3 = new_visitor(&app, &t).await;
    let c3 = open_conversation(&app, &t, &v3, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.silent_for(Duration::from_millis(300)).await;
    agent
        .send(json!({"type": "status", "status": "online"}))
        .await;
    assert_eq!(agent.recv_type("assigned").await["conversation_id"], c3);
}

async fn transfer_to_agent_and_to_team(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("xfer").await;
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            "/api/v1/teams",
            Some(&t.admin_token),
            Some(json!({"slug": "claims", "name": "Claims"})),
        )
        .await;
    assert_eq!(res.status(), 201);
    let (_, _, mut a) = agent_online(&app, &t, "a@example.com", 2).await;
    let v = new_visitor(&app, &t).await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    a.recv_type("assigned").await;
    let (b_id, _, mut b) = agent_online(&app, &t, "b@example.com", 2).await;

    // To an agent who is not there: refused.
    a.send(json!({"type": "transfer", "ref": "t0", "conversation_id": conv, "to_agent_id": 9999}))
        .await;
    assert_eq!(a.recv_type("error").await["code"], "agent_unavailable");

    a.send(json!({"type": "transfer", "conversation_id": conv, "to_agent_id": b_id}))
        .await;
    assert_eq!(b.recv_type("assigned").await["conversation_id"], conv);
    let x = visitor.recv_type("transferred").await;
    assert_eq!(x["to_agent_id"], b_id);
    a.recv_type("transferred").await;
    // A no longer holds it.
    let refused = a.say(conv, "late", "still mine?").await;
    assert_eq!(refused["code"], "not_participant");
    b.say(conv, "b1", "I'll take it from here").await;
    visitor.heard("I'll take it from here").await;

    // To a team: back to the queue of `claims`, where C (a claims agent) takes it.
    let (c_id, c_token) = app.create_agent(&t, "c@example.com", "agent").await;
    app.call(
        Method::PATCH,
        Some(&t.domain),
        &format!("/api/v1/agents/{c_id}"),
        Some(&t.admin_token),
        Some(json!({"teams": ["claims"]})),
    )
    .await;
    b.send(json!({"type": "transfer", "ref": "bad", "conversation_id": conv, "to_team": "nope"}))
        .await;
    assert_eq!(b.recv_type("error").await["code"], "unknown_team");
    b.send(json!({"type": "transfer", "conversation_id": conv, "to_team": "claims"}))
        .await;
    let x = visitor.recv_type("transferred").await;
    assert_eq!(x["to_team"], "claims");
    let mut c = Ws::connect(&app, &t.domain, "/ws/agent", &c_token)
        .await
        .unwrap();
    assert_eq!(c.recv_type("assigned").await["conversation_id"], conv);
    let stored = conversation(&app, &t, conv).await;
    assert_eq!(stored["agent_id"], c_id);
}

async fn close_by_visitor_frees_the_agent(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("close").await;
    let (_, _, mut agent) = agent_online(&app, &t, "a@example.com", 1).await;
    let v1 = new_visitor(&app, &t).await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v1.token)
        .await
        .unwrap();
    let c1 = open_conversation(&app, &t, &v1, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;
    let v2 = new_visitor(&app, &t).await;
    let c2 = open_conversation(&app, &t, &v2, None).await["conversation_id"]
        .as_i64()
        .unwrap();

    visitor
        .send(json!({"type": "close", "conversation_id": c1}))
        .await;
    assert_eq!(agent.recv_type("closed").await["by"], "visitor");
    assert_eq!(visitor.recv_type("closed").await["conversation_id"], c1);
    assert_eq!(agent.recv_type("assigned").await["conversation_id"], c2);
    let stored = conversation(&app, &t, c1).await;
    assert_eq!(
        (stored["status"].as_str(), stored["abandoned"].as_bool()),
        (Some("closed"), Some(false))
    );
    // A closed conversation takes no more messages, and the visitor may open a new one.
    assert_eq!(
        visitor.say(c1, "late", "hello?").await["code"],
        "conversation_closed"
    );
    // A socket opened now is told of no open conversation (the closed one is not listed),
    // then of the new one only.
    let reconnected = Ws::connect(&app, &t.domain, "/ws/visitor", &v1.token)
        .await
        .unwrap();
    assert_eq!(reconnected.hello["conversations"], json!([]));
    let again = open_conversation(&app, &t, &v1, None).await;
    assert_ne!(again["conversation_id"], c1);
    let reconnected = Ws::connect(&app, &t.domain, "/ws/visitor", &v1.token)
        .await
        .unwrap();
    let listed = reconnected.hello["conversations"].as_array().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["conversation_id"], again["conversation_id"]);
    assert_eq!(listed[0]["status"], again["status"]);
}

async fn leaving_or_going_silent_in_the_queue_is_abandonment(backend: Backend) {
    let app = spawn_app_with(backend, |s| s.realtime.queue_abandon_secs = 1).await;
    let t = app.create_tenant("aband").await;
    // Leaves explicitly (long-poll client).
    let v1 = new_visitor(&app, &t).await;
    let c1 = open_conversation(&app, &t, &v1, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            &format!("/api/v1/visitor/conversations/{c1}/close"),
            Some(&v1.token),
            None,
        )
        .await;
    assert_eq!(res.status(), 204);
    let c = conversation(&app, &t, c1).await;
    assert_eq!(
        (
            c["status"].as_str(),
            c["abandoned"].as_bool(),
            c["closed_by"].as_str()
        ),
        (Some("closed"), Some(true), Some("visitor"))
    );
    // Goes silent: no socket, no poll.
    let v2 = new_visitor(&app, &t).await;
    let c2 = open_conversation(&app, &t, &v2, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    // Stays: a socket is open.
    let v3 = new_visitor(&app, &t).await;
    let _ws = Ws::connect(&app, &t.domain, "/ws/visitor", &v3.token)
        .await
        .unwrap();
    let c3 = open_conversation(&app, &t, &v3, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    let c = eventually(&app, &t, c2, |c| c["status"] == "closed").await;
    assert_eq!(
        (c["abandoned"].as_bool(), c["closed_by"].as_str()),
        (Some(true), Some("system"))
    );
    assert_eq!(conversation(&app, &t, c3).await["status"], "queued");
}

async fn an_agent_who_does_not_return_loses_conversations_to_the_queue(backend: Backend) {
    let app = spawn_app_with(backend, |s| s.realtime.agent_grace_secs = 1).await;
    let t = app.create_tenant("grace").await;
    let (_, _, a) = agent_online(&app, &t, "a@example.com", 1).await;
    let v = new_visitor(&app, &t).await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    visitor.recv_type("assigned").await;
    a.close().await;
    let c = eventually(&app, &t, conv, |c| c["status"] == "queued").await;
    assert!(c["agent_id"].is_null());
    let (b_id, _, mut b) = agent_online(&app, &t, "b@example.com", 1).await;
    assert_eq!(b.recv_type("assigned").await["conversation_id"], conv);
    assert_eq!(visitor.recv_type("assigned").await["agent"]["id"], b_id);
}

async fn an_agent_who_returns_within_grace_keeps_conversations(backend: Backend) {
    let app = spawn_app_with(backend, |s| s.realtime.agent_grace_secs = 30).await;
    let t = app.create_tenant("keep").await;
    let (a_id, a_token, a) = agent_online(&app, &t, "a@example.com", 1).await;
    let v = new_visitor(&app, &t).await;
    let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    eventually(&app, &t, conv, |c| c["status"] == "active").await;
    a.close().await;
    let mut a = Ws::connect(&app, &t.domain, "/ws/agent", &a_token)
        .await
        .unwrap();
    assert_eq!(a.hello["conversations"][0]["conversation_id"], conv);
    a.say(conv, "back", "sorry, I was away").await;
    assert_eq!(conversation(&app, &t, conv).await["agent_id"], a_id);
}

on_both!(
    first_come_first_served_with_positions,
    least_loaded_then_longest_idle,
    no_double_assignment_and_no_agent_over_capacity,
    raising_capacity_or_coming_back_assigns_at_once,
    transfer_to_agent_and_to_team,
    close_by_visitor_frees_the_agent,
    leaving_or_going_silent_in_the_queue_is_abandonment,
    an_agent_who_does_not_return_loses_conversations_to_the_queue,
    an_agent_who_returns_within_grace_keeps_conversations,
);
