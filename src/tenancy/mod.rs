//! Tenancy: which tenant a request belongs to, and everything operators do to tenants.
//!
//! A tenant is found by the request's `Host` (contract §2). Resolution goes through an
//! in-memory cache keyed by domain; entries are replaced whenever this process changes a
//! tenant or its domains, and re-read after [`CACHE_TTL`] so that changes made by another
//! process (the `kefu tenant` command, another node) are seen soon after.
//!
//! Handlers receive their tenant's database through the [`Tenant`] extractor and never choose
//! a database themselves.

pub mod extract;
pub mod names;
mod onboarding;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use entity::platform::{tenant, tenant_domain};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter,
    QueryOrder, Set, SqlErr,
};
use serde::Serialize;

use crate::accounts::AccountsError;
use crate::storage::{Storage, StorageError};
pub use extract::Tenant;
pub use names::{DomainName, TenantSlug};
pub use onboarding::{CreatedTenant, NewAdmin, NewTenant};

/// How long a cached host → tenant entry is trusted before it is read again. Bounds how long
/// a suspension made by another process takes to bite.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// Lifecycle of a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantStatus {
    /// Onboarding is under way; invisible to every route until it finishes.
    Provisioning,
    Active,
    /// Kept with all data, but every tenant route answers 403 `tenant_suspended`.
    Suspended,
}

impl TenantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Provisioning => "provisioning",
            Self::Active => "active",
            Self::Suspended => "suspended",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "active" => Self::Active,
            "suspended" => Self::Suspended,
            // Anything unexpected is treated as not ready, never as active.
            _ => Self::Provisioning,
        }
    }
}

/// What request handling needs to know about a tenant.
#[derive(Clone, Debug)]
pub struct TenantRecord {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub status: TenantStatus,
    /// Name of the tenant's own database (see [`Storage::tenant`]).
    pub db_name: String,
}

impl From<tenant::Model> for TenantRecord {
    fn from(m: tenant::Model) -> Self {
        Self {
            id: m.id,
            status: TenantStatus::parse(&m.status),
            slug: m.slug,
            name: m.name,
            db_name: m.db_name,
        }
    }
}

/// A tenant as the platform API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct TenantView {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub status: TenantStatus,
    pub domains: Vec<String>,
    pub created_at: DateTime<Utc>,
}

/// Errors of the tenancy boundary; [`crate::http::ApiError`] maps them to statuses.
#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    #[error("no tenant is bound to this host")]
    UnknownTenant,
    #[error("this tenant is suspended")]
    Suspended,
    #[error("no tenant with this slug")]
    NotFound,
    #[error("slug {0} is taken")]
    SlugTaken(String),
    #[error("domain {0} is bound to a tenant already")]
    DomainTaken(String),
    #[error("domain {0} is not bound to this tenant")]
    DomainNotFound(String),
    #[error("a tenant keeps at least one domain")]
    LastDomain,
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Accounts(#[from] AccountsError),
}

impl From<sea_orm::DbErr> for TenancyError {
    fn from(e: sea_orm::DbErr) -> Self {
        Self::Storage(StorageError::Db(e))
    }
}

/// The tenant directory: resolution with its cache, and the operator's changes.
#[derive(Clone)]
pub struct Tenants {
    storage: Storage,
    /// domain → tenant, with the moment it was read.
    by_domain: Arc<DashMap<String, (Arc<TenantRecord>, Instant)>>,
}

