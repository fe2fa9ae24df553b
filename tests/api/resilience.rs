//! Circuit breakers and bulkheads against real failures: a tenant's PostgreSQL database made
//! unreachable and brought back, a tenant's SQLite file locked by another process-level
//! connection. (The NATS breaker is in `cluster.rs`, where the test owns a broker.)

use std::time::Duration;

use reqwest::{Method, Response, StatusCode};
use sea_orm::sqlx::{self, Connection};
use serde_json::{Value, json};

use crate::helpers::{Api, Backend, TestApp, TestTenant, postgres_server, spawn_app_with};
use crate::ws::{Visitor, Ws, agent_online, history, new_visitor, open_conversation};

/// Bounds a wait for the server to notice a change (a probe after the open period). Generous:
/// this bounds a failing test, it does not measure speed.
const SETTLE: Duration = Duration::from_secs(30);

async fn send(app: &TestApp, t: &TestTenant, v: &Visitor, conv: i64, id: &str) -> Response {
    app.call(
        Method::POST,
        Some(&t.domain),
        &format!("/api/v1/visitor/conversations/{conv}/messages"),
        Some(&v.token),
        Some(json!({"client_msg_id": id, "content": {"kind": "text", "text": id}})),
    )
    .await
}

async fn error_code(res: Response) -> String {
    let body: Value = res.json().await.unwrap();
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn breakers(app: &TestApp) -> Value {
    let ready: Value = app
        .client
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    ready["breakers"].clone()
}

async fn metrics(app: &TestApp) -> String {
    app.platform(Method::GET, "/metrics", None)
        .await
        .text()
        .await
        .unwrap()
}

/// Runs SQL on the maintenance database of the test PostgreSQL server.
async fn admin_sql(sql: &str) {
    let mut conn = sqlx::PgConnection::connect(&format!("{}/postgres", postgres_server()))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut conn)
        .await
        .unwrap();
}

