//! Names that parse: a value of these types is valid by construction, so code further in never
//! re-checks a slug or a domain.

use std::fmt;

/// Longest slug. PostgreSQL tenant databases are named `<platform>_<slug>` within 63 bytes.
pub const MAX_SLUG_LEN: usize = 32;

/// DNS limits a name to 253 characters and a label to 63.
const MAX_DOMAIN_LEN: usize = 253;
const MAX_LABEL_LEN: usize = 63;

/// A tenant's short name: 2 to 32 of `a-z`, `0-9` and `-`, starting and ending with a letter
/// or digit. Also used as a file and database name, hence the strict alphabet.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TenantSlug(String);

impl TenantSlug {
    pub fn parse(s: &str) -> Result<Self, String> {
        parse_slug(s, 2).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantSlug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The slug rules shared by tenants and teams.
pub fn parse_slug(s: &str, min_len: usize) -> Result<String, String> {
    let ok_len = (min_len..=MAX_SLUG_LEN).contains(&s.len());
    let ok_chars = s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    let ok_ends = !s.starts_with('-') && !s.ends_with('-');
    if ok_len && ok_chars && ok_ends {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "must be {min_len} to {MAX_SLUG_LEN} characters of a-z, 0-9 and '-', \
             not starting or ending with '-'"
        ))
    }
}

/// A host name bound to a tenant, lower-cased, without port or trailing dot.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainName(String);

impl DomainName {
    pub fn parse(s: &str) -> Result<Self, String> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let err = || {
            Err(format!(
                "{s:?} is not a valid domain name (labels of a-z, 0-9 and '-', separated by dots)"
            ))
        };
        if lower.is_empty() || lower.len() > MAX_DOMAIN_LEN {
            return err();
        }
        if lower.parse::<std::net::IpAddr>().is_ok() {
            return Err(format!(
                "{s:?} is an IP address; bind a domain name instead"
            ));
        }
        let labels_ok = lower.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= MAX_LABEL_LEN
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        });
        if !labels_ok {
            return err();
        }
        Ok(Self(lower))
    }

    /// Normalises a `Host` header value (`Acme.Example.com:8080`) to the stored form.
    pub fn from_host_header(host: &str) -> Option<Self> {
        let host = host.trim();
        // A bracketed IPv6 literal never names a tenant.
        if host.starts_with('[') {
            return None;
        }
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            Some(_) => return None,
            None => host,
        };
        Self::parse(name).ok()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DomainName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs() {
        for good in ["acme", "a1", "acme-insurance", "0x"] {
            assert!(TenantSlug::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "a",
            "-acme",
            "acme-",
            "Acme",
            "ac_me",
            "ac me",
            "a.b",
            "é",
            &"a".repeat(33),
        ] {
            assert!(TenantSlug::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn domains() {
        assert_eq!(
            DomainName::parse("Acme.Example.COM.").unwrap().as_str(),
            "acme.example.com"
        );
        for bad in [
            "",
            "a..b",
            "-a.com",
            "a-.com",
            "a_b.com",
            "a b.com",
            "127.0.0.1",
            "::1",
        ] {
            assert!(DomainName::parse(bad).is_err(), "{bad}");
        }
        assert!(DomainName::parse(&format!("{}.com", "a".repeat(64))).is_err());
    }

    #[test]
    fn host_headers() {
        let h = |s| DomainName::from_host_header(s).map(|d| d.0);
        assert_eq!(h("Demo.Localhost:8080").as_deref(), Some("demo.localhost"));
        assert_eq!(h("demo.localhost").as_deref(), Some("demo.localhost"));
        assert_eq!(h("[::1]:8080"), None);
        assert_eq!(h("demo.localhost:x"), None);
        assert_eq!(h("127.0.0.1:8080"), None);
    }
}
