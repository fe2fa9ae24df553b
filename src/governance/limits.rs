//! Rate limits with `governor` token buckets (GCRA): per tenant for HTTP requests and
//! messages, per client IP for new visitor sessions and logins, per account for logins. The
//! per-connection frame limit stays with the connection (`KEFU_REALTIME__FRAMES_PER_SEC`).
//!
//! Every check happens before the request does anything, so a refused request changes
//! nothing. A tenant's buckets are made the first time the tenant is seen, from the platform
//! defaults with its overrides (`limits.tenants.<slug>`), and live as long as the process.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use actix_web::HttpRequest;
use dashmap::DashMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::settings::LimitSettings;
use crate::tenancy::TenantRecord;

/// Which limit refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Limit {
    /// HTTP requests to one tenant.
    Http,
    /// Messages sent to one tenant, over every connection and long-poll.
    Messages,
    /// Frames from one WebSocket connection.
    ConnectionFrames,
    /// New visitor sessions from one client IP.
    IpSessions,
    /// Login attempts for one account.
    AccountLogins,
    /// Login attempts from one client IP.
    IpLogins,
}

impl Limit {
    /// The name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Http => "http",
            Limit::Messages => "messages",
            Limit::ConnectionFrames => "connection_frames",
            Limit::IpSessions => "ip_sessions",
            Limit::AccountLogins => "account_logins",
            Limit::IpLogins => "ip_logins",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Limit::Http => "too many requests for this tenant; retry later",
            Limit::Messages => "too many messages for this tenant; send again later",
            Limit::ConnectionFrames => "too many frames; slow down",
            Limit::IpSessions => "too many new visitor sessions from this address; retry later",
            Limit::AccountLogins => "too many login attempts for this account; retry later",
            Limit::IpLogins => "too many login attempts from this address; retry later",
        }
    }
}

/// A refused request: which limit, and when a retry may pass.
#[derive(Clone, Copy, Debug)]
pub struct Refusal {
    pub limit: Limit,
    pub retry_after: Duration,
}

impl Refusal {
    /// `Retry-After` in whole seconds, rounded up (0 would invite an immediate retry).
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }

    pub fn message(&self) -> &'static str {
        self.limit.message()
    }
}

impl From<Refusal> for crate::http::ApiError {
    fn from(r: Refusal) -> Self {
        Self::RateLimited {
            message: r.message().to_owned(),
            retry_after_secs: r.retry_after_secs(),
        }
    }
}

/// One tenant's buckets.
struct TenantBuckets {
    slug: String,
    http: DefaultDirectRateLimiter,
    messages: DefaultDirectRateLimiter,
    ip_sessions: DefaultKeyedRateLimiter<IpAddr>,
    account_logins: DefaultKeyedRateLimiter<String>,
    ip_logins: DefaultKeyedRateLimiter<IpAddr>,
}

/// Longest email kept as a bucket key; longer ones are cut (an attacker must not grow memory
/// with huge keys, and no real address is this long).
const MAX_ACCOUNT_KEY: usize = 254;

/// The rate limits of this server. Cheap to clone.
#[derive(Clone)]
pub struct Limits {
    inner: Arc<Inner>,
}

struct Inner {
    settings: LimitSettings,
    tenants: DashMap<i64, Arc<TenantBuckets>>,
    clock: DefaultClock,
}

