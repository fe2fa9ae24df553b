use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Tenants::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Tenants::Id))
                    .col(string_uniq(Tenants::Slug))
                    .col(string(Tenants::Name))
                    .col(string(Tenants::Status))
                    .col(string_uniq(Tenants::DbName))
                    .col(timestamp_with_time_zone(Tenants::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(TenantDomains::Table)
                    .if_not_exists()
                    .col(string(TenantDomains::Domain).primary_key())
                    .col(big_integer(TenantDomains::TenantId))
                    .col(timestamp_with_time_zone(TenantDomains::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(TenantDomains::Table, TenantDomains::TenantId)
                            .to(Tenants::Table, Tenants::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_tenant_domains_tenant")
                    .table(TenantDomains::Table)
                    .col(TenantDomains::TenantId)
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(PlatformSecrets::Table)
                    .if_not_exists()
                    .col(string(PlatformSecrets::Name).primary_key())
                    .col(string(PlatformSecrets::Value))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(PlatformSecrets::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(TenantDomains::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Tenants::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Tenants {
    Table,
    Id,
    Slug,
    Name,
    Status,
    DbName,
    CreatedAt,
}

#[derive(DeriveIden)]
enum TenantDomains {
    Table,
    Domain,
    TenantId,
    CreatedAt,
}

#[derive(DeriveIden)]
enum PlatformSecrets {
    Table,
    Name,
    Value,
}
