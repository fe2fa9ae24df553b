//! Who is calling: the platform operator (bearer platform key) or a tenant's agent (bearer
//! agent token issued on that tenant's domain), and the login that issues agent tokens.

use actix_web::dev::Payload;
use actix_web::{FromRequest, HttpRequest, HttpResponse, http::header, web};
use futures_util::future::LocalBoxFuture;
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::{ApiError, JsonBody};
use crate::accounts::{self, Role, TokenKind, agents};
use crate::startup::AppState;
use crate::tenancy::Tenant;

/// The bearer credential of a request, if any.
pub fn bearer(req: &HttpRequest) -> Option<String> {
    req.headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

fn state(req: &HttpRequest) -> Result<web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal("application state missing".into()))
}

/// Resolves the request's tenant and checks that `token` is a valid token of `kind` issued
/// for that tenant; returns the tenant and the token's subject id. The signature only: the
/// caller must still find the agent or visitor in storage (the extractors below do; the
/// WebSocket upgrades do it in the query that also reads the `hello` snapshot).
pub async fn verified(
    state: &AppState,
    req: &HttpRequest,
    token: Option<String>,
    kind: TokenKind,
) -> Result<(Tenant, i64), ApiError> {
    let tenant = Tenant::of(state, req).await?;
    let token = token.ok_or(ApiError::Unauthenticated)?;
    let claims = state.tokens.verify(&token).ok_or(ApiError::InvalidToken)?;
    if claims.tid != tenant.record.id {
        return Err(ApiError::InvalidToken);
    }
    let id = claims.subject(kind).ok_or(ApiError::InvalidToken)?;
    Ok((tenant, id))
}

/// Proof that the caller holds the platform key.
pub struct Operator;

impl FromRequest for Operator {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        std::future::ready((|| {
            let state = state(req)?;
            let given = bearer(req).ok_or(ApiError::Unauthenticated)?;
            // Constant-time, so the key cannot be guessed byte by byte from response times.
            if bool::from(given.as_bytes().ct_eq(state.platform_key.as_bytes())) {
                Ok(Operator)
            } else {
                Err(ApiError::InvalidPlatformKey)
            }
        })())
    }
}

/// A signed-in agent of the request's tenant, with that tenant's database.
pub struct AuthAgent {
    pub tenant: Tenant,
    pub id: i64,
    pub name: String,
    /// Read from storage on every request, so a demotion takes effect at once.
    pub role: Role,
}

impl AuthAgent {
    /// Resolves the tenant, then checks that `token` was issued for it to an agent that
    /// still exists.
    async fn from_token(
        state: &AppState,
        req: &HttpRequest,
        token: Option<String>,
    ) -> Result<Self, ApiError> {
        let (tenant, id) = verified(state, req, token, TokenKind::Agent).await?;
        let agent = agents::find(&tenant.db, id)
            .await?
            .ok_or(ApiError::InvalidToken)?;
        Ok(Self {
            role: agents::stored_role(&agent.role),
            name: agent.name,
            id,
            tenant,
        })
    }

    /// Refuses the request unless the agent has `role` (admins pass every check).
    pub fn require(&self, role: Role) -> Result<(), ApiError> {
        if self.role == role || self.role == Role::Admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!("this needs the {role} role")))
        }
    }

    /// Refuses the request unless the agent is a supervisor or an admin.
    pub fn require_oversight(&self) -> Result<(), ApiError> {
        if self.role.oversees() {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "this needs the supervisor or admin role".into(),
            ))
        }
    }
}

impl FromRequest for AuthAgent {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = state(&req)?;
            AuthAgent::from_token(&state, &req, bearer(&req)).await
        })
    }
}

/// A visitor of the request's tenant, identified by its visitor token.
pub struct AuthVisitor {
    pub tenant: Tenant,
    pub id: i64,
}

impl AuthVisitor {
    async fn from_token(
        state: &AppState,
        req: &HttpRequest,
        token: Option<String>,
    ) -> Result<Self, ApiError> {
        let (tenant, id) = verified(state, req, token, TokenKind::Visitor).await?;
        crate::conversations::store::find_visitor(&tenant.db, id)
            .await
            .map_err(|e| ApiError::Tenancy(e.into()))?
            .ok_or(ApiError::InvalidToken)?;
        Ok(Self { tenant, id })
    }
}

impl FromRequest for AuthVisitor {
    type Error = ApiError;
    type Future = LocalBoxFuture<'static, Result<Self, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = state(&req)?;
            AuthVisitor::from_token(&state, &req, bearer(&req)).await
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginBody {
    email: String,
    password: String,
}

/// `POST /api/v1/auth/login`
pub async fn login(
    req: HttpRequest,
    state: web::Data<AppState>,
    tenant: Tenant,
    JsonBody(body): JsonBody<LoginBody>,
) -> Result<HttpResponse, ApiError> {
    let email = body.email.trim().to_lowercase();
    // Counted before the password is checked: guessing costs attempts whether right or wrong.
    let ip = state.limits.client_ip(&req);
    state.limits.login(&tenant.record, &email, ip)?;
    let agent = agents::find_by_email(&tenant.db, &email).await?;
    let stored = agent.as_ref().map(|a| a.password_hash.clone());
    if !accounts::password::verify(body.password, stored).await {
        tracing::info!(%email, "login refused");
        return Err(ApiError::InvalidCredentials);
    }
    // verify() is true only when an account was found.
    let Some(agent) = agent else {
        return Err(ApiError::InvalidCredentials);
    };
    let role = agents::stored_role(&agent.role);
    let token = state.tokens.issue(tenant.record.id, agent.id, role);
    tracing::info!(agent_id = agent.id, "agent logged in");
    Ok(HttpResponse::Ok().json(json!({
        "token": token,
        "agent": {"id": agent.id, "email": agent.email, "name": agent.name, "role": role},
    })))
}

/// `GET /api/v1/me`: the signed-in agent.
pub async fn me(agent: AuthAgent) -> Result<HttpResponse, ApiError> {
    let view = agents::get(&agent.tenant.db, agent.id).await?;
    Ok(HttpResponse::Ok().json(view))
}
