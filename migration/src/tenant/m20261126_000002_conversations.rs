use sea_orm_migration::{prelude::*, schema::*};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Visitors::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Visitors::Id))
                    .col(string(Visitors::Name))
                    .col(timestamp_with_time_zone(Visitors::CreatedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Conversations::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Conversations::Id))
                    .col(big_integer(Conversations::VisitorId))
                    .col(big_integer(Conversations::TeamId))
                    .col(string(Conversations::Status))
                    .col(big_integer_null(Conversations::AgentId))
                    .col(big_integer(Conversations::LastSeq).default(0))
                    .col(timestamp_with_time_zone(Conversations::QueuedAt))
                    .col(timestamp_with_time_zone(Conversations::CreatedAt))
                    .col(timestamp_with_time_zone_null(Conversations::AssignedAt))
                    .col(timestamp_with_time_zone_null(Conversations::ClosedAt))
                    .col(string_null(Conversations::ClosedBy))
                    .col(boolean(Conversations::Abandoned).default(false))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Conversations::Table, Conversations::VisitorId)
                            .to(Visitors::Table, Visitors::Id),
                    )
                    .to_owned(),
            )
            .await?;
        for (name, cols) in [
            (
                "idx_conversations_status",
                vec![Conversations::Status, Conversations::QueuedAt],
            ),
            (
                "idx_conversations_visitor",
                vec![Conversations::VisitorId, Conversations::Status],
            ),
            (
                "idx_conversations_agent",
                vec![Conversations::AgentId, Conversations::Status],
            ),
        ] {
            let mut idx = Index::create();
            idx.if_not_exists().name(name).table(Conversations::Table);
            for c in cols {
                idx.col(c);
            }
            manager.create_index(idx.to_owned()).await?;
        }
        // A visitor has at most one conversation that is not closed; opening a second one
        // concurrently fails here and the caller returns the first. Same SQL on SQLite and
        // PostgreSQL, neither of which sea-query's index builder covers for partial indexes.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE UNIQUE INDEX IF NOT EXISTS uq_conversations_open_visitor \
                 ON conversations (visitor_id) WHERE status <> 'closed'",
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(Messages::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Messages::Id))
                    .col(big_integer(Messages::ConversationId))
                    .col(big_integer(Messages::Seq))
                    .col(string(Messages::ClientMsgId))
                    .col(string(Messages::SenderKind))
                    .col(big_integer_null(Messages::SenderId))
                    .col(text(Messages::Content))
                    .col(timestamp_with_time_zone(Messages::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(Messages::Table, Messages::ConversationId)
                            .to(Conversations::Table, Conversations::Id),
                    )
                    .to_owned(),
            )
            .await?;
        // The two rules of the message log: seq unique per conversation, and a client_msg_id
        // stored at most once per conversation.
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("uq_messages_seq")
                    .table(Messages::Table)
                    .col(Messages::ConversationId)
                    .col(Messages::Seq)
                    .unique()
                    .to_owned(),
            )
            .await?;
        manager.create_index(client_msg_id_index()).await?;
        manager
            .create_table(
                Table::create()
                    .table(ReadPositions::Table)
                    .if_not_exists()
                    .col(big_integer(ReadPositions::ConversationId))
                    .col(string(ReadPositions::ReaderKind))
                    .col(big_integer(ReadPositions::ReaderId))
                    .col(big_integer(ReadPositions::Seq))
                    .col(timestamp_with_time_zone(ReadPositions::UpdatedAt))
                    .primary_key(
                        Index::create()
                            .col(ReadPositions::ConversationId)
                            .col(ReadPositions::ReaderKind)
                            .col(ReadPositions::ReaderId),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            ReadPositions::Table.into_iden(),
            Messages::Table.into_iden(),
            Conversations::Table.into_iden(),
            Visitors::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).to_owned())
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Visitors {
    Table,
    Id,
    Name,
    CreatedAt,
}

#[derive(DeriveIden, Clone, Copy)]
enum Conversations {
    Table,
    Id,
    VisitorId,
    TeamId,
    Status,
    AgentId,
    LastSeq,
    QueuedAt,
    CreatedAt,
    AssignedAt,
    ClosedAt,
    ClosedBy,
    Abandoned,
}

/// The unique index on a message's `client_msg_id` per conversation; dropped on SQLite by
/// tenant migration 3, which recreates it going down.
pub(super) fn client_msg_id_index() -> IndexCreateStatement {
    Index::create()
        .if_not_exists()
        .name("uq_messages_client_msg_id")
        .table(Messages::Table)
        .col(Messages::ConversationId)
        .col(Messages::ClientMsgId)
        .unique()
        .to_owned()
}

#[derive(DeriveIden)]
enum Messages {
    Table,
    Id,
    ConversationId,
    Seq,
    ClientMsgId,
    SenderKind,
    SenderId,
    Content,
    CreatedAt,
}

#[derive(DeriveIden)]
enum ReadPositions {
    Table,
    ConversationId,
    ReaderKind,
    ReaderId,
    Seq,
    UpdatedAt,
}
