//! SQLite only: drops the unique index on `messages (conversation_id, client_msg_id)`. On
//! SQLite every message of a tenant is appended by one writer thread, which recognises a
//! re-sent id from memory and the conversation's rows (`conversations::client_ids` in the
//! server); keeping the index up to date was the largest and a growing part of that writer's
//! work. PostgreSQL keeps it: several nodes append to one conversation at once there.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Sqlite {
            return Ok(());
        }
        manager
            .drop_index(
                Index::drop()
                    .if_exists()
                    .name("uq_messages_client_msg_id")
                    .table(Messages::Table)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Sqlite {
            return Ok(());
        }
        manager
            .create_index(super::m20261126_000002_conversations::client_msg_id_index())
            .await
    }
}

#[derive(DeriveIden)]
enum Messages {
    Table,
}
