use sea_orm::entity::prelude::*;

/// A host name bound to a tenant; requests on it are that tenant's.
#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "tenant_domains")]
pub struct Model {
    /// Lower-case, without port: the form the `Host` header is normalised to.
    #[sea_orm(primary_key, auto_increment = false)]
    pub domain: String,
    pub tenant_id: i64,
    pub created_at: DateTimeUtc,
}

impl ActiveModelBehavior for ActiveModel {}
