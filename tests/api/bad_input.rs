//! Bad input gets a clear error and changes nothing.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Api, Backend, assert_error, spawn_app};
use crate::on_both;

async fn tenant_count(app: &crate::helpers::TestApp) -> usize {
    let list: Value = app
        .platform(Method::GET, "/platform/v1/tenants", None)
        .await
        .json()
        .await
        .unwrap();
    list["tenants"].as_array().unwrap().len()
}

async fn bad_onboarding_bodies_are_refused_and_change_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let good = || {
        json!({"slug": "fine", "name": "Fine", "domains": ["fine.test"],
               "admin": {"email": "a@fine.test", "password": "password-123"}})
    };
    let with = |path: &[&str], v: Value| {
        let mut body = good();
        let mut cur = &mut body;
        for p in &path[..path.len() - 1] {
            cur = &mut cur[*p];
        }
        cur[path[path.len() - 1]] = v;
        body
    };
    let cases: Vec<(Value, &str)> = vec![
        (with(&["slug"], json!("Bad Slug")), "slug"),
        (with(&["slug"], json!("-x")), "slug"),
        (with(&["slug"], json!("a".repeat(33))), "slug"),
        (with(&["slug"], json!(5)), "slug"),
        (with(&["domains"], json!([])), "domains"),
        (with(&["domains"], json!(["not a domain"])), "domains"),
        (with(&["domains"], json!(["127.0.0.1"])), "domains"),
        (with(&["domains"], json!("fine.test")), "domains"),
        (with(&["name"], json!("")), "name"),
        (
            with(&["admin", "email"], json!("not-an-email")),
            "admin.email",
        ),
        (
            with(&["admin", "password"], json!("short")),
            "admin.password",
        ),
        (
            with(&["admin", "password"], json!(12345678)),
            "admin.password",
        ),
        (with(&["extra"], json!(true)), "extra"),
        (with(&["admin", "role"], json!("admin")), "role"),
    ];
    for (body, field) in cases {
        let err = assert_error(
            app.platform(Method::POST, "/platform/v1/tenants", Some(body.clone()))
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        )
        .await;
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(field),
            "message {msg:?} should name {field} for {body}"
        );
    }
    // Missing fields.
    assert_error(
        app.platform(
            Method::POST,
            "/platform/v1/tenants",
            Some(json!({"slug": "fine"})),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert_eq!(tenant_count(&app).await, 0);
}

async fn malformed_oversized_and_mistyped_bodies(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("bad").await;
    let post_raw =
        |path: &str, host: Option<String>, token: Option<String>, ct: &str, body: Vec<u8>| {
            let mut req = app
                .client
                .post(app.url(path))
                .header("content-type", ct)
                .body(body);
            if let Some(h) = host {
                req = req.header("Host", h);
            }
            if let Some(t) = token {
                req = req.bearer_auth(t);
            }
            req.send()
        };
    let key = Some(app.platform_key.clone());
    assert_error(
        post_raw(
            "/platform/v1/tenants",
            None,
            key.clone(),
            "application/json",
            b"{\"slug\": ".to_vec(),
        )
        .await
        .unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed_json",
    )
    .await;
    assert_error(
        post_raw(
            "/platform/v1/tenants",
            None,
            key.clone(),
            "application/json",
            vec![0xff, 0xfe, 0x00],
        )
        .await
        .unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed_json",
    )
    .await;
    assert_error(
        post_raw(
            "/platform/v1/tenants",
            None,
            key.clone(),
            "text/plain",
            b"{}".to_vec(),
        )
        .await
        .unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;
    let huge = format!("{{\"slug\": \"{}\"}}", "a".repeat(200 * 1024));
    assert_error(
        post_raw(
            "/platform/v1/tenants",
            None,
            key.clone(),
            "application/json",
            huge.into_bytes(),
        )
        .await
        .unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    // Tenant routes too.
    assert_error(
        post_raw(
            "/api/v1/agents",
            Some(t.domain.clone()),
            Some(t.admin_token.clone()),
            "application/json",
            b"[1,2".to_vec(),
        )
        .await
        .unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed_json",
    )
    .await;
    for body in [
        json!({"email": "x@example.com", "name": "X", "password": "password-123", "role": "god"}),
        json!({"email": "x@example.com", "name": "X", "password": "password-123", "max_concurrent": -1}),
        json!({"email": "x@example.com", "name": "X", "password": "password-123", "max_concurrent": "five"}),
        json!({"email": "x@example.com", "name": "X", "password": "password-123", "teams": ["nope"]}),
        json!({"email": "x@example.com", "name": "X", "password": "password-123", "admin": true}),
        json!({"email": "x@example.com", "name": "", "password": "password-123"}),
    ] {
        assert_error(
            app.call(
                Method::POST,
                Some(&t.domain),
                "/api/v1/agents",
                Some(&t.admin_token),
                Some(body),
            )
            .await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_failed",
        )
        .await;
    }
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
    assert_eq!(
        agents["agents"].as_array().unwrap().len(),
        1,
        "nothing was created"
    );
    assert_error(
        app.call(
            Method::GET,
            Some(&t.domain),
            "/api/v1/agents/abc",
            Some(&t.admin_token),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

async fn bad_tokens_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("tok").await;
    let host = Some(t.domain.as_str());
    assert_error(
        app.call(Method::GET, host, "/api/v1/me", None, None).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;
    // Forged: a valid-looking token signed with another secret.
    let forged = kefu::accounts::TokenKeys::new("some-other-secret-value", 3600).issue(
        t.id,
        t.admin_id,
        kefu::accounts::Role::Admin,
    );
    // Expired: signed with the right secret, but long past its expiry.
    let expired = {
        use jsonwebtoken::{EncodingKey, Header, encode};
        let claims = kefu::accounts::Claims {
            sub: t.admin_id.to_string(),
            tid: t.id,
            kind: kefu::accounts::TokenKind::Agent,
            role: Some(kefu::accounts::Role::Admin),
            iat: 1,
            exp: 2,
        };
        let secret = app.settings.jwt_secret.clone().unwrap();
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    // Tampered: the right token with its payload changed.
    let tampered = {
        let mut parts: Vec<String> = t.admin_token.split('.').map(str::to_owned).collect();
        parts[1] = parts[1].chars().rev().collect();
        parts.join(".")
    };
    for token in [
        "garbage",
        forged.as_str(),
        expired.as_str(),
        tampered.as_str(),
        "",
    ] {
        assert_error(
            app.call(Method::GET, host, "/api/v1/me", Some(token), None)
                .await,
            StatusCode::UNAUTHORIZED,
            if token.is_empty() {
                "unauthenticated"
            } else {
                "invalid_token"
            },
        )
        .await;
    }
}

on_both!(
    bad_onboarding_bodies_are_refused_and_change_nothing,
    malformed_oversized_and_mistyped_bodies,
    bad_tokens_are_refused,
);
