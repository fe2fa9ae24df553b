pub mod platform_secret;
pub mod tenant;
pub mod tenant_domain;
