//! Liveness and readiness, answered on any host.

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::ApiError;
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
    Ok(HttpResponse::Ok().json(json!({
        "status": "ready",
        "node": state.settings.node_id,
        "open_tenant_pools": state.tenants.storage().open_tenant_pools(),
    })))
}
