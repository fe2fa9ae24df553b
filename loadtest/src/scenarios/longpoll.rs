//! `longpoll`: visitors on HTTP long-poll (POST to send, GET `events` to receive) against
//! agents on WebSockets; the same checks as `chat`.

use std::time::Duration;

use anyhow::Result;

use super::engine::EngineConfig;
use crate::report::Report;

#[derive(Clone, Debug)]
pub struct LongpollConfig {
    /// Base URL of the server, such as `http://127.0.0.1:8080`.
    pub url: String,
    /// Bearer key of the operator API (the relay accepts any).
    pub platform_key: String,
    pub conversations: usize,
    /// Agents sharing the conversations; 0 means one agent per conversation.
    pub agents: usize,
    /// Messages per second in total, both sides of all conversations together.
    pub rate: f64,
    pub duration: Duration,
    /// The `wait` of each long-poll, in seconds (the contract allows up to 30).
    pub wait_secs: u32,
    pub drain_timeout: Duration,
    pub assign_timeout: Duration,
    pub provision_concurrency: usize,
    pub check_stored: bool,
    pub progress: bool,
}

impl Default for LongpollConfig {
    /// A smoke run: four conversations, 20 messages a second, two seconds.
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            platform_key: super::platform_key_from_env(),
            conversations: 4,
            agents: 0,
            rate: 20.0,
            duration: Duration::from_secs(2),
            wait_secs: 25,
            drain_timeout: Duration::from_secs(5),
            assign_timeout: Duration::from_secs(30),
            provision_concurrency: 8,
            check_stored: true,
            progress: false,
        }
    }
}

pub async fn run(config: LongpollConfig) -> Result<Report> {
    let engine = EngineConfig {
        url: config.url,
        agent_url: None,
        platform_key: config.platform_key,
        conversations: config.conversations,
        agents: config.agents,
        longpoll_wait: Some(config.wait_secs),
        assign_timeout: config.assign_timeout,
        drain_timeout: config.drain_timeout,
        provision_concurrency: config.provision_concurrency,
        progress: super::progress(config.progress),
    };
    super::run_single_phase(
        "longpoll",
        engine,
        config.rate,
        config.duration,
        config.check_stored,
    )
    .await
}
