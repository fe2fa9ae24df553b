//! Circuit breakers: one per dependency and scope (each tenant's database, this node's NATS
//! connection). A breaker counts outcomes over a rolling window; when enough calls failed it
//! opens and callers fail fast (`dependency_unavailable`) instead of waiting on something
//! that is down; after a pause it lets a probe through (half-open), and the probe's outcome
//! closes or reopens it. Every change of state is logged and counted.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use serde::Serialize;
use tokio::time::Instant;

use crate::settings::BreakerSettings;

/// What a breaker guards. Also the `dependency` label of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dependency {
    /// A tenant's own database (the scope is the tenant's slug).
    TenantDb,
    /// The cluster bus (the scope is `node`).
    Nats,
}

impl Dependency {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TenantDb => "tenant_db",
            Self::Nats => "nats",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}

/// A call refused because the breaker is open.
#[derive(Debug, thiserror::Error)]
#[error("{dependency} is failing; calls are refused for {retry_after_secs} s (circuit open)")]
pub struct BreakerOpen {
    pub dependency: &'static str,
    pub retry_after_secs: u64,
}

pub struct Breaker {
    dependency: Dependency,
    scope: String,
    settings: BreakerSettings,
    inner: Mutex<Inner>,
    /// Shared with the registry, for the transition counters.
    counters: Arc<DashMap<(Dependency, BreakerState), u64>>,
}

struct Inner {
    state: BreakerState,
    /// One bucket per second of the window: (second, successes, failures).
    buckets: VecDeque<(u64, u32, u32)>,
    /// When the breaker opened (Open) — probes are let through `open_secs` later.
    opened_at: Instant,
    /// Probes let through while half-open and not yet answered.
    probes: u32,
    /// The zero of the bucket clock.
    epoch: Instant,
}

impl Breaker {
    fn new(
        dependency: Dependency,
        scope: String,
        settings: BreakerSettings,
        counters: Arc<DashMap<(Dependency, BreakerState), u64>>,
    ) -> Self {
        let now = Instant::now();
        Self {
            dependency,
            scope,
            settings,
            inner: Mutex::new(Inner {
                state: BreakerState::Closed,
                buckets: VecDeque::new(),
                opened_at: now,
                probes: 0,
                epoch: now,
            }),
            counters,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves counts, never broken invariants: go on.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        self.lock().state
    }

    /// May a call go ahead? Open: no (until the pause is over, then one probe at a time).
    pub fn check(&self) -> Result<(), BreakerOpen> {
        let mut inner = self.lock();
        let open_for = Duration::from_secs(self.settings.open_secs);
        if inner.state == BreakerState::Open {
            let elapsed = inner.opened_at.elapsed();
            if elapsed < open_for {
                return Err(BreakerOpen {
                    dependency: self.dependency.as_str(),
                    retry_after_secs: (open_for - elapsed).as_secs().max(1),
                });
            }
            self.transition(&mut inner, BreakerState::HalfOpen);
        }
        if inner.state == BreakerState::HalfOpen {
            if inner.probes >= self.settings.half_open_probes {
                return Err(BreakerOpen {
                    dependency: self.dependency.as_str(),
                    retry_after_secs: 1,
                });
            }
            inner.probes += 1;
        }
        Ok(())
    }

    /// The outcome of a call that [`Breaker::check`] let through.
    pub fn record(&self, ok: bool) {
        let mut inner = self.lock();
        match inner.state {
            BreakerState::HalfOpen => {
                inner.probes = inner.probes.saturating_sub(1);
                if ok {
                    inner.buckets.clear();
                    self.transition(&mut inner, BreakerState::Closed);
                } else {
                    self.open(&mut inner);
                }
            }
            // Late answers of calls made before it opened change nothing.
            BreakerState::Open => {}
            BreakerState::Closed => {
                let second = inner.epoch.elapsed().as_secs();
                let window = self.settings.window_secs;
                while inner
                    .buckets
                    .front()
                    .is_some_and(|(s, _, _)| *s + window <= second)
                {
                    inner.buckets.pop_front();
                }
                match inner.buckets.back_mut() {
                    Some((s, good, bad)) if *s == second => {
                        if ok {
                            *good += 1
                        } else {
                            *bad += 1
                        }
                    }
                    _ => inner
                        .buckets
                        .push_back((second, u32::from(ok), u32::from(!ok))),
                }
                let (good, bad) = inner
                    .buckets
                    .iter()
                    .fold((0u64, 0u64), |(g, b), (_, good, bad)| {
                        (g + u64::from(*good), b + u64::from(*bad))
                    });
                let total = good + bad;
                if total >= u64::from(self.settings.min_calls)
                    && bad as f64 >= self.settings.failure_ratio * total as f64
                {
                    self.open(&mut inner);
                }
            }
        }
    }

    fn open(&self, inner: &mut Inner) {
        inner.opened_at = Instant::now();
        inner.probes = 0;
        inner.buckets.clear();
        self.transition(inner, BreakerState::Open);
    }

    fn transition(&self, inner: &mut Inner, to: BreakerState) {
        let from = inner.state;
        inner.state = to;
        *self.counters.entry((self.dependency, to)).or_default() += 1;
        match to {
            BreakerState::Open => tracing::warn!(
                dependency = self.dependency.as_str(),
                scope = %self.scope,
                from = from.as_str(),
                "circuit breaker opened: calls fail fast"
            ),
            _ => tracing::info!(
                dependency = self.dependency.as_str(),
                scope = %self.scope,
                from = from.as_str(),
                to = to.as_str(),
                "circuit breaker changed state"
            ),
        }
    }
}

/// Every breaker of this node.
#[derive(Clone)]
pub struct Breakers {
    settings: BreakerSettings,
    map: Arc<DashMap<(Dependency, String), Arc<Breaker>>>,
    /// Transitions into each state, per dependency (for `/metrics`).
    counters: Arc<DashMap<(Dependency, BreakerState), u64>>,
}

/// One breaker as `/metrics` and `/readyz` show it.
#[derive(Clone, Debug, Serialize)]
pub struct BreakerView {
    pub dependency: Dependency,
    pub scope: String,
    pub state: BreakerState,
}

impl Breakers {
    pub fn new(settings: BreakerSettings) -> Self {
        Self {
            settings,
            map: Arc::new(DashMap::new()),
            counters: Arc::new(DashMap::new()),
        }
    }

