//! `ramp`: the `chat` setup, driven at a rising total rate one step at a time. Each step is
//! drained and judged on its own; the ramp stops at the first step whose p99 exceeds the bound,
//! or that lost or left unacknowledged anything, and reports the highest step that met it.
//! The conversations stay the same across steps, so provisioning is paid once.

use std::time::Duration;

use anyhow::{Result, bail};

use super::engine::{Engine, EngineConfig};
use crate::report::{RampReport, RampStep, Report};
use crate::stats::PhaseData;

/// Upper bound on steps, so a tiny `step_rate` cannot make a ramp run for days.
const MAX_STEPS: u32 = 200;

#[derive(Clone, Debug)]
pub struct RampConfig {
    pub url: String,
    pub platform_key: String,
    pub conversations: usize,
    /// 0: one agent per conversation.
    pub agents: usize,
    /// Total rate of the first step (messages per second, all sides together).
    pub start_rate: f64,
    /// Added to the rate at each step.
    pub step_rate: f64,
    /// Last rate tried.
    pub max_rate: f64,
    pub step_duration: Duration,
    /// A step meets the bound when its p99 is at most this.
    pub p99_bound: Duration,
    /// Longest wait after each step for its last acks and deliveries.
    pub drain_timeout: Duration,
    pub assign_timeout: Duration,
    pub provision_concurrency: usize,
    pub check_stored: bool,
    pub progress: bool,
}

impl Default for RampConfig {
    /// A smoke run: four conversations, 20 then 40 messages a second, a second each.
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            platform_key: super::platform_key_from_env(),
            conversations: 4,
            agents: 0,
            start_rate: 20.0,
            step_rate: 20.0,
            max_rate: 40.0,
            step_duration: Duration::from_secs(1),
            p99_bound: Duration::from_millis(50),
            drain_timeout: Duration::from_secs(5),
            assign_timeout: Duration::from_secs(30),
            provision_concurrency: 8,
            check_stored: true,
            progress: false,
        }
    }
}

pub async fn run(config: RampConfig) -> Result<Report> {
    if !(config.start_rate > 0.0 && config.step_rate > 0.0) {
        bail!("a ramp needs a positive start rate and step");
    }
    let progress = super::progress(config.progress);
    let engine = EngineConfig {
        url: config.url.clone(),
        agent_url: None,
        platform_key: config.platform_key.clone(),
        conversations: config.conversations,
        agents: config.agents,
        longpoll_wait: None,
        assign_timeout: config.assign_timeout,
        drain_timeout: config.drain_timeout,
        provision_concurrency: config.provision_concurrency,
        progress: progress.clone(),
    };
    let result = ramp(config, engine).await;
    progress.finish();
    result
}

async fn ramp(config: RampConfig, engine: EngineConfig) -> Result<Report> {
    let mut engine = Engine::start(engine).await?;
    let bound_ms = config.p99_bound.as_secs_f64() * 1e3;
    let mut steps = Vec::new();
    let mut best: Option<(f64, f64, PhaseData)> = None;
    let mut total = Duration::ZERO;
    let mut stopped = format!("reached the maximum rate {}", config.max_rate);
    for idx in 0..MAX_STEPS {
        let rate = config.start_rate + f64::from(idx) * config.step_rate;
        if rate > config.max_rate {
            break;
        }
        let phase = engine.run_phase(idx, rate, config.step_duration).await;
        total += config.step_duration;
        let latency = phase.data.latency.summary();
        let (lost, unacked) = (phase.undelivered(), phase.unacked());
        let met = phase.settled && lost == 0 && unacked == 0 && latency.p99_ms <= bound_ms;
        steps.push(RampStep {
            offered_rate: rate,
            throughput: phase.throughput(),
            sent: phase.data.sent,
            acked: phase.data.acked,
            lost,
            unacked,
            latency: latency.clone(),
            send_lateness: phase.data.lateness.summary(),
            met,
        });
        if !met {
            stopped = format!(
                "{rate} msg/s: p99 {:.3} ms (bound {bound_ms} ms), {lost} not read, {unacked} not acked{}",
                latency.p99_ms,
                if phase.settled {
                    ""
                } else {
                    ", drain timed out"
                }
            );
            break;
        }
        let throughput = phase.throughput();
        best = Some((rate, throughput, phase.data));
    }
    // Under saturation the last step may still be answering: give it the same grace again
    // before anything left unanswered is reported.
    engine.drain(config.drain_timeout).await;
    let (setup, agents, conversations) = (engine.setup, engine.agents, engine.conversations());
    let fin = engine.finish(config.check_stored).await;
    let c = fin.counters;
    let (best_rate, best_throughput, best_data) = match best {
        Some((r, t, d)) => (Some(r), Some(t), d),
        None => (None, None, PhaseData::default()),
    };
    let latency = best_data.latency.summary();
    Ok(Report {
        scenario: "ramp".into(),
        target: config.url,
        setup_secs: setup.as_secs_f64(),
        duration_secs: total.as_secs_f64(),
        conversations,
        agents,
        offered_rate: best_rate.unwrap_or(0.0),
        sent: c.sent,
        acked: c.acked,
        delivered: c.delivered,
        throughput: best_throughput.unwrap_or(0.0),
        lost: fin.lost,
        duplicated: c.duplicated,
        reordered: c.reordered,
        unacked: fin.unacked,
        errors: c.errors + fin.stuck_peers,
        disconnects: c.disconnects,
        latency,
        send_lateness: best_data.lateness.summary(),
        stored: fin.stored,
        ramp: Some(RampReport {
            p99_bound_ms: bound_ms,
            best_rate,
            best_throughput,
            steps,
            stopped,
        }),
        ..Default::default()
    }
    .settle())
}
