//! What a scenario run found, how it reads as a table, and how two runs (Kefu and the bare
//! relay) compare.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats::Summary;

/// The result of one scenario run against one server.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// `chat`, `longpoll`, `ramp` or `connections`.
    pub scenario: String,
    /// Base URL of the server.
    pub target: String,
    /// Nothing lost, duplicated, reordered, unacknowledged, refused or mis-stored, no connection
    /// failed or dropped: see [`Report::failures`].
    pub passed: bool,
    /// Provisioning and connecting before the measured window.
    pub setup_secs: f64,
    /// Length of the measured send window(s).
    pub duration_secs: f64,
    pub conversations: usize,
    pub agents: usize,
    /// Messages per second the schedule offered, both sides of all conversations together.
    pub offered_rate: f64,
    pub sent: u64,
    pub acked: u64,
    /// Messages read for the first time by the other side.
    pub delivered: u64,
    /// Acknowledged messages per second over the send window(s): what was persisted.
    pub throughput: f64,
    /// Acknowledged by one side, never read by the other.
    pub lost: u64,
    /// Read twice, or two messages under one seq.
    pub duplicated: u64,
    /// Read after a higher seq of the same conversation.
    pub reordered: u64,
    /// Sent and never acknowledged nor refused.
    pub unacked: u64,
    /// Error frames, failed calls, unreadable frames.
    pub errors: u64,
    /// Connections the server closed during the run.
    pub disconnects: u64,
    /// Write on the sender's socket to read on the receiver's.
    pub latency: Summary,
    /// How late the client's own sends ran against their schedule.
    pub send_lateness: Summary,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored: Option<StoredCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<ConnectionsReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ramp: Option<RampReport>,
}

/// The server's stored history against what was acknowledged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredCheck {
    pub conversations: usize,
    /// Stored messages of the parties (system messages left out).
    pub stored: u64,
    /// Acknowledged sends, counted from the acks the sides kept.
    pub acked: u64,
    /// Conversations whose stored count differs from their acknowledged count.
    pub mismatched: usize,
    /// Conversations whose history could not be read.
    pub unreadable: usize,
}

/// What the `connections` scenario measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConnectionsReport {
    pub requested: usize,
    pub opened: usize,
    pub failed: usize,
    /// Closed by the server while held.
    pub dropped: usize,
    pub procs: usize,
    pub source_addresses: usize,
    /// From the first connect to the last `hello`.
    pub open_all_secs: f64,
    /// Per connection: TCP connect to `hello` received.
    pub connect: Summary,
    pub hold_secs: f64,
    /// Server resident memory before connecting, once all were open, and at the end of the hold
    /// (KiB, from /proc/<pid>/status); absent without `--server-pid`.
    pub rss_before_kib: Option<u64>,
    pub rss_open_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    /// Growth of the server's resident memory per open connection, in bytes (the larger of the
    /// two readings after opening).
    pub bytes_per_connection: Option<f64>,
    /// A sample of the failures, for the reader.
    pub failure_samples: Vec<String>,
}

/// What the `ramp` scenario measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RampReport {
    pub p99_bound_ms: f64,
    /// Highest offered rate whose step met the bound with nothing lost.
    pub best_rate: Option<f64>,
    /// Acknowledged messages per second at that step.
    pub best_throughput: Option<f64>,
    pub steps: Vec<RampStep>,
    /// Why the ramp stopped.
    pub stopped: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RampStep {
    pub offered_rate: f64,
    pub throughput: f64,
    pub sent: u64,
    pub acked: u64,
    /// Acknowledged in this step and not read by the other side once the step drained.
    pub lost: u64,
    pub unacked: u64,
    pub latency: Summary,
    pub send_lateness: Summary,
    pub met: bool,
}

