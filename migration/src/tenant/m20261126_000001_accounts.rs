use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Teams::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Teams::Id))
                    .col(string_uniq(Teams::Slug))
                    .col(string(Teams::Name))
                    .col(timestamp_with_time_zone(Teams::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Agents::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Agents::Id))
                    .col(string_uniq(Agents::Email))
                    .col(string(Agents::Name))
                    .col(string(Agents::PasswordHash))
                    .col(string(Agents::Role))
                    .col(integer(Agents::MaxConcurrent))
                    .col(timestamp_with_time_zone(Agents::CreatedAt))
                    .col(timestamp_with_time_zone(Agents::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AgentTeams::Table)
                    .if_not_exists()
                    .col(big_integer(AgentTeams::AgentId))
                    .col(big_integer(AgentTeams::TeamId))
                    .primary_key(
                        Index::create()
                            .col(AgentTeams::AgentId)
                            .col(AgentTeams::TeamId),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(AgentTeams::Table, AgentTeams::AgentId)
                            .to(Agents::Table, Agents::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(AgentTeams::Table, AgentTeams::TeamId)
                            .to(Teams::Table, Teams::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("idx_agent_teams_team")
                    .table(AgentTeams::Table)
                    .col(AgentTeams::TeamId)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(AgentTeams::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Agents::Table).to_owned())
            .await?;
        manager
            .drop_table(Table::drop().table(Teams::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Teams {
    Table,
    Id,
    Slug,
    Name,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Agents {
    Table,
    Id,
    Email,
    Name,
    PasswordHash,
    Role,
    MaxConcurrent,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum AgentTeams {
    Table,
    AgentId,
    TeamId,
}
