//! The visitor actor: one per visitor with an open connection or a waiting long-poll on this
//! node. It fans frames out to the visitor's sockets and wakes its long-polls.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use super::Realtime;
use super::conn::{Attach, ConnHandle, Deliver, Detach, KillAll, fan_out};
use super::order::{DeliverWrite, OrderedHub, SeqOrder, handle_write};
use super::queue;
use crate::tenancy::TenantRecord;

/// A visitor actor with no connection and no long-poll stops after this long.
const LINGER: Duration = Duration::from_secs(60);

pub struct VisitorActor {
    rt: Realtime,
    tenant: Arc<TenantRecord>,
    id: i64,
    conns: Vec<ConnHandle>,
    /// Long-polls waiting for anything new; each is woken once.
    waiters: Vec<oneshot::Sender<()>>,
    linger: Option<SpawnHandle>,
    /// Conversations' writes in `seq` order, whichever node they come from.
    order: SeqOrder,
}

impl VisitorActor {
    /// Started for a connection, the actor is born with it (see `Realtime::visitor_hub_with`).
    pub fn new(rt: Realtime, tenant: Arc<TenantRecord>, id: i64, conn: Option<ConnHandle>) -> Self {
        Self {
            rt,
            tenant,
            id,
            conns: conn.into_iter().collect(),
            waiters: Vec::new(),
            linger: None,
            order: SeqOrder::default(),
        }
    }

    fn rearm_linger(&mut self, ctx: &mut Context<Self>) {
        if let Some(h) = self.linger.take() {
            ctx.cancel_future(h);
        }
        self.linger = Some(ctx.run_later(LINGER, |act, ctx| {
            act.waiters.retain(|w| !w.is_closed());
            if act.conns.is_empty() && act.waiters.is_empty() {
                ctx.stop();
            } else {
                act.rearm_linger(ctx);
            }
        }));
    }

    fn presence(&self, present: Option<bool>) {
        self.rt.queue_tell(
            &self.tenant,
            queue::QueueOp::VisitorSeen {
                visitor_id: self.id,
                present,
            },
        );
    }
}

impl Actor for VisitorActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
        self.rearm_linger(ctx);
        // Born with a connection: what `Attach` does for it.
        if !self.conns.is_empty() {
            self.rt.visitor_socket(self.tenant.id, self.id, true);
            self.presence(Some(true));
        }
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.rt
            .forget_visitor((self.tenant.id, self.id), &ctx.address());
    }
}

impl Handler<Attach> for VisitorActor {
    type Result = ();

    fn handle(&mut self, Attach(conn): Attach, ctx: &mut Context<Self>) {
        self.conns.push(conn);
        self.rt.visitor_socket(self.tenant.id, self.id, true);
        self.rearm_linger(ctx);
        self.presence(Some(true));
    }
}

impl Handler<Detach> for VisitorActor {
    type Result = ();

    fn handle(&mut self, Detach(id): Detach, _: &mut Context<Self>) {
        let before = self.conns.len();
        self.conns.retain(|c| c.id != id);
        if self.conns.len() < before {
            self.rt.visitor_socket(self.tenant.id, self.id, false);
        }
        if self.conns.is_empty() {
            self.presence(Some(false));
        }
    }
}

impl Handler<Deliver> for VisitorActor {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) {
        fan_out(&self.conns, &msg.frame, msg.except);
        self.wake_long_polls();
    }
}

impl Handler<KillAll> for VisitorActor {
    type Result = ();

    fn handle(&mut self, KillAll(why): KillAll, _: &mut Context<Self>) {
        for c in &self.conns {
            c.kill(why);
        }
        // Long-polls answer now; their next request is refused.
        self.wake_long_polls();
    }
}

/// A long-poll wants to be woken by the next frame for this visitor.
#[derive(Message)]
#[rtype(result = "oneshot::Receiver<()>")]
pub struct Wait;

impl Handler<Wait> for VisitorActor {
    type Result = MessageResult<Wait>;

    fn handle(&mut self, _: Wait, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.waiters.retain(|w| !w.is_closed());
        self.waiters.push(tx);
        self.rearm_linger(ctx);
        self.presence(None);
        MessageResult(rx)
    }
}

impl VisitorActor {
    fn wake_long_polls(&mut self) {
        for w in self.waiters.drain(..) {
            let _ = w.send(());
        }
    }
}

impl OrderedHub for VisitorActor {
    fn order_and_conns(&mut self) -> (&mut SeqOrder, &[ConnHandle]) {
        (&mut self.order, &self.conns)
    }

    fn storage(&self) -> (Realtime, Arc<TenantRecord>) {
        (self.rt.clone(), self.tenant.clone())
    }

    fn handed_over(&mut self) {
        self.wake_long_polls();
    }
}

impl Handler<DeliverWrite> for VisitorActor {
    type Result = ();

    fn handle(&mut self, msg: DeliverWrite, ctx: &mut Context<Self>) {
        handle_write(self, msg, ctx);
    }
}
