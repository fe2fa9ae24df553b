pub mod agent;
pub mod agent_team;
pub mod team;
