//! The one JSON error shape of contract §2, and the one place where errors get a status.

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::accounts::AccountsError;
use crate::storage::StorageError;
use crate::tenancy::TenancyError;

/// Every error an HTTP handler can answer with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("authentication required: send Authorization: Bearer <token>")]
    Unauthenticated,
    #[error("the token is invalid, expired, or was issued for another tenant")]
    InvalidToken,
    #[error("the platform key is wrong")]
    InvalidPlatformKey,
    #[error("wrong email or password")]
    InvalidCredentials,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    #[error("the body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    #[error("send the body as application/json")]
    UnsupportedMediaType,
    #[error("{field}: {reason}")]
    Validation { field: String, reason: String },
    #[error("{0}")]
    Unavailable(String),
    /// Over a rate limit: nothing was done; the client may retry after the delay.
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
    },
    /// The tenant's compartment for this dependency is full (bulkhead): refused at once.
    #[error("{0}")]
    Overloaded(String),
    /// The dependency's circuit breaker is open: refused at once, retry after the delay.
    #[error("{message}")]
    CircuitOpen {
        message: String,
        retry_after_secs: u64,
    },
    #[error("internal error")]
    Internal(String),
    #[error(transparent)]
    Tenancy(#[from] TenancyError),
    #[error(transparent)]
    Accounts(#[from] AccountsError),
}

/// Marks a response that failed because the tenant's storage did (the tenant database's
/// circuit breaker counts it).
pub struct StorageFailed;

impl From<crate::governance::BreakerOpen> for ApiError {
    fn from(e: crate::governance::BreakerOpen) -> Self {
        Self::CircuitOpen {
            message: e.to_string(),
            retry_after_secs: e.retry_after_secs,
        }
    }
}

impl From<crate::governance::Full> for ApiError {
    fn from(e: crate::governance::Full) -> Self {
        Self::Overloaded(e.to_string())
    }
}

impl ApiError {
    /// Did storage fail (rather than the request being refused)?
    fn is_storage_failure(&self) -> bool {
        matches!(
            self,
            Self::Tenancy(TenancyError::Storage(_))
                | Self::Tenancy(TenancyError::Accounts(AccountsError::Db(_)))
                | Self::Accounts(AccountsError::Db(_))
        )
    }

    pub fn validation(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Validation {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Status, code and message: the whole mapping lives here.
    fn parts(&self) -> (StatusCode, &'static str, String) {
        use StatusCode as S;
        let msg = self.to_string();
        match self {
            Self::MalformedJson(_) => (S::BAD_REQUEST, "malformed_json", msg),
            Self::BadRequest(_) => (S::BAD_REQUEST, "bad_request", msg),
            Self::Unauthenticated => (S::UNAUTHORIZED, "unauthenticated", msg),
            Self::InvalidToken => (S::UNAUTHORIZED, "invalid_token", msg),
            Self::InvalidPlatformKey => (S::UNAUTHORIZED, "invalid_platform_key", msg),
            Self::InvalidCredentials => (S::UNAUTHORIZED, "invalid_credentials", msg),
            Self::Forbidden(_) => (S::FORBIDDEN, "forbidden", msg),
            Self::NotFound(_) => (S::NOT_FOUND, "not_found", msg),
            Self::MethodNotAllowed => (S::METHOD_NOT_ALLOWED, "method_not_allowed", msg),
            Self::Conflict { code, .. } => (S::CONFLICT, code, msg),
            Self::PayloadTooLarge(_) => (S::PAYLOAD_TOO_LARGE, "payload_too_large", msg),
            Self::UnsupportedMediaType => {
                (S::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", msg)
            }
            Self::Validation { .. } => (S::UNPROCESSABLE_ENTITY, "validation_failed", msg),
            Self::Unavailable(_) => (S::SERVICE_UNAVAILABLE, "dependency_unavailable", msg),
            Self::RateLimited { .. } => (S::TOO_MANY_REQUESTS, "rate_limited", msg),
            Self::Overloaded(_) => (S::SERVICE_UNAVAILABLE, "overloaded", msg),
            Self::CircuitOpen { .. } => (S::SERVICE_UNAVAILABLE, "dependency_unavailable", msg),
            Self::Internal(_) => (S::INTERNAL_SERVER_ERROR, "internal", msg),
            Self::Tenancy(e) => match e {
                TenancyError::UnknownTenant => (S::NOT_FOUND, "unknown_tenant", msg),
                TenancyError::Suspended => (S::FORBIDDEN, "tenant_suspended", msg),
                TenancyError::NotFound => (S::NOT_FOUND, "not_found", msg),
                TenancyError::SlugTaken(_) => (S::CONFLICT, "slug_taken", msg),
                TenancyError::DomainTaken(_) => (S::CONFLICT, "domain_taken", msg),
                TenancyError::DomainNotFound(_) => (S::NOT_FOUND, "not_found", msg),
                TenancyError::LastDomain => (S::CONFLICT, "last_domain", msg),
                TenancyError::Storage(e) => storage_parts(e),
                TenancyError::Accounts(e) => accounts_parts(e, msg),
            },
            Self::Accounts(e) => accounts_parts(e, msg),
        }
    }
}

fn accounts_parts(e: &AccountsError, msg: String) -> (StatusCode, &'static str, String) {
    use StatusCode as S;
    match e {
        AccountsError::Invalid { field, reason } => (
            S::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!("{field}: {reason}"),
        ),
        AccountsError::UnknownTeam(t) => (
            S::UNPROCESSABLE_ENTITY,
            "validation_failed",
            format!("teams: no such team {t:?}"),
        ),
        AccountsError::EmailTaken => (S::CONFLICT, "email_taken", msg),
        AccountsError::TeamTaken => (S::CONFLICT, "team_taken", msg),
        AccountsError::AgentNotFound => (S::NOT_FOUND, "not_found", msg),
        AccountsError::LastAdmin => (S::CONFLICT, "last_admin", msg),
        AccountsError::Db(e) => storage_parts(&StorageError::Db(e.clone())),
        AccountsError::Hash(_) => (
            S::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error".into(),
        ),
    }
}

fn storage_parts(e: &StorageError) -> (StatusCode, &'static str, String) {
    match e {
        StorageError::Db(sea_orm::DbErr::Conn(_) | sea_orm::DbErr::ConnectionAcquire(_)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "dependency_unavailable",
            "storage is unavailable; retry shortly".into(),
        ),
        StorageError::AlreadyExists(name) => (
            StatusCode::CONFLICT,
            "storage_conflict",
            format!("a database named {name} already exists; remove it or choose another slug"),
        ),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error".into(),
        ),
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.parts().0
    }

    fn error_response(&self) -> HttpResponse {
        let (status, code, message) = self.parts();
        if status.is_server_error() {
            tracing::error!(error = ?self, code, "request failed");
        } else {
            tracing::debug!(code, %message, "request refused");
        }
        let mut res = HttpResponse::build(status);
        if status == StatusCode::UNAUTHORIZED {
            res.insert_header((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
        }
        match self {
            Self::RateLimited {
                retry_after_secs, ..
            }
            | Self::CircuitOpen {
                retry_after_secs, ..
            } => {
                res.insert_header((header::RETRY_AFTER, retry_after_secs.to_string()));
            }
            Self::Overloaded(_) => {
                res.insert_header((header::RETRY_AFTER, "1"));
            }
            _ => {}
        }
        let mut res = res.json(error_body(code, &message));
        if self.is_storage_failure() {
            res.extensions_mut().insert(StorageFailed);
        }
        res
    }
}

/// `{"error": {"code", "message"}}`.
pub fn error_body(code: &str, message: &str) -> serde_json::Value {
    json!({"error": {"code": code, "message": message}})
}
