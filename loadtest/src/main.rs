//! `kefu-loadtest`: command-line wiring of the scenarios and the relay (see the library docs).

use std::net::SocketAddr;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use kefu_loadtest::scenarios::{chat, connections, longpoll, ramp};
use kefu_loadtest::{Comparison, Report, relay};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Exit status when a run found something lost, duplicated, reordered, refused or failed.
const EXIT_FAILED_CHECKS: u8 = 1;
/// Exit status when the run could not be made at all.
const EXIT_ERROR: u8 = 2;

/// Load-test harness for Kefu, and the bare relay baseline it is measured against.
#[derive(Parser)]
#[command(name = "kefu-loadtest", version)]
struct Cli {
    /// Worker threads of this process's runtime (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Conversations on WebSockets, both sides sending on an open-loop schedule.
    Chat(ChatArgs),
    /// Long-poll visitors against WebSocket agents.
    Longpoll(LongpollArgs),
    /// Raise the chat rate step by step; report the highest that keeps p99 under a bound.
    Ramp(RampArgs),
    /// Open, hold and close many idle authenticated WebSockets; report connect time and the
    /// server's memory per connection.
    Connections(ConnectionsArgs),
    /// Run the bare relay baseline.
    Relay(RelayArgs),
    /// One process of `connections --procs K` (spoken to over stdin/stdout).
    #[command(hide = true)]
    ConnectionsWorker,
}

#[derive(Args, Clone)]
struct Common {
    /// Base URL of the server under test.
    #[arg(
        long,
        env = "KEFU_LOADTEST_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// Operator (platform) API key of the server; the relay accepts any.
    #[arg(
        long,
        env = "KEFU_PLATFORM_KEY",
        default_value = "",
        hide_env_values = true
    )]
    platform_key: String,
    /// Print the report as JSON on stdout instead of tables.
    #[arg(long)]
    json: bool,
    /// No progress line on stderr.
    #[arg(long)]
    quiet: bool,
    /// Also run the scenario against the bare relay at this URL and print Kefu/baseline ratios.
    #[arg(long, conflicts_with = "spawn_baseline")]
    baseline_url: Option<String>,
    /// Start the bare relay as a child process on a free port, run the scenario against it
    /// too, and print Kefu/baseline ratios.
    #[arg(long)]
    spawn_baseline: bool,
}

/// Options of the conversation scenarios.
#[derive(Args, Clone)]
struct Traffic {
    /// Conversations (one visitor each).
    #[arg(long, short = 'n', default_value_t = 100)]
    conversations: usize,
    /// Agents sharing them, each with max_concurrent = ceil(conversations / agents);
    /// 0: one agent per conversation.
    #[arg(long, default_value_t = 0)]
    agents: usize,
    /// Longest wait after sending stops for the last acks and deliveries.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Longest wait for the server to assign every conversation.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    assign_timeout: Duration,
    /// Provisioning calls in flight (agent creation and login hash passwords).
    #[arg(long, default_value_t = 8)]
    provision_concurrency: usize,
    /// Skip reading the stored history back.
    #[arg(long)]
    no_stored_check: bool,
}

#[derive(Args, Clone)]
struct ChatArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    traffic: Traffic,
    /// Messages per second in total (both sides of all conversations together).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Length of the send window (`60s`, `500ms`, `2m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Base URL the agents' WebSockets connect to, when not --url: the other node of a
    /// cluster pair, so that every message crosses nodes. Visitors, provisioning and the
    /// stored check stay on --url. Not used for the baseline run (the relay is one process).
    #[arg(long, env = "KEFU_LOADTEST_AGENT_URL")]
    agent_url: Option<String>,
}

#[derive(Args, Clone)]
struct LongpollArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    traffic: Traffic,
    /// Messages per second in total (both sides of all conversations together).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// The `wait` of each long-poll, in seconds.
    #[arg(long, default_value_t = 25)]
    wait: u32,
}

#[derive(Args, Clone)]
struct RampArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    traffic: Traffic,
    /// Total rate of the first step (messages per second).
    #[arg(long, default_value_t = 1000.0)]
    start_rate: f64,
    /// Added at each step.
    #[arg(long, default_value_t = 1000.0)]
    step_rate: f64,
    /// Last rate tried.
    #[arg(long, default_value_t = 100_000.0)]
    max_rate: f64,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    step_duration: Duration,
    /// A step meets the bound when its p99 latency is at most this.
    #[arg(long, default_value = "50ms", value_parser = parse_duration)]
    p99_bound: Duration,
}

