//! Rate limits: each one trips at its configured burst, answers 429 `rate_limited` with
//! `Retry-After` (or an `error` frame), changes nothing while refusing, and lets requests
//! through again once the bucket has refilled. Windows are short so the tests stay quick.

use std::time::Duration;

use kefu::settings::LimitOverrides;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    Api, Backend, TestApp, TestTenant, assert_error, random_suffix, spawn_app_with,
};
use crate::on_both;
use crate::ws::{Ws, new_visitor, open_conversation};

/// The `Retry-After` of a refusal, checked to be whole seconds of at least 1.
async fn refused(res: Response) -> u64 {
    let retry: u64 = res
        .headers()
        .get("retry-after")
        .expect("a 429 carries Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .expect("Retry-After is whole seconds");
    assert!(retry >= 1);
    assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    retry
}

async fn wait_out(retry_after: u64) {
    tokio::time::sleep(Duration::from_secs(retry_after) + Duration::from_millis(100)).await;
}

async fn teams(app: &TestApp, t: &TestTenant) -> Response {
    app.call(
        Method::GET,
        Some(&t.domain),
        "/api/v1/teams",
        Some(&t.admin_token),
        None,
    )
    .await
}

on_both!(http_limit_per_tenant);
async fn http_limit_per_tenant(backend: Backend) {
    let app = spawn_app_with(backend, |s| {
        s.limits.http_per_sec = 1;
        s.limits.http_burst = 5;
    })
    .await;
    let a = app.create_tenant("lim").await;
    let b = app.create_tenant("other").await;
    // Spend a's bucket; each request is quick, so at most a token or two refills meanwhile.
    let mut got = None;
    for _ in 0..10 {
        let res = teams(&app, &a).await;
        if res.status() == StatusCode::TOO_MANY_REQUESTS {
            got = Some(res);
            break;
        }
        assert_eq!(res.status(), StatusCode::OK);
    }
    let res = got.expect("the tenant's HTTP limit trips");
    let retry = refused(res).await;

    // A refused request changes nothing: this team is not created.
    let res = app
        .call(
            Method::POST,
            Some(&a.domain),
            "/api/v1/teams",
            Some(&a.admin_token),
            Some(json!({"slug": "refused", "name": "Refused"})),
        )
        .await;
    refused(res).await;
    // The other tenant is not affected.
    assert_eq!(teams(&app, &b).await.status(), StatusCode::OK);

    wait_out(retry).await;
    let res = teams(&app, &a).await;
    assert_eq!(res.status(), StatusCode::OK, "recovered after Retry-After");
    let body: Value = res.json().await.unwrap();
    assert!(
        body["teams"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["slug"] != "refused"),
        "{body}"
    );
}

async fn session(app: &TestApp, t: &TestTenant) -> Response {
    app.call(
        Method::POST,
        Some(&t.domain),
        "/api/v1/visitor/sessions",
        None,
        Some(json!({"name": "Guest"})),
    )
    .await
}

on_both!(visitor_sessions_per_ip);
async fn visitor_sessions_per_ip(backend: Backend) {
    let app = spawn_app_with(backend, |s| {
        s.limits.ip_sessions_per_min = 60;
        s.limits.ip_session_burst = 2;
    })
    .await;
    let t = app.create_tenant("ses").await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let res = session(&app, &t).await;
        assert_eq!(res.status(), StatusCode::CREATED);
        let body: Value = res.json().await.unwrap();
        ids.push(body["visitor_id"].as_i64().unwrap());
    }
    let retry = refused(session(&app, &t).await).await;
    // Per tenant: another tenant's visitors from the same address are not held back.
    let other = app.create_tenant("ses-other").await;
    assert_eq!(session(&app, &other).await.status(), StatusCode::CREATED);

    wait_out(retry).await;
    let res = session(&app, &t).await;
    assert_eq!(res.status(), StatusCode::CREATED, "recovered");
    let body: Value = res.json().await.unwrap();
    // The refused request made no visitor: ids carry on without a hole.
    assert_eq!(body["visitor_id"].as_i64().unwrap(), ids[1] + 1);
}

async fn login(app: &TestApp, t: &TestTenant, email: &str, password: &str) -> Response {
    app.call(
        Method::POST,
        Some(&t.domain),
        "/api/v1/auth/login",
        None,
        Some(json!({"email": email, "password": password})),
    )
    .await
}

