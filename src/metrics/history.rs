//! The last minutes of each tenant's headline numbers, for the dashboard's charts: a page
//! opened now still shows what happened before it was opened.
//!
//! Sampled from the queues running on this node only (one actor message per tenant, no
//! storage), so quiet tenants cost nothing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashmap::DashMap;
use serde::Serialize;

use crate::actors::queue::Snapshot;
use crate::startup::AppState;
use crate::tenancy::TenantStatus;

/// How far back the charts go.
pub const WINDOW: Duration = Duration::from_secs(10 * 60);
/// One point every this often: 120 points per tenant over the window.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Point {
    pub at: DateTime<Utc>,
    pub queued: usize,
    pub active: usize,
    pub online: usize,
}

/// tenant id → its points, oldest first. Cheap to clone.
#[derive(Clone, Default)]
pub struct History {
    points: Arc<DashMap<i64, VecDeque<Point>>>,
}

impl History {
    /// The tenant's points within the window, oldest first.
    pub fn of(&self, tenant_id: i64) -> Vec<Point> {
        self.points
            .get(&tenant_id)
            .map(|p| p.iter().copied().collect())
            .unwrap_or_default()
    }

    fn record(&self, tenant_id: i64, point: Point) {
        let mut points = self.points.entry(tenant_id).or_default();
        points.push_back(point);
        let oldest = point.at - WINDOW;
        while points.front().is_some_and(|p| p.at < oldest) {
            points.pop_front();
        }
    }

    /// Samples every live queue of this node every [`SAMPLE_EVERY`] until the server stops.
    pub fn spawn_sampler(state: actix_web::web::Data<AppState>) {
        let shutdown = state.realtime.shutdown_token();
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => sample(&state).await,
                }
            }
        });
    }
}

async fn sample(state: &AppState) {
    let records = match state.tenants.all_records().await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "no tenant list for the dashboard history");
            return;
        }
    };
    for t in records {
        if t.status != TenantStatus::Active {
            continue;
        }
        let Some(queue) = state.realtime.queue_if_running(t.id) else {
            continue;
        };
        if let Ok(s) = queue.send(Snapshot).await {
            state.history.record(
                t.id,
                Point {
                    at: Utc::now(),
                    queued: s.queues.values().map(|(n, _)| n).sum(),
                    active: s.active,
                    online: s.agents.iter().filter(|a| a.status == "online").count(),
                },
            );
        }
    }
}
