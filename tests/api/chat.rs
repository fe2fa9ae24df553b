//! A visitor and an agent talking: the contract's rules 1 to 3 and resync.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Api, Backend, spawn_app};
use crate::on_both;
use crate::ws::{
    Ws, agent_online, assert_gap_free, assigned_conversation, history, new_visitor,
    open_conversation,
};

/// Visitor opens, agent is assigned, both talk; acks come only for stored messages and the
/// other side hears each one.
async fn visitor_and_agent_talk(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("chat").await;
    let (agent_id, _, mut agent) = agent_online(&app, &t, "li@example.com", 3).await;
    let v = new_visitor(&app, &t).await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    assert_eq!(visitor.hello["conversations"], json!([]));
    let opened = open_conversation(&app, &t, &v, None).await;
    assert_eq!(opened["status"], "queued");
    let conv = opened["conversation_id"].as_i64().unwrap();

    let assigned = agent.recv_type("assigned").await;
    assert_eq!(assigned["conversation_id"], conv);
    assert_eq!(assigned["agent"]["id"], agent_id);
    let assigned = visitor.recv_type("assigned").await;
    assert_eq!(assigned["agent"]["name"], "li@example.com");

    let ack = visitor
        .say(conv, "v-1", "你好, I need help with my policy")
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["client_msg_id"], "v-1");
    let heard = agent.heard("你好, I need help with my policy").await;
    assert_eq!(heard["seq"], ack["seq"]);
    assert_eq!(heard["sender"]["kind"], "visitor");
    assert_eq!(heard["sender"]["id"], v.id);

    let ack = agent.say(conv, "a-1", "Of course. Which policy?").await;
    assert_eq!(ack["type"], "ack");
    let heard = visitor.heard("Of course. Which policy?").await;
    assert_eq!(heard["id"], ack["id"]);

    let stored = history(&app, &t, conv).await;
    assert_gap_free(&stored);
    // assigned (system), the visitor's message, the agent's reply
    let kinds: Vec<&str> = stored
        .iter()
        .map(|m| m["sender"]["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["system", "visitor", "agent"]);
}

/// Rule 3: re-sending a client_msg_id (after a dropped connection) stores nothing new and is
/// acknowledged with the first id and seq.
async fn resend_is_idempotent(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("idem").await;
    let (mut agent, v, conv) = assigned_conversation(&app, &t, "a@example.com").await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let first = visitor.say(conv, "same-id", "hello").await;
    visitor.close().await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let again = visitor.say(conv, "same-id", "hello").await;
    assert_eq!(again["type"], "ack");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["seq"], first["seq"]);
    assert_eq!(again["duplicate"], true);
    // Also over HTTP.
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            &format!("/api/v1/visitor/conversations/{conv}/messages"),
            Some(&v.token),
            Some(json!({"client_msg_id": "same-id", "content": {"kind": "text", "text": "hello"}})),
        )
        .await;
    assert_eq!(res.status(), 200);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["seq"], first["seq"]);

    let stored = history(&app, &t, conv).await;
    assert_eq!(
        stored
            .iter()
            .filter(|m| m["client_msg_id"] == "same-id")
            .count(),
        1
    );
    // The agent heard it once.
    agent.heard("hello").await;
    agent
        .silent_for(std::time::Duration::from_millis(300))
        .await;
}

/// A `client_msg_id` belongs to the participant who first stored it: the other side's send with
/// the same id is refused, nothing is stored and no `seq` is used up.
async fn a_client_msg_id_belongs_to_its_first_sender(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("idowner").await;
    let (mut agent, v, conv) = assigned_conversation(&app, &t, "a@example.com").await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let first = visitor.say(conv, "shared-id", "from the visitor").await;
    assert_eq!(first["type"], "ack");
    agent.heard("from the visitor").await;

    let refused = agent.say(conv, "shared-id", "from the agent").await;
    assert_eq!(refused["type"], "error");
    assert_eq!(refused["code"], "client_msg_id_reused");
    let next = agent.say(conv, "own-id", "reply").await;
    assert_eq!(
        next["seq"],
        first["seq"].as_i64().unwrap() + 1,
        "no seq used up"
    );
    visitor.heard("reply").await;

    let stored = history(&app, &t, conv).await;
    let texts: Vec<&str> = stored
        .iter()
        .filter(|m| m["client_msg_id"] == "shared-id")
        .map(|m| m["content"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["from the visitor"]);
}

/// A client that stored a message and lost the ack before the conversation was closed still
/// gets that ack on its re-send: the message is stored, and the close must not turn it into an
/// error the client would take for a loss.
async fn a_resend_after_close_is_still_acknowledged(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("lateack").await;
    let (mut agent, v, conv) = assigned_conversation(&app, &t, "a@example.com").await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let first = visitor.say(conv, "before-close", "last words").await;
    agent
        .send(json!({"type": "close", "conversation_id": conv}))
        .await;
    assert_eq!(visitor.recv_type("closed").await["conversation_id"], conv);

    let again = visitor.say(conv, "before-close", "last words").await;
    assert_eq!(again["type"], "ack");
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["seq"], first["seq"]);
    // A new message is refused as before.
    assert_eq!(
        visitor.say(conv, "after-close", "hello?").await["code"],
        "conversation_closed"
    );
}

