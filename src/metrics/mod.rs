//! Prometheus metrics (`prometheus-client`), exposed on `/metrics`.
//!
//! Two kinds of numbers:
//!
//! - Events counted where they happen (messages, refusals, latencies, open connections): kept
//!   in [`Metrics`], one per process, reached through [`global`] so that the actors and
//!   connection loops can count with one line and no plumbing. Every series carries the
//!   tenant slug (never a visitor or conversation id), so label cardinality grows with the
//!   number of tenants and nothing else.
//! - State (agents by status, queued and active conversations, abandoned visitors): read at
//!   scrape time from the tenants' queues, see [`numbers`] and [`render`].
//!
//! Process metrics (memory, CPU, file descriptors) are read from `/proc` at scrape time.

pub mod history;
pub mod numbers;
mod process;

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::governance::{Governance, Limit};
use numbers::TenantNumbers;

/// The channel a message came in on.
#[derive(Clone, Copy, Debug)]
pub enum Channel {
    WebSocket,
    LongPoll,
}

impl Channel {
    fn as_str(self) -> &'static str {
        match self {
            Channel::WebSocket => "websocket",
            Channel::LongPoll => "longpoll",
        }
    }
}

/// Who a message goes to: `inbound` from a visitor to the tenant, `outbound` from an agent
/// to a visitor.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// What kind of long-lived connection.
#[derive(Clone, Copy, Debug)]
pub enum ConnKind {
    AgentWebSocket,
    VisitorWebSocket,
    LongPoll,
    Dashboard,
}

