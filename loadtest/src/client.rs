//! Speaking to a server under test: provisioning over HTTP (operator API, agents, visitors),
//! long-poll calls, the stored-history read, and WebSocket connections from chosen source
//! addresses. Every tenant request carries `Host: <tenant domain>`, which is how Kefu picks
//! the tenant; the relay ignores it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use reqwest::{Method, StatusCode, Url, header};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type WsStream = WebSocketStream<TcpStream>;

/// Time allowed for one provisioning call. Agent creation and login hash a password with
/// Argon2, which on a loaded two-core machine can queue for seconds.
const PROVISION_TIMEOUT: Duration = Duration::from_secs(60);

/// Attempts of a provisioning call answered 429 or 503 (both say: retry later).
const PROVISION_ATTEMPTS: u32 = 20;

/// Longest pause honoured from a `Retry-After`, so a misconfigured limiter cannot stall a run.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Time allowed for a long-poll call beyond the server's own wait.
const POLL_SLACK: Duration = Duration::from_secs(10);

/// Time allowed for a visitor's message POST; far beyond any latency worth measuring.
const POST_TIMEOUT: Duration = Duration::from_secs(30);

/// Page size of the stored-history read; the contract allows this much per call.
const HISTORY_PAGE: usize = 500;

/// WebSocket read buffer of the harness's connections. Frames are a few hundred bytes, and a
/// connections run holds up to 20,000 sockets per process, so tungstenite's 128 KiB default
/// would cost the client gigabytes for nothing.
const WS_READ_BUFFER: usize = 4 * 1024;

/// WebSocket settings of every harness connection.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
        // Each frame is flushed as soon as it is sent: the harness measures latency, and
        // buffering frames would add to it.
        .write_buffer_size(0)
}

/// The server under test.
#[derive(Clone)]
pub struct Target {
    http: reqwest::Client,
    base: Url,
    socket_addr: SocketAddr,
}

/// A tenant provisioned for one run, with its admin signed in.
#[derive(Clone, Debug)]
pub struct TenantHandle {
    pub slug: String,
    pub domain: String,
    pub admin_id: i64,
    pub admin_email: String,
    pub admin_password: String,
    pub admin_token: String,
}

/// An agent that can open a WebSocket.
#[derive(Clone, Debug)]
pub struct AgentLogin {
    pub id: i64,
    pub token: String,
}

/// A visitor session.
#[derive(Clone, Debug)]
pub struct VisitorLogin {
    pub id: i64,
    pub token: String,
}

/// What a long-poll POST answers.
#[derive(Clone, Copy, Debug, Deserialize)]
pub struct Posted {
    pub id: i64,
    pub seq: i64,
}

/// A stored conversation's messages, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoredCount {
    /// Messages whose sender is a visitor or an agent.
    pub parties: u64,
    pub system: u64,
}

