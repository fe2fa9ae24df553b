//! The live dashboards: `/dashboard` for a tenant's supervisors and admins, and
//! `/platform/dashboard` for operators. The pages are embedded in the binary and read the
//! numbers as server-sent events from the stream endpoints, pushed every
//! `KEFU_DASHBOARD__PUSH_SECS`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::{HttpResponse, web};
use serde_json::{Value, json};

use super::ApiError;
use super::auth::{AuthAgent, Operator};
use crate::metrics::{self, ConnKind, numbers};
use crate::startup::AppState;
use crate::tenancy::TenantStatus;

/// Seconds between two pushes of the operator's table: every tenant's numbers are read from
/// its database each time, so this stays at the slowest refresh the dashboards promise.
const PLATFORM_PUSH_SECS: u64 = 5;

/// `GET /dashboard`: the supervisor page (it logs in with the tenant's login API).
pub async fn tenant_page() -> HttpResponse {
    html(include_str!("dashboard/tenant.html"))
}

/// `GET /platform/dashboard`: the operator page (it asks for the platform key).
pub async fn platform_page() -> HttpResponse {
    html(include_str!("dashboard/platform.html"))
}

fn html(page: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header(("cache-control", "no-cache"))
        .body(page)
}

/// `GET /dashboard/stream` (supervisors and admins): the tenant's numbers, as events.
pub async fn tenant_stream(
    state: web::Data<AppState>,
    agent: AuthAgent,
) -> Result<HttpResponse, ApiError> {
    agent.require_oversight()?;
    let tenant = agent.tenant.record;
    let st = state.clone();
    let mut first = true;
    let every = Duration::from_secs(state.settings.dashboard.push_secs);
    Ok(events(&state, every, move || {
        let (state, tenant) = (st.clone(), tenant.clone());
        // The first event carries the last minutes, so the charts start filled.
        let history = std::mem::take(&mut first).then(|| state.history.of(tenant.id));
        async move {
            // Starting the queue here makes presence known even before anything happened.
            match numbers::of_tenant(&state, &tenant, true).await {
                Ok(n) => {
                    let mut v = serde_json::to_value(n).unwrap_or(Value::Null);
                    if let Some(h) = history {
                        v["history"] = json!(h);
                    }
                    v
                }
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard numbers unavailable");
                    json!({"error": "the numbers are unavailable right now"})
                }
            }
        }
    }))
}

/// `GET /platform/v1/dashboard/stream` (platform key): every active tenant, as events.
pub async fn platform_stream(
    _: Operator,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let st = state.clone();
    let every = Duration::from_secs(PLATFORM_PUSH_SECS);
    Ok(events(&state, every, move || {
        let state = st.clone();
        async move {
            let records = match state.tenants.all_records().await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "tenant list unavailable");
                    return json!({"error": "the tenant list is unavailable right now"});
                }
            };
            let mut tenants = Vec::new();
            for record in records {
                if record.status != TenantStatus::Active {
                    continue;
                }
                let slug = record.slug.clone();
                match numbers::of_tenant(&state, &Arc::new(record), false).await {
                    Ok(n) => tenants.push(serde_json::to_value(n).unwrap_or(Value::Null)),
                    Err(e) => {
                        tracing::warn!(error = %e, tenant = %slug, "tenant numbers unavailable");
                        tenants.push(json!({"tenant": slug, "error": "unavailable"}));
                    }
                }
            }
            json!({"at": chrono::Utc::now(), "tenants": tenants})
        }
    }))
}

/// A `text/event-stream` answer: `next()` now, then every `every`, until the client goes away
/// or the server stops.
fn events<F, Fut>(state: &AppState, every: Duration, next: F) -> HttpResponse
where
    F: FnMut() -> Fut + 'static,
    Fut: Future<Output = Value> + 'static,
{
    let shutdown = state.realtime.shutdown_token();
    let open = metrics::global().connection(ConnKind::Dashboard);
    let ticker = tokio::time::interval(every);
    let stream = futures_util::stream::unfold(
        (next, ticker, open, shutdown),
        |(mut next, mut ticker, open, shutdown)| async move {
            tokio::select! {
                _ = shutdown.cancelled() => None,
                _ = ticker.tick() => {
                    let event = Bytes::from(format!("data: {}\n\n", next().await));
                    Some((Ok::<_, actix_web::Error>(event), (next, ticker, open, shutdown)))
                }
            }
        },
    );
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("cache-control", "no-cache"))
        .streaming(Box::pin(stream))
}
