//! Open-loop send schedules.
//!
//! A sender sends on a fixed timetable whatever the server does: replies never gate the next
//! send, and a sender that fell behind sends its missed slots at once rather than quietly
//! skipping them. Each send's lateness against its slot is
//! recorded, so a saturated client shows up as lateness instead of as a server that looks fast
//! because it was offered less load (coordinated omission).

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Shortest period a schedule accepts, so a rate of infinity-ish cannot make a zero step and
/// loop forever on one slot; no single connection of this harness sends a million frames a
/// second.
const MIN_PERIOD: Duration = Duration::from_micros(1);

/// A timetable of sends from `start` (plus a phase offset) until `end`, at a fixed rate.
///
/// Slots are computed, not taken from a tokio `Interval`, so the schedule can tell exactly when
/// it has no slot left: the drain after a phase waits for every sender to be done. Tokio's
/// timer has millisecond granularity, so up to 1 ms of lateness is the timer's, not the client's.
pub struct Schedule {
    next: Instant,
    period: Duration,
    end: Instant,
    /// Kept across calls (and reset per slot) rather than made per call: a sender's `select!`
    /// loop asks for the next slot after every frame it reads, and re-registering a timer
    /// each time was a measurable share of the client's CPU.
    timer: Pin<Box<Sleep>>,
}

impl Schedule {
    /// `rate` sends per second; `offset` in [0, 1) shifts the first slot by that fraction of a
    /// period, so thousands of senders with the same rate do not all fire on the same tick.
    /// `None` when the rate is not positive.
    pub fn new(start: Instant, end: Instant, rate: f64, offset: f64) -> Option<Self> {
        if !(rate.is_finite() && rate > 0.0) {
            return None;
        }
        let period = Duration::from_secs_f64(1.0 / rate).max(MIN_PERIOD);
        let next = start + period.mul_f64(offset.clamp(0.0, 0.999_999));
        Some(Self {
            next,
            period,
            end,
            timer: Box::pin(tokio::time::sleep_until(next)),
        })
    }

    /// Waits for the next slot and returns its scheduled instant; `None` once the slots reach
    /// the end of the phase. A sender that is behind gets its missed slots at once, one per
    /// call, until it has caught up. Cancel-safe: a slot is only consumed when returned.
    pub async fn next(&mut self) -> Option<Instant> {
        if self.is_done() {
            return None;
        }
        self.timer.as_mut().await;
        let slot = self.next;
        self.next += self.period;
        self.timer.as_mut().reset(self.next);
        Some(slot)
    }

    /// No slot is left.
    pub fn is_done(&self) -> bool {
        self.next >= self.end
    }
}

/// Waits on an optional schedule: never completes when there is none, so it can sit in a
/// `select!` beside the frames being read. Returns `None` when the schedule ran out.
pub async fn next_slot(schedule: &mut Option<Schedule>) -> Option<Instant> {
    match schedule {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn sends_exactly_rate_times_duration_on_time() {
        let start = Instant::now();
        let end = start + Duration::from_secs(2);
        let mut s = Schedule::new(start, end, 50.0, 0.0).unwrap();
        let mut slots = Vec::new();
        while let Some(slot) = s.next().await {
            // Paused time only moves when every task waits, so each slot fires exactly on time.
            assert_eq!(Instant::now(), slot);
            slots.push(slot);
        }
        assert!(s.is_done());
        assert_eq!(slots.len(), 100);
        assert_eq!(slots[1] - slots[0], Duration::from_millis(20));
        assert_eq!(*slots.last().unwrap(), start + Duration::from_millis(1980));
    }

    #[tokio::test(start_paused = true)]
    async fn offset_shifts_the_first_slot_within_a_period() {
        let start = Instant::now();
        let mut s = Schedule::new(start, start + Duration::from_secs(1), 10.0, 0.5).unwrap();
        assert_eq!(s.next().await, Some(start + Duration::from_millis(50)));
        assert_eq!(s.next().await, Some(start + Duration::from_millis(150)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_sender_catches_up_in_a_burst_and_its_lateness_shows() {
        let start = Instant::now();
        let end = start + Duration::from_secs(1);
        let mut s = Schedule::new(start, end, 100.0, 0.0).unwrap();
        assert_eq!(s.next().await, Some(start));
        // The sender is busy for 95 ms: slots at 10..=90 ms are due by the time it returns.
        tokio::time::advance(Duration::from_millis(95)).await;
        let mut late = Vec::new();
        for _ in 0..9 {
            let slot = s.next().await.unwrap();
            late.push(Instant::now() - slot);
        }
        assert_eq!(late[0], Duration::from_millis(85));
        assert_eq!(late[8], Duration::from_millis(5));
        // Caught up: the next slot waits for its time again.
        let slot = s.next().await.unwrap();
        assert_eq!(slot, start + Duration::from_millis(100));
        assert_eq!(Instant::now(), slot);
        // Open loop: all 100 slots are still sent.
        let mut n = 11;
        while s.next().await.is_some() {
            n += 1;
        }
        assert_eq!(n, 100);
        assert_eq!(Instant::now(), start + Duration::from_millis(990));
    }

    #[tokio::test(start_paused = true)]
    async fn no_rate_no_schedule() {
        let now = Instant::now();
        assert!(Schedule::new(now, now, 0.0, 0.0).is_none());
        assert!(Schedule::new(now, now, 5.0, 0.0).unwrap().is_done());
        assert!(Schedule::new(now, now, f64::NAN, 0.0).is_none());
        let mut none: Option<Schedule> = None;
        let waited = tokio::time::timeout(Duration::from_secs(60), next_slot(&mut none)).await;
        assert!(waited.is_err(), "an absent schedule never fires");
    }
}
