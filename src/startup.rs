//! Building and running the server: [`Application::build`] opens storage, migrates, loads
//! secrets and binds the listener (port 0 picks a free one, which tests rely on).

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix_web::dev::{Server, ServerHandle};
use actix_web::middleware::from_fn;
use actix_web::{App, HttpServer, web};

use crate::accounts::TokenKeys;
use crate::actors::{ActorThreads, Realtime};
use crate::cluster::{Cluster, ClusterError};
use crate::governance::{Governance, Limits, limits};
use crate::http::{self, BodyLimit};
use crate::metrics::history::History;
use crate::settings::Settings;
use crate::storage::{Storage, secrets};
use crate::tenancy::Tenants;

/// How long a graceful shutdown waits for requests in flight before closing them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What every handler shares.
pub struct AppState {
    pub settings: Arc<Settings>,
    /// Tenant directory and, through it, storage.
    pub tenants: Tenants,
    /// Issues and checks agent tokens.
    pub tokens: TokenKeys,
    /// The operator's bearer key.
    pub platform_key: String,
    /// The real-time core: actors, writers, connections.
    pub realtime: Realtime,
    /// Rate limits per tenant, client IP and account.
    pub limits: Limits,
    /// The last minutes of each tenant's numbers, for the dashboard's charts.
    pub history: History,
}

pub struct Application {
    port: u16,
    server: Server,
    state: web::Data<AppState>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let storage = Storage::open(&settings).await?;
        let tenants = prepare_tenants(storage.clone()).await?;
        let secrets = secrets::load_or_generate(storage.platform(), &settings).await?;
        if secrets.platform_key_generated {
            // Printed once, on the console rather than in the logs, and never again.
            println!(
                "Generated the platform key (kept in the platform database; shown only now):\n  {}",
                secrets.platform_key
            );
        }
        // Half the cores by default: a message crosses from its socket's worker to its
        // conversation's actor, to the writer and on to two hubs, and every crossing to a
        // sleeping thread is a wake-up. On two cores one actor thread beside two HTTP workers
        // cost 10 % less CPU per message than two, with the same ramp ceiling
        // (docs/benchmarks.md).
        let threads = settings.actor_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
        });
        let actor_threads = ActorThreads::start(threads);
        let cluster = match &settings.nats_url {
            None => None,
            Some(url) => {
                let platform_url = tenants
                    .storage()
                    .platform_url()
                    .ok_or(ClusterError::NeedsPostgres)?;
                // Made on the first actor thread, so that the NATS connection's tasks (the
                // client's socket, the publisher, the subscriptions) run beside the actors
                // that publish and receive notices: a notice then goes from a conversation
                // actor to the socket, and from the socket to a hub, without waking another
                // thread (docs/benchmarks.md, "Cross-node").
                let (nats, node) = (url.clone(), settings.node_id.clone());
                let cluster = actor_threads
                    .run_on_first(
                        async move { Cluster::connect(&nats, &node, &platform_url).await },
                    )
                    .await
                    .ok_or_else(|| ClusterError::Connect {
                        url: url.clone(),
                        reason: "the actor thread stopped".to_owned(),
                    })??;
                tracing::info!(nats = %url, node = %settings.node_id, "cluster mode");
                Some(cluster)
            }
        };
        let realtime = Realtime::start(
            settings.node_id.clone(),
            settings.realtime.clone(),
            tenants.clone(),
            actor_threads,
            cluster,
            Governance::new(settings.breakers.clone(), settings.bulkheads.clone()),
        );
        let limits = Limits::new(settings.limits.clone());
        sweep_limits(limits.clone(), realtime.shutdown_token());
        let state = web::Data::new(AppState {
            limits,
            history: History::default(),
            tokens: TokenKeys::new(&secrets.jwt_secret, settings.token_ttl_secs),
            platform_key: secrets.platform_key,
            tenants,
            realtime,
            settings: Arc::new(settings),
        });

        History::spawn_sampler(state.clone());
        let listener = TcpListener::bind(state.settings.listen)?;
        let port = listener.local_addr()?.port();
        let limit = state.settings.max_body_bytes;
        let app_state = state.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .app_data(web::PayloadConfig::new(limit))
                .app_data(BodyLimit(limit))
                .app_data(web::PathConfig::default().error_handler(http::path_error))
                .wrap(from_fn(http::middleware::request_context))
                .configure(http::routes)
                .default_service(web::to(http::not_found))
        })
        // Frames are small and must leave at once. Without this, Nagle's algorithm holds a
        // frame written while an earlier one is unacknowledged until the client's (delayed,
        // up to 40 ms) ACK: a message right behind a heartbeat ping took 20-45 ms
        // (docs/benchmarks.md, "The 30–45 ms tail was Nagle's algorithm").
        .tcp_nodelay(true)
        // Signals are ours to handle: WebSockets must be told 1001 before the server stops.
        .disable_signals()
        .shutdown_timeout(SHUTDOWN_GRACE.as_secs());
        if let Some(workers) = state.settings.workers {
            server = server.workers(workers);
        }
        let server = server.listen(listener)?.run();
        tracing::info!(port, node = %state.settings.node_id, "kefu listening");
        Ok(Self {
            port,
            server,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn state(&self) -> web::Data<AppState> {
        self.state.clone()
    }

    /// Stops this server from outside (tests, signals).
    pub fn stopper(&self) -> Stopper {
        Stopper {
            realtime: self.state.realtime.clone(),
            server: self.server.handle(),
        }
    }

    /// Runs until stopped by a [`Stopper`] (tests) or nothing (callers that handle signals).
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }

    /// Runs until SIGTERM or Ctrl-C, then stops gracefully: WebSockets are closed with 1001,
    /// requests in flight finish, everything accepted is written, and the call returns.
    pub async fn run_until_signalled(self) -> std::io::Result<()> {
        let stopper = self.stopper();
        actix_web::rt::spawn(async move {
            wait_for_signal().await;
            tracing::info!("signal received; stopping");
            stopper.stop().await;
        });
        self.server.await
    }
}

/// Stops a running [`Application`].
#[derive(Clone)]
pub struct Stopper {
    realtime: crate::actors::Realtime,
    server: ServerHandle,
}

impl Stopper {
    /// Stops without waiting: for teardown in `Drop`, where nothing can be awaited.
    pub fn stop_now(&self) {
        self.realtime.stop_now();
        // The command is sent when `stop` is called; the returned future only awaits it.
        drop(self.server.stop(false));
    }

    pub async fn stop(&self) {
        // Connections first (their close frames go out while the server still runs), then the
        // listener and requests in flight, then the writers and actors.
        self.realtime.shutdown_token().cancel();
        self.server.stop(true).await;
        self.realtime.shutdown().await;
    }
}

/// Drops idle per-IP and per-account buckets now and then, until the server stops.
fn sweep_limits(limits: Limits, shutdown: tokio_util::sync::CancellationToken) {
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(limits::SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => limits.sweep(),
            }
        }
    });
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C only");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Removes onboardings a dead process left unfinished and brings every tenant database's
/// schema up to date. Run at start-up and by `kefu migrate`.
pub async fn prepare_tenants(storage: Storage) -> anyhow::Result<Tenants> {
    let tenants = Tenants::new(storage.clone());
    let swept = tenants.sweep_unfinished().await?;
    if swept > 0 {
        tracing::warn!(swept, "removed unfinished onboardings");
    }
    for t in tenants.all_records().await? {
        storage.migrate_tenant(&t.db_name).await?;
    }
    Ok(tenants)
}