#[actix_web::test]
async fn logins_per_account() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        // One attempt every 10 s, two at once: the tenant's creation spends one.
        s.limits.account_logins_per_min = 6;
        s.limits.account_login_burst = 2;
    })
    .await;
    let t = app.create_tenant("acct").await;
    let res = login(&app, &t, &t.admin_email, "wrong-password").await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    // Even the right password is refused now: the attempt is not even checked.
    let retry = refused(login(&app, &t, &t.admin_email, &t.admin_password).await).await;
    // The same account in another case is the same account.
    refused(login(&app, &t, &t.admin_email.to_uppercase(), "x").await).await;
    // Another account is not held back (create_agent logs the new agent in).
    app.create_agent(&t, &format!("li-{}@acct.test", random_suffix()), "agent")
        .await;

    wait_out(retry).await;
    let res = login(&app, &t, &t.admin_email, &t.admin_password).await;
    assert_eq!(res.status(), StatusCode::OK, "recovered");
}

#[actix_web::test]
async fn logins_per_ip() {
    let app = spawn_app_with(Backend::Sqlite, |s| {
        s.limits.ip_logins_per_min = 6;
        s.limits.ip_login_burst = 3;
    })
    .await;
    let t = app.create_tenant("ip").await;
    for i in 0..2 {
        let res = login(&app, &t, &format!("nobody{i}@ip.test"), "guess").await;
        assert_error(res, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    }
    let res = login(&app, &t, "nobody9@ip.test", "guess").await;
    let body = {
        let retry = res.headers().get("retry-after").cloned();
        assert!(retry.is_some());
        assert_error(res, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await
    };
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("address"),
        "{body}"
    );
}

on_both!(messages_per_tenant);
async fn messages_per_tenant(backend: Backend) {
    let app = spawn_app_with(backend, |s| {
        s.limits.messages_per_sec = 1;
        s.limits.messages_burst = 3;
    })
    .await;
    let t = app.create_tenant("msg").await;
    let v = new_visitor(&app, &t).await;
    let conv = open_conversation(&app, &t, &v, None).await["conversation_id"]
        .as_i64()
        .unwrap();
    let mut ws = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let mut acked = 0;
    let mut limited = None;
    for i in 0..8 {
        let reply = ws.say(conv, &format!("m-{i}"), "hello").await;
        if reply["type"] == "ack" {
            acked += 1;
        } else {
            limited = Some(reply);
            break;
        }
    }
    let limited = limited.expect("the tenant's message limit trips");
    assert_eq!(limited["code"], "rate_limited", "{limited}");
    assert!(acked >= 3, "the burst passes: {acked}");

    // The long-poll send shares the tenant's bucket.
    let path = format!("/api/v1/visitor/conversations/{conv}/messages");
    let send = |id: &'static str| {
        app.call(
            Method::POST,
            Some(&t.domain),
            &path,
            Some(&v.token),
            Some(json!({"client_msg_id": id, "content": {"kind": "text", "text": "hi"}})),
        )
    };
    let retry = refused(send("lp-1").await).await;

    // Nothing refused was stored: the log holds exactly the acked messages.
    let stored = crate::ws::history(&app, &t, conv).await;
    let texts = stored
        .iter()
        .filter(|m| m["sender"]["kind"] == "visitor")
        .count();
    assert_eq!(texts, acked);

    wait_out(retry).await;
    assert_eq!(
        send("lp-2").await.status(),
        StatusCode::CREATED,
        "recovered"
    );
}

#[actix_web::test]
async fn a_tenant_override_beats_the_default() {
    let vip = format!("vip-{}", random_suffix());
    let vip_slug = vip.clone();
    let app = spawn_app_with(Backend::Sqlite, move |s| {
        s.limits.ip_sessions_per_min = 1;
        s.limits.ip_session_burst = 1;
        s.limits.tenants.insert(
            vip_slug,
            LimitOverrides {
                ip_session_burst: Some(5),
                ..Default::default()
            },
        );
    })
    .await;
    let plain = app.create_tenant("plain").await;
    let vip = app.create_tenant_with_slug(&vip).await;
    assert_eq!(session(&app, &plain).await.status(), StatusCode::CREATED);
    refused(session(&app, &plain).await).await;
    for _ in 0..5 {
        assert_eq!(session(&app, &vip).await.status(), StatusCode::CREATED);
    }
    refused(session(&app, &vip).await).await;
}
