//! Teams (skill groups). Conversations queue for a team; agents serve the teams they are in.

use chrono::{DateTime, Utc};
use entity::tenant::team;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, Set,
    SqlErr,
};
use serde::Serialize;

use super::{AccountsError, GENERAL_TEAM, parse_name};
use crate::tenancy::names::parse_slug;

#[derive(Clone, Debug, Serialize)]
pub struct TeamView {
    pub id: i64,
    pub slug: String,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

impl From<team::Model> for TeamView {
    fn from(m: team::Model) -> Self {
        Self {
            id: m.id,
            slug: m.slug,
            name: m.name,
            created_at: m.created_at,
        }
    }
}

/// Validates a team slug: like a tenant slug, but one character is enough.
pub fn parse_team_slug(s: &str) -> Result<String, AccountsError> {
    parse_slug(s, 1).map_err(|reason| AccountsError::Invalid {
        field: "slug",
        reason,
    })
}

pub async fn create(
    db: &impl ConnectionTrait,
    slug: &str,
    name: &str,
) -> Result<TeamView, AccountsError> {
    let slug = parse_team_slug(slug)?;
    let name = parse_name("name", name)?;
    if find_by_slug(db, &slug).await?.is_some() {
        return Err(AccountsError::TeamTaken);
    }
    let model = team::ActiveModel {
        slug: Set(slug),
        name: Set(name),
        created_at: Set(Utc::now()),
        ..Default::default()
    }
    .insert(db)
    .await
    .map_err(|e| match e.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(_)) => AccountsError::TeamTaken,
        _ => AccountsError::Db(e),
    })?;
    Ok(model.into())
}

/// Creates the `general` team if it is missing (tenant onboarding).
pub async fn ensure_general(db: &impl ConnectionTrait) -> Result<team::Model, AccountsError> {
    if let Some(t) = find_by_slug(db, GENERAL_TEAM).await? {
        return Ok(t);
    }
    Ok(team::ActiveModel {
        slug: Set(GENERAL_TEAM.to_owned()),
        name: Set("General".to_owned()),
        created_at: Set(Utc::now()),
        ..Default::default()
    }
    .insert(db)
    .await?)
}

pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<TeamView>, AccountsError> {
    Ok(team::Entity::find()
        .order_by_asc(team::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(TeamView::from)
        .collect())
}

pub async fn find_by_slug(
    db: &impl ConnectionTrait,
    slug: &str,
) -> Result<Option<team::Model>, AccountsError> {
    Ok(team::Entity::find()
        .filter(team::Column::Slug.eq(slug))
        .one(db)
        .await?)
}
