pub mod m20261126_000001_accounts;
pub mod m20261126_000002_conversations;