/// A client that was away sees what it missed in `hello` and gets it with `sync`.
async fn resync_after_disconnect_and_restart(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("resync").await;
    let (_, agent_token, mut agent) = agent_online(&app, &t, "a@example.com", 1).await;
    let v = new_visitor(&app, &t).await;
    let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    visitor.say(conv, "v1", "first").await;
    let seen = agent.heard("first").await["seq"].as_i64().unwrap();
    visitor.close().await;

    for i in 0..3 {
        assert_eq!(
            agent
                .say(conv, &format!("a{i}"), &format!("reply {i}"))
                .await["type"],
            "ack"
        );
    }
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let open = &visitor.hello["conversations"][0];
    assert_eq!(open["conversation_id"], conv);
    assert_eq!(open["last_seq"], seen + 3);
    visitor
        .send(json!({"type": "sync", "ref": "s1", "conversation_id": conv, "after_seq": seen}))
        .await;
    let mut got = Vec::new();
    loop {
        let f = visitor.recv().await;
        if f["type"] == "synced" {
            assert_eq!(f["last_seq"], seen + 3);
            assert_eq!(f["ref"], "s1");
            break;
        }
        assert_eq!(f["type"], "message");
        got.push(f["content"]["text"].as_str().unwrap().to_owned());
    }
    assert_eq!(got, ["reply 0", "reply 1", "reply 2"]);

    // After a restart, history and the open conversation are still there and seq continues.
    drop(agent);
    drop(visitor);
    let app = app.restart().await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    assert_eq!(visitor.hello["conversations"][0]["last_seq"], seen + 3);
    let mut agent = Ws::connect(&app, &t.domain, "/ws/agent", &agent_token)
        .await
        .unwrap();
    assert_eq!(agent.hello["conversations"][0]["conversation_id"], conv);
    let ack = visitor.say(conv, "after-restart", "still there?").await;
    assert_eq!(ack["seq"], seen + 4);
    agent.heard("still there?").await;
    // Ids stored before the restart are still recognised (SQLite's writer learns them from
    // the stored rows): the same sender's re-send is a duplicate, the other side's refused.
    let again = visitor.say(conv, "v1", "first").await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["seq"], seen);
    let again = agent.say(conv, "a2", "reply 2").await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["seq"], seen + 3);
    assert_eq!(
        visitor.say(conv, "a0", "not mine").await["code"],
        "client_msg_id_reused"
    );
    let stored = history(&app, &t, conv).await;
    assert_gap_free(&stored);
    assert_eq!(stored.last().expect("messages")["seq"], seen + 4);
}

/// Many senders on one conversation at once (two agent tabs, two visitor tabs, HTTP): every
/// ack is unique, and the stored log is gap-free and complete.
async fn concurrent_senders_keep_seq_gap_free(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("conc").await;
    let (_, agent_token, mut agent) = agent_online(&app, &t, "a@example.com", 1).await;
    let v = new_visitor(&app, &t).await;
    let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;
    let agent2 = Ws::connect(&app, &t.domain, "/ws/agent", &agent_token)
        .await
        .unwrap();
    let visitor1 = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let visitor2 = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    const PER_SENDER: usize = 25;
    let mut tasks = Vec::new();
    for (name, mut ws) in [
        ("agent1", agent),
        ("agent2", agent2),
        ("visitor1", visitor1),
        ("visitor2", visitor2),
    ] {
        tasks.push(actix_web::rt::spawn(async move {
            for i in 0..PER_SENDER {
                ws.send(json!({"type": "send", "ref": format!("{name}-{i}"), "conversation_id": conv,
                               "client_msg_id": format!("{name}-{i}"), "content": {"kind": "text", "text": format!("{name} {i}")}}))
                    .await;
            }
            let mut acks = Vec::new();
            while acks.len() < PER_SENDER {
                let f = ws.recv().await;
                assert_ne!(f["type"], "error", "{f}");
                if f["type"] == "ack" {
                    acks.push(f["seq"].as_i64().unwrap());
                }
            }
            // One sender's own acks come back in the order it sent.
            assert!(acks.windows(2).all(|w| w[0] < w[1]), "{name}: {acks:?}");
            acks
        }));
    }
    let mut http = Vec::new();
    for i in 0..PER_SENDER {
        let res = app
            .call(Method::POST, Some(&t.domain), &format!("/api/v1/visitor/conversations/{conv}/messages"), Some(&v.token),
                  Some(json!({"client_msg_id": format!("http-{i}"), "content": {"kind": "text", "text": format!("http {i}")}})))
            .await;
        assert_eq!(res.status(), 201);
        http.push(res.json::<Value>().await.unwrap()["seq"].as_i64().unwrap());
    }
    let mut all: HashSet<i64> = http.into_iter().collect();
    for task in tasks {
        for seq in task.await.unwrap() {
            assert!(all.insert(seq), "seq {seq} acknowledged twice");
        }
    }
    assert_eq!(all.len(), 5 * PER_SENDER);
    let stored = history(&app, &t, conv).await;
    assert_gap_free(&stored);
    assert_eq!(
        stored.len(),
        5 * PER_SENDER + 1,
        "every ack is stored, plus the assignment"
    );
}

