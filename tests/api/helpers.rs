use std::sync::Arc;

use kefu::settings::{LogFormat, Settings};
use kefu::startup::Application;
use reqwest::{Method, Response, StatusCode};
use serde_json::{Value, json};

/// Which storage the app under test uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Runs a test body once on SQLite and once on PostgreSQL:
/// `on_both!(name)` makes `name::sqlite` and `name::postgres` from `async fn name(Backend)`.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[actix_web::test]
            async fn sqlite() {
                super::$name($crate::helpers::Backend::Sqlite).await
            }
            #[actix_web::test]
            async fn postgres() {
                super::$name($crate::helpers::Backend::Postgres).await
            }
        }
    )*};
}

/// The PostgreSQL server tests use; `scripts/test` makes sure it runs.
pub fn postgres_server() -> String {
    std::env::var("KEFU_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

pub fn random_suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

pub struct TestApp {
    pub backend: Backend,
    pub port: u16,
    pub client: reqwest::Client,
    pub platform_key: String,
    pub settings: Settings,
    /// Kept alive for the whole test (and across restarts); deleted at drop.
    pub data_dir: Arc<tempfile::TempDir>,
    pub state: actix_web::web::Data<kefu::startup::AppState>,
    pub stopper: kefu::startup::Stopper,
}

/// A tenant made through the platform API, with its admin signed in.
pub struct TestTenant {
    pub id: i64,
    pub slug: String,
    pub domain: String,
    pub admin_id: i64,
    pub admin_email: String,
    pub admin_password: String,
    pub admin_token: String,
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Like [`spawn_app`], with settings changed first (short timeouts, small limits).
pub async fn spawn_app_with(backend: Backend, change: impl FnOnce(&mut Settings)) -> TestApp {
    let data_dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let mut settings = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.path().to_path_buf(),
        platform_key: Some(format!("test-platform-key-{}", random_suffix())),
        jwt_secret: Some(format!("test-jwt-secret-{}", random_suffix())),
        log_format: LogFormat::Pretty,
        workers: Some(2),
        ..Settings::default()
    };
    // Many apps share one PostgreSQL server (100 connections by default) during a test run.
    settings.tenant_pools.connections = 3;
    if backend == Backend::Postgres {
        settings.database_url = Some(format!("{}/kt_{}", postgres_server(), random_suffix()));
    }
    change(&mut settings);
    start(backend, settings, data_dir).await
}

async fn start(backend: Backend, settings: Settings, data_dir: Arc<tempfile::TempDir>) -> TestApp {
    if std::env::var_os("KEFU_TEST_LOG").is_some() {
        kefu::telemetry::init(LogFormat::Pretty);
    }
    let app = Application::build(settings.clone())
        .await
        .expect("the app builds");
    let port = app.port();
    let stopper = app.stopper();
    let state = app.state();
    actix_web::rt::spawn(app.run_until_stopped());
    TestApp {
        backend,
        port,
        client: reqwest::Client::new(),
        platform_key: settings.platform_key.clone().unwrap_or_default(),
        settings,
        data_dir,
        state,
        stopper,
    }
}

impl TestApp {
    /// Stops the server and starts a new one on the same data.
    pub async fn restart(self) -> TestApp {
        self.stopper.stop().await;
        let mut settings = self.settings.clone();
        settings.listen = "127.0.0.1:0".parse().unwrap();
        start(self.backend, settings, self.data_dir.clone()).await
    }
}

/// What tests do against a server, whether it runs in the test process ([`TestApp`]) or as
/// a child process (a cluster node).
#[allow(async_fn_in_trait)]
pub trait Api {
    fn port(&self) -> u16;
    fn client(&self) -> &reqwest::Client;
    fn platform_key(&self) -> &str;

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port(), path)
    }

    /// A request with an optional Host, bearer token and JSON body.
    async fn call(
        &self,
        method: Method,
        host: Option<&str>,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Response {
        let mut req = self.client().request(method, self.url(path));
        if let Some(h) = host {
            req = req.header("Host", h);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.expect("request sent")
    }

    async fn platform(&self, method: Method, path: &str, body: Option<Value>) -> Response {
        let key = self.platform_key().to_owned();
        self.call(method, None, path, Some(&key), body).await
    }

    /// Opens a tenant `<prefix>-<random>` on `<slug>.test` and logs its admin in.
    async fn create_tenant(&self, prefix: &str) -> TestTenant {
        self.create_tenant_with_slug(&format!("{prefix}-{}", random_suffix()))
            .await
    }

    /// Opens the tenant `slug` on `<slug>.test` and logs its admin in.
    async fn create_tenant_with_slug(&self, slug: &str) -> TestTenant {
        let slug = slug.to_owned();
        let domain = format!("{slug}.test");
        let password = "correct-horse-battery".to_owned();
        let email = format!("admin@{domain}");
        let res = self
            .platform(
                Method::POST,
                "/platform/v1/tenants",
                Some(json!({
                    "slug": slug, "name": format!("Tenant {slug}"), "domains": [domain],
                    "admin": {"email": email, "password": password, "name": "Admin"}
                })),
            )
            .await;
        assert_eq!(
            res.status(),
            StatusCode::CREATED,
            "{}",
            res.text().await.unwrap()
        );
        let body: Value = res.json().await.unwrap();
        let token = self.login(&domain, &email, &password).await;
        TestTenant {
            id: body["id"].as_i64().unwrap(),
            admin_id: body["admin"]["id"].as_i64().unwrap(),
            slug,
            domain,
            admin_email: email,
            admin_password: password,
            admin_token: token,
        }
    }

    async fn login(&self, domain: &str, email: &str, password: &str) -> String {
        let res = self
            .call(
                Method::POST,
                Some(domain),
                "/api/v1/auth/login",
                None,
                Some(json!({"email": email, "password": password})),
            )
            .await;
        assert_eq!(res.status(), StatusCode::OK, "login of {email}");
        let body: Value = res.json().await.unwrap();
        body["token"].as_str().unwrap().to_owned()
    }

    /// Creates an agent on a tenant and returns its id and token.
    async fn create_agent(&self, t: &TestTenant, email: &str, role: &str) -> (i64, String) {
        let res = self
            .call(
                Method::POST,
                Some(&t.domain),
                "/api/v1/agents",
                Some(&t.admin_token),
                Some(json!({"email": email, "name": email, "password": "agent-password-1", "role": role})),
            )
            .await;
        assert_eq!(
            res.status(),
            StatusCode::CREATED,
            "{}",
            res.text().await.unwrap()
        );
        let body: Value = res.json().await.unwrap();
        let token = self.login(&t.domain, email, "agent-password-1").await;
        (body["id"].as_i64().unwrap(), token)
    }
}

impl Api for TestApp {
    fn port(&self) -> u16 {
        self.port
    }
    fn client(&self) -> &reqwest::Client {
        &self.client
    }
    fn platform_key(&self) -> &str {
        &self.platform_key
    }
}

impl Drop for TestApp {
    /// Each test's app stops with the test, so its pools do not outlive it.
    fn drop(&mut self) {
        self.stopper.stop_now();
    }
}

/// Asserts the contract's error shape and code, returning the body.
pub async fn assert_error(res: Response, status: StatusCode, code: &str) -> Value {
    let got = res.status();
    let has_id = res.headers().contains_key("x-request-id");
    let text = res.text().await.unwrap();
    assert_eq!(got, status, "body: {text}");
    assert!(has_id, "every response carries X-Request-Id");
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON error body, got {text}"));
    assert_eq!(body["error"]["code"], code, "body: {text}");
    assert!(body["error"]["message"].is_string(), "body: {text}");
    body
}
