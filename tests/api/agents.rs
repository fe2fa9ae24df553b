use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Api, Backend, TestApp, assert_error, spawn_app};
use crate::on_both;
use crate::ws::Ws;

async fn admin_manages_agents_and_teams(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("crud").await;
    let host = Some(t.domain.as_str());
    let admin = Some(t.admin_token.as_str());

    let res = app
        .call(
            Method::POST,
            host,
            "/api/v1/teams",
            admin,
            Some(json!({"slug": "claims", "name": "Claims"})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    assert_error(
        app.call(
            Method::POST,
            host,
            "/api/v1/teams",
            admin,
            Some(json!({"slug": "claims", "name": "Again"})),
        )
        .await,
        StatusCode::CONFLICT,
        "team_taken",
    )
    .await;

    let res = app
        .call(
            Method::POST,
            host,
            "/api/v1/agents",
            admin,
            Some(
                json!({"email": "Li.Na@Example.com", "name": "Li Na", "password": "password-123",
                        "role": "agent", "max_concurrent": 3, "teams": ["general", "claims"]}),
            ),
        )
        .await;
    assert_eq!(res.status(), StatusCode::CREATED);
    let agent: Value = res.json().await.unwrap();
    assert_eq!(agent["email"], "li.na@example.com");
    assert_eq!(agent["teams"], json!(["general", "claims"]));
    assert_eq!(agent["max_concurrent"], 3);
    assert!(agent.get("password_hash").is_none());
    let id = agent["id"].as_i64().unwrap();

    // Default team and capacity.
    let res = app
        .call(
            Method::POST,
            host,
            "/api/v1/agents",
            admin,
            Some(json!({"email": "wang@example.com", "name": "Wang", "password": "password-123"})),
        )
        .await;
    let wang: Value = res.json().await.unwrap();
    assert_eq!(wang["teams"], json!(["general"]));
    assert_eq!(wang["role"], "agent");
    assert_eq!(wang["max_concurrent"], 5);

    assert_error(
        app.call(
            Method::POST,
            host,
            "/api/v1/agents",
            admin,
            Some(json!({"email": "LI.NA@example.com", "name": "Dup", "password": "password-123"})),
        )
        .await,
        StatusCode::CONFLICT,
        "email_taken",
    )
    .await;

    let res = app
        .call(
            Method::PATCH,
            host,
            &format!("/api/v1/agents/{id}"),
            admin,
            Some(json!({"max_concurrent": 8, "teams": ["claims"], "name": "Li Na (Claims)"})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let patched: Value = res.json().await.unwrap();
    assert_eq!(patched["max_concurrent"], 8);
    assert_eq!(patched["teams"], json!(["claims"]));
    assert_eq!(patched["email"], "li.na@example.com");

    // A changed password works at once; the old one no longer does.
    let res = app
        .call(
            Method::PATCH,
            host,
            &format!("/api/v1/agents/{id}"),
            admin,
            Some(json!({"password": "new-password-9"})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    app.login(&t.domain, "li.na@example.com", "new-password-9")
        .await;

    let list: Value = app
        .call(Method::GET, host, "/api/v1/agents", admin, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(list["agents"].as_array().unwrap().len(), 3);

    let res = app
        .call(
            Method::DELETE,
            host,
            &format!("/api/v1/agents/{id}"),
            admin,
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_error(
        app.call(
            Method::GET,
            host,
            &format!("/api/v1/agents/{id}"),
            admin,
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

async fn roles_are_enforced(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("roles").await;
    let host = Some(t.domain.as_str());
    let (agent_id, agent) = app.create_agent(&t, "agent@example.com", "agent").await;
    let (_, supervisor) = app.create_agent(&t, "sup@example.com", "supervisor").await;

    for (method, path, body) in [
        (
            Method::POST,
            "/api/v1/agents",
            Some(json!({"email": "x@example.com", "name": "X", "password": "password-123"})),
        ),
        (
            Method::POST,
            "/api/v1/teams",
            Some(json!({"slug": "x", "name": "X"})),
        ),
        (Method::DELETE, "/api/v1/agents/1", None),
        (
            Method::PATCH,
            "/api/v1/agents/1",
            Some(json!({"role": "agent"})),
        ),
    ] {
        for token in [&agent, &supervisor] {
            assert_error(
                app.call(method.clone(), host, path, Some(token), body.clone())
                    .await,
                StatusCode::FORBIDDEN,
                "forbidden",
            )
            .await;
        }
    }
    // Agents may not list other agents; supervisors may.
    assert_error(
        app.call(Method::GET, host, "/api/v1/agents", Some(&agent), None)
            .await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    assert_eq!(
        app.call(Method::GET, host, "/api/v1/agents", Some(&supervisor), None)
            .await
            .status(),
        StatusCode::OK
    );
    // Everyone may read themselves and the teams.
    let me: Value = app
        .call(Method::GET, host, "/api/v1/me", Some(&agent), None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(me["id"], agent_id);
    assert_eq!(
        app.call(Method::GET, host, "/api/v1/teams", Some(&agent), None)
            .await
            .status(),
        StatusCode::OK
    );

    // A promotion takes effect on the next request with the same token.
    let res = app
        .call(
            Method::PATCH,
            host,
            &format!("/api/v1/agents/{agent_id}"),
            Some(&t.admin_token),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        app.call(Method::GET, host, "/api/v1/agents", Some(&agent), None)
            .await
            .status(),
        StatusCode::OK
    );

    // A deleted agent's token stops working.
    let res = app
        .call(
            Method::DELETE,
            host,
            &format!("/api/v1/agents/{agent_id}"),
            Some(&t.admin_token),
            None,
        )
        .await;
    assert_eq!(res.status(), StatusCode::NO_CONTENT);
    assert_error(
        app.call(Method::GET, host, "/api/v1/me", Some(&agent), None)
            .await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
    // Nor does it open a socket: the socket reads the agent from storage too.
    assert_eq!(
        Ws::connect(&app, &t.domain, "/ws/agent", &agent)
            .await
            .err(),
        Some(StatusCode::UNAUTHORIZED)
    );
}

async fn the_last_admin_stays(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("last").await;
    let host = Some(t.domain.as_str());
    assert_error(
        app.call(
            Method::DELETE,
            host,
            &format!("/api/v1/agents/{}", t.admin_id),
            Some(&t.admin_token),
            None,
        )
        .await,
        StatusCode::CONFLICT,
        "last_admin",
    )
    .await;
    assert_error(
        app.call(
            Method::PATCH,
            host,
            &format!("/api/v1/agents/{}", t.admin_id),
            Some(&t.admin_token),
            Some(json!({"role": "agent"})),
        )
        .await,
        StatusCode::CONFLICT,
        "last_admin",
    )
    .await;

    // Two admins demoting each other at the same moment: one of them stays admin.
    let (second, second_token) = app.create_agent(&t, "second@last.test", "admin").await;
    for _ in 0..5 {
        let (a, b) = tokio::join!(
            set_role(&app, host, second, &t.admin_token, "agent"),
            set_role(&app, host, t.admin_id, &second_token, "agent")
        );
        let ok = [a.status(), b.status()]
            .iter()
            .filter(|s| s.is_success())
            .count();
        // Either one demotion went through and the other was refused (last admin, or no
        // longer an admin), or both were refused; never both.
        assert!(
            ok <= 1,
            "both admins demoted: {} and {}",
            a.status(),
            b.status()
        );
        let admins = app
            .call(
                Method::GET,
                host,
                "/api/v1/agents",
                Some(&t.admin_token),
                None,
            )
            .await;
        let body: serde_json::Value = if admins.status().is_success() {
            admins.json().await.unwrap()
        } else {
            app.call(
                Method::GET,
                host,
                "/api/v1/agents",
                Some(&second_token),
                None,
            )
            .await
            .json()
            .await
            .unwrap()
        };
        let list = body["agents"].as_array().cloned().unwrap_or_default();
        assert!(
            list.iter().any(|a| a["role"] == "admin"),
            "no admin left: {body}"
        );
        // Make both admins again for the next round.
        for (who, token) in [(second, &t.admin_token), (t.admin_id, &second_token)] {
            set_role(&app, host, who, token, "admin").await;
        }
    }
}

async fn set_role(
    app: &TestApp,
    host: Option<&str>,
    who: i64,
    token: &str,
    role: &str,
) -> reqwest::Response {
    app.call(
        Method::PATCH,
        host,
        &format!("/api/v1/agents/{who}"),
        Some(token),
        Some(json!({"role": role})),
    )
    .await
}

async fn login_refuses_wrong_credentials(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("login").await;
    for (email, password) in [
        (t.admin_email.as_str(), "wrong-password"),
        ("nobody@example.com", "whatever-pw"),
    ] {
        assert_error(
            app.call(
                Method::POST,
                Some(&t.domain),
                "/api/v1/auth/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await,
            StatusCode::UNAUTHORIZED,
            "invalid_credentials",
        )
        .await;
    }
    // Email is case-insensitive.
    app.login(&t.domain, &t.admin_email.to_uppercase(), &t.admin_password)
        .await;
}

/// Concurrent writers on one tenant (SQLite's single write lock) all succeed.
async fn concurrent_agent_creation(backend: Backend) {
    let app = spawn_app(backend).await;
    let t = app.create_tenant("many").await;
    let mut tasks = Vec::new();
    for i in 0..12 {
        let (client, url, domain, token) = (
            app.client.clone(),
            app.url("/api/v1/agents"),
            t.domain.clone(),
            t.admin_token.clone(),
        );
        tasks.push(actix_web::rt::spawn(async move {
            client
                .post(url)
                .header("Host", domain)
                .bearer_auth(token)
                .json(&json!({"email": format!("a{i}@example.com"), "name": "A", "password": "password-123"}))
                .send()
                .await
                .unwrap()
                .status()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::CREATED);
    }
}

on_both!(
    concurrent_agent_creation,
    admin_manages_agents_and_teams,
    roles_are_enforced,
    the_last_admin_stays,
    login_refuses_wrong_credentials,
);
