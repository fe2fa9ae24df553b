//! The bare relay served on Kefu's WebSocket stack (docs/benchmarks.md, "The relay on Kefu's
//! stack"): the relay's own work per frame ([`kefu_loadtest::relay::Core`]: fake tokens, a
//! queue, seqs in memory, acks, forwarding, nothing stored), but accepted, framed and written
//! by actix-web and actix-ws on two workers with Kefu's allocator and connection loop, instead
//! of hyper and tungstenite on a tokio runtime. The difference between the two relays is what
//! the stack costs; the difference between this one and Kefu is what Kefu's own work costs.
//!
//! It serves what `chat` and `ramp` use (provisioning, both sockets, the history read of the
//! stored-count check), not long-poll:
//!
//! ```sh
//! cargo build --release -p kefu-loadtest --example actix_relay
//! target/release/examples/actix_relay 9972 &
//! target/release/kefu-loadtest ramp -n 1000 --start-rate 1000 --step-rate 1000 \
//!     --max-rate 100000 --step-duration 5s --platform-key x --url http://127.0.0.1:9972
//! ```

use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, web};
use anyhow::{Result, bail};
use kefu_loadtest::protocol::Side;
use kefu_loadtest::relay::Core;

mod common;

/// As `kefu serve`: the allocator is part of what is measured.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// As Kefu's heartbeat: the connection loop wakes for it as Kefu's does.
const HEARTBEAT: Duration = Duration::from_secs(30);

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [port] = args.as_slice() else {
        bail!("usage: actix_relay PORT");
    };
    serve(port.parse()?)
}

fn serve(port: u16) -> Result<()> {
    let core = Core::default();
    common::serve_like_kefu!(port, move || {
        App::new()
            .app_data(web::Data::new(core.clone()))
            .route(
                "/ws/visitor",
                web::get().to(|req, body, core| socket(req, body, core, Side::Visitor)),
            )
            .route(
                "/ws/agent",
                web::get().to(|req, body, core| socket(req, body, core, Side::Agent)),
            )
            .default_service(web::to(call))
    })
}

/// Every HTTP call: the relay answers it.
async fn call(req: HttpRequest, body: web::Bytes, core: web::Data<Core>) -> HttpResponse {
    let method =
        hyper::Method::from_bytes(req.method().as_str().as_bytes()).unwrap_or(hyper::Method::GET);
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let (status, body) = core.answer(&method, req.path(), Some(req.query_string()), bearer, &body);
    HttpResponse::build(
        actix_web::http::StatusCode::from_u16(status.as_u16())
            .unwrap_or(actix_web::http::StatusCode::INTERNAL_SERVER_ERROR),
    )
    .content_type("application/json")
    .body(body)
}

async fn socket(
    req: HttpRequest,
    body: web::Payload,
    core: web::Data<Core>,
    side: Side,
) -> actix_web::Result<HttpResponse> {
    let token =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("token").cloned())
            .unwrap_or_default();
    let Some((conn, mut out, hello)) = core.connect(side, &token) else {
        return Ok(HttpResponse::Unauthorized().finish());
    };
    let (response, mut session, stream) = actix_ws::handle(&req, body)?;
    // Queued before the 101 is returned, as Kefu does, so both leave in one write.
    if session.text(hello).await.is_err() {
        return Ok(response);
    }
    actix_web::rt::spawn(async move {
        let mut stream = stream.max_frame_size(64 * 1024).aggregate_continuations();
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        loop {
            tokio::select! {
                frame = out.recv() => {
                    let Some(frame) = frame else { break };
                    // SAFETY: a `Utf8Bytes` is valid UTF-8 by construction. Handed over as
                    // it is, as Kefu hands its frames: a copy here would be work Kefu skips.
                    let frame = unsafe {
                        bytestring::ByteString::from_bytes_unchecked(bytes::Bytes::from(frame))
                    };
                    if session.text(frame).await.is_err() {
                        break;
                    }
                }
                msg = stream.recv() => match msg {
                    Some(Ok(actix_ws::AggregatedMessage::Text(text))) => conn.frame(&text),
                    Some(Ok(actix_ws::AggregatedMessage::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
                _ = ticker.tick() => if session.ping(b"").await.is_err() { break },
            }
        }
    });
    Ok(response)
}
