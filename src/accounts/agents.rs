//! Agents: create, list, change, delete, with the rules that keep a tenant manageable (unique
//! emails, known teams, at least one admin).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use entity::tenant::{agent, agent_team, team};
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect, Set, SqlErr, TransactionSession, TransactionTrait,
};
use serde::Serialize;

use super::{
    AccountsError, GENERAL_TEAM, Role, check_max_concurrent, check_password, parse_email,
    parse_name, password,
};

/// `max_concurrent` of an agent created without one.
pub const DEFAULT_MAX_CONCURRENT: i32 = 5;

/// An agent as the API shows it (never the password hash).
#[derive(Clone, Debug, Serialize)]
pub struct AgentView {
    pub id: i64,
    pub email: String,
    pub name: String,
    pub role: Role,
    pub max_concurrent: i32,
    pub teams: Vec<String>,
    pub created_at: DateTime<Utc>,
}

pub struct NewAgent {
    pub email: String,
    pub name: String,
    pub password: String,
    pub role: Role,
    pub max_concurrent: Option<i32>,
    /// Team slugs; `None` means `["general"]`.
    pub teams: Option<Vec<String>>,
}

#[derive(Default)]
pub struct AgentPatch {
    pub email: Option<String>,
    pub name: Option<String>,
    pub password: Option<String>,
    pub role: Option<Role>,
    pub max_concurrent: Option<i32>,
    pub teams: Option<Vec<String>>,
}

pub async fn create<C>(db: &C, new: NewAgent) -> Result<AgentView, AccountsError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let email = parse_email("email", &new.email)?;
    let name = parse_name("name", &new.name)?;
    check_password("password", &new.password)?;
    let max_concurrent =
        check_max_concurrent(new.max_concurrent.unwrap_or(DEFAULT_MAX_CONCURRENT))?;
    let team_slugs = new.teams.unwrap_or_else(|| vec![GENERAL_TEAM.to_owned()]);
    let hash = password::hash(new.password).await?;

    let txn = crate::storage::begin_write(db).await?;
    let team_ids = resolve_teams(&txn, &team_slugs).await?;
    if find_by_email(&txn, &email).await?.is_some() {
        return Err(AccountsError::EmailTaken);
    }
    let now = Utc::now();
    let model = agent::ActiveModel {
        email: Set(email),
        name: Set(name),
        password_hash: Set(hash),
        role: Set(new.role.as_str().to_owned()),
        max_concurrent: Set(max_concurrent),
        created_at: Set(now),
        updated_at: Set(now),
        ..Default::default()
    }
    .insert(&txn)
    .await
    .map_err(email_conflict)?;
    set_teams(&txn, model.id, &team_ids).await?;
    txn.commit().await?;
    view(db, model).await
}

pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<AgentView>, AccountsError> {
    let agents = agent::Entity::find()
        .order_by_asc(agent::Column::Id)
        .all(db)
        .await?;
    let teams: HashMap<i64, String> = team::Entity::find()
        .all(db)
        .await?
        .into_iter()
        .map(|t| (t.id, t.slug))
        .collect();
    let mut membership: HashMap<i64, Vec<String>> = HashMap::new();
    for m in agent_team::Entity::find()
        .order_by_asc(agent_team::Column::TeamId)
        .all(db)
        .await?
    {
        if let Some(slug) = teams.get(&m.team_id) {
            membership.entry(m.agent_id).or_default().push(slug.clone());
        }
    }
    Ok(agents
        .into_iter()
        .map(|a| {
            let teams = membership.remove(&a.id).unwrap_or_default();
            to_view(a, teams)
        })
        .collect())
}

pub async fn get(db: &impl ConnectionTrait, id: i64) -> Result<AgentView, AccountsError> {
    let model = agent::Entity::find_by_id(id)
        .one(db)
        .await?
        .ok_or(AccountsError::AgentNotFound)?;
    view(db, model).await
}

pub async fn update<C>(db: &C, id: i64, patch: AgentPatch) -> Result<AgentView, AccountsError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let email = patch
        .email
        .as_deref()
        .map(|e| parse_email("email", e))
        .transpose()?;
    let name = patch
        .name
        .as_deref()
        .map(|n| parse_name("name", n))
        .transpose()?;
    if let Some(p) = &patch.password {
        check_password("password", p)?;
    }
    let max_concurrent = patch.max_concurrent.map(check_max_concurrent).transpose()?;
    let hash = match patch.password {
        Some(p) => Some(password::hash(p).await?),
        None => None,
    };

    let txn = crate::storage::begin_write(db).await?;
    let current = agent::Entity::find_by_id(id)
        .one(&txn)
        .await?
        .ok_or(AccountsError::AgentNotFound)?;
    let team_ids = match &patch.teams {
        Some(slugs) => Some(resolve_teams(&txn, slugs).await?),
        None => None,
    };
    if let Some(role) = patch.role
        && role != Role::Admin
        && current.role == Role::Admin.as_str()
        && count_admins(&txn).await? <= 1
    {
        return Err(AccountsError::LastAdmin);
    }
    if let Some(email) = &email
        && *email != current.email
        && find_by_email(&txn, email).await?.is_some()
    {
        return Err(AccountsError::EmailTaken);
    }
    let mut am: agent::ActiveModel = current.into();
    if let Some(v) = email {
        am.email = Set(v);
    }
    if let Some(v) = name {
        am.name = Set(v);
    }
    if let Some(v) = hash {
        am.password_hash = Set(v);
    }
    if let Some(v) = patch.role {
        am.role = Set(v.as_str().to_owned());
    }
    if let Some(v) = max_concurrent {
        am.max_concurrent = Set(v);
    }
    am.updated_at = Set(Utc::now());
    let model = am.update(&txn).await.map_err(email_conflict)?;
    if let Some(ids) = team_ids {
        agent_team::Entity::delete_many()
            .filter(agent_team::Column::AgentId.eq(id))
            .exec(&txn)
            .await?;
        set_teams(&txn, id, &ids).await?;
    }
    txn.commit().await?;
    view(db, model).await
}

