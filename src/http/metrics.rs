//! `GET /metrics`: Prometheus text (OpenMetrics) for this node.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, HttpResponse, web};

use super::ApiError;
use super::auth::Operator;
use crate::metrics::{self, numbers};
use crate::startup::AppState;
use crate::tenancy::TenantStatus;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answered on any host. Needs the platform key as a bearer token unless
/// `KEFU_METRICS__PUBLIC` is set. Tenant numbers come from the tenants whose queue runs on
/// this node, so a cluster's nodes add up without counting anything twice.
pub async fn metrics(
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    if !state.settings.metrics.public {
        Operator::extract(&req).await?;
    }
    let mut tenants = Vec::new();
    for record in state.tenants.all_records().await? {
        if record.status != TenantStatus::Active
            || state.realtime.queue_if_running(record.id).is_none()
        {
            continue;
        }
        match numbers::of_tenant(&state, &Arc::new(record), false).await {
            Ok(n) => tenants.push(n),
            // One tenant's storage failing must not blank every other tenant's numbers.
            Err(e) => tracing::warn!(error = %e, "tenant numbers unavailable for /metrics"),
        }
    }
    let text = metrics::render(&tenants, state.realtime.governance());
    // Prometheus asks for OpenMetrics; everything else gets the classic text format.
    let wants_openmetrics = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    Ok(if wants_openmetrics {
        HttpResponse::Ok().content_type(OPENMETRICS).body(text)
    } else {
        HttpResponse::Ok()
            .content_type(CLASSIC)
            .body(metrics::to_classic_text(&text))
    })
}
