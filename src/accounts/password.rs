//! Argon2id password hashes. Hashing is deliberately slow, so it runs on the blocking pool and
//! never on an async worker.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use rand::rngs::OsRng;

use super::AccountsError;

/// A valid hash of a random password, verified against when the email is unknown so that a
/// login for a missing account takes as long as one for a real account.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$2g8bPl5hGZ5sY7Qo5m8Pj1e8pSv0p6H2tU8lYw0e3XQ";

pub async fn hash(password: String) -> Result<String, AccountsError> {
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| AccountsError::Hash(e.to_string()))
    })
    .await
    .map_err(|e| AccountsError::Hash(e.to_string()))?
}

/// Checks `password` against `stored` (or against a dummy when there is no account).
pub async fn verify(password: String, stored: Option<String>) -> bool {
    let known = stored.is_some();
    let stored = stored.unwrap_or_else(|| DUMMY_HASH.to_owned());
    let ok = tokio::task::spawn_blocking(move || {
        PasswordHash::new(&stored)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false)
    })
    .await
    .unwrap_or(false);
    known && ok
}

#[cfg(test)]
mod tests {
    #[test]
    fn dummy_hash_parses_so_unknown_emails_cost_a_real_verification() {
        assert!(argon2::password_hash::PasswordHash::new(super::DUMMY_HASH).is_ok());
    }

    #[tokio::test]
    async fn round_trip() {
        let h = super::hash("correct horse".into()).await.unwrap();
        assert!(super::verify("correct horse".into(), Some(h.clone())).await);
        assert!(!super::verify("wrong horse".into(), Some(h)).await);
        assert!(!super::verify("anything".into(), None).await);
    }
}
