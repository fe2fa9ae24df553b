//! Per-recipient ordering of a conversation's stored frames.
//!
//! A hub (agent or visitor) gets a conversation's writes from two directions in cluster mode:
//! from this node's conversation actor, and as notices from the nodes where the other
//! participant writes. Each path is ordered, but together they are not: the ack of an agent's
//! `seq` 8, written here, can reach the hub before the visitor's `seq` 7 arrives from another
//! node. So the hub, not the paths, keeps the order: for each conversation it remembers the
//! highest `seq` it handed to its connections, holds back a write that would jump over a
//! missing one, fetches what is missing from storage (the truth; notices are hints), and
//! drops a write it has already handed over (the notice of a write that a fill delivered).
//!
//! On a single node one actor writes each conversation, so writes already come in order and
//! nothing is held; the rule is the same code in both modes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use bytestring::ByteString;

use super::Realtime;
use super::conn::{ConnHandle, fan_out};
use super::conversation::event_frames;
use crate::conversations::{MessageView, store};
use crate::tenancy::TenantRecord;

/// How long a hub waits for a gap to close by itself (the missing write is usually a notice
/// or a local delivery a moment behind) before it reads storage. Only held writes wait.
pub const FILL_GRACE: Duration = Duration::from_millis(20);

/// How long a hub waits for storage to fill a gap before it hands over what it holds anyway
/// (the client sees the gap and syncs).
pub const FILL_TIMEOUT: Duration = Duration::from_secs(2);

/// Conversations a hub remembers the last `seq` of. An agent works through hundreds a day;
/// past this the memory is dropped (an unknown conversation is delivered as it comes, so
/// forgetting costs at most the detection of one gap).
const REMEMBERED: usize = 4096;

/// Writes held behind one gap; past this the hub stops waiting and hands them over.
const MAX_HELD: usize = 1024;

/// One stored write of a conversation, for every connection of one agent or visitor.
#[derive(Message, Clone)]
#[rtype(result = "()")]
pub struct DeliverWrite {
    pub conversation_id: i64,
    pub seq: i64,
    /// The `message` frame, then any event frames that go with it (`assigned`, `closed`…).
    pub frames: Arc<[ByteString]>,
    /// The connection the write came from: it gets the ack instead of the frames.
    pub except: Option<u64>,
    /// The sender's connection and its acknowledgement, when the sender is a connection of
    /// this hub (so that the ack takes its place in the conversation's order).
    pub ack: Option<(ConnHandle, ByteString)>,
}

impl DeliverWrite {
    /// The frames of a stored message as fetched back from storage (a fill).
    fn from_storage(view: &MessageView) -> Self {
        let mut frames = vec![crate::protocol::ServerFrame::Message(view).encode()];
        frames.extend(event_frames(view));
        Self {
            conversation_id: view.conversation_id,
            seq: view.seq,
            frames: frames.into(),
            except: None,
            ack: None,
        }
    }

    /// Queues the write on the hub's connections: the sender gets its ack, the others the
    /// frames. `repeat`: the frames were handed over already; only the ack is still owed.
    fn hand_over(&self, conns: &[ConnHandle], repeat: bool) {
        if !repeat {
            for f in self.frames.iter() {
                fan_out(conns, f, self.except);
            }
        }
        if let Some((origin, ack)) = &self.ack {
            origin.push(ack.clone());
        }
    }
}

/// What a hub should do after [`SeqOrder::offer`].
#[derive(Debug, PartialEq, Eq)]
pub enum Offered {
    /// Nothing more to do (handed over, or held behind a gap already being filled).
    Done,
    /// A gap opened: fetch the conversation's messages after `after` from storage and give
    /// them to [`SeqOrder::filled`].
    Fill { conversation_id: i64, after: i64 },
}

/// The ordering state of one hub.
#[derive(Default)]
pub struct SeqOrder {
    /// Conversation → highest `seq` handed to the connections.
    last: HashMap<i64, i64>,
    /// Writes held behind gaps; boxed because almost every hub never has any, and an idle
    /// visitor's hub should stay small.
    gaps: Option<Box<Gaps>>,
}

