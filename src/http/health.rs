//! Liveness, readiness and the demo page, answered on any host.

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::ApiError;
use crate::governance::breaker::BreakerState;
use crate::startup::AppState;

/// `GET /healthz`: the process is up.
pub async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": "ok", "node": state.settings.node_id}))
}

/// `GET /readyz`: storage answers (and, in cluster mode, the bus).
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state
        .tenants
        .storage()
        .ping()
        .await
        .map_err(|e| ApiError::Unavailable(format!("platform storage: {e}")))?;
    let cluster = match state.realtime.cluster() {
        None => serde_json::Value::Null,
        Some(c) => {
            if !c.connected() {
                return Err(ApiError::Unavailable(
                    "the cluster bus (NATS) is not connected".into(),
                ));
            }
            json!({"queues_held": c.leases().held().len(), "subscriptions": c.listening()})
        }
    };
    Ok(HttpResponse::Ok().json(json!({
        "status": "ready",
        "node": state.settings.node_id,
        "open_tenant_pools": state.tenants.storage().open_tenant_pools(),
        "cluster": cluster,
        // Breakers not closed (a tenant's failing database does not make the node unready).
        "breakers": state
            .realtime
            .governance()
            .breakers
            .views()
            .into_iter()
            .filter(|b| b.state != BreakerState::Closed)
            .collect::<Vec<_>>(),
    })))
}

/// `GET /demo`: a one-page visitor and agent console for trying Kefu in a browser (the
/// `--demo` tenant). The page is embedded in the binary and uses only the public API.
pub async fn demo_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(include_str!("demo.html"))
}
