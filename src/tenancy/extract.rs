//! The [`Tenant`] extractor: the one place where a request is bound to a tenant's database.

use std::sync::Arc;

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, http::header, web};
use futures_util::future::LocalBoxFuture;
use sea_orm::DatabaseConnection;

use super::{DomainName, TenancyError, TenantRecord, TenantStatus};
use crate::http::ApiError;
use crate::startup::AppState;

/// The tenant a request is for, with a connection to its own database. Handlers that take a
/// `Tenant` cannot reach any other tenant's data: they are never given another connection.
pub struct Tenant {
    pub record: Arc<TenantRecord>,
    pub db: DatabaseConnection,
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
        let db = state
            .tenants
            .storage()
            .tenant(&record.db_name)
            .await
            .map_err(TenancyError::from)?;
        Ok(Self { record, db })
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
