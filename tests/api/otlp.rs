//! Span export over OTLP/HTTP (cargo feature `otlp`, off by default).
//!
//! With the feature: `cargo test -p kefu --features otlp --test api otlp` runs the `kefu` binary
//! against a small OTLP/HTTP receiver of the test's own. Without it, the same filter checks that
//! a configured endpoint is only warned about.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `kefu` binary on fresh data, logging JSON lines to stdout at `info`.
fn kefu(data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kefu"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEFU_DATA_DIR", data_dir)
        .env("KEFU_LISTEN", "127.0.0.1:0")
        .env("KEFU_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd
}

/// Every log line of `child`, parsed, as it is written; read on a thread so the pipe never fills.
fn log_lines(child: &mut Child) -> mpsc::Receiver<Value> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                break;
            }
        }
    });
    rx
}

/// Waits for the first log line whose message is `message`.
fn wait_for_line(lines: &mpsc::Receiver<Value>, message: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no log line {message:?}"));
        if line["fields"]["message"] == message {
            return line;
        }
    }
}

fn listening_port(lines: &mpsc::Receiver<Value>) -> u16 {
    let line = wait_for_line(lines, "kefu listening");
    line["fields"]["port"]
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .expect("the listening line names the port")
}

/// SIGTERM, then the exit status (the server stops gracefully).
async fn terminate(mut child: Child) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "kefu did not stop after SIGTERM");
        actix_web::rt::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A tenant request's span leaves for the collector with its request id, the caller's trace id,
/// the tenant and the configured service name. The batch delay (5 s) is longer than this test
/// waits before SIGTERM, so what sends the spans is the flush at shutdown.
#[cfg(feature = "otlp")]
#[actix_web::test]
async fn spans_reach_an_otlp_receiver_by_shutdown() {
    use std::sync::{Arc, Mutex};

    use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};

    /// What the receiver got: (path, content type, body) of each request.
    type Received = Arc<Mutex<Vec<(String, String, Vec<u8>)>>>;

    async fn receive(
        req: HttpRequest,
        body: web::Bytes,
        received: web::Data<Received>,
    ) -> HttpResponse {
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        received
            .lock()
            .unwrap()
            .push((req.path().to_owned(), content_type, body.to_vec()));
        // An empty ExportTraceServiceResponse: everything accepted.
        HttpResponse::Ok()
            .content_type("application/x-protobuf")
            .finish()
    }

    let received: Received = Arc::default();
    let data = web::Data::new(received.clone());
    let receiver = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(16 * 1024 * 1024))
            .default_service(web::post().to(receive))
    })
    .workers(1)
    .disable_signals()
    .bind(("127.0.0.1", 0))
    .unwrap();
    let receiver_port = receiver.addrs()[0].port();
    let receiver = receiver.run();
    let receiver_handle = receiver.handle();
    actix_web::rt::spawn(receiver);

    let dir = tempfile::tempdir().unwrap();
    let platform_key = "otlp-test-platform-key";
    let mut child = kefu(dir.path())
        .env(
            "KEFU_OTLP__ENDPOINT",
            format!("http://127.0.0.1:{receiver_port}/"),
        )
        .env("KEFU_OTLP__SERVICE_NAME", "kefu-otlp-test")
        .env("KEFU_PLATFORM_KEY", platform_key)
        .args(["serve"])
        .spawn()
        .unwrap();
    let lines = log_lines(&mut child);
    let port = listening_port(&lines);
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let client = reqwest::Client::new();

    let slug = format!("otlp-{:08x}", rand::random::<u32>());
    let domain = format!("{slug}.test");
    let res = client
        .post(url("/platform/v1/tenants"))
        .bearer_auth(platform_key)
        .json(&serde_json::json!({
            "slug": slug, "name": "OTLP", "domains": [domain],
            "admin": {"email": format!("admin@{domain}"), "password": "correct-horse-battery", "name": "Admin"}
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    // A request of the tenant, from a caller that sends its own request id and trace.
    let request_id = format!("otlp-test-{:08x}", rand::random::<u32>());
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let res = client
        .post(url("/api/v1/auth/login"))
        .header("Host", &domain)
        .header("X-Request-Id", &request_id)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({"email": format!("admin@{domain}"), "password": "correct-horse-battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let status = terminate(child).await;
    assert!(
        status.success(),
        "SIGTERM ends with exit code 0: {status:?}"
    );

    // The flush happened before the process exited, so the receiver has it now.
    let got = received.lock().unwrap().clone();
    receiver_handle.stop(false).await;
    assert!(!got.is_empty(), "no OTLP request arrived");
    for (path, content_type, body) in &got {
        assert_eq!(path, "/v1/traces");
        assert_eq!(content_type, "application/x-protobuf");
        assert!(!body.is_empty(), "an empty export");
    }
    // The attributes are found in the protobuf bytes as encoded, without a decoder.
    let all: Vec<u8> = got.into_iter().flat_map(|(_, _, body)| body).collect();
    for (key, value) in [
        ("request_id", request_id.as_str()),
        ("trace_id", trace_id),
        ("tenant", slug.as_str()),
        ("service.name", "kefu-otlp-test"),
    ] {
        let encoded = string_attribute(key, value);
        assert!(
            all.windows(encoded.len()).any(|w| w == encoded),
            "no attribute {key}={value:?} in the export"
        );
    }
}

/// An OTLP `KeyValue { key, value: AnyValue { string_value } }` as protobuf puts it on the
/// wire (short strings only: every length fits in one byte).
#[cfg(feature = "otlp")]
fn string_attribute(key: &str, value: &str) -> Vec<u8> {
    let len = |n: usize| u8::try_from(n).ok().filter(|n| *n < 0x80).expect("short");
    let mut out = vec![0x0a, len(key.len())];
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&[0x12, len(value.len() + 2), 0x0a, len(value.len())]);
    out.extend_from_slice(value.as_bytes());
    out
}

/// A binary without the feature starts and serves with an endpoint configured, and says in its
/// log that nothing is exported.
#[cfg(not(feature = "otlp"))]
#[actix_web::test]
async fn an_endpoint_without_the_feature_is_only_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = kefu(dir.path())
        .env("KEFU_OTLP__ENDPOINT", "http://127.0.0.1:4318")
        .args(["serve"])
        .spawn()
        .unwrap();
    let lines = log_lines(&mut child);
    let warning = wait_for_line(
        &lines,
        "KEFU_OTLP__ENDPOINT is set but this binary was built without the `otlp` feature: \
         no spans are exported (build with `cargo build --release --features otlp`)",
    );
    assert_eq!(warning["level"], "WARN");
    let port = listening_port(&lines);
    let res = reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let status = terminate(child).await;
    assert!(status.success(), "{status:?}");
}