impl Report {
    /// Why the run did not pass; empty when it did.
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        let mut count = |n: u64, what: &str| {
            if n > 0 {
                f.push(format!("{n} {what}"));
            }
        };
        count(self.lost, "lost");
        count(self.duplicated, "duplicated");
        count(self.reordered, "reordered");
        count(self.unacked, "never acknowledged");
        count(self.errors, "errors");
        count(self.disconnects, "disconnects");
        if let Some(s) = &self.stored {
            if s.mismatched > 0 {
                f.push(format!(
                    "stored history differs from the acks in {} conversations ({} stored, {} acked)",
                    s.mismatched, s.stored, s.acked
                ));
            }
            if s.unreadable > 0 {
                f.push(format!("{} histories unreadable", s.unreadable));
            }
        }
        if let Some(c) = &self.connections {
            if c.failed > 0 {
                f.push(format!("{} connections failed", c.failed));
            }
            if c.dropped > 0 {
                f.push(format!("{} connections dropped", c.dropped));
            }
        }
        f
    }

    /// Sets `passed` from [`Report::failures`].
    pub fn settle(mut self) -> Self {
        self.passed = self.failures().is_empty();
        self
    }

    /// A readable table of the run.
    pub fn table(&self) -> String {
        let mut t = Table::default();
        self.rows(&mut t);
        format!(
            "{} against {} — {}\n{}",
            self.scenario,
            self.target,
            verdict(self),
            t.render(&["", "value"])
        )
    }

    fn rows(&self, t: &mut Table) {
        if self.scenario != "connections" {
            t.row(
                "conversations / agents",
                [format!("{} / {}", self.conversations, self.agents)],
            );
            t.row("offered rate (msg/s)", [num(self.offered_rate)]);
            t.row("throughput (acked msg/s)", [num(self.throughput)]);
            t.row(
                "sent / acked / delivered",
                [format!(
                    "{} / {} / {}",
                    self.sent, self.acked, self.delivered
                )],
            );
            latency_rows(t, "latency", &self.latency);
            t.row(
                "send lateness p99 / max (ms)",
                [format!(
                    "{} / {}",
                    ms(self.send_lateness.p99_ms),
                    ms(self.send_lateness.max_ms)
                )],
            );
        }
        if self.connections.is_none() {
            t.row(
                "lost / dup / reordered",
                [format!(
                    "{} / {} / {}",
                    self.lost, self.duplicated, self.reordered
                )],
            );
            t.row(
                "unacked / errors / disconnects",
                [format!(
                    "{} / {} / {}",
                    self.unacked, self.errors, self.disconnects
                )],
            );
        }
        if let Some(s) = &self.stored {
            t.row(
                "stored vs acked",
                [format!(
                    "{} vs {} ({} conversations differ)",
                    s.stored, s.acked, s.mismatched
                )],
            );
        }
        if let Some(c) = &self.connections {
            t.row(
                "connections opened / requested",
                [format!("{} / {}", c.opened, c.requested)],
            );
            t.row(
                "failed / dropped",
                [format!("{} / {}", c.failed, c.dropped)],
            );
            t.row(
                "processes / source addresses",
                [format!("{} / {}", c.procs, c.source_addresses)],
            );
            t.row("time to open all (s)", [num(c.open_all_secs)]);
            latency_rows(t, "connect", &c.connect);
            t.row("held (s)", [num(c.hold_secs)]);
            t.row(
                "server RSS before / open / end (KiB)",
                [format!(
                    "{} / {} / {}",
                    opt(c.rss_before_kib),
                    opt(c.rss_open_kib),
                    opt(c.rss_end_kib)
                )],
            );
            t.row(
                "server memory per connection (bytes)",
                [c.bytes_per_connection.map_or("-".into(), num)],
            );
        }
        if let Some(r) = &self.ramp {
            t.row("p99 bound (ms)", [ms(r.p99_bound_ms)]);
            t.row("best rate (msg/s)", [r.best_rate.map_or("-".into(), num)]);
            t.row(
                "throughput at best (msg/s)",
                [r.best_throughput.map_or("-".into(), num)],
            );
            t.row("stopped", [r.stopped.clone()]);
        }
        t.row("setup (s)", [num(self.setup_secs)]);
    }

    /// The ramp's steps as a table of their own.
    pub fn ramp_table(&self) -> Option<String> {
        let r = self.ramp.as_ref()?;
        let mut t = Table::default();
        for s in &r.steps {
            t.row(
                &num(s.offered_rate),
                [
                    num(s.throughput),
                    ms(s.latency.p50_ms),
                    ms(s.latency.p99_ms),
                    ms(s.latency.max_ms),
                    ms(s.send_lateness.p99_ms),
                    s.lost.to_string(),
                    if s.met { "yes".into() } else { "no".into() },
                ],
            );
        }
        Some(t.render(&[
            "offered msg/s",
            "acked msg/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "late p99 ms",
            "lost",
            "met",
        ]))
    }
}

