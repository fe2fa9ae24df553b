//! Kefu's load-test harness, and the bare relay it is measured against.
//!
//! Every scenario speaks Kefu's public protocol (`shared/contract/api-v1.md`) to a running
//! server, provisioning its own tenant, agents and visitors through the public APIs, so the
//! same run can be pointed at Kefu and at the relay and the two reports compared.
//!
//! Layout, one job per module:
//!
//! - [`scenarios`]: `chat`, `longpoll`, `ramp` and `connections`, each a `…Config` (whose
//!   `Default` is a tiny smoke run) and an async `run(config) -> anyhow::Result<Report>`;
//!   `scenarios::engine` (private) is the conversation machinery the first three share.
//! - [`relay`]: the bare relay baseline (`kefu-loadtest relay`); its work per frame is also
//!   [`relay::Core`], which `examples/actix_relay.rs` serves on Kefu's WebSocket stack.
//! - [`client`]: HTTP provisioning, long-poll calls, history reads and WebSocket connects,
//!   with the tenant's `Host` header and chosen source addresses.
//! - [`protocol`]: the frames read and written, and the send stamp carried in message text.
//! - [`check`]: per-conversation seq tracking: loss, duplication and order.
//! - [`stats`]: HDR histograms, the shared per-phase recorder, live counters, the clock.
//! - [`schedule`]: open-loop send timetables.
//! - [`report`]: the report, its table, and Kefu/baseline comparisons.
//! - [`progress`]: the progress line.
//! - `main.rs`: command-line wiring only.
//!
//! The library spawns its tasks with `tokio::spawn` and needs no multi-thread runtime, so the
//! server's own tests can run a scenario from an `actix_web::test` (current-thread) runtime.

pub mod check;
pub mod client;
pub mod progress;
pub mod protocol;
pub mod relay;
pub mod report;
pub mod scenarios;
pub mod schedule;
pub mod stats;

pub use report::{Comparison, Report};
pub use stats::Summary;
