//! The memory floor of Kefu's WebSocket stack, measured apart from Kefu (docs/benchmarks.md,
//! "Idle connections").
//!
//! `serve` is the least a server on actix-web and actix-ws can do per connection: accept the
//! upgrade, send one frame, then hold the socket with the same loop shape as Kefu's connection
//! (socket, an outbound queue, a heartbeat) or, with `--bare`, with nothing but the read loop.
//! It runs on the allocator and huge-page setting of `kefu serve`, so the difference between
//! the two servers' memory per connection is what Kefu's own state costs. `open` connects `N`
//! idle WebSockets to it over several 127.0.0.x source addresses, waits for each first frame
//! and prints the server's resident memory per connection, read from /proc.
//!
//! ```sh
//! cargo run --release -p kefu-loadtest --example actix_floor -- serve 9900 &
//! cargo run --release -p kefu-loadtest --example actix_floor -- open 9900 19000 $!
//! ```

use std::time::Duration;

use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use anyhow::{Context, Result, bail};
use futures_util::{StreamExt, stream};
use kefu_loadtest::client::Target;
use kefu_loadtest::scenarios::connections::{loopback_sources, rss_kib};

/// As `kefu serve`: the allocator is part of what is measured.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How many connections are being opened at once, as `kefu-loadtest connections` does.
const CONNECT_CONCURRENCY: usize = 64;

/// Source addresses to spread the connections over: one address has about 28,000 ports.
const SOURCES: usize = 4;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["serve", port, rest @ ..] => serve(port.parse()?, rest.contains(&"--bare")),
        ["open", port, n, pid] => open(port.parse()?, n.parse()?, pid.parse()?),
        _ => bail!("usage: actix_floor serve PORT [--bare] | actix_floor open PORT N SERVER_PID"),
    }
}

fn serve(port: u16, bare: bool) -> Result<()> {
    // As `kefu serve` (src/main.rs).
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_thp_disable(true)?;
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            App::new().route(
                "/ws",
                web::get().to(move |req: HttpRequest, body: web::Payload| hold(req, body, bare)),
            )
        })
        .workers(2)
        .backlog(4096)
        .max_connections(100_000)
        .bind(("127.0.0.1", port))?
        .run()
        .await
    })?;
    Ok(())
}

async fn hold(req: HttpRequest, body: web::Payload, bare: bool) -> actix_web::Result<HttpResponse> {
    let (response, mut session, stream) = actix_ws::handle(&req, body)?;
    actix_web::rt::spawn(async move {
        let mut stream = stream.max_frame_size(64 * 1024).aggregate_continuations();
        if session.text(r#"{"type":"hello"}"#).await.is_err() {
            return;
        }
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

fn open(port: u16, n: usize, pid: u32) -> Result<()> {
    tokio::runtime::Runtime::new()?.block_on(async move {
        // The harness's own connect; the floor server ignores the host and the empty token.
        let target = Target::new(&format!("http://127.0.0.1:{port}")).await?;
        let sources = loopback_sources(SOURCES);
        let before = rss_kib(pid).context("server RSS")?;
        let started = std::time::Instant::now();
        let held: Vec<_> = stream::iter(0..n)
            .map(|i| {
                let target = &target;
                let source = sources[i % SOURCES];
                async move {
                    let mut ws = target.ws_connect("floor", "/ws", "", Some(source)).await?;
                    ws.next().await.context("closed before its first frame")??;
                    anyhow::Ok(ws)
                }
            })
            .buffer_unordered(CONNECT_CONCURRENCY)
            .collect()
            .await;
        let opened = held.iter().filter(|c| c.is_ok()).count();
        let took = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let after = rss_kib(pid).context("server RSS")?;
        println!(
            "opened {opened} of {n} in {:.2} s; server RSS {before} -> {after} KiB: {:.0} bytes per connection",
            took.as_secs_f64(),
            after.saturating_sub(before) as f64 * 1024.0 / opened.max(1) as f64
        );
        Ok(())
    })
}
