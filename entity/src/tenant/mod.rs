pub mod agent;
pub mod agent_team;
pub mod conversation;
pub mod message;
pub mod read_position;
pub mod team;
pub mod visitor;