#[derive(Default)]
struct Gaps {
    /// Conversation → held writes by `seq`.
    held: HashMap<i64, BTreeMap<i64, DeliverWrite>>,
    /// Conversations with a fill under way.
    filling: HashSet<i64>,
}

impl SeqOrder {
    /// Takes a write: hands it (and whatever it unblocks) to `conns` in order, drops it if it
    /// was handed over already, or holds it behind a gap.
    pub fn offer(&mut self, w: DeliverWrite, conns: &[ConnHandle]) -> Offered {
        let conv = w.conversation_id;
        if let Some(held) = self.gaps.as_mut().and_then(|g| g.held.get_mut(&conv)) {
            // Behind a gap already: wait in line, unless this is what the gap waits for.
            let last = self.last.get(&conv).copied().unwrap_or(0);
            if w.seq <= last {
                w.hand_over(conns, true);
            } else if w.seq == last + 1 {
                w.hand_over(conns, false);
                self.last.insert(conv, w.seq);
                self.release_contiguous(conv, conns);
            } else if held.len() >= MAX_HELD {
                held.insert(w.seq, w);
                self.release_all(conv, conns);
            } else {
                held.insert(w.seq, w);
            }
            return Offered::Done;
        }
        match self.last.get(&conv).copied() {
            Some(last) if w.seq <= last => {
                w.hand_over(conns, true);
                Offered::Done
            }
            Some(last) if w.seq > last + 1 => {
                let gaps = self.gaps.get_or_insert_with(Box::default);
                gaps.held.entry(conv).or_default().insert(w.seq, w);
                if gaps.filling.insert(conv) {
                    Offered::Fill {
                        conversation_id: conv,
                        after: last,
                    }
                } else {
                    Offered::Done
                }
            }
            // The next one, or the first this hub sees of the conversation.
            _ => {
                w.hand_over(conns, false);
                self.remember(conv, w.seq);
                Offered::Done
            }
        }
    }

    /// After [`FILL_GRACE`]: the `seq` to read storage after, if the conversation still waits
    /// behind a gap (else the fill is called off).
    pub fn still_waiting(&mut self, conversation_id: i64) -> Option<i64> {
        let gaps = self.gaps.as_mut()?;
        if gaps.held.contains_key(&conversation_id) {
            return Some(self.last.get(&conversation_id).copied().unwrap_or(0));
        }
        gaps.filling.remove(&conversation_id);
        if gaps.held.is_empty() && gaps.filling.is_empty() {
            self.gaps = None;
        }
        None
    }

    /// The answer to [`Offered::Fill`]: the conversation's messages from storage, or `None`
    /// when storage failed or was too slow. What now follows without a gap, held or fetched,
    /// is handed over in `seq` order (held writes win over their fetched copies).
    ///
    /// A gap can outlive a good read: the read began before a write was committed, and a later
    /// write arrived while it ran (two nodes writing at once). A held write proves everything
    /// below it is committed (`seq` is allocated under the conversation's row lock), so
    /// reading again closes the gap; this returns another [`Offered::Fill`] for that. Only a
    /// read that failed, or that reached past the gap without filling it, gives up and hands
    /// over what is held, leaving the gap for the client to sync: handing over past a gap that
    /// storage could still fill would make its late notice look like a repeat, and drop it.
    pub fn filled(
        &mut self,
        conversation_id: i64,
        fetched: Option<Vec<MessageView>>,
        conns: &[ConnHandle],
    ) -> Offered {
        let Some(gaps) = self.gaps.as_mut() else {
            return Offered::Done;
        };
        gaps.filling.remove(&conversation_id);
        let before = self.last.get(&conversation_id).copied().unwrap_or(0);
        // Storage's rows are gap-free, so a read saw every `seq` up to its highest. An empty
        // one cannot be behind a held write (a read starts only while one is held): give up.
        let reached = fetched.iter().flatten().map(|v| v.seq).max();
        let held = gaps.held.entry(conversation_id).or_default();
        for view in fetched.into_iter().flatten() {
            if view.seq > before {
                held.entry(view.seq)
                    .or_insert_with(|| DeliverWrite::from_storage(&view));
            }
        }
        self.release_contiguous(conversation_id, conns);
        let last = self.last.get(&conversation_id).copied().unwrap_or(0);
        if let Some(gaps) = self.gaps.as_mut()
            && gaps.held.contains_key(&conversation_id)
            && reached.is_some_and(|r| r <= last)
        {
            gaps.filling.insert(conversation_id);
            return Offered::Fill {
                conversation_id,
                after: last,
            };
        }
        self.release_all(conversation_id, conns);
        if self
            .gaps
            .as_ref()
            .is_some_and(|g| g.held.is_empty() && g.filling.is_empty())
        {
            self.gaps = None;
        }
        Offered::Done
    }

