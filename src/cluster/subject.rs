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
    }
}
