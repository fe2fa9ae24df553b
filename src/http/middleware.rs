//! Request ids, the per-request span, and the guarantee that every error leaves in the
//! contract's JSON shape (even the ones actix-web produces itself, such as a 405).

use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{Error, HttpMessage, HttpResponse};
use tracing::Instrument;

use super::error::{StorageFailed, error_body};
use crate::tenancy::extract::TenantCall;
use crate::trace_context::TraceContext;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A caller's request id longer than this is replaced: it ends up in every log line.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The request id of the request being handled, for handlers that pass it on.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Takes the caller's `X-Request-Id` (or makes one), opens the `http` span that every log line
/// of this request is written in, and echoes the id on the response.
pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, Error> {
    let id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= MAX_REQUEST_ID_LEN
                && v.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_owned)
        // A v4 UUID from the thread's generator: `Uuid::new_v4` asks the kernel for its bytes
        // (a `getrandom` call per request, every long-poll and every socket's upgrade).
        .unwrap_or_else(|| {
            uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .simple()
                .to_string()
        });
    // The caller's trace, continued with a span of our own, or a new trace: every request
    // has one, so its log lines (and what it causes on other nodes) can be found together.
    let caller = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse);
    let trace = caller
        .as_ref()
        .map_or_else(TraceContext::root, TraceContext::child);
    let trace_id = trace.trace_id.clone();
    let span = tracing::info_span!(
        "http",
        request_id = %id,
        trace_id = %trace_id,
        tenant = tracing::field::Empty,
    );
    // Exported spans (the `otlp` feature) join the same trace the log lines name.
    #[cfg(feature = "otlp")]
    crate::telemetry::join_trace(&span, caller.as_ref().unwrap_or(&trace));
    req.extensions_mut().insert(RequestId(id.clone()));
    req.extensions_mut().insert(trace);
    let method = req.method().clone();
    let path = req.path().to_owned();
    let started = Instant::now();
    let res = next.call(req).instrument(span.clone()).await?;
    // The tenant's database breaker learns how the request went (a server error counts as a
    // failure of the dependency), and the request leaves the tenant's bulkhead.
    let call = res.request().extensions_mut().remove::<TenantCall>();
    if let Some(call) = call {
        let failed = res.response().extensions().contains::<StorageFailed>();
        call.breaker.record(!failed);
    }
    let mut res = ensure_json_error(res.map_into_boxed_body());
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert(REQUEST_ID, v);
    }
    let status = res.status().as_u16();
    span.in_scope(|| {
        tracing::info!(
            %method,
            %path,
            status,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "request"
        )
    });
    Ok(res)
}

/// Rewrites an error response that is not JSON (actix-web's own 404/405/400) into the
/// contract's shape, keeping status and headers.
fn ensure_json_error(res: ServiceResponse<BoxBody>) -> ServiceResponse<BoxBody> {
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let code = match status.as_u16() {
        400 => "bad_request",
        404 => "not_found",
        405 => "method_not_allowed",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        s if s >= 500 => "internal",
        _ => "bad_request",
    };
    let message = status.canonical_reason().unwrap_or("error").to_owned();
    let (req, old) = res.into_parts();
    let mut new = HttpResponse::build(status).json(error_body(code, &message));
    for (name, value) in old.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            new.headers_mut().insert(name.clone(), value.clone());
        }
    }
    ServiceResponse::new(req, new)
}
