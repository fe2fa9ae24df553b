//! `chat`: N conversations, one visitor and one agent each, both on WebSockets, each side
//! sending on an open-loop schedule for a while.

use std::time::Duration;

use anyhow::Result;

use super::engine::EngineConfig;
use crate::report::Report;

#[derive(Clone, Debug)]
pub struct ChatConfig {
    /// Base URL of the server, such as `http://127.0.0.1:8080`.
    pub url: String,
    /// Base URL the agents connect to instead, such as the second node of a cluster pair
    /// (`http://127.0.0.1:8081`); `None`: `url`. Provisioning, visitors and the stored check
    /// use `url`.
    pub agent_url: Option<String>,
    /// Bearer key of the operator API (the relay accepts any).
    pub platform_key: String,
    pub conversations: usize,
    /// Agents sharing the conversations (each gets `max_concurrent = ceil(N / agents)`);
    /// 0 means one agent per conversation.
    pub agents: usize,
    /// Messages per second in total, both sides of all conversations together; each side
    /// sends `rate / (2 * conversations)` per second.
    pub rate: f64,
    /// Length of the send window.
    pub duration: Duration,
    /// Longest wait after the window for the last acks and deliveries.
    pub drain_timeout: Duration,
    /// Longest wait for the server to assign every conversation.
    pub assign_timeout: Duration,
    /// Provisioning calls in flight at once (agent creation hashes passwords: keep it modest).
    pub provision_concurrency: usize,
    /// Read every conversation's history back and compare it with the acks.
    pub check_stored: bool,
    /// Draw a progress line on stderr.
    pub progress: bool,
}

impl Default for ChatConfig {
    /// A smoke run: four conversations, 40 messages a second, two seconds.
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            agent_url: None,
            platform_key: super::platform_key_from_env(),
            conversations: 4,
            agents: 0,
            rate: 40.0,
            duration: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(5),
            assign_timeout: Duration::from_secs(30),
            provision_concurrency: 8,
            check_stored: true,
            progress: false,
        }
    }
}

pub async fn run(config: ChatConfig) -> Result<Report> {
    let engine = EngineConfig {
        url: config.url,
        agent_url: config.agent_url,
        platform_key: config.platform_key,
        conversations: config.conversations,
        agents: config.agents,
        longpoll_wait: None,
        assign_timeout: config.assign_timeout,
        drain_timeout: config.drain_timeout,
        provision_concurrency: config.provision_concurrency,
        progress: super::progress(config.progress),
    };
    super::run_single_phase(
        "chat",
        engine,
        config.rate,
        config.duration,
        config.check_stored,
    )
    .await
}