pub async fn delete<C>(db: &C, id: i64) -> Result<(), AccountsError>
where
    C: ConnectionTrait + TransactionTrait,
{
    let txn = crate::storage::begin_write(db).await?;
    let current = agent::Entity::find_by_id(id)
        .one(&txn)
        .await?
        .ok_or(AccountsError::AgentNotFound)?;
    if current.role == Role::Admin.as_str() && count_admins(&txn).await? <= 1 {
        return Err(AccountsError::LastAdmin);
    }
    agent_team::Entity::delete_many()
        .filter(agent_team::Column::AgentId.eq(id))
        .exec(&txn)
        .await?;
    agent::Entity::delete_by_id(id).exec(&txn).await?;
    txn.commit().await?;
    Ok(())
}

pub async fn find_by_email(
    db: &impl ConnectionTrait,
    email: &str,
) -> Result<Option<agent::Model>, AccountsError> {
    Ok(agent::Entity::find()
        .filter(agent::Column::Email.eq(email))
        .one(db)
        .await?)
}

pub async fn find(
    db: &impl ConnectionTrait,
    id: i64,
) -> Result<Option<agent::Model>, AccountsError> {
    Ok(agent::Entity::find_by_id(id).one(db).await?)
}

/// The ids of the teams an agent is in.
pub async fn team_ids(db: &impl ConnectionTrait, agent_id: i64) -> Result<Vec<i64>, AccountsError> {
    Ok(agent_team::Entity::find()
        .filter(agent_team::Column::AgentId.eq(agent_id))
        .all(db)
        .await?
        .into_iter()
        .map(|m| m.team_id)
        .collect())
}

/// Parses the role stored in an agent's row; rows are only ever written from
/// [`Role::as_str`], and anything else gets the least role.
pub fn stored_role(role: &str) -> Role {
    Role::parse(role).unwrap_or(Role::Agent)
}

/// How many admins there are, inside a write transaction that then changes one of them. The
/// admin rows are locked (`FOR UPDATE`) so that two transactions demoting or deleting two
/// different admins at once cannot both see "two admins left": on PostgreSQL the second waits
/// and then counts again; SQLite's write lock, taken at `BEGIN`, already serialises them.
async fn count_admins(db: &impl ConnectionTrait) -> Result<u64, AccountsError> {
    let admins = agent::Entity::find()
        .select_only()
        .column(agent::Column::Id)
        .filter(agent::Column::Role.eq(Role::Admin.as_str()))
        .lock_exclusive()
        .into_tuple::<i64>()
        .all(db)
        .await?;
    Ok(admins.len() as u64)
}

async fn resolve_teams(
    db: &impl ConnectionTrait,
    slugs: &[String],
) -> Result<Vec<i64>, AccountsError> {
    let mut ids = Vec::with_capacity(slugs.len());
    for slug in slugs {
        let team = super::teams::find_by_slug(db, slug)
            .await?
            .ok_or_else(|| AccountsError::UnknownTeam(slug.clone()))?;
        if !ids.contains(&team.id) {
            ids.push(team.id);
        }
    }
    Ok(ids)
}

async fn set_teams(
    db: &impl ConnectionTrait,
    agent_id: i64,
    team_ids: &[i64],
) -> Result<(), AccountsError> {
    for &team_id in team_ids {
        agent_team::ActiveModel {
            agent_id: Set(agent_id),
            team_id: Set(team_id),
        }
        .insert(db)
        .await?;
    }
    Ok(())
}

async fn view(db: &impl ConnectionTrait, model: agent::Model) -> Result<AgentView, AccountsError> {
    let team_ids: Vec<i64> = agent_team::Entity::find()
        .filter(agent_team::Column::AgentId.eq(model.id))
        .all(db)
        .await?
        .into_iter()
        .map(|m| m.team_id)
        .collect();
    let teams = team::Entity::find()
        .filter(team::Column::Id.is_in(team_ids))
        .order_by_asc(team::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(|t| t.slug)
        .collect();
    Ok(to_view(model, teams))
}

fn to_view(model: agent::Model, teams: Vec<String>) -> AgentView {
    let role = stored_role(&model.role);
    AgentView {
        id: model.id,
        email: model.email,
        name: model.name,
        role,
        max_concurrent: model.max_concurrent,
        teams,
        created_at: model.created_at,
    }
}

fn email_conflict(e: sea_orm::DbErr) -> AccountsError {
    match e.sql_err() {
        Some(SqlErr::UniqueConstraintViolation(_)) => AccountsError::EmailTaken,
        _ => AccountsError::Db(e),
    }
}
