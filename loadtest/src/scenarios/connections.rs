//! `connections`: open many authenticated, idle WebSockets, hold them, and report how long
//! opening took, what failed, and how much resident memory the server grew per connection.
//!
//! One process may hold at most 20,000 files here, so a large run is split over child
//! processes: the binary re-executes itself as `kefu-loadtest connections-worker`, and parent
//! and children step together over pipes (JSON lines): each child provisions its share and says
//! `ready`; the parent reads the server's memory and says `connect`; each child opens its share
//! and reports; the parent reads the memory again, holds, and says `close`. Connections are
//! spread over several source addresses (127.0.0.2, 127.0.0.3, …), since one source address
//! has only some 28,000 ephemeral ports.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, stream};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Target, WsStream, await_hello};
use crate::progress::Progress;
use crate::report::{ConnectionsReport, Report};
use crate::stats::LatencyHistogram;

/// Connections one process opens before the automatic split adds another. The hard limit on
/// open files here is 20,000; half of it leaves room for the runtime, the HTTP pool and stdio,
/// and spreads the client's CPU over more than one process.
pub const CONNECTIONS_PER_PROCESS: usize = 10_000;

/// Failures kept verbatim for the report; the rest are only counted.
const FAILURE_SAMPLES: usize = 5;

/// Time a held connection gets to send its close frame at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct ConnectionsConfig {
    pub url: String,
    pub platform_key: String,
    /// Idle visitor connections (cheap to provision: one HTTP call each).
    pub visitors: usize,
    /// Idle agent connections (each a new agent: its password is hashed twice by the server).
    pub agents: usize,
    /// How long to hold them once all are open.
    pub hold: Duration,
    /// Source addresses to spread the connections over, round robin; empty: the OS picks.
    pub sources: Vec<IpAddr>,
    /// Client processes; 1 opens everything in this process, 0 picks one per
    /// [`CONNECTIONS_PER_PROCESS`]. More than one re-executes `worker_exe`.
    pub procs: usize,
    /// The `kefu-loadtest` binary the child processes run; `None`: the current executable
    /// (right for the CLI, wrong inside a test binary).
    pub worker_exe: Option<PathBuf>,
    /// The server's pid, to read its resident memory from /proc.
    pub server_pid: Option<u32>,
    /// Connection attempts in flight at once, per process.
    pub connect_concurrency: usize,
    /// Longest wait for one connection's `hello`.
    pub connect_timeout: Duration,
    /// Pause between the last connection opening and the memory reading, for the server to
    /// finish whatever it does per new connection.
    pub settle: Duration,
    pub provision_concurrency: usize,
    pub progress: bool,
}

impl Default for ConnectionsConfig {
    /// A smoke run: 20 visitors and 2 agents held for a second, in this process.
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8080".into(),
            platform_key: super::platform_key_from_env(),
            visitors: 20,
            agents: 2,
            hold: Duration::from_secs(1),
            sources: Vec::new(),
            procs: 1,
            worker_exe: None,
            server_pid: None,
            connect_concurrency: 64,
            connect_timeout: Duration::from_secs(30),
            settle: Duration::from_millis(500),
            provision_concurrency: 8,
            progress: false,
        }
    }
}

/// `n` loopback source addresses from 127.0.0.2 on.
pub fn loopback_sources(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            let i = i + 2;
            IpAddr::from([127, (i >> 16) as u8, (i >> 8) as u8, i as u8])
        })
        .collect()
}

/// Resident memory of a process in KiB, from /proc/<pid>/status.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One process's share of the work.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WorkerSpec {
    url: String,
    domain: String,
    admin_token: String,
    visitors: usize,
    agents: usize,
    /// Number of this process's first agent, so agent emails never collide across processes.
    agent_offset: usize,
    sources: Vec<IpAddr>,
    connect_concurrency: usize,
    connect_timeout_ms: u64,
    provision_concurrency: usize,
}

/// What one process's connecting found.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ConnectOutcome {
    opened: usize,
    failed: usize,
    wall_secs: f64,
    /// The connect-time histogram as (nanoseconds, count) pairs.
    connect: Vec<(u64, u64)>,
    failure_samples: Vec<String>,
}

/// A child's report line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum WorkerEvent {
    Ready,
    Connected { outcome: ConnectOutcome },
    Done { dropped: usize },
    Failed { error: String },
}

/// Credentials of one connection to open.
struct Cred {
    path: &'static str,
    token: String,
}

