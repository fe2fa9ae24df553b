//! The agent actor: one per agent with at least one open connection on this node. It fans
//! frames out to every connection of the agent and tells the tenant queue when the agent comes,
//! goes or changes status.

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;

use super::Realtime;
use super::conn::{Attach, ConnHandle, Deliver, Detach, KillAll, fan_out};
use super::order::{DeliverWrite, OrderedHub, SeqOrder, handle_write};
use crate::protocol::{AgentStatus, ServerFrame};
use crate::tenancy::TenantRecord;

/// An agent actor with no connection stops after this long, so a page reload does not tear
/// it down and rebuild it.
const LINGER: Duration = Duration::from_secs(30);

pub struct AgentActor {
    rt: Realtime,
    tenant: Arc<TenantRecord>,
    id: i64,
    /// Every open connection of this agent on this node (tabs, devices).
    conns: Vec<ConnHandle>,
    /// Online (takes new conversations) or away; a new agent actor starts online.
    status: AgentStatus,
    linger: Option<SpawnHandle>,
    /// Conversations' writes in `seq` order, whichever node they come from.
    order: SeqOrder,
}

impl AgentActor {
    /// Started for a connection, the actor is born with it (see `Realtime::agent_hub_with`).
    pub fn new(rt: Realtime, tenant: Arc<TenantRecord>, id: i64, conn: Option<ConnHandle>) -> Self {
        Self {
            rt,
            tenant,
            id,
            conns: conn.into_iter().collect(),
            status: AgentStatus::Online,
            linger: None,
            order: SeqOrder::default(),
        }
    }
}

impl Actor for AgentActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.set_mailbox_capacity(1024);
        // Born with a connection: what `Attach` does for the first one.
        if !self.conns.is_empty() {
            self.rt
                .agent_presence(&self.tenant, self.id, Some(self.status));
        }
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        self.rt
            .forget_agent((self.tenant.id, self.id), &ctx.address());
    }
}

impl Handler<Attach> for AgentActor {
    type Result = ();

    fn handle(&mut self, Attach(conn): Attach, ctx: &mut Context<Self>) {
        if let Some(h) = self.linger.take() {
            ctx.cancel_future(h);
        }
        let first = self.conns.is_empty();
        self.conns.push(conn);
        if first {
            self.rt
                .agent_presence(&self.tenant, self.id, Some(self.status));
        }
    }
}

impl Handler<Detach> for AgentActor {
    type Result = ();

    fn handle(&mut self, Detach(id): Detach, ctx: &mut Context<Self>) {
        self.conns.retain(|c| c.id != id);
        if self.conns.is_empty() {
            self.rt.agent_presence(&self.tenant, self.id, None);
            self.linger = Some(ctx.run_later(LINGER, |act, ctx| {
                if act.conns.is_empty() {
                    ctx.stop();
                }
            }));
        }
    }
}

impl Handler<Deliver> for AgentActor {
    type Result = ();

    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) {
        fan_out(&self.conns, &msg.frame, msg.except);
    }
}

impl Handler<KillAll> for AgentActor {
    type Result = ();

    fn handle(&mut self, KillAll(why): KillAll, _: &mut Context<Self>) {
        for c in &self.conns {
            c.kill(why);
        }
    }
}

/// The agent chose `online` or `away` (on any of its connections).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetStatus(pub AgentStatus);

impl Handler<SetStatus> for AgentActor {
    type Result = ();

    fn handle(&mut self, SetStatus(status): SetStatus, _: &mut Context<Self>) {
        self.status = status;
        if !self.conns.is_empty() {
            self.rt.agent_presence(&self.tenant, self.id, Some(status));
        }
        fan_out(&self.conns, &ServerFrame::Status { status }.encode(), None);
    }
}

impl OrderedHub for AgentActor {
    fn order_and_conns(&mut self) -> (&mut SeqOrder, &[ConnHandle]) {
        (&mut self.order, &self.conns)
    }

    fn storage(&self) -> (Realtime, Arc<TenantRecord>) {
        (self.rt.clone(), self.tenant.clone())
    }
}

impl Handler<DeliverWrite> for AgentActor {
    type Result = ();

    fn handle(&mut self, msg: DeliverWrite, ctx: &mut Context<Self>) {
        handle_write(self, msg, ctx);
    }
}
