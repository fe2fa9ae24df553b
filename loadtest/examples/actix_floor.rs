//! The floor of Kefu's WebSocket stack, measured apart from Kefu (docs/benchmarks.md, "Idle
//! connections"): the memory an idle connection costs and the time it takes to open.
//!
//! It is the least a server on actix-web and actix-ws can do per connection: accept the
//! upgrade, send one frame, then hold the socket with the same loop shape as Kefu's connection
//! (socket, an outbound queue, a heartbeat) or, with `--bare`, with nothing but the read loop.
//! It runs on the allocator, huge-page setting and worker count of `kefu serve`, so the
//! difference between the two servers is what Kefu's own work and state cost.
//!
//! It answers the provisioning calls of `kefu-loadtest connections` with fake tokens, as the
//! relay does, so the harness measures it exactly as it measures Kefu, beside the relay in the
//! same run:
//!
//! ```sh
//! cargo build --release -p kefu-loadtest --example actix_floor
//! target/release/examples/actix_floor 9971 &          # add --bare for the read loop only
//! target/release/kefu-loadtest connections --url http://127.0.0.1:9971 --platform-key x \
//!     --visitors 19000 --sources 4 --procs 2 --hold 20s --server-pid $! --spawn-baseline
//! ```

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, web};
use anyhow::{Result, bail};

mod common;

/// As `kefu serve`: the allocator is part of what is measured.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [port, rest @ ..] => serve(port.parse()?, rest.contains(&"--bare")),
        _ => bail!("usage: actix_floor PORT [--bare]"),
    }
}

fn serve(port: u16, bare: bool) -> Result<()> {
    common::serve_like_kefu!(port, move || {
        let hold = move |req: HttpRequest, body: web::Payload| hold(req, body, bare);
        App::new()
            .route("/ws/visitor", web::get().to(hold))
            .route("/ws/agent", web::get().to(hold))
            .route("/platform/v1/tenants", web::post().to(tenant))
            .route("/api/v1/auth/login", web::post().to(login))
            .route("/api/v1/agents", web::post().to(agent))
            .route("/api/v1/visitor/sessions", web::post().to(visitor_session))
    })
}

async fn hold(req: HttpRequest, body: web::Payload, bare: bool) -> actix_web::Result<HttpResponse> {
    let (response, mut session, stream) = actix_ws::handle(&req, body)?;
    // Queued before the 101 is returned, as Kefu does, so both leave in one write.
    if session.text(r#"{"type":"hello"}"#).await.is_err() {
        return Ok(response);
    }
    actix_web::rt::spawn(async move {
        let mut stream = stream.max_frame_size(64 * 1024).aggregate_continuations();
        if bare {
            while let Some(Ok(_)) = stream.recv().await {}
            return;
        }
        let (_keep_open, mut out) = tokio::sync::mpsc::channel::<String>(256);
        let beat = Duration::from_secs(30);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
        loop {
            tokio::select! {
                frame = out.recv() => match frame {
                    Some(f) => if session.text(f).await.is_err() { break },
                    None => break,
                },
                msg = stream.recv() => if !matches!(msg, Some(Ok(_))) { break },
                _ = ticker.tick() => if session.ping(b"").await.is_err() { break },
            }
        }
    });
    Ok(response)
}

// The provisioning answers carry only the fields the harness reads; tokens are not checked.

async fn tenant() -> HttpResponse {
    HttpResponse::Created().json(serde_json::json!({"admin": {"id": 1}}))
}

async fn login() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"agent": {"id": 1}, "token": "floor"}))
}

async fn agent() -> HttpResponse {
    HttpResponse::Created().json(serde_json::json!({}))
}

async fn visitor_session() -> HttpResponse {
    static NEXT: AtomicI64 = AtomicI64::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    HttpResponse::Created().json(serde_json::json!({"visitor_id": id, "visitor_token": "floor"}))
}
