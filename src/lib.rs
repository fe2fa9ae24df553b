//! Kefu (客服): a multi-tenant customer-service server.
//!
//! # Layout
//!
//! - [`settings`]: typed configuration: defaults, then a TOML file, then `KEFU_*` variables.
//! - [`telemetry`]: `tracing` subscriber set-up (pretty or JSON lines).
//! - [`trace_context`]: W3C `traceparent`, carried from requests and frames to every node.
//! - [`startup`]: [`startup::Application`] binds the listener, wires state and runs the server.
//! - [`cli`]: the `kefu` command line (`serve`, `tenant …`, `migrate`).
//! - [`demo`]: the `--demo` tenant.
//! - [`storage`]: the platform database, one database per tenant (SQLite files or PostgreSQL
//!   databases), lazily opened and capped tenant pools, migrations.
//! - [`tenancy`]: tenant names, host → tenant resolution with its cache, all-or-nothing
//!   onboarding, and the extractor that hands a handler its tenant's database.
//! - [`accounts`]: agents, roles, teams, password hashing and signed agent tokens.
//! - [`conversations`]: conversations and their message log (`seq` allocation, system
//!   messages for state changes).
//! - [`protocol`]: the WebSocket frames, parsed and encoded.
//! - [`actors`]: the real-time core: conversation, agent, visitor and queue actors, and the
//!   bus between them.
//! - [`cluster`]: cluster mode: NATS notices between nodes, queue leases in PostgreSQL.
//! - [`governance`]: rate limits per tenant, per client IP and per account.
//! - [`metrics`]: Prometheus metrics and the live numbers behind the dashboards.
//! - [`http`]: routes, the JSON error shape, request ids, the platform and tenant APIs, the
//!   dashboards.

pub mod accounts;
pub mod actors;
pub mod cli;
pub mod cluster;
pub mod conversations;
pub mod demo;
pub mod governance;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod settings;
pub mod startup;
pub mod storage;
pub mod telemetry;
pub mod tenancy;
pub mod trace_context;
