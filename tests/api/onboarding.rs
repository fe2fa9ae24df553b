use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Api, Backend, assert_error, random_suffix, spawn_app};
use crate::on_both;
use crate::ws::{Ws, agent_online, new_visitor};

fn tenant_body(slug: &str, domains: &[&str]) -> Value {
    json!({
        "slug": slug, "name": "Acme Insurance", "domains": domains,
        "admin": {"email": format!("boss@{slug}.test"), "password": "long-enough-pw", "name": "Boss"}
    })
}

async fn onboarding_creates_everything_in_one_call(backend: Backend) {
    let app = spawn_app(backend).await;
    let slug = format!("acme-{}", random_suffix());
    let domain = format!("{slug}.example.com");
    let res = app
        .platform(
            Method::POST,
            "/platform/v1/tenants",
            Some(tenant_body(&slug, &[&domain])),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["slug"], slug.as_str());
    assert_eq!(body["status"], "active");
    assert_eq!(body["domains"], json!([domain]));
    assert_eq!(body["admin"]["email"], format!("boss@{slug}.test"));

    // The admin can log in on the tenant's domain and sees team `general`.
    let token = app
        .login(&domain, &format!("boss@{slug}.test"), "long-enough-pw")
        .await;
    let teams: Value = app
        .call(
            Method::GET,
            Some(&domain),
            "/api/v1/teams",
            Some(&token),
            None,
        )
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(teams["teams"][0]["slug"], "general");

    let list: Value = app
        .platform(Method::GET, "/platform/v1/tenants", None)
        .await
        .json()
        .await
        .unwrap();
    assert!(
        list["tenants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["slug"] == slug.as_str())
    );
    let one: Value = app
        .platform(Method::GET, &format!("/platform/v1/tenants/{slug}"), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(one["name"], "Acme Insurance");
}

async fn duplicate_slug_and_domain_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("dup").await;
    assert_error(
        app.platform(
            Method::POST,
            "/platform/v1/tenants",
            Some(tenant_body(&t.slug, &["fresh.example"])),
        )
        .await,
        StatusCode::CONFLICT,
        "slug_taken",
    )
    .await;
    let other = format!("other-{}", random_suffix());
    // Case and trailing dot do not make a domain different.
    let upper = format!("{}.", t.domain.to_uppercase());
    assert_error(
        app.platform(
            Method::POST,
            "/platform/v1/tenants",
            Some(tenant_body(&other, &[&upper])),
        )
        .await,
        StatusCode::CONFLICT,
        "domain_taken",
    )
    .await;
    // The refused tenant left nothing behind: its slug is free.
    let res = app
        .platform(
            Method::POST,
            "/platform/v1/tenants",
            Some(tenant_body(&other, &["free.example"])),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
}

/// A database already sits where the tenant's would go (left by someone else): onboarding
/// fails, leaves that database alone, and leaves no tenant, domain or admin behind.
async fn onboarding_failure_midway_leaves_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let slug = format!("crash-{}", random_suffix());
    let domain = format!("{slug}.test");
    let storage = app.state.tenants.storage().clone();
    let db_name = storage.tenant_db_name(&slug);
    storage.create_tenant_db(&db_name).await.unwrap();

    let res = app
        .platform(
            Method::POST,
            "/platform/v1/tenants",
            Some(tenant_body(&slug, &[&domain])),
        )
        .await;
    assert_error(res, StatusCode::CONFLICT, "storage_conflict").await;
    assert_error(
        app.platform(Method::GET, &format!("/platform/v1/tenants/{slug}"), None)
            .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_error(
        app.call(
            Method::POST,
            Some(&domain),
            "/api/v1/auth/login",
            None,
            Some(json!({"email": "a@b.c", "password": "x"})),
        )
        .await,
        StatusCode::NOT_FOUND,
        "unknown_tenant",
    )
    .await;
    // The stray database is still there (we did not adopt or destroy it)...
    assert!(matches!(
        storage.create_tenant_db(&db_name).await,
        Err(kefu::storage::StorageError::AlreadyExists(_))
    ));
    // ...and once it is gone the same slug and domain onboard cleanly.
    storage.drop_tenant_db(&db_name).await.unwrap();
    let res = app
        .platform(
            Method::POST,
            "/platform/v1/tenants",
            Some(tenant_body(&slug, &[&domain])),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
}

/// A process that died in the middle of onboarding left a claim and a database: the next
/// start removes both.
async fn unfinished_onboarding_is_swept_at_start(backend: Backend) {
    use entity::platform::{tenant, tenant_domain};
    use sea_orm::{ActiveModelTrait, EntityTrait, Set};

    let app = spawn_app(backend).await;
    let slug = format!("dead-{}", random_suffix());
    let storage = app.state.tenants.storage().clone();
    let db_name = storage.tenant_db_name(&slug);
    storage.create_tenant_db(&db_name).await.unwrap();
    let t = tenant::ActiveModel {
        slug: Set(slug.clone()),
        name: Set("Dead".into()),
        status: Set("provisioning".into()),
        db_name: Set(db_name.clone()),
        created_at: Set(chrono::Utc::now() - chrono::Duration::hours(1)),
        ..Default::default()
    }
    .insert(storage.platform())
    .await
    .unwrap();
    tenant_domain::ActiveModel {
        domain: Set(format!("{slug}.test")),
        tenant_id: Set(t.id),
        created_at: Set(chrono::Utc::now()),
    }
    .insert(storage.platform())
    .await
    .unwrap();

    let app = app.restart().await;
    let storage = app.state.tenants.storage().clone();
    assert!(
        tenant::Entity::find_by_id(t.id)
            .one(storage.platform())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        tenant_domain::Entity::find_by_id(format!("{slug}.test"))
            .one(storage.platform())
            .await
            .unwrap()
            .is_none()
    );
    // The database was removed too: creating it again succeeds.
    storage.create_tenant_db(&db_name).await.unwrap();
    storage.drop_tenant_db(&db_name).await.unwrap();
}

async fn suspension_and_resumption(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("susp").await;
    let res = app
        .platform(
            Method::POST,
            &format!("/platform/v1/tenants/{}/suspend", t.slug),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_error(
        app.call(
            Method::GET,
            Some(&t.domain),
            "/api/v1/agents",
            Some(&t.admin_token),
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
        "tenant_suspended",
    )
    .await;
    assert_error(
        app.call(
            Method::POST,
            Some(&t.domain),
            "/api/v1/auth/login",
            None,
            Some(json!({"email": t.admin_email, "password": t.admin_password})),
        )
        .await,
        StatusCode::FORBIDDEN,
        "tenant_suspended",
    )
    .await;
    let res = app
        .platform(
            Method::POST,
            &format!("/platform/v1/tenants/{}/resume", t.slug),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let res = app
        .call(
            Method::GET,
            Some(&t.domain),
            "/api/v1/agents",
            Some(&t.admin_token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

async fn host_resolution_ignores_case_and_port(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("host").await;
    for host in [
        t.domain.clone(),
        t.domain.to_uppercase(),
        format!("{}:8443", t.domain),
        format!("{}.", t.domain),
    ] {
        let res = app
            .call(
                Method::GET,
                Some(&host),
                "/api/v1/me",
                Some(&t.admin_token),
                None,
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK, "host {host}");
    }
    for host in ["unknown.test", "127.0.0.1", "[::1]:80"] {
        assert_error(
            app.call(
                Method::GET,
                Some(host),
                "/api/v1/me",
                Some(&t.admin_token),
                None,
            )
            .await,
            StatusCode::NOT_FOUND,
            "unknown_tenant",
        )
        .await;
    }
}

async fn domains_can_be_added_and_removed(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("dom").await;
    let extra = format!("www.{}", t.domain);
    let res = app
        .platform(
            Method::POST,
            &format!("/platform/v1/tenants/{}/domains", t.slug),
            Some(json!({"domain": extra})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let res = app
        .call(
            Method::GET,
            Some(&extra),
            "/api/v1/me",
            Some(&t.admin_token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);

    let other = app.create_tenant("dom2").await;
    assert_error(
        app.platform(
            Method::POST,
            &format!("/platform/v1/tenants/{}/domains", other.slug),
            Some(json!({"domain": extra})),
        )
        .await,
        StatusCode::CONFLICT,
        "domain_taken",
    )
    .await;

    let res = app
        .platform(
            Method::DELETE,
            &format!("/platform/v1/tenants/{}/domains/{extra}", t.slug),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_error(
        app.call(
            Method::GET,
            Some(&extra),
            "/api/v1/me",
            Some(&t.admin_token),
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "unknown_tenant",
    )
    .await;
    assert_error(
        app.platform(
            Method::DELETE,
            &format!("/platform/v1/tenants/{}/domains/{}", t.slug, t.domain),
            None,
        )
        .await,
        StatusCode::CONFLICT,
        "last_domain",
    )
    .await;
}

async fn generated_platform_key_is_kept(backend: Backend) {
    let mut app = spawn_app(backend).await;
    app.settings.platform_key = None;
    let app = app.restart().await;
    let generated = app.state.platform_key.clone();
    assert!(generated.len() >= 32);
    let app = app.restart().await;
    assert_eq!(
        app.state.platform_key, generated,
        "the generated key survives restarts"
    );
    let res = app
        .call(
            Method::GET,
            None,
            "/platform/v1/tenants",
            Some(&generated),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
}

async fn suspension_closes_open_sockets(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("sus").await;
    let (_, _, mut agent) = agent_online(&app, &t, "a@sus.test", 1).await;
    let v = new_visitor(&app, &t).await;
    let mut visitor = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token)
        .await
        .unwrap();
    let res = app
        .platform(
            Method::POST,
            &format!("/platform/v1/tenants/{}/suspend", t.slug),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(agent.closed_with().await, 4003);
    assert_eq!(visitor.closed_with().await, 4003);
    // And they cannot come back while it is suspended.
    let again = Ws::connect(&app, &t.domain, "/ws/visitor", &v.token).await;
    assert_eq!(again.err(), Some(StatusCode::FORBIDDEN));
}

on_both!(
    suspension_closes_open_sockets,
    onboarding_creates_everything_in_one_call,
    duplicate_slug_and_domain_are_refused,
    onboarding_failure_midway_leaves_nothing,
    unfinished_onboarding_is_swept_at_start,
    suspension_and_resumption,
    host_resolution_ignores_case_and_port,
    domains_can_be_added_and_removed,
    generated_platform_key_is_kept,
);
