//! The live dashboards: who may watch, the numbers pushed as server-sent events and seen to
//! change, and the supervisor page driven in headless Chromium with a screenshot kept.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::{Method, Response, StatusCode};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use crate::helpers::{Api, Backend, TestApp, assert_error, spawn_app, spawn_app_with};
use crate::on_both;
use crate::ws::{new_visitor, open_conversation};

/// Reads server-sent events off a streaming response.
struct Events {
    res: Response,
    buffer: String,
}

impl Events {
    fn new(res: Response) -> Self {
        Self {
            res,
            buffer: String::new(),
        }
    }

    async fn next(&mut self) -> Value {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                let data = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data: "))
                    .collect::<String>();
                return serde_json::from_str(&data).unwrap();
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.res.chunk())
                .await
                .expect("an event within 10 s")
                .unwrap()
                .expect("the stream stays open");
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// Skips events until one matches (within 15 s).
    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                let e = self.next().await;
                if pred(&e) {
                    return e;
                }
            }
        })
        .await
        .expect("a matching event")
    }
}

#[actix_web::test]
async fn pages_are_served_from_the_binary() {
    let app = spawn_app(Backend::Sqlite).await;
    for path in ["/dashboard", "/platform/dashboard"] {
        let res = app.call(Method::GET, None, path, None, None).await;
        assert_eq!(res.status(), StatusCode::OK);
        assert!(
            res.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/html")
        );
        let page = res.text().await.unwrap();
        // Nothing is fetched from elsewhere at run time.
        assert!(
            !page.contains("http://") && !page.contains("https://"),
            "{path}"
        );
    }
}

on_both!(supervisors_see_their_numbers_change);
async fn supervisors_see_their_numbers_change(backend: Backend) {
    let app = spawn_app_with(backend, |s| s.dashboard.push_secs = 1).await;
    let t = app.create_tenant("dash").await;
    let other = app.create_tenant("dash-other").await;
    let (_, agent_token) = app.create_agent(&t, "li@dash.test", "agent").await;
    let (_, supervisor_token) = app.create_agent(&t, "wang@dash.test", "supervisor").await;

    let stream = |token: String| {
        let app = &app;
        let domain = t.domain.clone();
        async move {
            app.call(
                Method::GET,
                Some(&domain),
                "/dashboard/stream",
                Some(&token),
                None,
            )
            .await
        }
    };
    assert_error(
        stream(agent_token).await,
        StatusCode::FORBIDDEN,
        "forbidden",
    )
    .await;
    // Another tenant's admin token is not valid here.
    assert_error(
        stream(other.admin_token.clone()).await,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;

    let res = stream(supervisor_token.clone()).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = Events::new(res);
    let first = events.next().await;
    assert!(
        first["history"].is_array(),
        "the first event carries the history"
    );
    assert_eq!(first["tenant"], t.slug.as_str());
    assert_eq!(first["totals"]["queued"], 0);
    assert_eq!(first["live"], true);
    let names: Vec<&str> = first["agents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{first}");
    assert!(
        first["agents"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["status"] == "offline")
    );
    assert_eq!(first["teams"][0]["slug"], "general");

    let v = new_visitor(&app, &t).await;
    open_conversation(&app, &t, &v, None).await;
    let changed = events.until(|e| e["totals"]["queued"] == 1).await;
    assert_eq!(changed["teams"][0]["queued"], 1);
    assert!(
        changed.get("history").is_none(),
        "only the first event has it"
    );

    // A page opened later starts with the last minutes: the queued visitor is in them (the
    // sampler takes a point every 5 s).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let res = stream(supervisor_token.clone()).await;
        let first = Events::new(res).next().await;
        let points = first["history"].as_array().unwrap().clone();
        if points.iter().any(|p| p["queued"] == 1) {
            assert!(
                points
                    .iter()
                    .all(|p| p["at"].is_string() && p["online"].is_number())
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no history point: {first}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The operator's view: every tenant in one table.
    let res = app
        .platform(Method::GET, "/platform/v1/dashboard/stream", None)
        .await;
    assert_eq!(res.status(), StatusCode::OK);
    let all = Events::new(res).next().await;
    let tenants = all["tenants"].as_array().unwrap();
    let mine = tenants
        .iter()
        .find(|x| x["tenant"] == t.slug.as_str())
        .unwrap();
    assert_eq!(mine["totals"]["queued"], 1);
    assert!(tenants.iter().any(|x| x["tenant"] == other.slug.as_str()));
    let res = app
        .call(
            Method::GET,
            None,
            "/platform/v1/dashboard/stream",
            Some("wrong"),
            None,
        )
        .await;
    assert_error(res, StatusCode::UNAUTHORIZED, "invalid_platform_key").await;
}

/// Where test artifacts are kept: `<target>/test-artifacts`.
fn artifacts() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[actix_web::test]
async fn dashboard_in_headless_chromium() {
    let browser_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    if std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED dashboard_in_headless_chromium: node is not installed");
        return;
    }
    assert!(
        browser_dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run scripts/test (or `npm install` in tests/browser)"
    );
    assert!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "/usr/bin/chromium is missing: run scripts/test (or apt-get install chromium)"
    );

    let app: TestApp = spawn_app_with(Backend::Sqlite, |s| s.dashboard.push_secs = 1).await;
    let t = app.create_tenant("browser").await;
    let (_, _) = app.create_agent(&t, "zhao@browser.test", "agent").await;
    let shot = artifacts().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let mut child = tokio::process::Command::new("node")
        .arg(browser_dir.join("dashboard.mjs"))
        .current_dir(&browser_dir)
        .env("KEFU_URL", format!("http://{}:{}", t.domain, app.port))
        .env("KEFU_EMAIL", &t.admin_email)
        .env("KEFU_PASSWORD", &t.admin_password)
        .env("KEFU_SCREENSHOT", &shot)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut expect = async |word: &str| {
        let line = tokio::time::timeout(Duration::from_secs(90), lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("the browser script did not say {word} in time"))
            .unwrap();
        assert_eq!(
            line.as_deref(),
            Some(word),
            "the browser script failed (see stderr)"
        );
    };
    expect("READY").await;
    // A visitor arrives: the page must show it queued without being reloaded.
    let v = new_visitor(&app, &t).await;
    open_conversation(&app, &t, &v, None).await;
    expect("CHANGED").await;
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the browser closes")
        .unwrap();
    assert!(status.success());
    let size = std::fs::metadata(&shot).expect("a screenshot").len();
    assert!(size > 10_000, "the screenshot is {size} bytes");
    eprintln!("dashboard screenshot: {}", shot.display());
}
