//! Latency accounting: HDR histograms in nanoseconds, per-phase recorders shared by every
//! connection task, and the live counters the progress bar and the drain loop read.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Largest latency a histogram tracks exactly; anything slower is clamped to it. A message five
/// minutes late is a failed run whatever its exact figure, and a tighter bound keeps each
/// histogram smaller.
const HIGHEST_TRACKABLE_NANOS: u64 = 300 * 1_000_000_000;

/// Three significant digits: p99.9 of a 1.2 ms distribution is told apart from 1.201 ms.
const SIGNIFICANT_DIGITS: u8 = 3;

/// Shards of the shared recorder. Every received frame records into one; a few shards keep the
/// lock uncontended on a multi-thread runtime without multiplying the histograms' memory.
const SHARDS: usize = 8;

/// A histogram of nanosecond values.
#[derive(Clone, Debug)]
pub struct LatencyHistogram(Histogram<u64>);

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        // The bounds are constants that satisfy hdrhistogram's rules (low >= 1, high >= 2 * low,
        // sigfig <= 5), so creation cannot fail.
        let h = Histogram::new_with_bounds(1, HIGHEST_TRACKABLE_NANOS, SIGNIFICANT_DIGITS)
            .expect("constant histogram bounds are valid");
        Self(h)
    }

    pub fn record(&mut self, d: Duration) {
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        // Zero is below the lowest discernible value; a same-instant delivery is 1 ns.
        self.0.saturating_record(nanos.max(1));
    }

    pub fn record_nanos_n(&mut self, nanos: u64, count: u64) {
        self.0.saturating_record_n(nanos.max(1), count);
    }

    pub fn merge(&mut self, other: &LatencyHistogram) {
        // Both sides were made by `new` with the same bounds; adding only fails when the source
        // holds values the target cannot, which equal bounds rule out. Clamp defensively anyway.
        if self.0.add(&other.0).is_err() {
            for v in other.0.iter_recorded() {
                self.0
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    pub fn len(&self) -> u64 {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The recorded values as (value, count) pairs: how a child process sends its histogram to
    /// its parent without a binary serialisation format.
    pub fn to_pairs(&self) -> Vec<(u64, u64)> {
        self.0
            .iter_recorded()
            .map(|v| (v.value_iterated_to(), v.count_at_value()))
            .collect()
    }

    pub fn from_pairs(pairs: &[(u64, u64)]) -> Self {
        let mut h = Self::new();
        for &(v, n) in pairs {
            h.record_nanos_n(v, n);
        }
        h
    }

    pub fn summary(&self) -> Summary {
        let ms = |nanos: u64| nanos as f64 / 1e6;
        if self.0.is_empty() {
            return Summary::default();
        }
        Summary {
            count: self.0.len(),
            mean_ms: self.0.mean() / 1e6,
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p90_ms: ms(self.0.value_at_quantile(0.90)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            p999_ms: ms(self.0.value_at_quantile(0.999)),
            max_ms: ms(self.0.max()),
        }
    }
}

/// Percentiles of a histogram, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// What one phase (one step of a ramp, or the whole of a chat run) measured.
#[derive(Clone, Debug, Default)]
pub struct PhaseData {
    /// Write on the sender's socket to read on the receiver's.
    pub latency: LatencyHistogram,
    /// How long after its scheduled instant each send was written: the client's own lag.
    pub lateness: LatencyHistogram,
    pub sent: u64,
    pub acked: u64,
    /// First deliveries of the other side's messages (repeats are counted as duplicates).
    pub delivered: u64,
}

impl PhaseData {
    pub fn merge(&mut self, other: &PhaseData) {
        self.latency.merge(&other.latency);
        self.lateness.merge(&other.lateness);
        self.sent += other.sent;
        self.acked += other.acked;
        self.delivered += other.delivered;
    }
}

/// Per-phase data shared by all connection tasks of a run, sharded to keep locks short.
pub struct Recorder {
    shards: Vec<Mutex<Vec<PhaseData>>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
        }
    }

    /// Runs `f` on the data of `phase` in the shard picked by `key` (a conversation id, so one
    /// conversation's records stay together and different ones spread out).
    pub fn with<R>(&self, key: i64, phase: u32, f: impl FnOnce(&mut PhaseData) -> R) -> R {
        let shard = &self.shards[(key.unsigned_abs() as usize) % SHARDS];
        // A poisoned lock means another recording thread panicked mid-update of plain counters
        // and histograms; the data is still usable, so carry on rather than cascade the panic.
        let mut phases = shard.lock().unwrap_or_else(|e| e.into_inner());
        let idx = phase as usize;
        if phases.len() <= idx {
            phases.resize_with(idx + 1, PhaseData::default);
        }
        f(&mut phases[idx])
    }

    pub fn record_latency(&self, key: i64, phase: u32, d: Duration) {
        self.with(key, phase, |p| {
            p.latency.record(d);
            p.delivered += 1;
        });
    }

    pub fn record_send(&self, key: i64, phase: u32, lateness: Duration) {
        self.with(key, phase, |p| {
            p.lateness.record(lateness);
            p.sent += 1;
        });
    }

    pub fn record_ack(&self, key: i64, phase: u32) {
        self.with(key, phase, |p| p.acked += 1);
    }

    /// A delivery whose text carried no timestamp (not one of ours): counted, not timed.
    pub fn record_untimed_delivery(&self, key: i64, phase: u32) {
        self.with(key, phase, |p| p.delivered += 1);
    }

    /// The merged data of one phase so far.
    pub fn phase(&self, phase: u32) -> PhaseData {
        let mut out = PhaseData::default();
        for shard in &self.shards {
            let phases = shard.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = phases.get(phase as usize) {
                out.merge(p);
            }
        }
        out
    }
}

/// Counters read while the run goes on (progress bar, drain loop); the exact reckoning is done
/// from the sequence trackers at the end.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
    /// `error` frames, failed HTTP calls during the run, unparsable frames.
    pub errors: AtomicU64,
    /// Sends the server refused (error frame with our ref, or a non-2xx POST): never acked.
    pub send_failures: AtomicU64,
    /// Connections that closed before the run asked them to.
    pub disconnects: AtomicU64,
}

/// A copy of [`Counters`] at one instant.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub errors: u64,
    pub send_failures: u64,
    pub disconnects: u64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            sent: g(&self.sent),
            acked: g(&self.acked),
            delivered: g(&self.delivered),
            duplicated: g(&self.duplicated),
            reordered: g(&self.reordered),
            errors: g(&self.errors),
            send_failures: g(&self.send_failures),
            disconnects: g(&self.disconnects),
        }
    }
}

