//! Typed settings: built-in defaults, then an optional TOML file, then `KEFU_*` environment
//! variables, then command-line flags. Anything invalid stops start-up with the setting named.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Everything a Kefu process needs to know before it starts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// HTTP + WebSocket listener. Port 0 picks a free port (tests do this).
    pub listen: SocketAddr,
    /// Embedded storage: the platform SQLite file and one file per tenant.
    pub data_dir: PathBuf,
    /// `postgres://…` selects PostgreSQL: this database is the platform one and every tenant
    /// gets a database of its own on the same server. Unset: SQLite under `data_dir`.
    pub database_url: Option<String>,
    /// Set: cluster mode over NATS. Unset: in-process bus.
    pub nats_url: Option<String>,
    /// This node's name in logs, metrics and `hello` frames.
    pub node_id: String,
    /// Operator API bearer key. Unset: generated once and kept in the platform database.
    pub platform_key: Option<String>,
    /// Agent token signing secret. Unset: generated once and kept in the platform database.
    pub jwt_secret: Option<String>,
    /// `pretty` for people, `json` for log collectors.
    pub log_format: LogFormat,
    /// HTTP worker threads; unset uses one per core.
    pub workers: Option<usize>,
    /// Threads the actors (conversations, hubs, queues) run on; unset uses half the cores.
    pub actor_threads: Option<usize>,
    /// Largest accepted HTTP request body, in bytes.
    pub max_body_bytes: usize,
    /// Lifetime of an agent token, in seconds.
    pub token_ttl_secs: u64,
    /// Tenant database pools: how many may be open at once, and after how long unused a
    /// pool is closed, so that a thousand quiet tenants do not hold a thousand pools.
    pub tenant_pools: TenantPoolSettings,
    /// Real-time limits and timeouts (WebSocket, long-poll, queue).
    pub realtime: RealtimeSettings,
    /// Rate limits per tenant, per client IP and per account (docs/operations.md).
    pub limits: LimitSettings,
    /// The Prometheus endpoint `/metrics`.
    pub metrics: MetricsSettings,
    /// The supervisor and operator dashboards.
    pub dashboard: DashboardSettings,
    /// Circuit breakers around each dependency (docs/operations.md).
    pub breakers: BreakerSettings,
    /// Bounded concurrency per tenant per dependency (docs/operations.md).
    pub bulkheads: BulkheadSettings,
    /// Span export over OTLP/HTTP (binaries built with the `otlp` cargo feature).
    pub otlp: OtlpSettings,
}

/// Token buckets: each limit refills at a sustained rate and holds a burst. The platform
/// defaults apply to every tenant; `tenants.<slug>` overrides any of them for one tenant.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// HTTP requests per second to one tenant's API (every `/api/*` and `/ws/*` request)...
    pub http_per_sec: u32,
    /// ...and in a burst.
    pub http_burst: u32,
    /// Messages per second one tenant's visitors and agents may send, all connections and
    /// long-polls together...
    pub messages_per_sec: u32,
    /// ...and in a burst.
    pub messages_burst: u32,
    /// New visitor sessions per minute from one client IP, per tenant...
    pub ip_sessions_per_min: u32,
    /// ...and in a burst.
    pub ip_session_burst: u32,
    /// Login attempts per minute for one account (email) of a tenant...
    pub account_logins_per_min: u32,
    /// ...and in a burst.
    pub account_login_burst: u32,
    /// Login attempts per minute from one client IP, per tenant...
    pub ip_logins_per_min: u32,
    /// ...and in a burst.
    pub ip_login_burst: u32,
    /// Take the client IP from the last `X-Forwarded-For` entry (behind a reverse proxy that
    /// sets it). Off: the TCP peer address, which a client cannot forge.
    pub trust_forwarded_for: bool,
    /// Per-tenant overrides, keyed by tenant slug.
    pub tenants: BTreeMap<String, LimitOverrides>,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            // A busy tenant of a few hundred agents stays well below these; one runaway
            // integration or scraper hits them before it hurts its neighbours.
            http_per_sec: 500,
            http_burst: 1000,
            messages_per_sec: 500,
            messages_burst: 1000,
            // A visitor opens one session per visit; a page reloaded in a loop does not.
            // Generous enough for a shared office or mobile carrier NAT.
            ip_sessions_per_min: 30,
            ip_session_burst: 60,
            // Password guessing: a person mistypes a few times, a script tries thousands.
            account_logins_per_min: 10,
            account_login_burst: 10,
            // A whole call centre behind one NAT logs in at shift start.
            ip_logins_per_min: 60,
            ip_login_burst: 60,
            trust_forwarded_for: false,
            tenants: BTreeMap::new(),
        }
    }
}