impl Target {
    /// `url` is the server's base, such as `http://127.0.0.1:8080`.
    pub async fn new(url: &str) -> Result<Self> {
        let base = Url::parse(url).with_context(|| format!("--url {url:?} is not a URL"))?;
        if base.scheme() != "http" {
            bail!("--url must be http://… (the harness speaks plain HTTP and ws://)");
        }
        let host = base.host_str().context("--url has no host")?.to_owned();
        let port = base.port_or_known_default().unwrap_or(80);
        let socket_addr = tokio::net::lookup_host((host.as_str(), port))
            .await
            .with_context(|| format!("resolving {host}"))?
            .next()
            .with_context(|| format!("{host} resolves to no address"))?;
        let http = reqwest::Client::builder()
            // A proxy from the environment must not sit between the harness and the server.
            .no_proxy()
            .tcp_nodelay(true)
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            base,
            socket_addr,
        })
    }

    pub fn base(&self) -> &Url {
        &self.base
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .with_context(|| format!("joining {path}"))
    }

    /// One HTTP call; `host` overrides the Host header (the tenant's domain).
    async fn call(
        &self,
        method: Method,
        path: &str,
        host: Option<&str>,
        token: Option<&str>,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes, Option<Duration>)> {
        let mut req = self.http.request(method, self.url(path)?).timeout(timeout);
        if let Some(h) = host {
            req = req.header(header::HOST, h);
        }
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await?;
        let status = res.status();
        let retry_after = res
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let bytes = res.bytes().await?;
        Ok((status, bytes, retry_after))
    }

    /// A provisioning call: retried while the server says 429 or 503, then required to answer
    /// one of `ok`.
    async fn provision(
        &self,
        method: Method,
        path: &str,
        host: Option<&str>,
        token: Option<&str>,
        body: Option<&Value>,
        ok: &[StatusCode],
    ) -> Result<Value> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (status, bytes, retry_after) = self
                .call(method.clone(), path, host, token, body, PROVISION_TIMEOUT)
                .await
                .with_context(|| format!("{method} {path}"))?;
            if ok.contains(&status) {
                return serde_json::from_slice(&bytes)
                    .with_context(|| format!("{method} {path}: the answer is not JSON"));
            }
            let retriable = matches!(
                status,
                StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
            );
            if !retriable || attempt >= PROVISION_ATTEMPTS {
                bail!(
                    "{method} {path} answered {status}: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            let pause = retry_after
                .unwrap_or(Duration::from_millis(200))
                .min(MAX_RETRY_AFTER);
            tokio::time::sleep(pause).await;
        }
    }

    /// Opens a tenant `lt-<8 hex>` on `<slug>.loadtest` and signs its admin in.
    pub async fn create_tenant(&self, platform_key: &str) -> Result<TenantHandle> {
        let slug = format!("lt-{:08x}", rand::random::<u32>());
        let domain = format!("{slug}.loadtest");
        let admin_email = format!("admin@{domain}");
        let admin_password = format!("lt-admin-{:016x}", rand::random::<u64>());
        let body = json!({
            "slug": slug, "name": format!("Load test {slug}"), "domains": [domain],
            "admin": {"email": admin_email, "password": admin_password, "name": "Load test admin"}
        });
        let created = self
            .provision(
                Method::POST,
                "/platform/v1/tenants",
                None,
                Some(platform_key),
                Some(&body),
                &[StatusCode::CREATED],
            )
            .await
            .context("creating the load-test tenant (is --platform-key right?)")?;
        let admin_id = created["admin"]["id"]
            .as_i64()
            .context("the tenant answer has no admin.id")?;
        let login = self.login(&domain, &admin_email, &admin_password).await?;
        Ok(TenantHandle {
            slug,
            domain,
            admin_id,
            admin_email,
            admin_password,
            admin_token: login.token,
        })
    }

    pub async fn login(&self, domain: &str, email: &str, password: &str) -> Result<AgentLogin> {
        let v = self
            .provision(
                Method::POST,
                "/api/v1/auth/login",
                Some(domain),
                None,
                Some(&json!({"email": email, "password": password})),
                &[StatusCode::OK],
            )
            .await?;
        Ok(AgentLogin {
            id: v["agent"]["id"]
                .as_i64()
                .context("the login answer has no agent.id")?,
            token: v["token"]
                .as_str()
                .context("the login answer has no token")?
                .to_owned(),
        })
    }

    /// Creates agent number `n` of the tenant (team `general`) and signs it in.
    pub async fn create_agent(
        &self,
        tenant: &TenantHandle,
        n: usize,
        max_concurrent: usize,
    ) -> Result<AgentLogin> {
        let email = format!("agent{n}@{}", tenant.domain);
        let password = format!("lt-agent-{n}-password");
        let body = json!({
            "email": email, "name": format!("Agent {n}"), "password": password,
            "max_concurrent": max_concurrent
        });
        self.provision(
            Method::POST,
            "/api/v1/agents",
            Some(&tenant.domain),
            Some(&tenant.admin_token),
            Some(&body),
            &[StatusCode::CREATED],
        )
        .await
        .with_context(|| format!("creating agent {n}"))?;
        self.login(&tenant.domain, &email, &password).await
    }

    pub async fn visitor_session(&self, domain: &str) -> Result<VisitorLogin> {
        let v = self
            .provision(
                Method::POST,
                "/api/v1/visitor/sessions",
                Some(domain),
                None,
                Some(&json!({})),
                &[StatusCode::CREATED, StatusCode::OK],
            )
            .await?;
        Ok(VisitorLogin {
            id: v["visitor_id"]
                .as_i64()
                .context("the session answer has no visitor_id")?,
            token: v["visitor_token"]
                .as_str()
                .context("the session answer has no visitor_token")?
                .to_owned(),
        })
    }

    /// Opens (or finds) the visitor's conversation; returns its id.
    pub async fn create_conversation(&self, domain: &str, visitor_token: &str) -> Result<i64> {
        let v = self
            .provision(
                Method::POST,
                "/api/v1/visitor/conversations",
                Some(domain),
                Some(visitor_token),
                Some(&json!({})),
                &[StatusCode::CREATED, StatusCode::OK],
            )
            .await?;
        v["conversation_id"]
            .as_i64()
            .context("the conversation answer has no conversation_id")
    }

    /// A visitor's message over long-poll; answers once it is stored.
    pub async fn post_visitor_message(
        &self,
        domain: &str,
        visitor_token: &str,
        conversation_id: i64,
        client_msg_id: &str,
        text: &str,
    ) -> Result<Posted> {
        let path = format!("/api/v1/visitor/conversations/{conversation_id}/messages");
        let body = crate::protocol::post_message_body(client_msg_id, text);
        let (status, bytes, _) = self
            .call(
                Method::POST,
                &path,
                Some(domain),
                Some(visitor_token),
                Some(&body),
                POST_TIMEOUT,
            )
            .await?;
        if !matches!(status, StatusCode::CREATED | StatusCode::OK) {
            bail!(
                "POST {path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(serde_json::from_slice(&bytes)?)
    }

    /// One long-poll; the raw body is returned so frames can be parsed borrowed from it.
    pub async fn poll_events(
        &self,
        domain: &str,
        visitor_token: &str,
        conversation_id: i64,
        after_seq: i64,
        wait_secs: u32,
    ) -> Result<Bytes> {
        let path = format!(
            "/api/v1/visitor/conversations/{conversation_id}/events?after_seq={after_seq}&wait={wait_secs}"
        );
        let timeout = Duration::from_secs(u64::from(wait_secs)) + POLL_SLACK;
        let (status, bytes, _) = self
            .call(
                Method::GET,
                &path,
                Some(domain),
                Some(visitor_token),
                None,
                timeout,
            )
            .await?;
        if status != StatusCode::OK {
            bail!(
                "GET {path} answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(bytes)
    }

    /// Counts a conversation's stored messages, paging through its history as the admin.
    pub async fn stored_count(
        &self,
        tenant: &TenantHandle,
        conversation_id: i64,
    ) -> Result<StoredCount> {
        let mut count = StoredCount::default();
        let mut after = 0i64;
        loop {
            let path = format!(
                "/api/v1/conversations/{conversation_id}/messages?after_seq={after}&limit={HISTORY_PAGE}"
            );
            let v = self
                .provision(
                    Method::GET,
                    &path,
                    Some(&tenant.domain),
                    Some(&tenant.admin_token),
                    None,
                    &[StatusCode::OK],
                )
                .await?;
            let page = v["messages"]
                .as_array()
                .with_context(|| format!("GET {path}: no messages array"))?;
            for m in page {
                let kind = m["sender"]["kind"]
                    .as_str()
                    .or_else(|| m["sender_kind"].as_str());
                if kind == Some("system") {
                    count.system += 1;
                } else {
                    count.parties += 1;
                }
                after = after.max(m["seq"].as_i64().unwrap_or(after));
            }
            if page.len() < HISTORY_PAGE {
                return Ok(count);
            }
        }
    }

    /// Opens `path` (`/ws/agent` or `/ws/visitor`) with `token`, from `source` when given.
    pub async fn ws_connect(
        &self,
        domain: &str,
        path: &str,
        token: &str,
        source: Option<IpAddr>,
    ) -> Result<WsStream> {
        let mut url = self.url(path)?;
        url.set_scheme("ws")
            .map_err(|()| anyhow!("cannot make a ws:// URL of {url}"))?;
        url.query_pairs_mut().append_pair("token", token);
        let mut request = url.as_str().into_client_request()?;
        request
            .headers_mut()
            .insert(header::HOST, HeaderValue::from_str(domain)?);
        let socket = if self.socket_addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding to source address {ip}"))?;
        }
        let stream = socket
            .connect(self.socket_addr)
            .await
            .with_context(|| format!("connecting to {}", self.socket_addr))?;
        // Nagle's algorithm would hold small frames for up to 40 ms waiting for an ACK.
        stream.set_nodelay(true)?;
        let (ws, _) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
                .await
                .with_context(|| format!("WebSocket handshake on {path}"))?;
        Ok(ws)
    }
}

/// Reads frames until the server's `hello`, handing each text frame (the `hello` included) to
/// `seen`. The server sends `hello` once the connection is registered, so whatever the client
/// does after this (such as opening a conversation) cannot race the registration.
pub async fn await_hello(ws: &mut WsStream, mut seen: impl FnMut(&str)) -> Result<()> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let text = t.as_str();
                seen(text);
                let f: crate::protocol::ServerFrame = serde_json::from_str(text)
                    .with_context(|| format!("unreadable frame {text:?}"))?;
                match f.kind.as_ref() {
                    "hello" => return Ok(()),
                    "error" => bail!("refused: {text}"),
                    _ => {}
                }
            }
            Some(Ok(Message::Close(c))) => bail!("closed before hello: {c:?}"),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => bail!("closed before hello"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Reads one request head from a raw socket.
    async fn read_head(sock: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = sock.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed mid-request");
            buf.extend_from_slice(&chunk[..n]);
        }
        String::from_utf8_lossy(&buf).to_ascii_lowercase()
    }

    #[tokio::test]
    async fn tenant_requests_and_upgrades_carry_the_tenant_host() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut heads = Vec::new();
            for _ in 0..2 {
                let (mut sock, _) = listener.accept().await.unwrap();
                let head = read_head(&mut sock).await;
                let reply = if head.starts_with("get /ws/") {
                    "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n".to_owned()
                } else {
                    let body = r#"{"visitor_id":1,"visitor_token":"tok en/+"}"#;
                    format!(
                        "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\n\r\n{body}",
                        body.len()
                    )
                };
                sock.write_all(reply.as_bytes()).await.unwrap();
                heads.push(head);
            }
            heads
        });
        let target = Target::new(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        let v = target.visitor_session("lt-1.loadtest").await.unwrap();
        assert_eq!(v.token, "tok en/+");
        let err = target
            .ws_connect("lt-1.loadtest", "/ws/visitor", &v.token, None)
            .await;
        assert!(err.is_err(), "the fake server refuses the upgrade");
        let heads = server.await.unwrap();
        assert!(
            heads[0].contains("\r\nhost: lt-1.loadtest\r\n"),
            "{}",
            heads[0]
        );
        assert!(
            heads[1].starts_with("get /ws/visitor?token=tok+en%2f%2b "),
            "{}",
            heads[1]
        );
        assert!(
            heads[1].contains("\r\nhost: lt-1.loadtest\r\n"),
            "{}",
            heads[1]
        );
    }
}
