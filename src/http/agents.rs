//! Agents and teams of a tenant (contract §4), admin only except reading, which supervisors
//! may do too (they watch agents' status).

use actix_web::{HttpResponse, web};
use serde::Deserialize;

use super::auth::AuthAgent;
use super::{ApiError, JsonBody};
use crate::accounts::{self, AgentPatch, NewAgent, Role, agents, teams};
use crate::actors::queue;
use crate::startup::AppState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentBody {
    email: String,
    name: String,
    password: String,
    role: Option<String>,
    max_concurrent: Option<i32>,
    teams: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchAgentBody {
    email: Option<String>,
    name: Option<String>,
    password: Option<String>,
    role: Option<String>,
    max_concurrent: Option<i32>,
    teams: Option<Vec<String>>,
}

fn parse_role(role: Option<String>) -> Result<Option<Role>, ApiError> {
    role.map(|r| Role::parse(&r).map_err(|reason| ApiError::validation("role", reason)))
        .transpose()
}

/// `GET /api/v1/agents`
pub async fn list(agent: AuthAgent) -> Result<HttpResponse, ApiError> {
    agent.require_oversight()?;
    let list = agents::list(&agent.tenant.db).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"agents": list})))
}

/// `POST /api/v1/agents`
pub async fn create(
    agent: AuthAgent,
    JsonBody(body): JsonBody<CreateAgentBody>,
) -> Result<HttpResponse, ApiError> {
    agent.require(Role::Admin)?;
    let new = NewAgent {
        email: body.email,
        name: body.name,
        password: body.password,
        role: parse_role(body.role)?.unwrap_or(Role::Agent),
        max_concurrent: body.max_concurrent,
        teams: body.teams,
    };
    let created = agents::create(&agent.tenant.db, new).await?;
    tracing::info!(agent_id = created.id, by = agent.id, "agent created");
    Ok(HttpResponse::Created().json(created))
}

/// `GET /api/v1/agents/{id}`
pub async fn get(agent: AuthAgent, id: web::Path<i64>) -> Result<HttpResponse, ApiError> {
    if *id != agent.id {
        agent.require_oversight()?;
    }
    Ok(HttpResponse::Ok().json(agents::get(&agent.tenant.db, *id).await?))
}

/// Capacity, teams or existence changed: a running queue re-reads the agent (and may assign
/// at once when capacity grew).
fn notify_queue(state: &AppState, agent: &AuthAgent, agent_id: i64) {
    state.realtime.queue_tell(
        &agent.tenant.record,
        queue::QueueOp::AgentChanged { agent_id },
    );
}

/// `PATCH /api/v1/agents/{id}`
pub async fn update(
    state: web::Data<AppState>,
    agent: AuthAgent,
    id: web::Path<i64>,
    JsonBody(body): JsonBody<PatchAgentBody>,
) -> Result<HttpResponse, ApiError> {
    agent.require(Role::Admin)?;
    let patch = AgentPatch {
        email: body.email,
        name: body.name,
        password: body.password,
        role: parse_role(body.role)?,
        max_concurrent: body.max_concurrent,
        teams: body.teams,
    };
    let updated = agents::update(&agent.tenant.db, *id, patch).await?;
    notify_queue(&state, &agent, updated.id);
    tracing::info!(agent_id = updated.id, by = agent.id, "agent updated");
    Ok(HttpResponse::Ok().json(updated))
}

/// `DELETE /api/v1/agents/{id}`
pub async fn delete(
    state: web::Data<AppState>,
    agent: AuthAgent,
    id: web::Path<i64>,
) -> Result<HttpResponse, ApiError> {
    agent.require(Role::Admin)?;
    agents::delete(&agent.tenant.db, *id).await?;
    notify_queue(&state, &agent, *id);
    tracing::info!(agent_id = *id, by = agent.id, "agent deleted");
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTeamBody {
    slug: String,
    name: String,
}

/// `GET /api/v1/teams` (any agent: the console offers teams as transfer targets).
pub async fn list_teams(agent: AuthAgent) -> Result<HttpResponse, ApiError> {
    let list = teams::list(&agent.tenant.db).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"teams": list})))
}

/// `POST /api/v1/teams`
pub async fn create_team(
    agent: AuthAgent,
    JsonBody(body): JsonBody<CreateTeamBody>,
) -> Result<HttpResponse, ApiError> {
    agent.require(Role::Admin)?;
    let team = accounts::teams::create(&agent.tenant.db, &body.slug, &body.name).await?;
    Ok(HttpResponse::Created().json(team))
}
