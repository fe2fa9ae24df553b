//! NATS subjects, all under `kefu.<tenant id>.` so that a tenant's traffic is separable by
//! construction (and could be split across accounts or permissions per tenant). Tenant ids
//! are used rather than slugs because they never change and are always valid subject tokens.

/// Frames for every connection of an agent (subscribed by the node hosting its hub).
pub fn agent(tenant: i64, agent: i64) -> String {
    format!("kefu.{tenant}.agent.{agent}")
}

/// Frames for every connection and long-poll of a visitor.
pub fn visitor(tenant: i64, visitor: i64) -> String {
    format!("kefu.{tenant}.visitor.{visitor}")
}

/// A stored write of a conversation, for both its participants at once: published once, and
/// heard by the nodes of the visitor (subscribed to [`visitor_writes`]) and of the agent
/// ([`agent_writes`]). `None`: the conversation has no agent (queued, or closed unassigned).
pub fn write(tenant: i64, visitor: i64, agent: Option<i64>) -> String {
    match agent {
        Some(agent) => format!("kefu.{tenant}.write.{visitor}.{agent}"),
        // Never an agent id, so no agent's node hears it.
        None => format!("kefu.{tenant}.write.{visitor}.none"),
    }
}

/// Every stored write of the visitor's conversations, whichever agent has them.
pub fn visitor_writes(tenant: i64, visitor: i64) -> String {
    format!("kefu.{tenant}.write.{visitor}.*")
}

/// Every stored write of the conversations the agent has, whichever visitor they are with.
pub fn agent_writes(tenant: i64, agent: i64) -> String {
    format!("kefu.{tenant}.write.*.{agent}")
}

/// "This conversation changed hands": conversation actors drop what they cached about it.
pub fn conversation(tenant: i64, conversation: i64) -> String {
    format!("kefu.{tenant}.conv.{conversation}")
}

/// The tenant's queue: operations forwarded to the node holding its lease, and presence
/// heartbeats.
pub fn queue(tenant: i64) -> String {
    format!("kefu.{tenant}.queue")
}

#[cfg(test)]
mod tests {
    #[test]
    fn subjects_are_tenant_sharded() {
        assert_eq!(super::agent(7, 3), "kefu.7.agent.3");
        assert_eq!(super::visitor(7, 3), "kefu.7.visitor.3");
        assert_eq!(super::conversation(7, 3), "kefu.7.conv.3");
        assert_eq!(super::queue(7), "kefu.7.queue");
        assert_eq!(super::write(7, 3, Some(5)), "kefu.7.write.3.5");
        assert_eq!(super::write(7, 3, None), "kefu.7.write.3.none");
        assert_eq!(super::visitor_writes(7, 3), "kefu.7.write.3.*");
        assert_eq!(super::agent_writes(7, 5), "kefu.7.write.*.5");
    }
}
