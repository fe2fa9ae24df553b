//! The [`Tenant`] extractor: the one place where a request is bound to a tenant's database.

use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpMessage, HttpRequest, http::header, web};
use futures_util::future::LocalBoxFuture;
use sea_orm::DatabaseConnection;

use super::{DomainName, TenancyError, TenantRecord, TenantStatus};
use crate::governance::Compartment;
use crate::http::ApiError;
use crate::startup::AppState;
use crate::storage::reader::SqliteReader;

/// The tenant a request is for, with a connection to its own database. Handlers that take a
/// `Tenant` cannot reach any other tenant's data: they are never given another connection.
pub struct Tenant {
    pub record: Arc<TenantRecord>,
    pub db: DatabaseConnection,
    /// The same database's reads on the caller's thread, where the backend has them (SQLite);
    /// for the few hot reads that [`crate::conversations::store`] routes there.
    pub reader: Option<Arc<SqliteReader>>,
}

/// A request's claim on its tenant's database: the breaker that judges the outcome and the
/// request's place in the tenant's bulkhead. Kept in the request's extensions and taken out
/// by the request middleware when the response leaves, which records the outcome and frees
/// the place (also for WebSocket upgrades, whose connection lives on without it).
pub struct TenantCall {
    pub breaker: Arc<crate::governance::breaker::Breaker>,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl TenantCall {
    /// Ends a request's claim early, before a wait that does not use the database (a
    /// long-poll): its place in the bulkhead is free again, and what it did so far went well.
    pub fn leave(req: &HttpRequest) {
        let call = req.extensions_mut().remove::<TenantCall>();
        if let Some(call) = call {
            call.breaker.record(true);
        }
    }
}

impl Tenant {
    /// Resolves the tenant of a request from its `Host` (or, for HTTP/2, its authority).
    pub async fn of(state: &AppState, req: &HttpRequest) -> Result<Self, ApiError> {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_owned)
            .or_else(|| req.uri().authority().map(|a| a.as_str().to_owned()));
        let domain = host
            .as_deref()
            .and_then(DomainName::from_host_header)
            .ok_or(TenancyError::UnknownTenant)?;
        let record = state.tenants.resolve(&domain).await?;
        tracing::Span::current().record("tenant", record.slug.as_str());
        if record.status == TenantStatus::Suspended {
            return Err(TenancyError::Suspended.into());
        }
        // Before anything else happens for the tenant: a refused request changes nothing.
        state.limits.http(&record)?;
        let governance = state.realtime.governance();
        let breaker = governance.breakers.tenant_db(&record.slug);
        // Fail fast while the tenant's database is known to be failing.
        breaker.check()?;
        if !req.extensions().contains::<TenantCall>() {
            let place = governance
                .bulkheads
                .enter(Compartment::TenantDbRequests, record.id)?;
            req.extensions_mut().insert(TenantCall {
                breaker: breaker.clone(),
                _place: place,
            });
        }
        let db = match state.tenants.storage().tenant_db(&record.db_name).await {
            Ok(db) => db,
            Err(e) => {
                breaker.record(false);
                return Err(TenancyError::from(e).into());
            }
        };
        Ok(Self {
            record,
            db: db.conn,
            reader: db.reader,
        })
    }
}

impl FromRequest for Tenant {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = req
                .app_data::<web::Data<AppState>>()
                .cloned()
                .ok_or_else(|| ApiError::Internal("application state missing".into()))?;
            Tenant::of(&state, &req).await
        })
    }
}
