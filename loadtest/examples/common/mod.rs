//! What the examples share: a server set up as `kefu serve` sets up its own, so that what
//! differs between them and Kefu is only the work each does per connection and frame.

/// Runs `$app` (an `App` factory) on 127.0.0.1:`$port` until stopped, as `kefu serve` runs
/// its own: transparent huge pages off (src/main.rs), two workers on two cores and no Nagle
/// (src/startup.rs). A macro because `HttpServer::new`'s factory types do not name well.
macro_rules! serve_like_kefu {
    ($port:expr, $app:expr) => {{
        #[cfg(target_os = "linux")]
        nix::sys::prctl::set_thp_disable(true)?;
        actix_web::rt::System::new().block_on(async move {
            actix_web::HttpServer::new($app)
                .workers(2)
                .tcp_nodelay(true)
                .bind(("127.0.0.1", $port))?
                .run()
                .await
        })?;
        Ok(())
    }};
}
pub(crate) use serve_like_kefu;