    /// The breaker of `dependency` for `scope`, made on first use.
    pub fn get(&self, dependency: Dependency, scope: &str) -> Arc<Breaker> {
        if let Some(b) = self.map.get(&(dependency, scope.to_owned())) {
            return b.clone();
        }
        self.map
            .entry((dependency, scope.to_owned()))
            .or_insert_with(|| {
                Arc::new(Breaker::new(
                    dependency,
                    scope.to_owned(),
                    self.settings.clone(),
                    self.counters.clone(),
                ))
            })
            .clone()
    }

    /// A tenant's database breaker.
    pub fn tenant_db(&self, slug: &str) -> Arc<Breaker> {
        self.get(Dependency::TenantDb, slug)
    }

    /// Every breaker and its state.
    pub fn views(&self) -> Vec<BreakerView> {
        let mut v: Vec<BreakerView> = self
            .map
            .iter()
            .map(|e| BreakerView {
                dependency: e.key().0,
                scope: e.key().1.clone(),
                state: e.value().state(),
            })
            .collect();
        v.sort_by(|a, b| (a.dependency.as_str(), &a.scope).cmp(&(b.dependency.as_str(), &b.scope)));
        v
    }

    /// Transitions into each state so far, per dependency.
    pub fn transitions(&self) -> Vec<(Dependency, BreakerState, u64)> {
        self.counters
            .iter()
            .map(|e| (e.key().0, e.key().1, *e.value()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breakers() -> Breakers {
        Breakers::new(BreakerSettings {
            window_secs: 10,
            min_calls: 4,
            failure_ratio: 0.5,
            open_secs: 5,
            half_open_probes: 1,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_fails_fast_probes_and_closes() {
        let b = breakers().tenant_db("acme");
        // Too few calls to judge: stays closed even if all fail.
        for _ in 0..3 {
            b.check().unwrap();
            b.record(false);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.check().unwrap();
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        let refused = b.check().unwrap_err();
        assert_eq!(refused.retry_after_secs, 5);

        // After the pause one probe goes through; a second waits for its answer.
        tokio::time::advance(Duration::from_secs(5)).await;
        b.check().unwrap();
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.check().is_err());
        // The probe fails: open again, for another pause.
        b.record(false);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.check().is_err());
        tokio::time::advance(Duration::from_secs(5)).await;
        b.check().unwrap();
        b.record(true);
        assert_eq!(b.state(), BreakerState::Closed);
        b.check().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let b = breakers().tenant_db("acme");
        for _ in 0..3 {
            b.record(false);
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        // The three old failures are gone: one more failure among successes does not open.
        for ok in [true, true, true, false] {
            b.record(ok);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn transitions_are_counted() {
        let all = breakers();
        let b = all.get(Dependency::Nats, "node");
        for _ in 0..4 {
            b.record(false);
        }
        let t = all.transitions();
        assert!(t.contains(&(Dependency::Nats, BreakerState::Open, 1)));
        assert_eq!(all.views()[0].state, BreakerState::Open);
    }
}