fn per_sec(rate: u32, burst: u32) -> Quota {
    // Settings are validated non-zero at start-up.
    Quota::per_second(NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

fn per_min(rate: u32, burst: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            inner: Arc::new(Inner {
                settings,
                tenants: DashMap::new(),
                clock: DefaultClock::default(),
            }),
        }
    }

    fn buckets(&self, tenant: &TenantRecord) -> Arc<TenantBuckets> {
        if let Some(b) = self.inner.tenants.get(&tenant.id) {
            return b.clone();
        }
        let l = self.inner.settings.for_tenant(&tenant.slug);
        self.inner
            .tenants
            .entry(tenant.id)
            .or_insert_with(|| {
                Arc::new(TenantBuckets {
                    slug: tenant.slug.clone(),
                    http: RateLimiter::direct(per_sec(l.http_per_sec, l.http_burst)),
                    messages: RateLimiter::direct(per_sec(l.messages_per_sec, l.messages_burst)),
                    ip_sessions: RateLimiter::keyed(per_min(
                        l.ip_sessions_per_min,
                        l.ip_session_burst,
                    )),
                    account_logins: RateLimiter::keyed(per_min(
                        l.account_logins_per_min,
                        l.account_login_burst,
                    )),
                    ip_logins: RateLimiter::keyed(per_min(l.ip_logins_per_min, l.ip_login_burst)),
                })
            })
            .clone()
    }

    /// Turns a governor answer into ours, counting and logging a refusal.
    fn verdict(
        &self,
        slug: &str,
        limit: Limit,
        answer: Result<(), governor::NotUntil<<DefaultClock as Clock>::Instant>>,
    ) -> Result<(), Refusal> {
        answer.map_err(|not_until| {
            crate::metrics::global().rate_limited(slug, limit);
            // Debug, not info: under a flood this line would be the flood. The counter and the
            // request's own log line (status 429) are what an operator watches.
            tracing::debug!(tenant = slug, limit = limit.as_str(), "rate limited");
            Refusal {
                limit,
                retry_after: not_until.wait_time_from(self.inner.clock.now()),
            }
        })
    }

    /// A bucket for the frames of one WebSocket connection. It shares this server's clock:
    /// making a clock of its own reads the CPU's features (`cpuid`), which traps to the
    /// hypervisor on a virtual machine and was 5 % of the CPU spent opening a connection.
    pub fn connection_frames(&self, rate: u32, burst: u32) -> DefaultDirectRateLimiter {
        RateLimiter::direct_with_clock(per_sec(rate, burst), self.inner.clock.clone())
    }

    /// One HTTP request to `tenant`.
    pub fn http(&self, tenant: &TenantRecord) -> Result<(), Refusal> {
        let b = self.buckets(tenant);
        self.verdict(&b.slug, Limit::Http, b.http.check())
    }

    /// One message sent to `tenant` (WebSocket `send` or long-poll send).
    pub fn message(&self, tenant: &TenantRecord) -> Result<(), Refusal> {
        let b = self.buckets(tenant);
        self.verdict(&b.slug, Limit::Messages, b.messages.check())
    }

    /// A new visitor session from `ip`.
    pub fn visitor_session(&self, tenant: &TenantRecord, ip: IpAddr) -> Result<(), Refusal> {
        let b = self.buckets(tenant);
        self.verdict(&b.slug, Limit::IpSessions, b.ip_sessions.check_key(&ip))
    }

    /// A login attempt for `email` from `ip`: both buckets must have room.
    pub fn login(&self, tenant: &TenantRecord, email: &str, ip: IpAddr) -> Result<(), Refusal> {
        let b = self.buckets(tenant);
        self.verdict(&b.slug, Limit::IpLogins, b.ip_logins.check_key(&ip))?;
        let key: String = email.chars().take(MAX_ACCOUNT_KEY).collect();
        self.verdict(
            &b.slug,
            Limit::AccountLogins,
            b.account_logins.check_key(&key),
        )
    }

    /// Forgets keyed buckets that are full again (an idle IP or account costs nothing).
    pub fn sweep(&self) {
        for b in self.inner.tenants.iter() {
            b.ip_sessions.retain_recent();
            b.account_logins.retain_recent();
            b.ip_logins.retain_recent();
        }
    }

    /// The client address of `req` for the per-IP limits: the TCP peer, or the last
    /// `X-Forwarded-For` entry when the operator says a proxy sets it.
    pub fn client_ip(&self, req: &HttpRequest) -> IpAddr {
        let forwarded = self
            .inner
            .settings
            .trust_forwarded_for
            .then(|| {
                req.headers()
                    .get_all("x-forwarded-for")
                    .filter_map(|v| v.to_str().ok())
                    .flat_map(|v| v.split(','))
                    .filter_map(|s| s.trim().parse::<IpAddr>().ok())
                    .last()
            })
            .flatten();
        forwarded
            .or_else(|| req.peer_addr().map(|a| a.ip()))
            // No peer address only happens for requests built in unit tests.
            .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED))
    }
}

/// How often idle per-IP and per-account buckets are dropped.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenancy::TenantStatus;

    fn tenant(slug: &str) -> TenantRecord {
        TenantRecord {
            id: 1,
            slug: slug.into(),
            name: slug.into(),
            status: TenantStatus::Active,
            db_name: slug.into(),
        }
    }

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let limits = Limits::new(LimitSettings {
            http_per_sec: 1,
            http_burst: 2,
            ..LimitSettings::default()
        });
        let t = tenant("a");
        assert!(limits.http(&t).is_ok());
        assert!(limits.http(&t).is_ok());
        let r = limits.http(&t).unwrap_err();
        assert_eq!(r.limit, Limit::Http);
        assert_eq!(r.retry_after_secs(), 1);
    }

    #[test]
    fn overrides_apply_to_their_tenant_only() {
        let mut settings = LimitSettings {
            account_logins_per_min: 1,
            account_login_burst: 1,
            ..LimitSettings::default()
        };
        settings.tenants.insert(
            "vip".into(),
            crate::settings::LimitOverrides {
                account_login_burst: Some(3),
                ..Default::default()
            },
        );
        let limits = Limits::new(settings);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let vip = TenantRecord {
            id: 2,
            ..tenant("vip")
        };
        for _ in 0..3 {
            assert!(limits.login(&vip, "a@x", ip).is_ok());
        }
        assert!(limits.login(&vip, "a@x", ip).is_err());
        let plain = tenant("plain");
        assert!(limits.login(&plain, "a@x", ip).is_ok());
        let r = limits.login(&plain, "a@x", ip).unwrap_err();
        assert_eq!(r.limit, Limit::AccountLogins);
        // Another account from the same address still passes.
        assert!(limits.login(&plain, "b@x", ip).is_ok());
    }
}