/// One tenant's exceptions to [`LimitSettings`]; an unset field keeps the platform default.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitOverrides {
    pub http_per_sec: Option<u32>,
    pub http_burst: Option<u32>,
    pub messages_per_sec: Option<u32>,
    pub messages_burst: Option<u32>,
    pub ip_sessions_per_min: Option<u32>,
    pub ip_session_burst: Option<u32>,
    pub account_logins_per_min: Option<u32>,
    pub account_login_burst: Option<u32>,
    pub ip_logins_per_min: Option<u32>,
    pub ip_login_burst: Option<u32>,
}

impl LimitSettings {
    /// The limits in force for the tenant `slug`: its overrides over the platform defaults.
    pub fn for_tenant(&self, slug: &str) -> LimitSettings {
        let mut l = LimitSettings {
            tenants: BTreeMap::new(),
            ..self.clone()
        };
        if let Some(o) = self.tenants.get(slug) {
            let set = |field: &mut u32, value: Option<u32>| {
                if let Some(v) = value {
                    *field = v;
                }
            };
            set(&mut l.http_per_sec, o.http_per_sec);
            set(&mut l.http_burst, o.http_burst);
            set(&mut l.messages_per_sec, o.messages_per_sec);
            set(&mut l.messages_burst, o.messages_burst);
            set(&mut l.ip_sessions_per_min, o.ip_sessions_per_min);
            set(&mut l.ip_session_burst, o.ip_session_burst);
            set(&mut l.account_logins_per_min, o.account_logins_per_min);
            set(&mut l.account_login_burst, o.account_login_burst);
            set(&mut l.ip_logins_per_min, o.ip_logins_per_min);
            set(&mut l.ip_login_burst, o.ip_login_burst);
        }
        l
    }

    /// Every number with the variable that sets it, for validation.
    fn numbers(&self, prefix: &str) -> [(String, u32); 10] {
        let n = |name: &str, v| (format!("{prefix}{name}"), v);
        [
            n("HTTP_PER_SEC", self.http_per_sec),
            n("HTTP_BURST", self.http_burst),
            n("MESSAGES_PER_SEC", self.messages_per_sec),
            n("MESSAGES_BURST", self.messages_burst),
            n("IP_SESSIONS_PER_MIN", self.ip_sessions_per_min),
            n("IP_SESSION_BURST", self.ip_session_burst),
            n("ACCOUNT_LOGINS_PER_MIN", self.account_logins_per_min),
            n("ACCOUNT_LOGIN_BURST", self.account_login_burst),
            n("IP_LOGINS_PER_MIN", self.ip_logins_per_min),
            n("IP_LOGIN_BURST", self.ip_login_burst),
        ]
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// Serve `/metrics` without the platform key (for a scraper on a private network).
    /// Off: Prometheus sends the platform key as a bearer token.
    pub public: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DashboardSettings {
    /// Seconds between two pushes of the numbers to an open dashboard.
    pub push_secs: u64,
}

impl Default for DashboardSettings {
    fn default() -> Self {
        Self { push_secs: 2 }
    }
}

/// When a breaker opens and how it recovers. One set of numbers for every dependency: what
/// differs between them is how often they are called, which the minimum volume absorbs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSettings {
    /// The rolling window over which calls are counted, in seconds.
    pub window_secs: u64,
    /// Fewest calls in the window before the error rate means anything.
    pub min_calls: u32,
    /// Share of failed calls in the window that opens the breaker (0 < ratio ≤ 1).
    pub failure_ratio: f64,
    /// How long an open breaker fails calls fast before letting a probe through.
    pub open_secs: u64,
    /// Calls let through while half-open; their outcome closes or reopens the breaker.
    pub half_open_probes: u32,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self {
            window_secs: 10,
            min_calls: 20,
            failure_ratio: 0.5,
            open_secs: 5,
            half_open_probes: 1,
        }
    }
}

