//! The scenarios. `chat`, `longpoll` and `ramp` drive conversations through the shared
//! [`engine`]; `connections` opens and holds idle sockets.

pub mod chat;
pub mod connections;
pub(crate) mod engine;
pub mod longpoll;
pub mod ramp;

use std::time::Duration;

use anyhow::Result;

use crate::progress::Progress;
use crate::report::Report;
use engine::{Engine, EngineConfig};

/// Runs one phase of conversations at `rate` for `duration` and reports it: the body of `chat`
/// and `longpoll`.
pub(crate) async fn run_single_phase(
    scenario: &str,
    cfg: EngineConfig,
    rate: f64,
    duration: Duration,
    check_stored: bool,
) -> Result<Report> {
    let progress = cfg.progress.clone();
    let url = cfg.url.clone();
    let result = async {
        let mut engine = Engine::start(cfg).await?;
        let phase = engine.run_phase(0, rate, duration).await;
        let (setup, agents, conversations) = (engine.setup, engine.agents, engine.conversations());
        let fin = engine.finish(check_stored).await;
        let c = fin.counters;
        anyhow::Ok(
            Report {
                scenario: scenario.into(),
                target: url,
                setup_secs: setup.as_secs_f64(),
                duration_secs: duration.as_secs_f64(),
                conversations,
                agents,
                offered_rate: rate,
                sent: c.sent,
                acked: c.acked,
                delivered: c.delivered,
                throughput: phase.throughput(),
                lost: fin.lost,
                duplicated: c.duplicated,
                reordered: c.reordered,
                unacked: fin.unacked,
                errors: c.errors + fin.stuck_peers,
                disconnects: c.disconnects,
                latency: phase.data.latency.summary(),
                send_lateness: phase.data.lateness.summary(),
                stored: fin.stored,
                ..Default::default()
            }
            .settle(),
        )
    }
    .await;
    progress.finish();
    result
}

/// The platform key from `KEFU_PLATFORM_KEY`, or empty (the relay accepts any).
pub(crate) fn platform_key_from_env() -> String {
    std::env::var("KEFU_PLATFORM_KEY").unwrap_or_default()
}

pub(crate) fn progress(enabled: bool) -> Progress {
    Progress::new(enabled)
}
