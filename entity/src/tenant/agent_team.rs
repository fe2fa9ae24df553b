use sea_orm::entity::prelude::*;

/// Membership of an agent in a team.
#[sea_orm::model]
#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "agent_teams")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub agent_id: i64,
    #[sea_orm(primary_key, auto_increment = false)]
    pub team_id: i64,
}

impl ActiveModelBehavior for ActiveModel {}