/// How much of this node one tenant may occupy at once for one dependency.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkheadSettings {
    /// HTTP requests of one tenant using its database at once.
    pub tenant_db_requests: u32,
    /// Writes (messages, changes, reads) of one tenant in flight at once: each conversation
    /// has at most one, so this bounds how many of a stuck tenant's conversations wait.
    pub tenant_db_writes: u32,
}

impl Default for BulkheadSettings {
    fn default() -> Self {
        Self {
            tenant_db_requests: 256,
            tenant_db_writes: 4096,
        }
    }
}

/// Where spans go when the binary is built with the `otlp` feature (docs/operations.md,
/// "Tracing export (OTLP)"). Without the feature a set endpoint is only warned about.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpSettings {
    /// Base URL of an OTLP/HTTP receiver (a collector), such as `http://127.0.0.1:4318`;
    /// spans are POSTed to `<endpoint>/v1/traces`. Unset: nothing is exported.
    pub endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for OtlpSettings {
    fn default() -> Self {
        Self {
            endpoint: None,
            service_name: "kefu".to_owned(),
        }
    }
}

/// The slowest dashboard refresh the supervisors' promise allows ("at least every 5 s").
const MAX_DASHBOARD_PUSH_SECS: u64 = 5;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RealtimeSettings {
    /// Longest text message, in characters.
    pub max_text_chars: usize,
    /// Largest WebSocket frame accepted from a client, in bytes.
    pub max_frame_bytes: usize,
    /// Frames queued for one connection before it is judged too slow and closed (4001).
    pub outbound_buffer: usize,
    /// Seconds between server pings.
    pub heartbeat_secs: u64,
    /// Seconds without any frame or pong from the client before the connection is closed.
    pub idle_timeout_secs: u64,
    /// Frames per second one connection may send, sustained...
    pub frames_per_sec: u32,
    /// ...and in a burst.
    pub frame_burst: u32,
    /// Frames refused for flooding before the connection is closed (1008).
    pub flood_limit: u32,
    /// Seconds an agent who lost every connection keeps its conversations.
    pub agent_grace_secs: u64,
    /// Seconds a queued visitor may be gone (no socket, no poll) before counting as abandoned.
    pub queue_abandon_secs: u64,
}

