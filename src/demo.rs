//! `kefu serve --demo`: a tenant to try things on, provisioned idempotently.

use crate::startup::AppState;
use crate::tenancy::{DomainName, NewAdmin, NewTenant, TenancyError, TenantSlug};

pub const DEMO_SLUG: &str = "demo";
pub const DEMO_DOMAIN: &str = "demo.localhost";
pub const DEMO_ADMIN_EMAIL: &str = "admin@demo.localhost";
/// A fixed, printed password: the demo tenant is for trying Kefu on a laptop, not for
/// production, and a fixed password lets the README show working commands.
pub const DEMO_ADMIN_PASSWORD: &str = "kefu-demo-admin";

/// Creates the demo tenant unless it exists, then prints how to use it.
pub async fn provision(state: &AppState, port: u16) -> anyhow::Result<()> {
    let new = NewTenant {
        slug: TenantSlug::parse(DEMO_SLUG).map_err(anyhow::Error::msg)?,
        name: "Demo".into(),
        domains: vec![DomainName::parse(DEMO_DOMAIN).map_err(anyhow::Error::msg)?],
        admin: NewAdmin {
            email: DEMO_ADMIN_EMAIL.into(),
            password: DEMO_ADMIN_PASSWORD.into(),
            name: "Demo Admin".into(),
        },
    };
    match state.tenants.create(new).await {
        Ok(_) => tracing::info!("demo tenant provisioned"),
        Err(TenancyError::SlugTaken(_)) => tracing::info!("demo tenant already exists"),
        Err(e) => return Err(e.into()),
    }
    let base = format!("http://{DEMO_DOMAIN}:{port}");
    println!(
        "\nKefu demo is ready.\n\
         \x20 tenant:  {DEMO_SLUG} at {base}\n\
         \x20 click:   {base}/demo  (a visitor and an agent side by side)\n\
         \x20 watch:   {base}/dashboard  (the live numbers; log in as the admin)\n\
         \x20 admin:   {DEMO_ADMIN_EMAIL} / {DEMO_ADMIN_PASSWORD}\n\
         \x20 log in:  curl -s {base}/api/v1/auth/login -H 'content-type: application/json' \\\n\
         \x20            -d '{{\"email\":\"{DEMO_ADMIN_EMAIL}\",\"password\":\"{DEMO_ADMIN_PASSWORD}\"}}'\n\
         \x20 health:  http://127.0.0.1:{port}/healthz\n"
    );
    Ok(())
}
