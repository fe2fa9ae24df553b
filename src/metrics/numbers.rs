//! A tenant's live numbers, for `/metrics` and the dashboards: who is online, what waits,
//! what is being handled. The queue actor knows presence and the queues; storage knows every
//! open conversation and every agent, so it fills in what the queue does not hold and stands
//! in for it where no queue runs on this node.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use entity::tenant::conversation;
use sea_orm::{
    ColumnTrait, ConnectionTrait, DbErr, EntityTrait, FromQueryResult, QueryFilter, QuerySelect,
};
use serde::Serialize;

use crate::accounts::{agents, teams};
use crate::actors::queue::{QueueOp, QueueReply, Snapshot};
use crate::conversations::{ConversationStatus, store};
use crate::startup::AppState;
use crate::tenancy::TenantRecord;

/// Every status an agent can be shown with, in display order.
pub const AGENT_STATUSES: [&str; 4] = ["online", "away", "disconnected", "offline"];

/// What the queue actor reports (`actors::queue::Snapshot`), also across nodes.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    pub agents: Vec<AgentPresence>,
    /// team id → (queued, queued_at of the head).
    pub queues: HashMap<i64, (usize, Option<DateTime<Utc>>)>,
    /// Conversations held by agents (assigned and not closed).
    pub active: usize,
    /// Queued conversations closed because the visitor left, since the queue started.
    pub abandoned: u64,
}

