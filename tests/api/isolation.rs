//! Tenants never see each other (contract rule 5): every route tried across the line.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Api, Backend, assert_error, spawn_app};
use crate::on_both;

async fn a_token_of_tenant_a_is_refused_on_tenant_b(backend: Backend) {
    let app = spawn_app(backend).await;
    let a = app.create_tenant("iso-a").await;
    let b = app.create_tenant("iso-b").await;
    let b_host = Some(b.domain.as_str());
    // Same agent id (1) and same signing secret on both sides: only the tenant in the token
    // tells them apart.
    assert_eq!(a.admin_id, b.admin_id);
    for (method, path, body) in [
        (Method::GET, "/api/v1/me".to_owned(), None),
        (Method::GET, "/api/v1/agents".to_owned(), None),
        (Method::GET, format!("/api/v1/agents/{}", b.admin_id), None),
        (
            Method::PATCH,
            format!("/api/v1/agents/{}", b.admin_id),
            Some(json!({"name": "pwned"})),
        ),
        (
            Method::DELETE,
            format!("/api/v1/agents/{}", b.admin_id),
            None,
        ),
        (Method::GET, "/api/v1/teams".to_owned(), None),
        (
            Method::POST,
            "/api/v1/teams".to_owned(),
            Some(json!({"slug": "evil", "name": "Evil"})),
        ),
        (
            Method::POST,
            "/api/v1/agents".to_owned(),
            Some(json!({"email": "e@evil.com", "name": "E", "password": "password-123"})),
        ),
    ] {
        assert_error(
            app.call(method, b_host, &path, Some(&a.admin_token), body)
                .await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
        )
        .await;
    }
    // Nothing changed on B.
    let agents: Value = app
        .call(
            Method::GET,
            b_host,
            "/api/v1/agents",
            Some(&b.admin_token),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(agents["agents"].as_array().unwrap().len(), 1);
    assert_eq!(agents["agents"][0]["name"], "Admin");
    let teams: Value = app
        .call(
            Method::GET,
            b_host,
            "/api/v1/teams",
            Some(&b.admin_token),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(teams["teams"].as_array().unwrap().len(), 1);
    // A's credentials do not log in on B either.
    assert_error(
        app.call(
            Method::POST,
            b_host,
            "/api/v1/auth/login",
            None,
            Some(json!({"email": a.admin_email, "password": a.admin_password})),
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
}

async fn rows_written_for_a_are_invisible_from_b(backend: Backend) {
    let app = spawn_app(backend).await;
    let a = app.create_tenant("rows-a").await;
    let b = app.create_tenant("rows-b").await;
    let (agent_id, _) = app.create_agent(&a, "only-in-a@example.com", "agent").await;
    let res = app
        .call(
            Method::POST,
            Some(&a.domain),
            "/api/v1/teams",
            Some(&a.admin_token),
            Some(json!({"slug": "vip", "name": "VIP"})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);

    let b_agents: Value = app
        .call(
            Method::GET,
            Some(&b.domain),
            "/api/v1/agents",
            Some(&b.admin_token),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(!b_agents.to_string().contains("only-in-a"));
    assert_error(
        app.call(
            Method::GET,
            Some(&b.domain),
            &format!("/api/v1/agents/{agent_id}"),
            Some(&b.admin_token),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let b_teams: Value = app
        .call(
            Method::GET,
            Some(&b.domain),
            "/api/v1/teams",
            Some(&b.admin_token),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert!(!b_teams.to_string().contains("vip"));
    // The same email may exist in both tenants: they are different people's accounts.
    app.create_agent(&b, "only-in-a@example.com", "agent").await;
    // A team slug taken in A is free in B.
    let res = app
        .call(
            Method::POST,
            Some(&b.domain),
            "/api/v1/teams",
            Some(&b.admin_token),
            Some(json!({"slug": "vip", "name": "VIP"})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
}

/// The two tenants' data really sit in two different databases.
async fn each_tenant_has_its_own_database(backend: Backend) {
    use entity::tenant::agent;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

    let app = spawn_app(backend).await;
    let a = app.create_tenant("db-a").await;
    let b = app.create_tenant("db-b").await;
    app.create_agent(&a, "a-only@example.com", "agent").await;
    let storage = app.state.tenants.storage().clone();
    let (a_db, b_db) = (
        storage.tenant_db_name(&a.slug),
        storage.tenant_db_name(&b.slug),
    );
    assert_ne!(a_db, b_db);
    if backend == Backend::Sqlite {
        let dir = app.data_dir.path().join("tenants");
        assert!(dir.join(format!("{a_db}.db")).is_file());
        assert!(dir.join(format!("{b_db}.db")).is_file());
    }
    let find = |db: sea_orm::DatabaseConnection| async move {
        agent::Entity::find()
            .filter(agent::Column::Email.eq("a-only@example.com"))
            .one(&db)
            .await
            .unwrap()
    };
    assert!(find(storage.tenant(&a_db).await.unwrap()).await.is_some());
    assert!(find(storage.tenant(&b_db).await.unwrap()).await.is_none());
}

async fn platform_api_needs_the_platform_key(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("pk").await;
    assert_error(
        app.call(Method::GET, None, "/platform/v1/tenants", None, None)
            .await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;
    assert_error(
        app.call(
            Method::GET,
            None,
            "/platform/v1/tenants",
            Some("wrong-key"),
            None,
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "invalid_platform_key",
    )
    .await;
    // An admin token of a tenant is not a platform key.
    assert_error(
        app.call(
            Method::POST,
            None,
            &format!("/platform/v1/tenants/{}/suspend", t.slug),
            Some(&t.admin_token),
            None,
        )
        .await,
        StatusCode::UNAUTHORIZED,
        "invalid_platform_key",
    )
    .await;
}

on_both!(
    a_token_of_tenant_a_is_refused_on_tenant_b,
    rows_written_for_a_are_invisible_from_b,
    each_tenant_has_its_own_database,
    platform_api_needs_the_platform_key,
);
