//! Loss, duplication and order checking.
//!
//! Each side of each conversation keeps a [`SeqTracker`]: one slot per `seq`, filled by the
//! `message` frames the side reads (any sender, system included) and by the acks of its own
//! sends. Duplicates and order are judged as frames arrive; loss is judged at the end by
//! [`lost`], which compares what one side had acknowledged with what the other side read.
//!
//! System messages (assignment events and the like) share the seq stream but nobody acks them,
//! so they can never be counted lost, and a system message read twice is not counted either:
//! only the two parties' own messages are the harness's to account for.

/// Largest `seq` a tracker accepts. A tracker grows one 8-byte slot per seq, so a corrupt frame
/// claiming seq 2^60 must not make it allocate; ten million messages in one conversation is far
/// beyond any run this harness makes.
pub const MAX_TRACKED_SEQ: u64 = 10_000_000;

const ACKED: u64 = 1;
const DELIVERED: u64 = 2;
const FLAG_BITS: u32 = 2;

/// How one observation of a seq turned out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// First sight of this seq, in order.
    New,
    /// First sight of this seq, but a higher one was already seen on this ordered channel.
    Late,
    /// The first ack of a message this side had already read: its own message, echoed back
    /// (as long-poll does) before the answer to its send arrived.
    AckOfRead,
    /// The same message again by a path that is allowed to repeat it: an own message read back
    /// after its ack, or an ack repeated.
    Echo,
    /// The same message read a second time.
    Duplicate,
    /// A system message read a second time: not the parties' traffic, not counted.
    SystemRepeat,
    /// Another message under a seq already taken: two messages share one seq.
    Conflict,
    /// seq 0, a seq beyond [`MAX_TRACKED_SEQ`], or a negative id.
    Invalid,
}

impl Seen {
    /// Whether this observation is the first of its kind for the seq: the first read of a
    /// message, or the first ack of a send.
    pub fn is_first(self) -> bool {
        matches!(self, Seen::New | Seen::Late)
    }

    /// Whether an ack observed with this outcome is the first ack of its send.
    pub fn is_first_ack(self) -> bool {
        matches!(self, Seen::New | Seen::Late | Seen::AckOfRead)
    }
}

/// What one side of one conversation has seen, by seq.
#[derive(Clone, Debug, Default)]
pub struct SeqTracker {
    /// Slot `seq - 1`: 0 when unseen, else `id << 2 | ACKED? | DELIVERED?`.
    slots: Vec<u64>,
    /// Highest seq observed on the ordered channel (the WebSocket, or the long-poll stream).
    max_ordered: u64,
}

impl SeqTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// A `message` frame read by this side. `ordered` is whether it came on the channel whose
    /// order the server promises (always, for frames; the parameter keeps the rule explicit).
    pub fn deliver(&mut self, seq: i64, id: i64, system: bool, ordered: bool) -> Seen {
        self.observe(seq, id, DELIVERED, system, ordered)
    }

    /// The ack of one of this side's own sends. On a WebSocket acks share the ordered channel
    /// with message frames; a long-poll POST answer has no order relative to the event stream,
    /// so it passes `ordered = false`.
    pub fn ack(&mut self, seq: i64, id: i64, ordered: bool) -> Seen {
        self.observe(seq, id, ACKED, false, ordered)
    }

    fn observe(&mut self, seq: i64, id: i64, how: u64, system: bool, ordered: bool) -> Seen {
        let Ok(seq) = u64::try_from(seq) else {
            return Seen::Invalid;
        };
        let Ok(id) = u64::try_from(id) else {
            return Seen::Invalid;
        };
        if seq == 0 || seq > MAX_TRACKED_SEQ || id >= 1 << (64 - FLAG_BITS) {
            return Seen::Invalid;
        }
        let idx = (seq - 1) as usize;
        if self.slots.len() <= idx {
            self.slots.resize(idx + 1, 0);
        }
        let slot = self.slots[idx];
        let late = ordered && seq < self.max_ordered;
        if ordered {
            self.max_ordered = self.max_ordered.max(seq);
        }
        if slot == 0 {
            self.slots[idx] = (id << FLAG_BITS) | how;
            return if late { Seen::Late } else { Seen::New };
        }
        if slot >> FLAG_BITS != id {
            return Seen::Conflict;
        }
        let repeat = slot & how != 0;
        self.slots[idx] = slot | how;
        match (how, repeat) {
            (DELIVERED, true) if system => Seen::SystemRepeat,
            (DELIVERED, true) => Seen::Duplicate,
            (ACKED, false) => Seen::AckOfRead,
            _ => Seen::Echo,
        }
    }

    /// The id read or acked under `seq`, if any.
    pub fn id_at(&self, seq: u64) -> Option<i64> {
        let slot = *self.slots.get(usize::try_from(seq.checked_sub(1)?).ok()?)?;
        (slot != 0).then_some((slot >> FLAG_BITS) as i64)
    }

    /// (seq, id) of every message this side sent and had acknowledged.
    pub fn own_acked(&self) -> impl Iterator<Item = (u64, i64)> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| *s & ACKED != 0)
            .map(|(i, s)| (i as u64 + 1, (s >> FLAG_BITS) as i64))
    }

    pub fn own_acked_count(&self) -> u64 {
        self.slots.iter().filter(|s| *s & ACKED != 0).count() as u64
    }

    /// Highest seq seen by any path.
    pub fn last_seq(&self) -> u64 {
        self.slots
            .iter()
            .rposition(|s| *s != 0)
            .map_or(0, |i| i as u64 + 1)
    }
}