impl Default for RealtimeSettings {
    fn default() -> Self {
        Self {
            max_text_chars: 4000,
            max_frame_bytes: 64 * 1024,
            outbound_buffer: 512,
            heartbeat_secs: 10,
            idle_timeout_secs: 30,
            frames_per_sec: 50,
            frame_burst: 100,
            flood_limit: 200,
            agent_grace_secs: 60,
            queue_abandon_secs: 120,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantPoolSettings {
    /// Open tenant pools at most; the least recently used is closed past this.
    pub max_open: usize,
    /// Seconds without use after which a tenant pool is closed.
    pub idle_secs: u64,
    /// Connections per tenant pool at most (PostgreSQL; SQLite also uses it for readers).
    pub connections: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Command-line values that override every other source.
#[derive(Debug, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid setting {setting}: {reason}")]
    Setting {
        setting: &'static str,
        reason: String,
    },
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("./data"),
            database_url: None,
            nats_url: None,
            node_id: default_node_id(),
            platform_key: None,
            jwt_secret: None,
            log_format: LogFormat::Pretty,
            workers: None,
            actor_threads: None,
            max_body_bytes: 64 * 1024,
            token_ttl_secs: 12 * 3600,
            tenant_pools: TenantPoolSettings {
                max_open: 256,
                idle_secs: 300,
                connections: 8,
            },
            realtime: RealtimeSettings::default(),
            limits: LimitSettings::default(),
            metrics: MetricsSettings::default(),
            dashboard: DashboardSettings::default(),
            breakers: BreakerSettings::default(),
            bulkheads: BulkheadSettings::default(),
            otlp: OtlpSettings::default(),
        }
    }
}

/// The shortest secret we accept from configuration: 16 bytes of entropy in hex or base64
/// is at least this long, and a shorter one is almost certainly a placeholder.
const MIN_SECRET_LEN: usize = 16;

impl Settings {
    /// Loads defaults, then `overrides.config` (if any), then `KEFU_*` variables, then the
    /// command-line overrides, and validates the result.
    pub fn load(overrides: Overrides) -> Result<Self, SettingsError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = &overrides.config {
            figment = figment.merge(Toml::file_exact(path));
        }
        // `KEFU_TENANT_POOLS__MAX_OPEN` reaches `tenant_pools.max_open`.
        figment = figment.merge(Env::prefixed("KEFU_").split("__"));
        let mut settings: Settings = figment.extract().map_err(describe)?;
        if let Some(listen) = overrides.listen {
            settings.listen = listen;
        }
        if let Some(dir) = overrides.data_dir {
            settings.data_dir = dir;
        }
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: shapes of URLs, ranges, secret lengths.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |setting, reason: &str| {
            Err(SettingsError::Setting {
                setting,
                reason: reason.to_owned(),
            })
        };
        if let Some(url) = &self.database_url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return bad(
                    "KEFU_DATABASE_URL",
                    "must be a postgres:// URL (leave it unset for SQLite)",
                );
            }
            if url::Url::parse(url).is_err() {
                return bad("KEFU_DATABASE_URL", "is not a valid URL");
            }
        }
        if let Some(url) = &self.nats_url {
            if url.trim().is_empty() {
                return bad(
                    "KEFU_NATS_URL",
                    "is empty (leave it unset for a single node)",
                );
            }
            if self.database_url.is_none() {
                return bad(
                    "KEFU_NATS_URL",
                    "cluster mode needs KEFU_DATABASE_URL=postgres://… too (SQLite files belong to one node)",
                );
            }
        }
        if self.node_id.trim().is_empty() || self.node_id.len() > 64 {
            return bad("KEFU_NODE_ID", "must be 1 to 64 characters");
        }
        for (name, secret) in [
            ("KEFU_PLATFORM_KEY", &self.platform_key),
            ("KEFU_JWT_SECRET", &self.jwt_secret),
        ] {
            if let Some(secret) = secret
                && secret.len() < MIN_SECRET_LEN
            {
                return bad(name, "must be at least 16 characters");
            }
        }
        if self.workers == Some(0) {
            return bad("KEFU_WORKERS", "must be at least 1");
        }
        if self.actor_threads == Some(0) {
            return bad("KEFU_ACTOR_THREADS", "must be at least 1");
        }
        if self.max_body_bytes < 1024 {
            return bad("KEFU_MAX_BODY_BYTES", "must be at least 1024");
        }
        if self.token_ttl_secs < 60 {
            return bad("KEFU_TOKEN_TTL_SECS", "must be at least 60");
        }
        if self.tenant_pools.max_open == 0 {
            return bad("KEFU_TENANT_POOLS__MAX_OPEN", "must be at least 1");
        }
        if self.tenant_pools.connections == 0 {
            return bad("KEFU_TENANT_POOLS__CONNECTIONS", "must be at least 1");
        }
        let rt = &self.realtime;
        for (name, value) in [
            ("KEFU_REALTIME__MAX_TEXT_CHARS", rt.max_text_chars as u64),
            ("KEFU_REALTIME__MAX_FRAME_BYTES", rt.max_frame_bytes as u64),
            ("KEFU_REALTIME__OUTBOUND_BUFFER", rt.outbound_buffer as u64),
            ("KEFU_REALTIME__HEARTBEAT_SECS", rt.heartbeat_secs),
            (
                "KEFU_REALTIME__FRAMES_PER_SEC",
                u64::from(rt.frames_per_sec),
            ),
            ("KEFU_REALTIME__FRAME_BURST", u64::from(rt.frame_burst)),
            ("KEFU_REALTIME__FLOOD_LIMIT", u64::from(rt.flood_limit)),
        ] {
            if value == 0 {
                return bad(name, "must be at least 1");
            }
        }
        let limits = &self.limits;
        let overridden = limits
            .tenants
            .keys()
            .map(|slug| (slug, limits.for_tenant(slug)));
        for (name, value) in limits
            .numbers("KEFU_LIMITS__")
            .into_iter()
            .chain(overridden.flat_map(|(slug, l)| {
                l.numbers(&format!("limits.tenants.{slug}."))
                    .map(|(name, v)| (name.to_lowercase(), v))
            }))
        {
            if value == 0 {
                return Err(SettingsError::Setting {
                    setting: "limits",
                    reason: format!("{name} must be at least 1"),
                });
            }
        }
        let b = &self.breakers;
        if b.window_secs == 0 || b.open_secs == 0 || b.min_calls == 0 || b.half_open_probes == 0 {
            return bad(
                "KEFU_BREAKERS",
                "window_secs, open_secs, min_calls and half_open_probes must be at least 1",
            );
        }
        if !(b.failure_ratio > 0.0 && b.failure_ratio <= 1.0) {
            return bad(
                "KEFU_BREAKERS__FAILURE_RATIO",
                "must be above 0 and at most 1",
            );
        }
        if self.bulkheads.tenant_db_requests == 0 || self.bulkheads.tenant_db_writes == 0 {
            return bad("KEFU_BULKHEADS", "every compartment must hold at least 1");
        }
        if !(1..=MAX_DASHBOARD_PUSH_SECS).contains(&self.dashboard.push_secs) {
            return bad("KEFU_DASHBOARD__PUSH_SECS", "must be 1 to 5");
        }
        if let Some(endpoint) = &self.otlp.endpoint {
            match url::Url::parse(endpoint) {
                Ok(url) if url.scheme() == "http" && url.host().is_some() => {}
                // The exporter is built without TLS to keep the optional dependency tree
                // small: a collector next to the node (sidecar, agent) takes plain HTTP.
                Ok(url) if url.scheme() == "https" => {
                    return bad(
                        "KEFU_OTLP__ENDPOINT",
                        "https is not supported: send to a collector on this host or network over http://",
                    );
                }
                _ => {
                    return bad(
                        "KEFU_OTLP__ENDPOINT",
                        "must be an http:// URL such as http://127.0.0.1:4318",
                    );
                }
            }
        }
        if self.otlp.service_name.trim().is_empty() {
            return bad("KEFU_OTLP__SERVICE_NAME", "must not be empty");
        }
        if rt.idle_timeout_secs <= rt.heartbeat_secs {
            return bad(
                "KEFU_REALTIME__IDLE_TIMEOUT_SECS",
                "must be longer than KEFU_REALTIME__HEARTBEAT_SECS",
            );
        }
        Ok(())
    }

    /// Where the embedded databases live.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

