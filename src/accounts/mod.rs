//! Accounts of a tenant: agents (坐席) with roles and capacity, teams (skill groups),
//! password hashing and signed agent tokens. Everything here works on one tenant's database
//! handle; which tenant it is was decided before (see [`crate::tenancy`]).

pub mod agents;
pub mod password;
pub mod teams;
pub mod tokens;

use std::fmt;

pub use agents::{AgentPatch, AgentView, NewAgent};
pub use teams::TeamView;
pub use tokens::{Claims, TokenKeys, TokenKind};

/// Slug of the team every tenant has and every new agent joins unless told otherwise.
pub const GENERAL_TEAM: &str = "general";

/// What a signed-in agent may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Manages agents and teams, sees everything.
    Admin,
    /// Sees every conversation and the live numbers; manages nothing.
    Supervisor,
    /// Answers conversations assigned to them.
    Agent,
}

impl Role {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Self::Admin),
            "supervisor" => Ok(Self::Supervisor),
            "agent" => Ok(Self::Agent),
            _ => Err("must be one of admin, supervisor, agent".into()),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Supervisor => "supervisor",
            Self::Agent => "agent",
        }
    }

    /// Supervisors and admins see all of a tenant's conversations and numbers.
    pub fn oversees(self) -> bool {
        matches!(self, Self::Admin | Self::Supervisor)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Errors of the accounts boundary; [`crate::http::ApiError`] maps them to statuses.
#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("{field} {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("an agent with this email already exists")]
    EmailTaken,
    #[error("a team with this slug already exists")]
    TeamTaken,
    #[error("no such team: {0}")]
    UnknownTeam(String),
    #[error("no such agent")]
    AgentNotFound,
    #[error("the tenant must keep at least one admin")]
    LastAdmin,
    #[error("database error: {0}")]
    Db(#[from] sea_orm::DbErr),
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// Largest display name, in characters.
pub const MAX_NAME_CHARS: usize = 100;
/// Password length bounds, in characters: long enough to mean something, short enough that
/// hashing a hostile input costs nothing unusual.
pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_PASSWORD_CHARS: usize = 128;
/// Upper bound for `max_concurrent`: a sanity limit, not a policy.
pub const MAX_CONCURRENT_LIMIT: i32 = 1000;

/// Validates and normalises an email address (trimmed, lower-cased).
pub fn parse_email(field: &'static str, s: &str) -> Result<String, AccountsError> {
    let s = s.trim().to_lowercase();
    let valid = s.len() <= 254
        && s.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && local.len() <= 64
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && domain.contains('.')
                && !domain.contains('@')
                && !s.chars().any(char::is_whitespace)
        });
    if valid {
        Ok(s)
    } else {
        Err(AccountsError::Invalid {
            field,
            reason: "is not a valid email address".into(),
        })
    }
}

/// Validates a display name: 1 to 100 characters after trimming.
pub fn parse_name(field: &'static str, s: &str) -> Result<String, AccountsError> {
    let s = s.trim();
    let n = s.chars().count();
    if n == 0 || n > MAX_NAME_CHARS {
        return Err(AccountsError::Invalid {
            field,
            reason: format!("must be 1 to {MAX_NAME_CHARS} characters"),
        });
    }
    Ok(s.to_owned())
}

pub fn check_password(field: &'static str, s: &str) -> Result<(), AccountsError> {
    let n = s.chars().count();
    if !(MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&n) {
        return Err(AccountsError::Invalid {
            field,
            reason: format!("must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"),
        });
    }
    Ok(())
}

pub fn check_max_concurrent(v: i32) -> Result<i32, AccountsError> {
    if (0..=MAX_CONCURRENT_LIMIT).contains(&v) {
        Ok(v)
    } else {
        Err(AccountsError::Invalid {
            field: "max_concurrent",
            reason: format!("must be between 0 and {MAX_CONCURRENT_LIMIT}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails() {
        assert_eq!(
            parse_email("email", " Ann@Example.COM ").unwrap(),
            "ann@example.com"
        );
        for bad in [
            "",
            "ann",
            "@example.com",
            "ann@",
            "ann@example",
            "a b@example.com",
            "ann@@example.com",
        ] {
            assert!(parse_email("email", bad).is_err(), "{bad}");
        }
    }
}
