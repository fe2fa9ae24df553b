//! Integration tests over real HTTP, against apps spawned on port 0 with their own data: SQLite
//! files in a temporary directory, or fresh databases on the real PostgreSQL server.

mod helpers;

mod agents;
mod bad_input;
mod chat;
mod cli;
mod cluster;
mod dashboard;
mod frames;
mod health;
mod isolation;
mod limits;
mod loadtest_smoke;
mod longpoll;
mod metrics;
mod onboarding;
mod otlp;
mod queue;
mod resilience;
mod restart;
mod ws;