fn verdict(r: &Report) -> String {
    let f = r.failures();
    if f.is_empty() {
        "PASSED".into()
    } else {
        format!("FAILED: {}", f.join(", "))
    }
}

fn latency_rows(t: &mut Table, what: &str, s: &Summary) {
    let rows = [
        ("p50", s.p50_ms),
        ("p90", s.p90_ms),
        ("p99", s.p99_ms),
        ("p99.9", s.p999_ms),
        ("max", s.max_ms),
    ];
    for (name, v) in rows {
        t.row(&format!("{what} {name} (ms)"), [ms(v)]);
    }
}

/// Two runs of one scenario: Kefu and the bare relay.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub kefu: Report,
    pub baseline: Report,
    /// Kefu's figure over the baseline's, for the figures where both are measured.
    pub ratios: Vec<Ratio>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ratio {
    pub figure: String,
    pub kefu: f64,
    pub baseline: f64,
    /// `kefu / baseline`; absent when the baseline figure is zero.
    pub ratio: Option<f64>,
}

impl Comparison {
    pub fn new(kefu: Report, baseline: Report) -> Self {
        let mut ratios = Vec::new();
        let mut add = |figure: &str, k: f64, b: f64| {
            ratios.push(Ratio {
                figure: figure.into(),
                kefu: k,
                baseline: b,
                ratio: (b != 0.0).then(|| k / b),
            });
        };
        if kefu.scenario != "connections" {
            add(
                "throughput (acked msg/s)",
                kefu.throughput,
                baseline.throughput,
            );
            add(
                "latency p50 (ms)",
                kefu.latency.p50_ms,
                baseline.latency.p50_ms,
            );
            add(
                "latency p90 (ms)",
                kefu.latency.p90_ms,
                baseline.latency.p90_ms,
            );
            add(
                "latency p99 (ms)",
                kefu.latency.p99_ms,
                baseline.latency.p99_ms,
            );
            add(
                "latency p99.9 (ms)",
                kefu.latency.p999_ms,
                baseline.latency.p999_ms,
            );
            add(
                "latency max (ms)",
                kefu.latency.max_ms,
                baseline.latency.max_ms,
            );
        }
        if let (Some(k), Some(b)) = (&kefu.ramp, &baseline.ramp) {
            add(
                "ramp best rate (msg/s)",
                k.best_rate.unwrap_or(0.0),
                b.best_rate.unwrap_or(0.0),
            );
            add(
                "ramp throughput at best (msg/s)",
                k.best_throughput.unwrap_or(0.0),
                b.best_throughput.unwrap_or(0.0),
            );
        }
        if let (Some(k), Some(b)) = (&kefu.connections, &baseline.connections) {
            add("time to open all (s)", k.open_all_secs, b.open_all_secs);
            add("connect p50 (ms)", k.connect.p50_ms, b.connect.p50_ms);
            add("connect p99 (ms)", k.connect.p99_ms, b.connect.p99_ms);
            if let (Some(kb), Some(bb)) = (k.bytes_per_connection, b.bytes_per_connection) {
                add("memory per connection (bytes)", kb, bb);
            }
        }
        Self {
            kefu,
            baseline,
            ratios,
        }
    }

