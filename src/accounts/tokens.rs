//! Signed agent tokens (HS256 JWT). A token names its tenant, so one issued on tenant A's
//! domain is refused on tenant B's even though both are signed with the same secret.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::Role;

/// What a token says about its bearer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentClaims {
    /// Agent id, as a string per the JWT convention.
    pub sub: String,
    /// Tenant id the token was issued for.
    pub tid: i64,
    /// Role at issue time; the server re-reads the role from storage on every request.
    pub role: Role,
    pub iat: u64,
    pub exp: u64,
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
        let now = now_secs();
        let claims = AgentClaims {
            sub: agent_id.to_string(),
            tid: tenant_id,
            role,
            iat: now,
            exp: now + self.ttl_secs,
        };
        // Serialising a struct of strings and integers with an HMAC key cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding of plain claims")
    }

    /// Checks signature and expiry; the caller checks the tenant.
    pub fn verify(&self, token: &str) -> Option<AgentClaims> {
        jsonwebtoken::decode::<AgentClaims>(token, &self.decoding, &self.validation)
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
        assert_eq!((c.tid, c.sub.as_str(), c.role), (7, "42", Role::Admin));
        let other = TokenKeys::new("another-secret-entirely", 3600);
        assert!(other.verify(&t).is_none());
        assert!(keys.verify("not.a.token").is_none());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let keys = TokenKeys::new("0123456789abcdef0123", 3600);
        let claims = AgentClaims {
            sub: "1".into(),
            tid: 1,
            role: Role::Agent,
            iat: 0,
            exp: 1,
        };
        let t =
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &keys.encoding).unwrap();
        assert!(keys.verify(&t).is_none());
    }
}