/// A process's connections: provisioned, then opened and held.
struct Worker {
    spec: WorkerSpec,
    target: Target,
    creds: Vec<Cred>,
    held: JoinSet<()>,
    dropped: Arc<AtomicUsize>,
    stop: watch::Sender<bool>,
}

impl Worker {
    async fn provision(spec: WorkerSpec) -> Result<Worker> {
        let target = Target::new(&spec.url).await?;
        let domain = spec.domain.as_str();
        let mut creds = Vec::with_capacity(spec.visitors + spec.agents);
        let mut sessions = stream::iter(0..spec.visitors)
            .map(|_| target.visitor_session(domain))
            .buffer_unordered(spec.provision_concurrency.max(1));
        while let Some(v) = sessions.next().await {
            creds.push(Cred {
                path: "/ws/visitor",
                token: v?.token,
            });
        }
        drop(sessions);
        let tenant = crate::client::TenantHandle {
            slug: String::new(),
            domain: spec.domain.clone(),
            admin_id: 0,
            admin_email: String::new(),
            admin_password: String::new(),
            admin_token: spec.admin_token.clone(),
        };
        let mut agents = stream::iter(spec.agent_offset..spec.agent_offset + spec.agents)
            .map(|n| target.create_agent(&tenant, n, 1))
            .buffer_unordered(spec.provision_concurrency.max(1));
        while let Some(a) = agents.next().await {
            creds.push(Cred {
                path: "/ws/agent",
                token: a?.token,
            });
        }
        drop(agents);
        let (stop, _) = watch::channel(false);
        Ok(Worker {
            spec,
            target,
            creds,
            held: JoinSet::new(),
            dropped: Arc::new(AtomicUsize::new(0)),
            stop,
        })
    }

    /// Opens every connection (TCP connect to `hello`) and starts holding it.
    async fn connect(&mut self, progress: &Progress) -> ConnectOutcome {
        let started = Instant::now();
        let timeout = Duration::from_millis(self.spec.connect_timeout_ms);
        let creds = std::mem::take(&mut self.creds);
        let total = creds.len() as u64;
        progress.bar(total, "connections opened");
        let (target, domain, sources) = (&self.target, &self.spec.domain, &self.spec.sources);
        let mut attempts = stream::iter(creds.iter().enumerate())
            .map(|(i, cred)| {
                let source = (!sources.is_empty()).then(|| sources[i % sources.len()]);
                async move {
                    let t0 = Instant::now();
                    let ws = tokio::time::timeout(timeout, async {
                        let mut ws = target
                            .ws_connect(domain, cred.path, &cred.token, source)
                            .await?;
                        await_hello(&mut ws, |_| {}).await?;
                        anyhow::Ok(ws)
                    })
                    .await
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("no hello within {timeout:?}")));
                    (ws, t0.elapsed())
                }
            })
            .buffer_unordered(self.spec.connect_concurrency.max(1));
        let mut hist = LatencyHistogram::new();
        let mut out = ConnectOutcome::default();
        while let Some((ws, took)) = attempts.next().await {
            match ws {
                Ok(ws) => {
                    hist.record(took);
                    out.opened += 1;
                    self.held
                        .spawn(hold(ws, self.stop.subscribe(), self.dropped.clone()));
                }
                Err(e) => {
                    out.failed += 1;
                    if out.failure_samples.len() < FAILURE_SAMPLES {
                        out.failure_samples.push(format!("{e:#}"));
                    }
                }
            }
            progress.set((out.opened + out.failed) as u64, "connections opened");
        }
        out.wall_secs = started.elapsed().as_secs_f64();
        out.connect = hist.to_pairs();
        out
    }

    /// Closes everything; returns how many connections the server dropped while held.
    async fn close(mut self) -> usize {
        // Counted before asking for the close, so our own closes are not taken for drops.
        let dropped = self.dropped.load(Ordering::Relaxed);
        self.stop.send_replace(true);
        while self.held.join_next().await.is_some() {}
        dropped
    }
}

/// Holds one idle connection until told to close; reading keeps pings answered.
async fn hold(mut ws: WsStream, mut stop: watch::Receiver<bool>, dropped: Arc<AtomicUsize>) {
    loop {
        tokio::select! {
            frame = ws.next() => match frame {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    dropped.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Some(Ok(_)) => {}
            },
            // The guard `wait_for` returns must not live across the close below.
            () = async { let _ = stop.wait_for(|s| *s).await; } => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
                return;
            }
        }
    }
}