    pub fn passed(&self) -> bool {
        self.kefu.passed && self.baseline.passed
    }

    pub fn table(&self) -> String {
        let mut t = Table::default();
        for r in &self.ratios {
            t.row(
                &r.figure,
                [
                    num(r.kefu),
                    num(r.baseline),
                    r.ratio.map_or("-".into(), |x| format!("{x:.2}")),
                ],
            );
        }
        let mut out = String::new();
        let _ = writeln!(out, "{}\n", self.kefu.table());
        if let Some(rt) = self.kefu.ramp_table() {
            let _ = writeln!(out, "{rt}");
        }
        let _ = writeln!(out, "{}\n", self.baseline.table());
        if let Some(rt) = self.baseline.ramp_table() {
            let _ = writeln!(out, "{rt}");
        }
        let _ = writeln!(out, "Kefu / baseline");
        out.push_str(&t.render(&["", "kefu", "baseline", "ratio"]));
        out
    }
}

fn num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn ms(x: f64) -> String {
    format!("{x:.3}")
}

fn opt(x: Option<u64>) -> String {
    x.map_or("-".into(), |v| v.to_string())
}

/// A plain text table: first column left-aligned, the others right-aligned.
#[derive(Default)]
struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    fn row<I: IntoIterator<Item = String>>(&mut self, label: &str, cells: I) {
        let mut r = vec![label.to_owned()];
        r.extend(cells);
        self.rows.push(r);
    }

    fn render(&self, header: &[&str]) -> String {
        let cols = header
            .len()
            .max(self.rows.iter().map(Vec::len).max().unwrap_or(0));
        let mut widths = vec![0; cols];
        let all = std::iter::once(header.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .chain(self.rows.iter().cloned());
        let all: Vec<Vec<String>> = all.collect();
        for r in &all {
            for (i, c) in r.iter().enumerate() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for (n, r) in all.iter().enumerate() {
            for (i, w) in widths.iter().enumerate() {
                let c = r.get(i).map(String::as_str).unwrap_or("");
                if i == 0 {
                    let _ = write!(out, "{c:<w$}");
                } else {
                    let _ = write!(out, "  {c:>w$}");
                }
            }
            out.push('\n');
            if n == 0 {
                let total = widths.iter().sum::<usize>() + 2 * (cols - 1);
                out.push_str(&"-".repeat(total));
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_report_passes_and_any_fault_fails_it() {
        let r = Report {
            scenario: "chat".into(),
            ..Default::default()
        }
        .settle();
        assert!(r.passed);
        for f in [
            |r: &mut Report| r.lost = 1,
            |r: &mut Report| r.duplicated = 1,
            |r: &mut Report| r.reordered = 1,
            |r: &mut Report| r.unacked = 1,
            |r: &mut Report| {
                r.stored = Some(StoredCheck {
                    mismatched: 1,
                    ..Default::default()
                })
            },
        ] {
            let mut bad = r.clone();
            f(&mut bad);
            let bad = bad.settle();
            assert!(!bad.passed);
            assert!(bad.table().contains("FAILED"));
        }
    }

    #[test]
    fn comparison_divides_kefu_by_baseline() {
        let mut k = Report {
            scenario: "chat".into(),
            throughput: 4000.0,
            ..Default::default()
        };
        k.latency.p99_ms = 3.0;
        let mut b = k.clone();
        b.latency.p99_ms = 1.5;
        b.throughput = 0.0;
        let c = Comparison::new(k, b);
        let p99 = c
            .ratios
            .iter()
            .find(|r| r.figure.starts_with("latency p99 "))
            .unwrap();
        assert_eq!(p99.ratio, Some(2.0));
        let tp = c
            .ratios
            .iter()
            .find(|r| r.figure.starts_with("throughput"))
            .unwrap();
        assert_eq!(tp.ratio, None);
        assert!(c.table().contains("Kefu / baseline"));
    }
}
