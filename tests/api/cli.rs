//! The `kefu` binary itself: tenant commands, migrations, settings errors, the demo and a
//! graceful stop on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

fn kefu(data_dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kefu"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("KEFU_DATA_DIR", data_dir)
        .env("RUST_LOG", "warn");
    cmd
}

#[test]
fn tenant_commands_and_migrate() {
    let dir = tempfile::tempdir().unwrap();
    let out = kefu(dir.path())
        .args([
            "tenant",
            "create",
            "--slug",
            "cli-co",
            "--name",
            "CLI Co",
            "--domain",
            "cli.test",
            "--domain",
            "www.cli.test",
            "--admin-email",
            "boss@cli.test",
            "--admin-password",
            "password-123",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(created["slug"], "cli-co");
    assert_eq!(created["domains"], json!(["cli.test", "www.cli.test"]));
    assert!(dir.path().join("tenants/cli-co.db").is_file());

    // Same slug again: refused, and the message says why.
    let out = kefu(dir.path())
        .args([
            "tenant",
            "create",
            "--slug",
            "cli-co",
            "--name",
            "Again",
            "--domain",
            "other.test",
            "--admin-email",
            "a@other.test",
            "--admin-password",
            "password-123",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("taken"));

    let out = kefu(dir.path())
        .args(["tenant", "suspend", "cli-co"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = kefu(dir.path()).args(["tenant", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(
        list.contains("cli-co") && list.contains("suspended"),
        "{list}"
    );
    let out = kefu(dir.path())
        .args(["tenant", "resume", "cli-co"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = kefu(dir.path())
        .args(["tenant", "resume", "no-such"])
        .output()
        .unwrap();
    assert!(!out.status.success());

    let out = kefu(dir.path()).arg("migrate").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 tenant"));
}

#[test]
fn invalid_settings_name_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value, named) in [
        ("KEFU_LISTEN", "not-an-address", "KEFU_LISTEN"),
        ("KEFU_DATABASE_URL", "mysql://x", "KEFU_DATABASE_URL"),
        ("KEFU_LOG_FORMAT", "xml", "KEFU_LOG_FORMAT"),
        ("KEFU_JWT_SECRET", "short", "KEFU_JWT_SECRET"),
        (
            "KEFU_TENANT_POOLS__MAX_OPEN",
            "0",
            "KEFU_TENANT_POOLS__MAX_OPEN",
        ),
    ] {
        let out = kefu(dir.path())
            .env(var, value)
            .args(["serve"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{var}={value} must stop start-up");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{var}={value}: {err}");
    }
    let cfg = dir.path().join("kefu.toml");
    std::fs::write(&cfg, "listen = 5\n").unwrap();
    let out = kefu(dir.path())
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}

/// `serve --demo` prints a working login; SIGTERM stops the server with exit code 0; a second
/// `--demo` start finds the demo tenant already there.
#[test]
fn demo_serves_and_stops_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..2 {
        let mut child = kefu(dir.path())
            .env("KEFU_LISTEN", "127.0.0.1:0")
            .args(["serve", "--demo"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut port = None;
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(rest) = line.trim().strip_prefix("health:  http://127.0.0.1:") {
                port = rest.split('/').next().map(|p| p.parse::<u16>().unwrap());
                break;
            }
        }
        let port = port.expect("the demo prints its URLs");
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let res = reqwest::Client::new()
                .post(format!("http://127.0.0.1:{port}/api/v1/auth/login"))
                .header("Host", "demo.localhost")
                .json(&json!({"email": kefu::demo::DEMO_ADMIN_EMAIL, "password": kefu::demo::DEMO_ADMIN_PASSWORD}))
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200, "round {round}");
        });
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = child.wait().unwrap();
        assert!(
            exit.success(),
            "SIGTERM ends with exit code 0, got {exit:?}"
        );
    }
}