/// Two tabs of one agent both receive what the visitor says.
async fn every_connection_of_an_agent_receives(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("tabs").await;
    let (_, token, mut tab1) = agent_online(&app, &t, "a@example.com", 1).await;
    let mut tab2 = Ws::connect(&app, &t.domain, "/ws/agent", &token)
        .await
        .unwrap();
    let v = new_visitor(&app, &t).await;
    let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    tab1.recv_type("assigned").await;
    tab2.recv_type("assigned").await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    visitor.say(conv, "m", "both tabs?").await;
    tab1.heard("both tabs?").await;
    tab2.heard("both tabs?").await;
    // Typing and read receipts reach the other side.
    visitor
        .send(json!({"type": "typing", "conversation_id": conv}))
        .await;
    assert_eq!(tab1.recv_type("typing").await["from"], "visitor");
    tab1.send(json!({"type": "read", "conversation_id": conv, "seq": 2}))
        .await;
    let read = visitor.recv_type("read").await;
    assert_eq!(
        (read["seq"].as_i64(), read["by"].as_str()),
        (Some(2), Some("agent"))
    );
}

/// Every socket of a visitor hears the agent: the first starts the visitor's hub with itself
/// in it, the others join the running hub, and one tab closing leaves the rest served.
async fn every_connection_of_a_visitor_receives(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("visitor-tabs").await;
    let (mut agent, v, conv) = assigned_conversation(&app, &t, "a@example.com").await;
    let connect = || Ws::connect(&app, &t.domain, "/ws/visitor", &v.token);
    let mut tab1 = connect().await.unwrap();
    let mut tab2 = connect().await.unwrap();
    agent.say(conv, "a-1", "to both tabs").await;
    tab1.heard("to both tabs").await;
    tab2.heard("to both tabs").await;

    tab1.close().await;
    let mut tab3 = connect().await.unwrap();
    agent.say(conv, "a-2", "to the open tabs").await;
    tab2.heard("to the open tabs").await;
    tab3.heard("to the open tabs").await;
    // What one tab says reaches the agent and the visitor's other tab.
    tab2.say(conv, "v-1", "from tab 2").await;
    agent.heard("from tab 2").await;
    tab3.heard("from tab 2").await;
}

/// Rule 3 is kept by a unique index on PostgreSQL, where several nodes append to one
/// conversation, and by SQLite's one writer per tenant without one (`conversations::client_ids`).
async fn the_client_msg_id_index_is_where_writers_share(backend: Backend) {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};

    let app = spawn_app(backend).await;
    let t = app.create_tenant("index").await;
    let storage = app.state.tenants.storage().clone();
    let db = storage
        .tenant(&storage.tenant_db_name(&t.slug))
        .await
        .unwrap();
    let sql = match db.get_database_backend() {
        DbBackend::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'messages'"
        }
        _ => "SELECT indexname AS name FROM pg_indexes WHERE tablename = 'messages'",
    };
    let names: Vec<String> = db
        .query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get::<String>("", "name").unwrap())
        .collect();
    assert!(names.iter().any(|n| n == "uq_messages_seq"), "{names:?}");
    let has_id_index = names.iter().any(|n| n == "uq_messages_client_msg_id");
    match backend {
        Backend::Sqlite => assert!(!has_id_index, "{names:?}"),
        Backend::Postgres => assert!(has_id_index, "{names:?}"),
    }
}

on_both!(
    the_client_msg_id_index_is_where_writers_share,
    visitor_and_agent_talk,
    every_connection_of_a_visitor_receives,
    resend_is_idempotent,
    a_client_msg_id_belongs_to_its_first_sender,
    a_resend_after_close_is_still_acknowledged,
    resync_after_disconnect_and_restart,
    concurrent_senders_keep_seq_gap_free,
    every_connection_of_an_agent_receives,
);