#[derive(Args, Clone)]
struct ConnectionsArgs {
    #[command(flatten)]
    common: Common,
    /// Idle visitor connections.
    #[arg(long, default_value_t = 1000)]
    visitors: usize,
    /// Idle agent connections (each a new agent).
    #[arg(long, default_value_t = 0)]
    agents: usize,
    /// How long to hold them once all are open.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    hold: Duration,
    /// Source addresses to connect from: 127.0.0.2 onwards; 0 lets the OS pick.
    #[arg(long, default_value_t = 0)]
    sources: usize,
    /// Client processes; 0: one per 10,000 connections.
    #[arg(long, default_value_t = 0)]
    procs: usize,
    /// Pid of the server, to read its resident memory before and after.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Pid of the relay at --baseline-url, likewise.
    #[arg(long)]
    baseline_pid: Option<u32>,
    /// Connection attempts in flight, per process.
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Pause after the last connection opens, before reading the server's memory.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    settle: Duration,
    /// Provisioning calls in flight, per process.
    #[arg(long, default_value_t = 32)]
    provision_concurrency: usize,
}

#[derive(Args, Clone)]
struct RelayArgs {
    /// Address to listen on (port 0: any free port; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Commit every message to this SQLite file (created if missing) before acking and
    /// forwarding it, as Kefu does: the floor of a relay that persists.
    #[arg(long)]
    store: Option<std::path::PathBuf>,
}