/// Names each bad setting the way the user wrote it: `KEFU_LISTEN` for a variable,
/// `listen` (with the file) for a TOML key.
fn describe(err: figment::Error) -> SettingsError {
    let lines: Vec<String> = err
        .into_iter()
        .map(|e| {
            let from_env = e
                .metadata
                .as_ref()
                .is_some_and(|m| m.name.contains("environment"));
            let name = if from_env {
                format!("KEFU_{}", e.path.join("__").to_uppercase())
            } else {
                e.path.join(".")
            };
            let source = e
                .metadata
                .as_ref()
                .and_then(|m| m.source.as_ref())
                .map(|s| format!(" (in {s})"))
                .unwrap_or_default();
            format!("setting {name}{source}: {}", e.kind)
        })
        .collect();
    SettingsError::Invalid(lines.join("; "))
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "kefu".to_owned());
    let suffix: u16 = rand::random();
    format!("{host}-{suffix:04x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_limit_is_refused_with_its_name() {
        let mut s = Settings::default();
        s.limits.ip_login_burst = 0;
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("KEFU_LIMITS__IP_LOGIN_BURST"), "{err}");

        let mut s = Settings::default();
        s.limits.tenants.insert(
            "acme".into(),
            LimitOverrides {
                http_per_sec: Some(0),
                ..Default::default()
            },
        );
        let err = s.validate().unwrap_err().to_string();
        assert!(err.contains("limits.tenants.acme.http_per_sec"), "{err}");
    }

    #[test]
    fn overrides_fill_in_over_the_defaults() {
        let mut l = LimitSettings::default();
        l.tenants.insert(
            "acme".into(),
            LimitOverrides {
                messages_burst: Some(7),
                ..Default::default()
            },
        );
        let acme = l.for_tenant("acme");
        assert_eq!(acme.messages_burst, 7);
        assert_eq!(acme.messages_per_sec, l.messages_per_sec);
        assert_eq!(l.for_tenant("other").messages_burst, l.messages_burst);
    }

    #[test]
    fn an_otlp_endpoint_must_be_plain_http() {
        let mut s = Settings::default();
        s.otlp.endpoint = Some("http://127.0.0.1:4318".into());
        assert!(s.validate().is_ok());
        for bad in ["https://collector:4318", "127.0.0.1:4318", "not a url"] {
            s.otlp.endpoint = Some(bad.into());
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains("KEFU_OTLP__ENDPOINT"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_dashboard_push_stays_within_five_seconds() {
        let mut s = Settings::default();
        s.dashboard.push_secs = 6;
        assert!(s.validate().is_err());
    }
}