/// A child process running [`worker_main`].
struct ChildWorker {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl ChildWorker {
    async fn spawn(exe: &PathBuf, spec: &WorkerSpec) -> Result<Self> {
        let mut child = Command::new(exe)
            .arg("connections-worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            // A parent that fails midway must not leave children holding sockets.
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = child.stdout.take().context("child stdout")?;
        let mut w = Self {
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        w.say(&serde_json::to_string(spec)?).await?;
        Ok(w)
    }

    async fn say(&mut self, line: &str) -> Result<()> {
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.write_all(b"\n").await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn hear(&mut self) -> Result<WorkerEvent> {
        let line = self
            .lines
            .next_line()
            .await?
            .context("a worker process ended early")?;
        let event: WorkerEvent =
            serde_json::from_str(&line).with_context(|| format!("a worker said {line:?}"))?;
        if let WorkerEvent::Failed { error } = event {
            bail!("a worker process failed: {error}");
        }
        Ok(event)
    }
}

/// The work, in this process or spread over children.
enum Workers {
    Here(Box<Worker>),
    Children(Vec<ChildWorker>),
}

impl Workers {
    async fn connect(&mut self, progress: &Progress) -> Result<Vec<ConnectOutcome>> {
        match self {
            Workers::Here(w) => Ok(vec![w.connect(progress).await]),
            Workers::Children(children) => {
                progress.stage(format!("{} processes opening connections", children.len()));
                for c in children.iter_mut() {
                    c.say("connect").await?;
                }
                let mut out = Vec::new();
                for c in children.iter_mut() {
                    match c.hear().await? {
                        WorkerEvent::Connected { outcome } => out.push(outcome),
                        other => bail!("a worker said {other:?} instead of connected"),
                    }
                }
                Ok(out)
            }
        }
    }

    async fn close(self) -> Result<usize> {
        match self {
            Workers::Here(w) => Ok(w.close().await),
            Workers::Children(children) => {
                let mut dropped = 0;
                for mut c in children {
                    c.say("close").await?;
                    match c.hear().await? {
                        WorkerEvent::Done { dropped: d } => dropped += d,
                        other => bail!("a worker said {other:?} instead of done"),
                    }
                    let _ = c.child.wait().await;
                }
                Ok(dropped)
            }
        }
    }
}

pub async fn run(config: ConnectionsConfig) -> Result<Report> {
    let progress = super::progress(config.progress);
    let result = connections(config, &progress).await;
    progress.finish();
    result
}

async fn connections(config: ConnectionsConfig, progress: &Progress) -> Result<Report> {
    let started = Instant::now();
    let total = config.visitors + config.agents;
    let procs = match config.procs {
        0 => total.div_ceil(CONNECTIONS_PER_PROCESS).max(1),
        n => n,
    };
    progress.stage("creating the tenant");
    let target = Target::new(&config.url).await?;
    let tenant = target.create_tenant(&config.platform_key).await?;
    let spec_for = |i: usize| {
        let share = |n: usize| n / procs + usize::from(i < n % procs);
        let agent_offset = (0..i)
            .map(|j| config.agents / procs + usize::from(j < config.agents % procs))
            .sum();
        WorkerSpec {
            url: config.url.clone(),
            domain: tenant.domain.clone(),
            admin_token: tenant.admin_token.clone(),
            visitors: share(config.visitors),
            agents: share(config.agents),
            agent_offset,
            sources: config.sources.clone(),
            connect_concurrency: config.connect_concurrency,
            connect_timeout_ms: u64::try_from(config.connect_timeout.as_millis())
                .unwrap_or(u64::MAX),
            provision_concurrency: config.provision_concurrency,
        }
    };
    progress.stage(format!("provisioning {total} connections"));
    let mut workers = if procs == 1 {
        Workers::Here(Box::new(Worker::provision(spec_for(0)).await?))
    } else {
        let exe = match &config.worker_exe {
            Some(p) => p.clone(),
            None => std::env::current_exe().context("finding this executable")?,
        };
        let mut children = Vec::with_capacity(procs);
        for i in 0..procs {
            children.push(ChildWorker::spawn(&exe, &spec_for(i)).await?);
        }
        for c in &mut children {
            match c.hear().await? {
                WorkerEvent::Ready => {}
                other => bail!("a worker said {other:?} instead of ready"),
            }
        }
        Workers::Children(children)
    };
    let setup = started.elapsed();
    let rss = || config.server_pid.and_then(rss_kib);
    let rss_before = rss();
    let opening = Instant::now();
    let outcomes = workers.connect(progress).await?;
    let open_all = opening.elapsed();
    tokio::time::sleep(config.settle).await;
    let rss_open = rss();
    progress.bar(config.hold.as_secs(), "s holding");
    let hold_start = Instant::now();
    let hold_end = hold_start + config.hold;
    while Instant::now() < hold_end {
        let left = hold_end - Instant::now();
        tokio::time::sleep(left.min(Duration::from_secs(1))).await;
        progress.set(hold_start.elapsed().as_secs(), "s holding");
    }
    let rss_end = rss();
    progress.stage("closing");
    let dropped = workers.close().await?;

    let mut connect = LatencyHistogram::new();
    let mut c = ConnectionsReport {
        requested: total,
        procs,
        source_addresses: config.sources.len(),
        hold_secs: config.hold.as_secs_f64(),
        rss_before_kib: rss_before,
        rss_open_kib: rss_open,
        rss_end_kib: rss_end,
        dropped,
        open_all_secs: open_all.as_secs_f64(),
        ..Default::default()
    };
    for o in outcomes {
        c.opened += o.opened;
        c.failed += o.failed;
        connect.merge(&LatencyHistogram::from_pairs(&o.connect));
        for s in o.failure_samples {
            if c.failure_samples.len() < FAILURE_SAMPLES {
                c.failure_samples.push(s);
            }
        }
    }
    c.connect = connect.summary();
    c.bytes_per_connection = match (rss_before, rss_open.max(rss_end)) {
        (Some(before), Some(after)) if c.opened > 0 => {
            Some(after.saturating_sub(before) as f64 * 1024.0 / c.opened as f64)
        }
        _ => None,
    };
    Ok(Report {
        scenario: "connections".into(),
        target: config.url,
        setup_secs: setup.as_secs_f64(),
        duration_secs: config.hold.as_secs_f64(),
        agents: config.agents,
        connections: Some(c),
        ..Default::default()
    }
    .settle())
}

/// The body of `kefu-loadtest connections-worker`: reads its spec and commands on stdin,
/// answers on stdout (see the module doc).
pub async fn worker_main() -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let result = worker_steps(&mut lines, &mut out).await;
    if let Err(e) = &result {
        let line = serde_json::to_string(&WorkerEvent::Failed {
            error: format!("{e:#}"),
        })?;
        out.write_all(format!("{line}\n").as_bytes()).await?;
        out.flush().await?;
    }
    result
}

async fn worker_steps(
    lines: &mut Lines<BufReader<tokio::io::Stdin>>,
    out: &mut tokio::io::Stdout,
) -> Result<()> {
    async fn say(out: &mut tokio::io::Stdout, e: &WorkerEvent) -> Result<()> {
        out.write_all(format!("{}\n", serde_json::to_string(e)?).as_bytes())
            .await?;
        out.flush().await?;
        Ok(())
    }
    async fn expect(lines: &mut Lines<BufReader<tokio::io::Stdin>>, word: &str) -> Result<()> {
        match lines.next_line().await? {
            Some(l) if l.trim() == word => Ok(()),
            other => bail!("expected {word:?} from the parent, got {other:?}"),
        }
    }
    let spec_line = lines
        .next_line()
        .await?
        .context("no spec on stdin (this command is run by `connections --procs`)")?;
    let spec: WorkerSpec = serde_json::from_str(&spec_line).context("reading the spec")?;
    let mut worker = Worker::provision(spec).await?;
    say(out, &WorkerEvent::Ready).await?;
    expect(lines, "connect").await?;
    let outcome = worker.connect(&Progress::hidden()).await;
    say(out, &WorkerEvent::Connected { outcome }).await?;
    expect(lines, "close").await?;
    let dropped = worker.close().await;
    say(out, &WorkerEvent::Done { dropped }).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_start_at_127_0_0_2() {
        let s = loopback_sources(3);
        assert_eq!(
            s,
            vec![
                "127.0.0.2".parse::<IpAddr>().unwrap(),
                "127.0.0.3".parse().unwrap(),
                "127.0.0.4".parse().unwrap()
            ]
        );
        assert_eq!(
            loopback_sources(255)[254],
            "127.0.1.0".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tkefu\nVmPeak:\t  900 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss(status), Some(12345));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
