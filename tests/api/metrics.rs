//! `/metrics`: guarded by the platform key, parsed after known activity, and accepted by
//! `promtool check metrics` where promtool is installed (`scripts/test` installs it).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{Api, TestApp, assert_error, spawn_app, spawn_app_with};
use crate::on_both;
use crate::ws::{Ws, agent_online, new_visitor, open_conversation};

/// The classic text format (what promtool and a plain curl get).
async fn scrape(app: &TestApp) -> String {
    let res = app.platform(Method::GET, "/metrics", None).await;
    assert_eq!(res.status(), StatusCode::OK);
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    res.text().await.unwrap()
}

/// OpenMetrics, as Prometheus asks for it.
async fn scrape_openmetrics(app: &TestApp) -> String {
    let res = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&app.platform_key)
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let ct = res.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    res.text().await.unwrap()
}

/// The value of the sample `name` whose labels include every pair of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_once('{').unwrap_or((series, ""));
        let matches = n == name
            && labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

#[actix_web::test]
async fn metrics_need_the_platform_key_unless_public() {
    let app = spawn_app(crate::helpers::Backend::Sqlite).await;
    let res = app.call(Method::GET, None, "/metrics", None, None).await;
    assert_error(res, StatusCode::UNAUTHORIZED, "unauthenticated").await;
    let res = app
        .call(Method::GET, None, "/metrics", Some("wrong-key"), None)
        .await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_platform_key").await;

    let open = spawn_app_with(crate::helpers::Backend::Sqlite, |s| s.metrics.public = true).await;
    let res = open.call(Method::GET, None, "/metrics", None, None).await;
    assert_eq!(res.status(), StatusCode::OK);
}

on_both!(metrics_follow_activity);
async fn metrics_follow_activity(backend: crate::helpers::Backend) {
    let app = spawn_app_with(backend, |s| {
        s.limits.ip_sessions_per_min = 1;
        s.limits.ip_session_burst = 2;
    })
    .await;
    let t = app.create_tenant("met").await;
    let slug = t.slug.as_str();
    let tenant = ("tenant", slug);
    let general = ("team", "general");

    // One agent with room for one conversation: the first visitor is served, the second waits.
    let (_, _, mut agent) = agent_online(&app, &t, "li@met.test", 1).await;
    let v1 = new_visitor(&app, &t).await;
    let c1 = open_conversation(&app, &t, &v1, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    agent.recv_type("assigned").await;
    let mut ws1 = Ws::connect(&app, &t.domain, "/ws/visitor", &v1.token)
        .await
        .unwrap();
    assert_eq!(ws1.say(c1, "v-1", "hello").await["type"], "ack");
    assert_eq!(ws1.say(c1, "v-2", "anyone?").await["type"], "ack");
    assert_eq!(agent.say(c1, "a-1", "yes").await["type"], "ack");
    let v2 = new_visitor(&app, &t).await;
    let c2 = open_conversation(&app, &t, &v2, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            &format!("/api/v1/visitor/conversations/{c2}/messages"),
            Some(&v2.token),
            Some(json!({"client_msg_id": "lp-1", "content": {"kind": "text", "text": "waiting"}})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    // A third session from this address is refused (and counted).
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            "/api/v1/visitor/sessions",
            None,
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);

    let m = scrape(&app).await;
    let get = |name: &str, labels: &[(&str, &str)]| {
        sample(&m, name, labels).unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{m}"))
    };
    assert_eq!(get("kefu_agents", &[tenant, ("status", "online")]), 1.0);
    assert_eq!(
        get("kefu_agents", &[tenant, ("status", "offline")]),
        1.0,
        "the admin"
    );
    assert_eq!(
        get("kefu_team_agents", &[tenant, general, ("status", "online")]),
        1.0
    );
    assert_eq!(get("kefu_conversations_active", &[tenant, general]), 1.0);
    assert_eq!(get("kefu_conversations_queued", &[tenant, general]), 1.0);
    assert!(get("kefu_queue_oldest_wait_seconds", &[tenant, general]) >= 0.0);
    let msgs = |channel, direction| {
        get(
            "kefu_messages_total",
            &[tenant, ("channel", channel), ("direction", direction)],
        )
    };
    assert_eq!(msgs("websocket", "inbound"), 2.0);
    assert_eq!(msgs("websocket", "outbound"), 1.0);
    assert_eq!(msgs("longpoll", "inbound"), 1.0);
    assert_eq!(
        get("kefu_queue_wait_seconds_count", &[tenant, general]),
        1.0
    );
    // Four messages plus the assignment went through the conversation actors.
    assert!(get("kefu_message_delivery_seconds_count", &[tenant]) >= 5.0);
    assert_eq!(
        get(
            "kefu_rate_limited_total",
            &[tenant, ("limit", "ip_sessions")]
        ),
        1.0
    );
    assert!(get("kefu_connections", &[("kind", "agent_websocket")]) >= 1.0);
    assert!(get("kefu_connections", &[("kind", "visitor_websocket")]) >= 1.0);
    assert_eq!(get("kefu_visitors_abandoned_total", &[tenant]), 0.0);
    assert!(get("process_resident_memory_bytes", &[]) > 0.0);
    assert!(get("process_open_fds", &[]) > 0.0);
    assert!(get("process_cpu_seconds_total", &[]) > 0.0);
    assert!(m.contains("# TYPE kefu_messages_total counter"), "{m}");
    let om = scrape_openmetrics(&app).await;
    assert!(om.contains("# TYPE kefu_messages counter"), "{om}");
    assert!(om.ends_with("# EOF\n"));

    // The waiting visitor leaves: abandoned, and the queue is empty.
    let res = app
        .call(
            Method::POST,
            Some(&t.domain),
            &format!("/api/v1/visitor/conversations/{c2}/close"),
            Some(&v2.token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    let m = scrape(&app).await;
    assert_eq!(
        sample(&m, "kefu_visitors_abandoned_total", &[tenant]),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "kefu_conversations_queued", &[tenant, general]),
        Some(0.0)
    );
    promtool_accepts(&m).await;
}

/// `promtool check metrics` reads the exposition on standard input and fails on any format
/// or naming problem. Skipped (loudly) where promtool is not installed.
async fn promtool_accepts(text: &str) {
    use tokio::io::AsyncWriteExt;
    let child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "SKIPPED promtool check: promtool is not installed (scripts/test installs the Debian package prometheus)"
            );
            return;
        }
        Err(e) => panic!("promtool did not start: {e}"),
    };
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("promtool finishes")
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- exposition ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