/// An agent the queue knows: connected, or within its grace period.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct AgentPresence {
    pub id: i64,
    /// `online`, `away` or `disconnected` (grace period running).
    pub status: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct TenantNumbers {
    pub tenant: String,
    pub name: String,
    pub at: DateTime<Utc>,
    /// A queue for this tenant runs on this node (else presence is unknown here and every
    /// agent shows as offline).
    pub live: bool,
    pub totals: Totals,
    pub teams: Vec<TeamNumbers>,
    pub agents: Vec<AgentNumbers>,
    pub abandoned: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub agents_online: usize,
    pub agents_away: usize,
    pub queued: usize,
    pub active: usize,
    pub oldest_wait_secs: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TeamNumbers {
    pub slug: String,
    pub name: String,
    pub queued: usize,
    pub active: usize,
    pub agents_online: usize,
    pub oldest_wait_secs: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentNumbers {
    pub id: i64,
    pub name: String,
    pub role: String,
    pub status: &'static str,
    /// Conversations the agent holds now.
    pub load: usize,
    pub max_concurrent: i32,
    pub teams: Vec<String>,
}

/// Why the numbers could not be read.
#[derive(Debug, thiserror::Error)]
pub enum NumbersError {
    #[error(transparent)]
    Tenancy(#[from] crate::tenancy::TenancyError),
    #[error(transparent)]
    Accounts(#[from] crate::accounts::AccountsError),
    #[error(transparent)]
    Db(#[from] sea_orm::DbErr),
}

/// The static name of a presence the queue reported (what the numbers carry).
fn presence_name(status: &str) -> &'static str {
    match status {
        "online" => "online",
        "away" => "away",
        _ => "disconnected",
    }
}

/// The numbers of `tenant` now. `start_queue`: start the tenant's queue on this node if it
/// is not running (the supervisor dashboard does, so presence is known); else only a running
/// queue is asked.
pub async fn of_tenant(
    state: &AppState,
    tenant: &Arc<TenantRecord>,
    start_queue: bool,
) -> Result<TenantNumbers, NumbersError> {
    let snapshot = if start_queue {
        // Wherever the tenant's queue runs (in a cluster, possibly another node).
        match state.realtime.queue_call(tenant, QueueOp::Snapshot).await {
            Ok(QueueReply::Snapshot(s)) => Some(s),
            _ => None,
        }
    } else {
        match state.realtime.queue_if_running(tenant.id) {
            Some(q) => q.send(Snapshot).await.ok(),
            None => None,
        }
    };
    let db = state.realtime.db(tenant).await?;
    let team_list = teams::list(&db).await?;
    let agent_list = agents::list(&db).await?;
    let active = active_counts(&db).await?;
    // Only where no queue runs here: the live queue knows what waits.
    let queued = match snapshot {
        Some(_) => Vec::new(),
        None => store::queued(&db).await?,
    };
    let now = Utc::now();
    let wait = |at: DateTime<Utc>| (now - at).as_seconds_f64().max(0.0);

    let presence: HashMap<i64, &'static str> = snapshot
        .as_ref()
        .map(|s| {
            s.agents
                .iter()
                .map(|a| (a.id, presence_name(&a.status)))
                .collect()
        })
        .unwrap_or_default();
    let mut load: HashMap<i64, usize> = HashMap::new();
    for c in &active {
        if let Some(a) = c.agent_id {
            *load.entry(a).or_default() += c.n as usize;
        }
    }
    let agents: Vec<AgentNumbers> = agent_list
        .into_iter()
        .map(|a| AgentNumbers {
            status: presence.get(&a.id).copied().unwrap_or("offline"),
            load: load.get(&a.id).copied().unwrap_or(0),
            id: a.id,
            name: a.name,
            role: a.role.to_string(),
            max_concurrent: a.max_concurrent,
            teams: a.teams,
        })
        .collect();

    let teams: Vec<TeamNumbers> = team_list
        .into_iter()
        .map(|t| {
            // The live queue is the truth for what waits; storage where none runs here.
            let (queued_n, head) = match snapshot.as_ref() {
                Some(s) => s.queues.get(&t.id).copied().unwrap_or((0, None)),
                None => {
                    let mine: Vec<_> = queued.iter().filter(|c| c.team_id == t.id).collect();
                    (mine.len(), mine.iter().map(|c| c.queued_at).min())
                }
            };
            TeamNumbers {
                queued: queued_n,
                active: active
                    .iter()
                    .filter(|c| c.team_id == t.id)
                    .map(|c| c.n as usize)
                    .sum(),
                agents_online: agents
                    .iter()
                    .filter(|a| a.status == "online" && a.teams.contains(&t.slug))
                    .count(),
                oldest_wait_secs: head.map(wait).unwrap_or(0.0),
                slug: t.slug,
                name: t.name,
            }
        })
        .collect();
    let totals = Totals {
        agents_online: agents.iter().filter(|a| a.status == "online").count(),
        agents_away: agents.iter().filter(|a| a.status == "away").count(),
        queued: teams.iter().map(|t| t.queued).sum(),
        active: active.iter().map(|c| c.n as usize).sum(),
        oldest_wait_secs: teams.iter().map(|t| t.oldest_wait_secs).fold(0.0, f64::max),
    };
    Ok(TenantNumbers {
        tenant: tenant.slug.clone(),
        name: tenant.name.clone(),
        at: now,
        live: snapshot.is_some(),
        totals,
        teams,
        agents,
        abandoned: snapshot.map_or(0, |s| s.abandoned),
    })
}

/// Active conversations counted by team and agent.
#[derive(Debug, FromQueryResult)]
struct ActiveCount {
    team_id: i64,
    agent_id: Option<i64>,
    n: i64,
}

/// Counted in the database rather than loaded: a busy tenant has thousands of them.
async fn active_counts(db: &impl ConnectionTrait) -> Result<Vec<ActiveCount>, DbErr> {
    conversation::Entity::find()
        .select_only()
        .column(conversation::Column::TeamId)
        .column(conversation::Column::AgentId)
        .column_as(conversation::Column::Id.count(), "n")
        .filter(conversation::Column::Status.eq(ConversationStatus::Active.as_str()))
        .group_by(conversation::Column::TeamId)
        .group_by(conversation::Column::AgentId)
        .into_model::<ActiveCount>()
        .all(db)
        .await
}