impl Tenants {
    pub fn new(storage: Storage) -> Self {
        Self {
            storage,
            by_domain: Arc::new(DashMap::new()),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Finds the tenant bound to `domain`, whatever its status (the caller decides what a
    /// suspended tenant may do). Tenants still provisioning are not found.
    pub async fn resolve(&self, domain: &DomainName) -> Result<Arc<TenantRecord>, TenancyError> {
        if let Some(entry) = self.by_domain.get(domain.as_str())
            && entry.1.elapsed() < CACHE_TTL
        {
            return Ok(entry.0.clone());
        }
        let platform = self.storage.platform();
        let Some(binding) = tenant_domain::Entity::find_by_id(domain.as_str().to_owned())
            .one(platform)
            .await?
        else {
            self.by_domain.remove(domain.as_str());
            return Err(TenancyError::UnknownTenant);
        };
        let record = tenant::Entity::find_by_id(binding.tenant_id)
            .one(platform)
            .await?
            .map(TenantRecord::from)
            .filter(|t| t.status != TenantStatus::Provisioning)
            .ok_or(TenancyError::UnknownTenant)?;
        let record = Arc::new(record);
        self.by_domain
            .insert(domain.as_str().to_owned(), (record.clone(), Instant::now()));
        Ok(record)
    }

    /// Drops every cached entry of a tenant, so the next request reads it afresh.
    fn forget(&self, tenant_id: i64) {
        self.by_domain.retain(|_, (t, _)| t.id != tenant_id);
    }

    pub async fn list(&self) -> Result<Vec<TenantView>, TenancyError> {
        let platform = self.storage.platform();
        let tenants = tenant::Entity::find()
            .filter(tenant::Column::Status.ne(TenantStatus::Provisioning.as_str()))
            .order_by_asc(tenant::Column::Id)
            .all(platform)
            .await?;
        let domains = tenant_domain::Entity::find()
            .order_by_asc(tenant_domain::Column::Domain)
            .all(platform)
            .await?;
        Ok(tenants
            .into_iter()
            .map(|t| {
                let mine = domains
                    .iter()
                    .filter(|d| d.tenant_id == t.id)
                    .map(|d| d.domain.clone())
                    .collect();
                view(t, mine)
            })
            .collect())
    }

    pub async fn get(&self, slug: &str) -> Result<TenantView, TenancyError> {
        let t = self.find_model(slug).await?;
        let domains = self.domains_of(t.id).await?;
        Ok(view(t, domains))
    }

    /// Every tenant that has finished onboarding (for migrations at start-up).
    pub async fn all_records(&self) -> Result<Vec<TenantRecord>, TenancyError> {
        Ok(tenant::Entity::find()
            .filter(tenant::Column::Status.ne(TenantStatus::Provisioning.as_str()))
            .all(self.storage.platform())
            .await?
            .into_iter()
            .map(TenantRecord::from)
            .collect())
    }

    pub async fn set_status(
        &self,
        slug: &str,
        status: TenantStatus,
    ) -> Result<TenantView, TenancyError> {
        let t = self.find_model(slug).await?;
        let mut am = t.into_active_model();
        am.status = Set(status.as_str().to_owned());
        let t = am.update(self.storage.platform()).await?;
        self.forget(t.id);
        tracing::info!(tenant = %t.slug, status = status.as_str(), "tenant status changed");
        let domains = self.domains_of(t.id).await?;
        Ok(view(t, domains))
    }

    pub async fn add_domain(
        &self,
        slug: &str,
        domain: &DomainName,
    ) -> Result<TenantView, TenancyError> {
        let t = self.find_model(slug).await?;
        let platform = self.storage.platform();
        if tenant_domain::Entity::find_by_id(domain.as_str().to_owned())
            .one(platform)
            .await?
            .is_some()
        {
            return Err(TenancyError::DomainTaken(domain.to_string()));
        }
        tenant_domain::ActiveModel {
            domain: Set(domain.as_str().to_owned()),
            tenant_id: Set(t.id),
            created_at: Set(Utc::now()),
        }
        .insert(platform)
        .await
        .map_err(|e| match e.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(_)) => {
                TenancyError::DomainTaken(domain.to_string())
            }
            _ => e.into(),
        })?;
        self.forget(t.id);
        self.get(slug).await
    }

    pub async fn remove_domain(&self, slug: &str, domain: &DomainName) -> Result<(), TenancyError> {
        let t = self.find_model(slug).await?;
        let platform = self.storage.platform();
        let binding = tenant_domain::Entity::find_by_id(domain.as_str().to_owned())
            .one(platform)
            .await?
            .filter(|d| d.tenant_id == t.id)
            .ok_or_else(|| TenancyError::DomainNotFound(domain.to_string()))?;
        let count = tenant_domain::Entity::find()
            .filter(tenant_domain::Column::TenantId.eq(t.id))
            .count(platform)
            .await?;
        if count <= 1 {
            return Err(TenancyError::LastDomain);
        }
        tenant_domain::Entity::delete_by_id(binding.domain)
            .exec(platform)
            .await?;
        self.forget(t.id);
        self.by_domain.remove(domain.as_str());
        Ok(())
    }

    async fn find_model(&self, slug: &str) -> Result<tenant::Model, TenancyError> {
        tenant::Entity::find()
            .filter(tenant::Column::Slug.eq(slug))
            .filter(tenant::Column::Status.ne(TenantStatus::Provisioning.as_str()))
            .one(self.storage.platform())
            .await?
            .ok_or(TenancyError::NotFound)
    }

    async fn domains_of(&self, tenant_id: i64) -> Result<Vec<String>, TenancyError> {
        Ok(tenant_domain::Entity::find()
            .filter(tenant_domain::Column::TenantId.eq(tenant_id))
            .order_by_asc(tenant_domain::Column::Domain)
            .all(self.storage.platform())
            .await?
            .into_iter()
            .map(|d| d.domain)
            .collect())
    }
}

fn view(t: tenant::Model, domains: Vec<String>) -> TenantView {
    TenantView {
        id: t.id,
        status: TenantStatus::parse(&t.status),
        slug: t.slug,
        name: t.name,
        domains,
        created_at: t.created_at,
    }
}
