//! The HTTP surface: routes, extractors and the error shape.

mod agents;
pub mod auth;
mod conversations;
mod dashboard;
mod error;
mod health;
mod json;
mod metrics;
pub mod middleware;
mod platform;
mod visitor;
pub mod ws;

use actix_web::{HttpRequest, web};

pub use error::ApiError;
pub use json::{BodyLimit, JsonBody, Query};
pub use platform::CreateTenantBody;

/// Registers every route. The tenant of `/api/*` routes comes from the `Host` header through
/// the [`crate::tenancy::Tenant`] extractor; `/platform/*` and health routes answer on any host.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/healthz", web::get().to(health::healthz))
        .route("/readyz", web::get().to(health::readyz))
        .route("/demo", web::get().to(health::demo_page))
        .route("/metrics", web::get().to(metrics::metrics))
        .route("/dashboard", web::get().to(dashboard::tenant_page))
        .route("/dashboard/stream", web::get().to(dashboard::tenant_stream))
        .route(
            "/platform/dashboard",
            web::get().to(dashboard::platform_page),
        )
        .service(
            web::scope("/platform/v1")
                .service(
                    web::resource("/tenants")
                        .get(platform::list_tenants)
                        .post(platform::create_tenant),
                )
                .route("/tenants/{slug}", web::get().to(platform::get_tenant))
                .route(
                    "/dashboard/stream",
                    web::get().to(dashboard::platform_stream),
                )
                .route(
                    "/tenants/{slug}/suspend",
                    web::post().to(platform::suspend_tenant),
                )
                .route(
                    "/tenants/{slug}/resume",
                    web::post().to(platform::resume_tenant),
                )
                .route(
                    "/tenants/{slug}/domains",
                    web::post().to(platform::add_domain),
                )
                .route(
                    "/tenants/{slug}/domains/{domain}",
                    web::delete().to(platform::remove_domain),
                ),
        )
        .service(
            web::scope("/api/v1")
                .route("/auth/login", web::post().to(auth::login))
                .route("/me", web::get().to(auth::me))
                .service(
                    web::resource("/agents")
                        .get(agents::list)
                        .post(agents::create),
                )
                .service(
                    web::resource("/agents/{id}")
                        .get(agents::get)
                        .patch(agents::update)
                        .delete(agents::delete),
                )
                .service(
                    web::resource("/teams")
                        .get(agents::list_teams)
                        .post(agents::create_team),
                )
                .route("/conversations", web::get().to(conversations::list))
                .route("/conversations/{id}", web::get().to(conversations::get))
                .route(
                    "/conversations/{id}/messages",
                    web::get().to(conversations::messages),
                )
                .route("/visitor/sessions", web::post().to(visitor::create_session))
                .route(
                    "/visitor/conversations",
                    web::post().to(visitor::open_conversation),
                )
                .route(
                    "/visitor/conversations/{id}/messages",
                    web::post().to(visitor::send_message),
                )
                .route(
                    "/visitor/conversations/{id}/events",
                    web::get().to(visitor::events),
                )
                .route(
                    "/visitor/conversations/{id}/close",
                    web::post().to(visitor::close),
                ),
        )
        .route("/ws/agent", web::get().to(ws::agent_ws))
        .route("/ws/visitor", web::get().to(ws::visitor_ws));
}

/// Path parameters that do not parse (`/agents/abc`) name nothing: 404.
pub fn path_error(err: actix_web::error::PathError, _: &HttpRequest) -> actix_web::Error {
    ApiError::NotFound(format!("no such resource ({err})")).into()
}

/// Any route that does not exist.
pub async fn not_found() -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}