impl ConnKind {
    fn as_str(self) -> &'static str {
        match self {
            ConnKind::AgentWebSocket => "agent_websocket",
            ConnKind::VisitorWebSocket => "visitor_websocket",
            ConnKind::LongPoll => "longpoll",
            ConnKind::Dashboard => "dashboard",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabel {
    tenant: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MessageLabels {
    tenant: String,
    channel: &'static str,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    tenant: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    tenant: String,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TeamLabels {
    tenant: String,
    team: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TeamStatusLabels {
    tenant: String,
    team: String,
    status: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Delivery latency buckets: 1 ms to about 16 s (a commit is milliseconds; seconds mean
/// trouble).
fn delivery_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Cluster notice buckets: 100 µs to about 3 s (a trip through the broker on a quiet
/// network is a fraction of a millisecond; the tail is what matters).
fn notice_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// Queue wait buckets: 1 s to about 68 min.
fn wait_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

/// The event metrics of this process.
pub struct Metrics {
    messages: Family<MessageLabels, Counter>,
    rate_limited: Family<LimitLabels, Counter>,
    connections: Family<KindLabel, Gauge>,
    delivery: HistogramFamily<TenantLabel>,
    queue_wait: HistogramFamily<TeamLabels>,
    /// Cluster mode: a notice's trip from another node's publish call to this node's
    /// listener. Not by tenant: the trip is the broker's and the nodes', the same for all.
    notice: Histogram,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    messages: Family::default(),
    rate_limited: Family::default(),
    connections: Family::default(),
    delivery: Family::new_with_constructor(delivery_histogram),
    queue_wait: Family::new_with_constructor(wait_histogram),
    notice: notice_histogram(),
});

/// The metrics of this process.
pub fn global() -> &'static Metrics {
    &METRICS
}

/// Counts a long-lived connection for as long as it is alive.
pub struct ConnGuard(Gauge);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// A message accepted for storage.
    pub fn message(&self, tenant: &str, channel: Channel, direction: Direction) {
        self.messages
            .get_or_create(&MessageLabels {
                tenant: tenant.to_owned(),
                channel: channel.as_str(),
                direction: direction.as_str(),
            })
            .inc();
    }

    /// A request or frame refused by a rate limit.
    pub fn rate_limited(&self, tenant: &str, limit: Limit) {
        self.rate_limited
            .get_or_create(&LimitLabels {
                tenant: tenant.to_owned(),
                limit: limit.as_str(),
            })
            .inc();
    }

    /// A connection opened; it counts until the guard is dropped.
    pub fn connection(&self, kind: ConnKind) -> ConnGuard {
        let gauge = self.connections.get_or_create_owned(&KindLabel {
            kind: kind.as_str(),
        });
        gauge.inc();
        ConnGuard(gauge)
    }

    /// A write that reached its conversation's actor was stored, acknowledged and fanned out
    /// this long after.
    pub fn delivered(&self, tenant: &str, elapsed: Duration) {
        self.delivery
            .get_or_create(&TenantLabel {
                tenant: tenant.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Cluster mode: a notice of another node arrived `trip` after it was published.
    pub fn notice_arrived(&self, trip: Duration) {
        self.notice.observe(trip.as_secs_f64());
    }

    /// A conversation was assigned after waiting `waited` in its queue.
    pub fn queue_waited(&self, tenant: &str, team: &str, waited: chrono::TimeDelta) {
        self.queue_wait
            .get_or_create(&TeamLabels {
                tenant: tenant.to_owned(),
                team: team.to_owned(),
            })
            .observe(waited.as_seconds_f64().max(0.0));
    }
}

/// The whole `/metrics` answer (OpenMetrics text): this process's event metrics, the live
/// numbers of `tenants`, and the process.
pub fn render(tenants: &[TenantNumbers], governance: &Governance) -> String {
    let m = global();
    let mut r = Registry::with_prefix("kefu");
    r.register(
        "messages",
        "Messages accepted for storage, by tenant, channel and direction",
        m.messages.clone(),
    );
    r.register(
        "rate_limited",
        "Requests, messages and frames refused by a rate limit, by tenant and limit",
        m.rate_limited.clone(),
    );
    r.register(
        "connections",
        "Open long-lived connections on this node, by kind",
        m.connections.clone(),
    );
    r.register(
        "message_delivery_seconds",
        "Time from a write reaching its conversation to stored, acknowledged and delivered",
        m.delivery.clone(),
    );
    r.register(
        "queue_wait_seconds",
        "Time conversations waited in the queue before an agent was assigned",
        m.queue_wait.clone(),
    );
    r.register(
        "cluster_notice_seconds",
        "Cluster mode: time from another node publishing a notice to this node receiving it",
        m.notice.clone(),
    );
    register_numbers(&mut r, tenants);
    register_governance(&mut r, governance);
    let mut root = Registry::default();
    root.register_collector(Box::new(process::ProcessCollector));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &r);
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &root);
    let _ = prometheus_client::encoding::text::encode_eof(&mut out);
    out
}

/// Rewrites OpenMetrics text into the classic Prometheus text format (0.0.4), for scrapers
/// and tools that do not ask for OpenMetrics (`promtool check metrics`, older Prometheus):
/// there a counter's HELP and TYPE name the `_total` series itself, and `# UNIT` and
/// `# EOF` do not exist.
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let suffix = if counters.contains(name) {
                    "_total"
                } else {
                    ""
                };
                out.push_str(&format!("{prefix}{name}{suffix} {tail}"));
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// The state gauges, built fresh for every scrape from the tenants' numbers.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BreakerLabels {
    dependency: &'static str,
    /// The tenant's slug for its database, `node` for NATS.
    scope: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    dependency: &'static str,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CompartmentLabel {
    compartment: &'static str,
}

/// Circuit breakers (state as a 0/1 gauge per state, transitions) and bulkhead refusals.
fn register_governance(r: &mut Registry, g: &Governance) {
    use crate::governance::breaker::BreakerState;
    let state: Family<BreakerLabels, Gauge> = Family::default();
    for b in g.breakers.views() {
        for s in [
            BreakerState::Closed,
            BreakerState::HalfOpen,
            BreakerState::Open,
        ] {
            state
                .get_or_create(&BreakerLabels {
                    dependency: b.dependency.as_str(),
                    scope: b.scope.clone(),
                    state: s.as_str(),
                })
                .set(i64::from(b.state == s));
        }
    }
    let transitions: Family<TransitionLabels, Counter> = Family::default();
    for (dependency, to, n) in g.breakers.transitions() {
        transitions
            .get_or_create(&TransitionLabels {
                dependency: dependency.as_str(),
                state: to.as_str(),
            })
            .inc_by(n);
    }
    let rejected: Family<CompartmentLabel, Counter> = Family::default();
    for (c, n) in g.bulkheads.rejected() {
        rejected
            .get_or_create(&CompartmentLabel {
                compartment: c.as_str(),
            })
            .inc_by(n);
    }
    r.register(
        "circuit_breaker_state",
        "Circuit breakers by dependency and scope: 1 for the state each is in",
        state,
    );
    r.register(
        "circuit_breaker_transitions",
        "Circuit breaker changes of state, by dependency and the state entered",
        transitions,
    );
    r.register(
        "bulkhead_rejections",
        "Calls refused because a tenant's compartment for a dependency was full",
        rejected,
    );
}

fn register_numbers(r: &mut Registry, tenants: &[TenantNumbers]) {
    let agents: Family<StatusLabels, Gauge> = Family::default();
    let team_agents: Family<TeamStatusLabels, Gauge> = Family::default();
    let queued: Family<TeamLabels, Gauge> = Family::default();
    let active: Family<TeamLabels, Gauge> = Family::default();
    let oldest: Family<TeamLabels, Gauge<f64, std::sync::atomic::AtomicU64>> = Family::default();
    let abandoned: Family<TenantLabel, Counter> = Family::default();
    for t in tenants {
        for status in numbers::AGENT_STATUSES {
            let n = t.agents.iter().filter(|a| a.status == status).count();
            agents
                .get_or_create(&StatusLabels {
                    tenant: t.tenant.clone(),
                    status,
                })
                .set(n as i64);
        }
        for team in &t.teams {
            let labels = TeamLabels {
                tenant: t.tenant.clone(),
                team: team.slug.clone(),
            };
            queued.get_or_create(&labels).set(team.queued as i64);
            active.get_or_create(&labels).set(team.active as i64);
            oldest.get_or_create(&labels).set(team.oldest_wait_secs);
            for status in numbers::AGENT_STATUSES {
                let n = t
                    .agents
                    .iter()
                    .filter(|a| a.status == status && a.teams.contains(&team.slug))
                    .count();
                team_agents
                    .get_or_create(&TeamStatusLabels {
                        tenant: t.tenant.clone(),
                        team: team.slug.clone(),
                        status,
                    })
                    .set(n as i64);
            }
        }
        abandoned
            .get_or_create(&TenantLabel {
                tenant: t.tenant.clone(),
            })
            .inc_by(t.abandoned);
    }
    r.register(
        "agents",
        "Agents of the tenant by status (online, away, disconnected within their grace period, offline)",
        agents,
    );
    r.register(
        "team_agents",
        "Agents of each team by status; an agent in two teams counts in both",
        team_agents,
    );
    r.register(
        "conversations_queued",
        "Conversations waiting in each team's queue",
        queued,
    );
    r.register(
        "conversations_active",
        "Conversations an agent is handling, by team",
        active,
    );
    r.register(
        "queue_oldest_wait_seconds",
        "How long the conversation at the head of each team's queue has waited",
        oldest,
    );
    r.register(
        "visitors_abandoned",
        "Queued visitors who left or went silent before an agent took them, since the tenant's queue started on this node",
        abandoned,
    );
}

#[cfg(test)]
mod tests {
    #[test]
    fn classic_text_names_counters_by_their_samples() {
        let om = "# HELP kefu_messages Messages.\n# TYPE kefu_messages counter\n\
                  kefu_messages_total{tenant=\"a\"} 2\n# HELP kefu_agents Agents.\n\
                  # TYPE kefu_agents gauge\n# UNIT kefu_agents agents\nkefu_agents 1\n# EOF\n";
        assert_eq!(
            super::to_classic_text(om),
            "# HELP kefu_messages_total Messages.\n# TYPE kefu_messages_total counter\n\
             kefu_messages_total{tenant=\"a\"} 2\n# HELP kefu_agents Agents.\n\
             # TYPE kefu_agents gauge\nkefu_agents 1\n"
        );
    }
}
