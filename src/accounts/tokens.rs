//! Signed tokens (HS256 JWT) for agents and visitors. A token names its tenant, so one issued
//! on tenant A's domain is refused on tenant B's even though both are signed with the same
//! secret, and its kind, so a visitor token never passes for an agent's.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::Role;

/// How long a visitor keeps its identity: a returning visitor within this time is recognised
/// and finds its open conversation again.
pub const VISITOR_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;

/// Who a token was issued to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Agent,
    Visitor,
}

/// What a token says about its bearer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Agent or visitor id, as a string per the JWT convention.
    pub sub: String,
    /// Tenant id the token was issued for.
    pub tid: i64,
    pub kind: TokenKind,
    /// An agent's role at issue time; the server re-reads it from storage on every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    pub iat: u64,
    pub exp: u64,
}

impl Claims {
    /// The subject as an id, when the token is of `kind`.
    pub fn subject(&self, kind: TokenKind) -> Option<i64> {
        (self.kind == kind).then(|| self.sub.parse().ok()).flatten()
    }
}

/// Keys derived once from the JWT secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: u64,
}

impl TokenKeys {
    pub fn new(secret: &str, ttl_secs: u64) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret.as_bytes()),
            decoding: DecodingKey::from_secret(secret.as_bytes()),
            validation,
            ttl_secs,
        }
    }

    pub fn issue(&self, tenant_id: i64, agent_id: i64, role: Role) -> String {
        self.sign(
            tenant_id,
            agent_id,
            TokenKind::Agent,
            Some(role),
            self.ttl_secs,
        )
    }

    pub fn issue_visitor(&self, tenant_id: i64, visitor_id: i64) -> String {
        self.sign(
            tenant_id,
            visitor_id,
            TokenKind::Visitor,
            None,
            VISITOR_TOKEN_TTL_SECS,
        )
    }

    fn sign(
        &self,
        tenant_id: i64,
        id: i64,
        kind: TokenKind,
        role: Option<Role>,
        ttl: u64,
    ) -> String {
        let now = now_secs();
        let claims = Claims {
            sub: id.to_string(),
            tid: tenant_id,
            kind,
            role,
            iat: now,
            exp: now + ttl,
        };
        // Serialising a struct of strings and integers with an HMAC key cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding of plain claims")
    }

    /// Checks signature and expiry; the caller checks the tenant.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .ok()
            .map(|data| data.claims)
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_verify_and_forged_ones_do_not() {
        let keys = TokenKeys::new("0123456789abcdef0123", 3600);
        let t = keys.issue(7, 42, Role::Admin);
        let c = keys.verify(&t).unwrap();
        assert_eq!(
            (c.tid, c.subject(TokenKind::Agent), c.role),
            (7, Some(42), Some(Role::Admin))
        );
        assert_eq!(c.subject(TokenKind::Visitor), None);
        let v = keys.verify(&keys.issue_visitor(7, 9)).unwrap();
        assert_eq!(
            (v.subject(TokenKind::Visitor), v.subject(TokenKind::Agent)),
            (Some(9), None)
        );
        let other = TokenKeys::new("another-secret-entirely", 3600);
        assert!(other.verify(&t).is_none());
        assert!(keys.verify("not.a.token").is_none());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let keys = TokenKeys::new("0123456789abcdef0123", 3600);
        let claims = Claims {
            sub: "1".into(),
            tid: 1,
            kind: TokenKind::Agent,
            role: Some(Role::Agent),
            iat: 0,
            exp: 1,
        };
        let t =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding).unwrap();
        assert!(keys.verify(&t).is_none());
    }
}
