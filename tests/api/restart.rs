use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Api, Backend, spawn_app};
use crate::on_both;

async fn restart_keeps_everything(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("keep").await;
    let suspended = app.create_tenant("keep-susp").await;
    app.create_agent(&t, "kept@example.com", "supervisor").await;
    app.call(
        Method::POST,
        Some(&t.domain),
        "/api/v1/teams",
        Some(&t.admin_token),
        Some(json!({"slug": "sales", "name": "Sales"})),
    )
    .await;
    app.platform(
        Method::POST,
        &format!("/platform/v1/tenants/{}/suspend", suspended.slug),
        None,
    )
    .await;

    let app = app.restart().await;
    // Tokens issued before the restart still work (the secret is kept).
    let agents: Value = app
        .call(
            Method::GET,
            Some(&t.domain),
            "/api/v1/agents",
            Some(&t.admin_token),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(agents.to_string().contains("kept@example.com"));
    app.login(&t.domain, "kept@example.com", "agent-password-1")
        .await;
    let teams: Value = app
        .call(
            Method::GET,
            Some(&t.domain),
            "/api/v1/teams",
            Some(&t.admin_token),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(teams.to_string().contains("sales"));
    let res = app
        .call(
            Method::GET,
            Some(&suspended.domain),
            "/api/v1/me",
            Some(&suspended.admin_token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
}

on_both!(restart_keeps_everything);