#[actix_web::test]
async fn a_tenant_database_breaker_opens_fails_fast_probes_and_closes() {
    let app = spawn_app_with(Backend::Postgres, |s| {
        s.breakers.min_calls = 3;
        s.breakers.window_secs = 60;
        s.breakers.open_secs = 1;
    })
    .await;
    let t = app.create_tenant("brk").await;
    let v = new_visitor(&app, &t).await;
    let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    assert_eq!(
        send(&app, &t, &v, conv, "ok-1").await.status(),
        StatusCode::CREATED
    );

    // The tenant's database goes away: no new sessions, and the open ones are cut.
    let db = app.state.tenants.storage().tenant_db_name(&t.slug);
    admin_sql(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS false")).await;
    admin_sql(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{db}'"
    ))
    .await;

    // Failures until the breaker opens; then every call is refused at once, with Retry-After,
    // and nothing is stored.
    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut i = 0;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the breaker never opened"
        );
        i += 1;
        let res = send(&app, &t, &v, conv, &format!("down-{i}")).await;
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        let retry_after = res.headers().get("retry-after").is_some();
        let message = res.json::<Value>().await.unwrap()["error"]["message"]
            .as_str()
            .unwrap()
            .to_owned();
        if retry_after && message.contains("circuit open") {
            break;
        }
    }
    let open = breakers(&app).await;
    assert_eq!(open[0]["dependency"], "tenant_db", "{open}");
    assert_eq!(open[0]["scope"], t.slug.as_str());
    assert_eq!(open[0]["state"], "open");
    // WebSocket sends are refused too (the upgrade itself is an HTTP request to the tenant).
    let refused = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token).await;
    assert_eq!(refused.err(), Some(StatusCode::SERVICE_UNAVAILABLE));

    // The database comes back: after the open period a probe goes through and closes it.
    admin_sql(&format!("ALTER DATABASE \"{db}\" ALLOW_CONNECTIONS true")).await;
    let deadline = tokio::time::Instant::now() + SETTLE;
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the breaker never closed"
        );
        let res = send(&app, &t, &v, conv, "back").await;
        if res.status().is_success() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(breakers(&app).await, json!([]));
    let mut ws = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    assert_eq!(ws.say(conv, "ws-back", "ws-back").await["type"], "ack");

    // Only what was acknowledged is stored.
    let texts: Vec<String> = history(&app, &t, conv)
        .await
        .iter()
        .filter(|m| m["sender"]["kind"] == "visitor")
        .map(|m| m["content"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(texts, ["ok-1", "back", "ws-back"]);

    // And the metrics show the trip.
    let metrics = metrics(&app).await;
    assert!(
        metrics.contains(
            "kefu_circuit_breaker_transitions_total{dependency=\"tenant_db\",state=\"open\"}"
        ),
        "{metrics}"
    );
}

#[actix_web::test]
async fn a_locked_tenant_fills_its_own_compartment_and_not_anothers() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.bulkheads.tenant_db_requests = 2;
    })
    .await;
    let slow = app.create_tenant("slow").await;
    let fast = app.create_tenant("fast").await;
    let sv = new_visitor(&app, &slow).await;
    let slow_conv = open_conversation(&app, &slow, &sv, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    let (_, _, mut agent) = agent_online(&app, &fast, "a@fast.test", 5).await;
    let fv = new_visitor(&app, &fast).await;
    let fast_conv = open_conversation(&app, &fast, &fv, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;
    let mut fast_ws = Ws::connect(&app, &fast.domain, "/ws/visitor", &fv.token)
        .await
        .unwrap();

    // Another connection takes the slow tenant's write lock and keeps it.
    let file = app.data_dir.path().join("tenants").join(format!(
        "{}.db",
        app.state.tenants.storage().tenant_db_name(&slow.slug)
    ));
    let mut lock = sqlx::SqliteConnection::connect(&format!("sqlite://{}", file.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .unwrap();

    // Two sends fill the slow tenant's compartment (they wait on the lock)...
    let waiting: Vec<_> = (0..2)
        .map(|i| {
            let req = app
                .client
                .post(app.url(&format!("/api/v1/visitor/conversations/{slow_conv}/messages")))
                .header("Host", &slow.domain)
                .bearer_auth(&sv.token)
                .json(&json!({"client_msg_id": format!("w-{i}"), "content": {"kind": "text", "text": "w"}}));
            actix_web::rt::spawn(async move { req.send().await.unwrap().status() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...so a third request of that tenant is refused at once, clearly,
    let res = send(&app, &slow, &sv, slow_conv, "third").await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(res.headers()["retry-after"], "1");
    assert_eq!(error_code(res).await, "overloaded");
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "still waiting on the lock"
    );

    // ...while the other tenant talks on, answered while the slow one is still stuck.
    for i in 0..10 {
        let ack = fast_ws.say(fast_conv, &format!("f-{i}"), "hi").await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    agent.heard("hi").await;
    assert!(
        waiting.iter().all(|w| !w.is_finished()),
        "the slow tenant was still stuck"
    );

    // The lock goes; the slow tenant's waiting sends finish and it works again.
    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    for w in waiting {
        assert!(w.await.unwrap().is_success());
    }
    assert_eq!(
        send(&app, &slow, &sv, slow_conv, "after").await.status(),
        StatusCode::CREATED
    );
    let metrics = metrics(&app).await;
    assert!(
        metrics.contains("kefu_bulkhead_rejections_total{compartment=\"tenant_db_requests\"} 1"),
        "{metrics}"
    );
}

#[actix_web::test]
async fn waiting_long_polls_do_not_hold_the_compartment() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.bulkheads.tenant_db_requests = 2;
    })
    .await;
    let t = app.create_tenant("lpb").await;
    // Four visitors long-poll (twice the compartment), each waiting for news. Set up first,
    // then started a moment apart: a poll holds its place while it reads, and four reading
    // at the same instant would be refused for the reading, not for the waiting under test.
    let mut visitors = Vec::new();
    for _ in 0..4 {
        let v = new_visitor(&app, &t).await;
        let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
            .as_i64()
            .unwrap();
        visitors.push((v, conv));
    }
    let mut polls = Vec::new();
    for (v, conv) in visitors {
        let last = 0;
        let req = app
            .client
            .get(app.url(&format!(
                "/api/v1/visitor/conversations/{conv}/events?after_seq={last}&wait=3"
            )))
            .header("Host", &t.domain)
            .bearer_auth(&v.token);
        polls.push(actix_web::rt::spawn(async move {
            req.send().await.unwrap().status()
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // While they wait, the tenant is still served.
    let v = new_visitor(&app, &t).await;
    assert!(!v.token.is_empty());
    for p in polls {
        assert_eq!(p.await.unwrap(), StatusCode::OK);
    }
}
