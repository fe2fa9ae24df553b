//! Operator API (contract §3): open, list, suspend and resume tenants, bind domains.

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::auth::Operator;
use super::{ApiError, JsonBody};
use crate::startup::AppState;
use crate::tenancy::{DomainName, NewAdmin, NewTenant, TenantSlug, TenantStatus};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTenantBody {
    slug: String,
    name: String,
    domains: Vec<String>,
    admin: AdminBody,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminBody {
    email: String,
    password: String,
    name: Option<String>,
}

/// Most domains one request may bind; a sanity limit against hostile bodies.
const MAX_DOMAINS_PER_TENANT: usize = 32;

impl CreateTenantBody {
    /// Turns the body into a [`NewTenant`], naming the first field that is wrong.
    pub fn parse(self) -> Result<NewTenant, ApiError> {
        let slug = TenantSlug::parse(&self.slug).map_err(|r| ApiError::validation("slug", r))?;
        if self.domains.is_empty() || self.domains.len() > MAX_DOMAINS_PER_TENANT {
            return Err(ApiError::validation(
                "domains",
                format!("give 1 to {MAX_DOMAINS_PER_TENANT} domains"),
            ));
        }
        let mut domains = Vec::with_capacity(self.domains.len());
        for d in &self.domains {
            let d = DomainName::parse(d).map_err(|r| ApiError::validation("domains", r))?;
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
        let admin_name = self.admin.name.unwrap_or_else(|| "Admin".to_owned());
        Ok(NewTenant {
            slug,
            name: self.name,
            domains,
            admin: NewAdmin {
                email: self.admin.email,
                password: self.admin.password,
                name: admin_name,
            },
        })
    }
}

/// `POST /platform/v1/tenants`
pub async fn create_tenant(
    _: Operator,
    state: web::Data<AppState>,
    JsonBody(body): JsonBody<CreateTenantBody>,
) -> Result<HttpResponse, ApiError> {
    let created = state.tenants.create(body.parse()?).await?;
    Ok(HttpResponse::Created().json(created))
}

/// `GET /platform/v1/tenants`
pub async fn list_tenants(
    _: Operator,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(serde_json::json!({"tenants": state.tenants.list().await?})))
}

/// `GET /platform/v1/tenants/{slug}`
pub async fn get_tenant(
    _: Operator,
    state: web::Data<AppState>,
    slug: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(state.tenants.get(&slug).await?))
}

/// `POST /platform/v1/tenants/{slug}/suspend`
pub async fn suspend_tenant(
    _: Operator,
    state: web::Data<AppState>,
    slug: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let view = state
        .tenants
        .set_status(&slug, TenantStatus::Suspended)
        .await?;
    // This node's sockets close now; other nodes' within their next tenant check.
    state
        .realtime
        .kill_tenant(view.id, crate::actors::conn::Kill::Suspended);
    Ok(HttpResponse::Ok().json(view))
}

/// `POST /platform/v1/tenants/{slug}/resume`
pub async fn resume_tenant(
    _: Operator,
    state: web::Data<AppState>,
    slug: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(
        state
            .tenants
            .set_status(&slug, TenantStatus::Active)
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainBody {
    domain: String,
}

/// `POST /platform/v1/tenants/{slug}/domains`
pub async fn add_domain(
    _: Operator,
    state: web::Data<AppState>,
    slug: web::Path<String>,
    JsonBody(body): JsonBody<DomainBody>,
) -> Result<HttpResponse, ApiError> {
    let domain = DomainName::parse(&body.domain).map_err(|r| ApiError::validation("domain", r))?;
    Ok(HttpResponse::Created().json(state.tenants.add_domain(&slug, &domain).await?))
}

/// `DELETE /platform/v1/tenants/{slug}/domains/{domain}`
pub async fn remove_domain(
    _: Operator,
    state: web::Data<AppState>,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, ApiError> {
    let (slug, domain) = path.into_inner();
    let domain = DomainName::parse(&domain).map_err(|r| ApiError::validation("domain", r))?;
    state.tenants.remove_domain(&slug, &domain).await?;
    Ok(HttpResponse::NoContent().finish())
}