/// `60s`, `500ms`, `2m`, `1h`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1e3,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: the unit must be ms, s, m or h")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Cmd::Relay(r) => r.workers.or(cli.threads),
        _ => cli.threads,
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        rt.worker_threads(n.max(1));
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kefu-loadtest: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_FAILED_CHECKS),
        Err(e) => {
            eprintln!("kefu-loadtest: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Runs a command; `Ok(false)` when a report failed its checks.
async fn run(cmd: Cmd) -> Result<bool> {
    match cmd {
        Cmd::Relay(r) => {
            let handle = relay::start(r.listen, r.store.as_deref()).await?;
            // Scripts (and --spawn-baseline) read the address from this line.
            println!("relay listening on {}", handle.url());
            tokio::signal::ctrl_c().await?;
            Ok(true)
        }
        Cmd::ConnectionsWorker => {
            connections::worker_main().await?;
            Ok(true)
        }
        Cmd::Chat(a) => compare(a.common.clone(), |url, _| chat::run(chat_config(&a, url))).await,
        Cmd::Longpoll(a) => {
            compare(a.common.clone(), |url, _| {
                longpoll::run(longpoll_config(&a, url))
            })
            .await
        }
        Cmd::Ramp(a) => compare(a.common.clone(), |url, _| ramp::run(ramp_config(&a, url))).await,
        Cmd::Connections(a) => {
            compare(a.common.clone(), |url, baseline_pid| {
                let pid = if url == a.common.url {
                    a.server_pid
                } else {
                    baseline_pid.or(a.baseline_pid)
                };
                connections::run(connections_config(&a, url, pid))
            })
            .await
        }
    }
}

fn chat_config(a: &ChatArgs, url: String) -> chat::ChatConfig {
    let t = &a.traffic;
    // The agents' other node belongs to the server under test, not to the baseline relay.
    let agent_url = a.agent_url.clone().filter(|_| url == a.common.url);
    chat::ChatConfig {
        url,
        agent_url,
        platform_key: a.common.platform_key.clone(),
        conversations: t.conversations,
        agents: t.agents,
        rate: a.rate,
        duration: a.duration,
        drain_timeout: t.drain_timeout,
        assign_timeout: t.assign_timeout,
        provision_concurrency: t.provision_concurrency,
        check_stored: !t.no_stored_check,
        progress: !a.common.quiet,
    }
}

fn longpoll_config(a: &LongpollArgs, url: String) -> longpoll::LongpollConfig {
    let t = &a.traffic;
    longpoll::LongpollConfig {
        url,
        platform_key: a.common.platform_key.clone(),
        conversations: t.conversations,
        agents: t.agents,
        rate: a.rate,
        duration: a.duration,
        wait_secs: a.wait,
        drain_timeout: t.drain_timeout,
        assign_timeout: t.assign_timeout,
        provision_concurrency: t.provision_concurrency,
        check_stored: !t.no_stored_check,
        progress: !a.common.quiet,
    }
}

fn ramp_config(a: &RampArgs, url: String) -> ramp::RampConfig {
    let t = &a.traffic;
    ramp::RampConfig {
        url,
        platform_key: a.common.platform_key.clone(),
        conversations: t.conversations,
        agents: t.agents,
        start_rate: a.start_rate,
        step_rate: a.step_rate,
        max_rate: a.max_rate,
        step_duration: a.step_duration,
        p99_bound: a.p99_bound,
        drain_timeout: t.drain_timeout,
        assign_timeout: t.assign_timeout,
        provision_concurrency: t.provision_concurrency,
        check_stored: !t.no_stored_check,
        progress: !a.common.quiet,
    }
}

fn connections_config(
    a: &ConnectionsArgs,
    url: String,
    pid: Option<u32>,
) -> connections::ConnectionsConfig {
    connections::ConnectionsConfig {
        url,
        platform_key: a.common.platform_key.clone(),
        visitors: a.visitors,
        agents: a.agents,
        hold: a.hold,
        sources: connections::loopback_sources(a.sources),
        procs: a.procs,
        worker_exe: None,
        server_pid: pid,
        connect_concurrency: a.connect_concurrency,
        connect_timeout: a.connect_timeout,
        settle: a.settle,
        provision_concurrency: a.provision_concurrency,
        progress: !a.common.quiet,
    }
}

/// Runs `scenario` against the server, then (when asked) against the relay, and prints the
/// report or the comparison. `scenario` gets the URL and, for a spawned relay, its pid.
async fn compare<F, Fut>(common: Common, scenario: F) -> Result<bool>
where
    F: Fn(String, Option<u32>) -> Fut,
    Fut: std::future::Future<Output = Result<Report>>,
{
    let kefu = scenario(common.url.clone(), None).await?;
    let baseline = if let Some(url) = &common.baseline_url {
        Some(scenario(url.clone(), None).await?)
    } else if common.spawn_baseline {
        let relay = SpawnedRelay::start().await?;
        let report = scenario(relay.url.clone(), relay.child.id()).await;
        drop(relay);
        Some(report?)
    } else {
        None
    };
    match baseline {
        None => {
            if common.json {
                println!("{}", serde_json::to_string_pretty(&kefu)?);
            } else {
                println!("{}", kefu.table());
                if let Some(t) = kefu.ramp_table() {
                    println!("{t}");
                }
            }
            Ok(kefu.passed)
        }
        Some(baseline) => {
            let c = Comparison::new(kefu, baseline);
            if common.json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                println!("{}", c.table());
            }
            Ok(c.passed())
        }
    }
}

/// The relay in a child process of this binary; killed when dropped.
struct SpawnedRelay {
    child: Child,
    url: String,
}

impl SpawnedRelay {
    async fn start() -> Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut child = Command::new(exe)
            .args(["relay", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the relay")?;
        let stdout = child.stdout.take().context("relay stdout")?;
        let line = BufReader::new(stdout)
            .lines()
            .next_line()
            .await?
            .context("the relay exited before saying where it listens")?;
        let Some(url) = line.strip_prefix("relay listening on ") else {
            bail!("the relay said {line:?}");
        };
        Ok(Self {
            url: url.trim().to_owned(),
            child,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    fn chat_args(argv: &[&str]) -> ChatArgs {
        let cli = Cli::try_parse_from(argv).expect("arguments parse");
        match cli.command {
            Cmd::Chat(a) => a,
            _ => panic!("not chat"),
        }
    }

    #[test]
    fn agents_use_the_server_url_unless_told_otherwise() {
        let a = chat_args(&["kefu-loadtest", "chat", "--url", "http://127.0.0.1:8080"]);
        assert_eq!(a.agent_url, None);
        assert_eq!(chat_config(&a, a.common.url.clone()).agent_url, None);
    }

    #[test]
    fn agent_url_applies_to_the_server_not_to_the_baseline() {
        let a = chat_args(&[
            "kefu-loadtest",
            "chat",
            "--url",
            "http://127.0.0.1:8080",
            "--agent-url",
            "http://127.0.0.1:8081",
            "--spawn-baseline",
        ]);
        let kefu = chat_config(&a, "http://127.0.0.1:8080".into());
        assert_eq!(kefu.url, "http://127.0.0.1:8080");
        assert_eq!(kefu.agent_url.as_deref(), Some("http://127.0.0.1:8081"));
        let relay = chat_config(&a, "http://127.0.0.1:9000".into());
        assert_eq!(relay.agent_url, None);
    }

    #[test]
    fn the_cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
