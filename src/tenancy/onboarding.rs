//! One-call onboarding: a tenant's database, schema, domains and first admin exist together or
//! not at all.
//!
//! 1. Claim: one platform transaction inserts the tenant (status `provisioning`) and its
//!    domains. Unique keys make two concurrent onboardings of the same slug or domain exclusive
//!    across every process sharing the platform database, before any database is created.
//! 2. Build: create the tenant database, migrate it, create team `general` and the admin.
//! 3. Activate: flip the status to `active`; only now can a request resolve the tenant.
//!
//! Any failure after the claim drops what was built and deletes the claim. A process that dies
//! midway leaves a `provisioning` row, which [`Tenants::sweep_unfinished`] removes (with its
//! database) at the next start.

use std::time::Duration;

use chrono::Utc;
use entity::platform::{tenant, tenant_domain};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, QueryFilter, Set, SqlErr,
};
use serde::Serialize;

use super::{DomainName, TenancyError, TenantSlug, TenantStatus, TenantView, Tenants};
use crate::accounts::{self, NewAgent, Role, teams};

/// An unfinished onboarding older than this is taken as abandoned by a dead process. Real
/// onboarding takes about a second, so this leaves a wide margin for a slow one in progress.
const ABANDONED_AFTER: Duration = Duration::from_secs(120);

pub struct NewTenant {
    pub slug: TenantSlug,
    pub name: String,
    pub domains: Vec<DomainName>,
    pub admin: NewAdmin,
}

pub struct NewAdmin {
    pub email: String,
    pub password: String,
    pub name: String,
}

#[derive(Debug, Serialize)]
pub struct CreatedTenant {
    #[serde(flatten)]
    pub tenant: TenantView,
    pub admin: CreatedAdmin,
}

#[derive(Debug, Serialize)]
pub struct CreatedAdmin {
    pub id: i64,
    pub email: String,
}

impl Tenants {
    /// Onboards a tenant; see the module documentation for the steps.
    pub async fn create(&self, new: NewTenant) -> Result<CreatedTenant, TenancyError> {
        let name = accounts::parse_name("name", &new.name)?;
        accounts::parse_email("admin.email", &new.admin.email)?;
        accounts::check_password("admin.password", &new.admin.password)?;
        let admin_name = accounts::parse_name("admin.name", &new.admin.name)?;
        let db_name = self.storage.tenant_db_name(new.slug.as_str());

        let claimed = self.claim(&new.slug, &name, &new.domains, &db_name).await?;
        let mut db_created = false;
        let built = async {
            self.storage.create_tenant_db(&db_name).await?;
            db_created = true;
            self.storage.migrate_tenant(&db_name).await?;
            let db = self.storage.tenant(&db_name).await?;
            teams::ensure_general(&db).await?;
            let admin = accounts::agents::create(
                &db,
                NewAgent {
                    email: new.admin.email.clone(),
                    name: admin_name.clone(),
                    password: new.admin.password.clone(),
                    role: Role::Admin,
                    max_concurrent: None,
                    teams: None,
                },
            )
            .await?;
            let mut am = claimed.clone().into_active_model();
            am.status = Set(TenantStatus::Active.as_str().to_owned());
            am.update(self.storage.platform()).await?;
            Ok::<_, TenancyError>(admin)
        }
        .await;

        match built {
            Ok(admin) => {
                tracing::info!(tenant = %new.slug, db = %db_name, "tenant onboarded");
                Ok(CreatedTenant {
                    tenant: self.get(new.slug.as_str()).await?,
                    admin: CreatedAdmin {
                        id: admin.id,
                        email: admin.email,
                    },
                })
            }
            Err(err) => {
                tracing::warn!(tenant = %new.slug, error = %err, "onboarding failed; undoing it");
                // `db_created` stays false when the database already existed: not ours to drop.
                self.undo(&claimed, db_created).await;
                Err(err)
            }
        }
    }

    /// Removes onboardings left unfinished by a process that died midway.
    pub async fn sweep_unfinished(&self) -> Result<usize, TenancyError> {
        let cutoff = Utc::now()
            - chrono::Duration::from_std(ABANDONED_AFTER).unwrap_or(chrono::Duration::zero());
        let stale = tenant::Entity::find()
            .filter(tenant::Column::Status.eq(TenantStatus::Provisioning.as_str()))
            .filter(tenant::Column::CreatedAt.lt(cutoff))
            .all(self.storage.platform())
            .await?;
        let n = stale.len();
        for t in stale {
            tracing::warn!(tenant = %t.slug, "removing an onboarding left unfinished");
            self.undo(&t, true).await;
        }
        Ok(n)
    }

    async fn claim(
        &self,
        slug: &TenantSlug,
        name: &str,
        domains: &[DomainName],
        db_name: &str,
    ) -> Result<tenant::Model, TenancyError> {
        let platform = self.storage.platform();
        let txn = crate::storage::begin_write(platform).await?;
        if tenant::Entity::find()
            .filter(tenant::Column::Slug.eq(slug.as_str()))
            .one(&txn)
            .await?
            .is_some()
        {
            return Err(TenancyError::SlugTaken(slug.to_string()));
        }
        let now = Utc::now();
        let t = tenant::ActiveModel {
            slug: Set(slug.as_str().to_owned()),
            name: Set(name.to_owned()),
            status: Set(TenantStatus::Provisioning.as_str().to_owned()),
            db_name: Set(db_name.to_owned()),
            created_at: Set(now),
            ..Default::default()
        }
        .insert(&txn)
        .await
        .map_err(|e| match e.sql_err() {
            Some(SqlErr::UniqueConstraintViolation(_)) => TenancyError::SlugTaken(slug.to_string()),
            _ => e.into(),
        })?;
        for d in domains {
            if tenant_domain::Entity::find_by_id(d.as_str().to_owned())
                .one(&txn)
                .await?
                .is_some()
            {
                return Err(TenancyError::DomainTaken(d.to_string()));
            }
            tenant_domain::ActiveModel {
                domain: Set(d.as_str().to_owned()),
                tenant_id: Set(t.id),
                created_at: Set(now),
            }
            .insert(&txn)
            .await
            .map_err(|e| match e.sql_err() {
                Some(SqlErr::UniqueConstraintViolation(_)) => {
                    TenancyError::DomainTaken(d.to_string())
                }
                _ => e.into(),
            })?;
        }
        txn.commit().await?;
        Ok(t)
    }

    /// Best effort: drops the tenant database (when `drop_db`) and deletes the claim. Failures
    /// are logged; a row left behind is swept at the next start.
    async fn undo(&self, claimed: &tenant::Model, drop_db: bool) {
        if drop_db && let Err(e) = self.storage.drop_tenant_db(&claimed.db_name).await {
            tracing::error!(db = %claimed.db_name, error = %e, "could not drop tenant database");
            return;
        }
        let platform = self.storage.platform();
        let deleted = async {
            tenant_domain::Entity::delete_many()
                .filter(tenant_domain::Column::TenantId.eq(claimed.id))
                .exec(platform)
                .await?;
            tenant::Entity::delete_by_id(claimed.id)
                .exec(platform)
                .await
        }
        .await;
        if let Err(e) = deleted {
            tracing::error!(tenant = %claimed.slug, error = %e, "could not remove unfinished tenant");
        }
        self.forget(claimed.id);
    }
}