impl CounterSnapshot {
    /// Every send has its answer and every acknowledged message reached the other side.
    pub fn settled(&self) -> bool {
        self.acked + self.send_failures >= self.sent && self.delivered >= self.acked
    }
}

/// The run's time base. Sender and receiver live in one process, so a send timestamp written
/// into the message text as nanoseconds since this base is read back on the other side without
/// any clock synchronisation.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    base: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Self {
            base: Instant::now(),
        }
    }

    pub fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    pub fn now_nanos(&self) -> u64 {
        self.nanos(Instant::now())
    }

    /// Time from a send stamp to `at`; zero when `at` is before it (clock cannot go backwards,
    /// but a stamp from a foreign writer could be anything).
    pub fn since(&self, sent_nanos: u64, at: Instant) -> Duration {
        Duration::from_nanos(self.nanos(at).saturating_sub(sent_nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reports_percentiles_in_milliseconds() {
        let mut h = LatencyHistogram::new();
        for i in 1..=1000u64 {
            h.record(Duration::from_micros(i));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_ms - 0.5).abs() < 0.001, "{s:?}");
        assert!((s.p90_ms - 0.9).abs() < 0.001, "{s:?}");
        assert!((s.p99_ms - 0.99).abs() < 0.001, "{s:?}");
        assert!((s.max_ms - 1.0).abs() < 0.001, "{s:?}");
        assert!((s.mean_ms - 0.5005).abs() < 0.001, "{s:?}");
    }

    #[test]
    fn empty_histogram_summarises_to_zero() {
        assert_eq!(LatencyHistogram::new().summary(), Summary::default());
    }

    #[test]
    fn values_beyond_the_range_are_clamped_not_lost() {
        let mut h = LatencyHistogram::new();
        h.record(Duration::from_secs(3600));
        h.record(Duration::ZERO);
        assert_eq!(h.len(), 2);
        assert!(h.summary().max_ms >= 299_000.0);
    }

    #[test]
    fn pairs_round_trip_keeps_counts_and_percentiles() {
        let mut h = LatencyHistogram::new();
        for i in 0..500u64 {
            h.record(Duration::from_micros(100 + i * 7));
        }
        let back = LatencyHistogram::from_pairs(&h.to_pairs());
        assert_eq!(back.len(), h.len());
        assert_eq!(back.summary(), h.summary());
    }

    #[test]
    fn recorder_merges_shards_per_phase() {
        let r = Recorder::new();
        for conv in 0..100i64 {
            r.record_send(conv, 0, Duration::from_micros(5));
            r.record_ack(conv, 0);
            r.record_latency(conv, 0, Duration::from_millis(1));
        }
        r.record_latency(7, 2, Duration::from_millis(9));
        let p0 = r.phase(0);
        assert_eq!((p0.sent, p0.acked, p0.delivered), (100, 100, 100));
        assert_eq!(p0.latency.len(), 100);
        assert_eq!(p0.lateness.len(), 100);
        let p1 = r.phase(1);
        assert_eq!((p1.sent, p1.delivered), (0, 0));
        let p2 = r.phase(2);
        assert_eq!(p2.delivered, 1);
        assert!((p2.latency.summary().max_ms - 9.0).abs() < 0.01);
    }

    #[test]
    fn settled_needs_every_send_answered_and_delivered() {
        let mut s = CounterSnapshot {
            sent: 10,
            acked: 9,
            delivered: 9,
            ..Default::default()
        };
        assert!(!s.settled());
        s.send_failures = 1;
        assert!(s.settled());
        s.delivered = 8;
        assert!(!s.settled());
    }

    #[tokio::test(start_paused = true)]
    async fn clock_measures_from_the_stamp() {
        let clock = Clock::new();
        let stamp = clock.now_nanos();
        tokio::time::advance(Duration::from_millis(3)).await;
        assert_eq!(clock.since(stamp, Instant::now()), Duration::from_millis(3));
        assert_eq!(clock.since(u64::MAX, Instant::now()), Duration::ZERO);
    }
}