    /// Hands over the held writes that now follow without a gap.
    fn release_contiguous(&mut self, conv: i64, conns: &[ConnHandle]) {
        let Some(gaps) = self.gaps.as_mut() else {
            return;
        };
        let Some(held) = gaps.held.get_mut(&conv) else {
            return;
        };
        let mut last = self.last.get(&conv).copied().unwrap_or(0);
        while let Some(entry) = held.first_entry() {
            if *entry.key() > last + 1 {
                break;
            }
            let w = entry.remove();
            w.hand_over(conns, w.seq <= last);
            last = last.max(w.seq);
        }
        if held.is_empty() {
            gaps.held.remove(&conv);
        }
        self.last.insert(conv, last);
    }

    /// Gives up waiting: hands over everything held for `conv`, in order.
    fn release_all(&mut self, conv: i64, conns: &[ConnHandle]) {
        let held = self
            .gaps
            .as_mut()
            .and_then(|g| g.held.remove(&conv))
            .unwrap_or_default();
        self.hand_over_in_order(conv, held, conns);
    }

    fn hand_over_in_order(
        &mut self,
        conv: i64,
        held: BTreeMap<i64, DeliverWrite>,
        conns: &[ConnHandle],
    ) {
        let mut last = self.last.get(&conv).copied().unwrap_or(0);
        for (seq, w) in held {
            w.hand_over(conns, seq <= last);
            last = last.max(seq);
        }
        self.remember(conv, last);
    }

    fn remember(&mut self, conv: i64, seq: i64) {
        if self.last.len() >= REMEMBERED && !self.last.contains_key(&conv) {
            self.last.clear();
        }
        self.last.insert(conv, seq);
    }
}

/// A hub whose connections get conversations' writes through a [`SeqOrder`].
pub trait OrderedHub: Actor<Context = Context<Self>> {
    /// The ordering state and the connections to hand writes to.
    fn order_and_conns(&mut self) -> (&mut SeqOrder, &[ConnHandle]);
    /// Where a fill reads from.
    fn storage(&self) -> (Realtime, Arc<TenantRecord>);
    /// Something was handed over (a visitor's hub wakes its long-polls).
    fn handed_over(&mut self) {}
}

/// A hub's handling of [`DeliverWrite`]: in order, with a fill from storage for a gap that
/// does not close by itself within [`FILL_GRACE`].
pub fn handle_write<A: OrderedHub>(act: &mut A, w: DeliverWrite, ctx: &mut Context<A>) {
    let (order, conns) = act.order_and_conns();
    if let Offered::Fill {
        conversation_id, ..
    } = order.offer(w, conns)
    {
        fill_later(conversation_id, ctx);
    }
    act.handed_over();
}

