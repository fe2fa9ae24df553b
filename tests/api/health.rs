use reqwest::{Method, StatusCode};

use crate::helpers::{Api, Backend, assert_error, spawn_app};
use crate::on_both;

async fn health_and_readiness_answer_on_any_host(backend: Backend) {
    let app = spawn_app(backend).await;
    for path in ["/healthz", "/readyz"] {
        let res = app
            .call(Method::GET, Some("anything.example"), path, None, None)
            .await;
        assert_eq!(res.status(), StatusCode::OK, "{path}");
    }
}

async fn request_ids_are_echoed_or_made(backend: Backend) {
    let app = spawn_app(backend).await;
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "my-id-123")
        .send()
        .await
        .unwrap();
    assert_eq!(res.headers()["x-request-id"], "my-id-123");
    let res = app.client.get(app.url("/healthz")).send().await.unwrap();
    let made = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    assert!(made.len() >= 16);
    // An id that cannot be a header value in logs is replaced, not echoed.
    let res = app
        .client
        .get(app.url("/healthz"))
        .header("X-Request-Id", "x".repeat(500))
        .send()
        .await
        .unwrap();
    assert_ne!(res.headers()["x-request-id"], "x".repeat(500).as_str());
}

async fn unknown_routes_and_methods_get_the_json_error_shape(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_error(
        app.call(Method::GET, None, "/nope", None, None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_error(
        app.call(Method::PUT, None, "/platform/v1/tenants", None, None)
            .await,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
}

async fn the_demo_page_is_served(backend: Backend) {
    let app = spawn_app(backend).await;
    let res = app
        .call(Method::GET, Some("demo.localhost"), "/demo", None, None)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = res.text().await.unwrap();
    assert!(page.contains("/ws/visitor") && page.contains("/api/v1/visitor/sessions"));
}

on_both!(
    the_demo_page_is_served,
    health_and_readiness_answer_on_any_host,
    request_ids_are_echoed_or_made,
    unknown_routes_and_methods_get_the_json_error_shape,
);