/// Messages `sender` had acknowledged that `receiver` never read under their seq: missing, or
/// another message in their place (which the receiver alone cannot tell from a good one). A
/// receiver that is missing altogether (its connection never came up) lost everything.
pub fn lost(sender: &SeqTracker, receiver: Option<&SeqTracker>) -> u64 {
    sender
        .own_acked()
        .filter(|&(seq, id)| receiver.and_then(|r| r.id_at(seq)) != Some(id))
        .count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_stream_with_acks_and_system_messages_is_clean() {
        let mut t = SeqTracker::new();
        assert_eq!(t.deliver(1, 100, true, true), Seen::New);
        assert_eq!(t.ack(2, 101, true), Seen::New);
        assert_eq!(t.deliver(3, 102, false, true), Seen::New);
        assert_eq!(t.ack(4, 103, true), Seen::New);
        assert_eq!(t.last_seq(), 4);
        assert_eq!(t.own_acked().collect::<Vec<_>>(), vec![(2, 101), (4, 103)]);
        assert_eq!(t.own_acked_count(), 2);
    }

    #[test]
    fn a_message_read_twice_is_a_duplicate() {
        let mut t = SeqTracker::new();
        assert_eq!(t.deliver(1, 7, false, true), Seen::New);
        assert_eq!(t.deliver(1, 7, false, true), Seen::Duplicate);
    }

    #[test]
    fn a_system_message_read_twice_is_not_counted() {
        let mut t = SeqTracker::new();
        assert_eq!(t.deliver(1, 7, true, true), Seen::New);
        assert_eq!(t.deliver(1, 7, true, true), Seen::SystemRepeat);
    }

    #[test]
    fn own_message_echoed_after_its_ack_is_an_echo_either_way_round() {
        let mut t = SeqTracker::new();
        assert_eq!(t.ack(1, 5, true), Seen::New);
        assert_eq!(t.deliver(1, 5, false, true), Seen::Echo);
        assert_eq!(t.ack(1, 5, true), Seen::Echo);
        // Long-poll: the event stream may show the visitor's own message before the POST answers.
        assert_eq!(t.deliver(2, 6, false, true), Seen::New);
        assert_eq!(t.ack(2, 6, false), Seen::AckOfRead);
        assert!(Seen::AckOfRead.is_first_ack() && !Seen::AckOfRead.is_first());
        assert_eq!(t.ack(2, 6, false), Seen::Echo);
        assert_eq!(t.own_acked_count(), 2);
    }

    #[test]
    fn two_messages_under_one_seq_conflict() {
        let mut t = SeqTracker::new();
        assert_eq!(t.ack(3, 10, true), Seen::New);
        assert_eq!(t.deliver(3, 11, false, true), Seen::Conflict);
    }

    #[test]
    fn a_lower_seq_after_a_higher_one_is_late() {
        let mut t = SeqTracker::new();
        assert_eq!(t.deliver(1, 1, true, true), Seen::New);
        assert_eq!(t.deliver(3, 3, false, true), Seen::New);
        assert_eq!(t.deliver(2, 2, false, true), Seen::Late);
        assert_eq!(t.deliver(4, 4, false, true), Seen::New);
        // An ack on the same socket is part of the same order.
        assert_eq!(t.ack(6, 6, true), Seen::New);
        assert_eq!(t.ack(5, 5, true), Seen::Late);
    }

    #[test]
    fn unordered_acks_neither_judge_nor_move_the_order() {
        let mut t = SeqTracker::new();
        assert_eq!(t.ack(5, 5, false), Seen::New);
        // The event stream has not reached 5 yet: 3 and 4 arriving now are in order.
        assert_eq!(t.deliver(3, 3, false, true), Seen::New);
        assert_eq!(t.deliver(4, 4, false, true), Seen::New);
        assert_eq!(t.ack(2, 2, false), Seen::New);
        assert_eq!(t.ack(3, 3, false), Seen::AckOfRead);
        assert_eq!(t.deliver(5, 5, false, true), Seen::Echo);
        assert_eq!(t.deliver(6, 6, false, true), Seen::New);
    }

    #[test]
    fn invalid_seqs_and_ids_are_refused_without_allocating() {
        let mut t = SeqTracker::new();
        assert_eq!(t.deliver(0, 1, false, true), Seen::Invalid);
        assert_eq!(t.deliver(-3, 1, false, true), Seen::Invalid);
        assert_eq!(t.deliver(i64::MAX, 1, false, true), Seen::Invalid);
        assert_eq!(t.ack(1, -1, true), Seen::Invalid);
        assert_eq!(t.last_seq(), 0);
    }

    #[test]
    fn loss_is_what_one_side_acked_and_the_other_never_read() {
        let mut visitor = SeqTracker::new();
        let mut agent = SeqTracker::new();
        // seq 1: system message, read by the agent only; never loss.
        agent.deliver(1, 1, true, true);
        // seq 2..=5 sent by the visitor; the agent misses 4.
        for seq in 2..=5 {
            visitor.ack(seq, seq, true);
            if seq != 4 {
                agent.deliver(seq, seq, false, true);
            }
        }
        // seq 6 sent by the agent and read by the visitor.
        agent.ack(6, 6, true);
        visitor.deliver(6, 6, false, true);
        assert_eq!(lost(&visitor, Some(&agent)), 1);
        assert_eq!(lost(&agent, Some(&visitor)), 0);
        assert_eq!(lost(&visitor, None), 4);
    }

    #[test]
    fn another_message_in_the_place_of_an_acked_one_is_a_loss() {
        let mut visitor = SeqTracker::new();
        let mut agent = SeqTracker::new();
        visitor.ack(1, 10, true);
        // The agent alone cannot tell: to it this is a fine first message.
        assert_eq!(agent.deliver(1, 99, false, true), Seen::New);
        assert_eq!(lost(&visitor, Some(&agent)), 1);
    }
}