/// After [`FILL_GRACE`], reads what a conversation's gap still misses from storage and hands
/// it over; again if [`SeqOrder::filled`] asks for another read.
fn fill_later<A: OrderedHub>(conversation_id: i64, ctx: &mut Context<A>) {
    ctx.run_later(FILL_GRACE, move |act, ctx| {
        let Some(after) = act.order_and_conns().0.still_waiting(conversation_id) else {
            return;
        };
        let (rt, tenant) = act.storage();
        tracing::debug!(tenant = %tenant.slug, conversation_id, after, "gap in a conversation's writes; filling from storage");
        let fetch = async move {
            let fetch = async {
                let db = rt.db(&tenant).await.ok()?;
                // Through the pool: a read on this thread would hold every actor on it.
                store::messages_after(&db, None, conversation_id, after, store::MAX_PAGE)
                    .await
                    .ok()
            };
            tokio::time::timeout(FILL_TIMEOUT, fetch)
                .await
                .ok()
                .flatten()
        };
        ctx.spawn(fetch.into_actor(act).map(move |fetched, act, ctx| {
            let (order, conns) = act.order_and_conns();
            let views = fetched.map(|rows| rows.into_iter().map(MessageView::from).collect());
            if let Offered::Fill { .. } = order.filled(conversation_id, views, conns) {
                fill_later(conversation_id, ctx);
            }
            act.handed_over();
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A write of seq `seq`; `from` is the hub's own connection when it sent it.
    fn write(seq: i64, from: Option<&ConnHandle>) -> DeliverWrite {
        DeliverWrite {
            conversation_id: 7,
            seq,
            frames: vec![ByteString::from(format!("m{seq}"))].into(),
            except: from.map(|c| c.id),
            ack: from.map(|c| (c.clone(), ByteString::from(format!("ack{seq}")))),
        }
    }

    fn view(seq: i64) -> MessageView {
        MessageView::from(entity::tenant::message::Model {
            id: seq,
            conversation_id: 7,
            seq,
            client_msg_id: format!("c{seq}"),
            sender_kind: "visitor".into(),
            sender_id: Some(1),
            content: r#"{"type":"text","text":"hi"}"#.into(),
            created_at: chrono::Utc::now(),
        })
    }

    fn drain(rx: &mut tokio::sync::mpsc::Receiver<ByteString>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(f) = rx.try_recv() {
            out.push(f.to_string());
        }
        out
    }

    #[test]
    fn writes_in_order_pass_straight_through_and_repeats_are_dropped() {
        let (conn, mut rx, _) = ConnHandle::new(1, 64);
        let conns = [conn];
        let mut o = SeqOrder::default();
        assert_eq!(o.offer(write(3, None), &conns), Offered::Done);
        assert_eq!(o.offer(write(4, None), &conns), Offered::Done);
        assert_eq!(o.offer(write(4, None), &conns), Offered::Done);
        assert_eq!(drain(&mut rx), ["m3", "m4"]);
        assert!(o.gaps.is_none());
    }

    #[test]
    fn an_ack_that_overtakes_a_message_waits_for_it() {
        let (conn, mut rx, _) = ConnHandle::new(1, 64);
        let conns = [conn];
        let mut o = SeqOrder::default();
        o.offer(write(1, None), &conns);
        // This connection's own seq 3 is stored before the other side's seq 2 arrives.
        assert_eq!(
            o.offer(write(3, Some(&conns[0])), &conns),
            Offered::Fill {
                conversation_id: 7,
                after: 1
            }
        );
        assert_eq!(drain(&mut rx), ["m1"], "the ack of 3 is held");
        // Seq 2 arrives as a notice before the fill comes back: both go, in order.
        o.offer(write(2, None), &conns);
        assert_eq!(drain(&mut rx), ["m2", "ack3"]);
        // The fill then finds nothing new; nothing is repeated.
        o.filled(7, Some(vec![view(2), view(3)]), &conns);
        assert!(drain(&mut rx).is_empty());
        assert!(o.gaps.is_none());
    }

    #[test]
    fn a_fill_from_storage_closes_the_gap_and_the_late_notice_is_dropped() {
        let (conn, mut rx, _) = ConnHandle::new(1, 64);
        let conns = [conn];
        let mut o = SeqOrder::default();
        o.offer(write(1, None), &conns);
        o.offer(write(4, Some(&conns[0])), &conns);
        o.offer(write(5, None), &conns);
        o.filled(7, Some(vec![view(2), view(3), view(4), view(5)]), &conns);
        let got = drain(&mut rx);
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[0], "m1");
        assert!(
            got[1].contains("\"seq\":2") && got[2].contains("\"seq\":3"),
            "{got:?}"
        );
        assert_eq!(
            &got[3..],
            ["ack4", "m5"],
            "held writes win over fetched copies"
        );
        // The notice of 3 that was still travelling changes nothing.
        o.offer(write(3, None), &conns);
        assert!(drain(&mut rx).is_empty());
    }

    #[test]
    fn a_gap_that_closes_within_the_grace_needs_no_fill() {
        let (conn, mut rx, _) = ConnHandle::new(1, 64);
        let conns = [conn];
        let mut o = SeqOrder::default();
        o.offer(write(1, None), &conns);
        o.offer(write(3, None), &conns);
        o.offer(write(2, None), &conns);
        assert_eq!(drain(&mut rx), ["m1", "m2", "m3"]);
        assert_eq!(o.still_waiting(7), None);
        assert!(o.gaps.is_none());
        // One that does not close: the fill reads after what was handed over.
        o.offer(write(5, None), &conns);
        assert_eq!(o.still_waiting(7), Some(3));
    }

    #[test]
    fn a_gap_that_opens_while_a_fill_reads_is_read_again_not_skipped() {
        let (conn, mut rx, _) = ConnHandle::new(1, 64);
        let conns = [conn];
        let mut o = SeqOrder::default();
        o.offer(write(1, None), &conns);
        o.offer(write(3, None), &conns);
        // The grace runs out: a read after 1 begins, and sees 2 and 3.
        assert_eq!(o.still_waiting(7), Some(1));
        // Meanwhile 2 arrives and closes that gap; 5 arrives before 4 is even committed.
        o.offer(write(2, None), &conns);
        o.offer(write(5, None), &conns);
        assert_eq!(drain(&mut rx), ["m1", "m2", "m3"]);
        // The read knew nothing of 4 or 5: 5 stays held and storage is read again.
        assert_eq!(
            o.filled(7, Some(vec![view(2), view(3)]), &conns),
            Offered::Fill {
                conversation_id: 7,
                after: 3
            }
        );
        assert!(drain(&mut rx).is_empty(), "5 is not handed over past 4");
        assert_eq!(o.still_waiting(7), Some(3));
        assert_eq!(
            o.filled(7, Some(vec![view(4), view(5)]), &conns),
            Offered::Done
        );
        let got = drain(&mut rx);
        assert!(got.len() == 2 && got[0].contains("\"seq\":4"), "{got:?}");
        assert_eq!(got[1], "m5");
        // The notice of 4 that was still travelling changes nothing.
        o.offer(write(4, None), &conns);
        assert!(drain(&mut rx).is_empty());
        assert!(o.gaps.is_none());
    }

    #[test]
    fn a_read_that_passes_a_gap_without_filling_it_gives_up() {
        let (conn, mut rx, _) = ConnHandle::new(1, 64);
        let conns = [conn];
        let mut o = SeqOrder::default();
        o.offer(write(1, None), &conns);
        o.offer(write(4, None), &conns);
        // Storage without 3 (it cannot happen while seq is gap-free; the hub must not loop).
        assert_eq!(
            o.filled(7, Some(vec![view(2), view(4)]), &conns),
            Offered::Done
        );
        assert_eq!(drain(&mut rx).len(), 3);
        assert!(o.gaps.is_none());
    }

    #[test]
    fn a_failed_fill_hands_over_what_is_held() {
        let (conn, mut rx, _) = ConnHandle::new(1, 64);
        let conns = [conn];
        let mut o = SeqOrder::default();
        o.offer(write(1, None), &conns);
        o.offer(write(3, None), &conns);
        o.filled(7, None, &conns);
        assert_eq!(drain(&mut rx), ["m1", "m3"]);
        // A repeated ack (a duplicate send) still reaches its sender.
        o.offer(write(3, Some(&conns[0])), &conns);
        assert_eq!(drain(&mut rx), ["ack3"]);
    }
}
