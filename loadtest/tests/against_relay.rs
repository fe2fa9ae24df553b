//! The scenarios, small and quick, against the in-crate relay on real sockets.

use std::time::Duration;

use kefu_loadtest::relay;
use kefu_loadtest::scenarios::{chat, connections, longpoll, ramp};

async fn relay() -> relay::RelayHandle {
    relay::start("127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap()
}

/// Six conversations at 120 msg/s for a second.
fn small_chat(url: String) -> chat::ChatConfig {
    chat::ChatConfig {
        url,
        conversations: 6,
        agents: 2,
        rate: 120.0,
        duration: Duration::from_secs(1),
        ..Default::default()
    }
}

/// Four long-poll visitors at 40 msg/s for a second.
fn small_longpoll(url: String) -> longpoll::LongpollConfig {
    longpoll::LongpollConfig {
        url,
        conversations: 4,
        rate: 40.0,
        duration: Duration::from_secs(1),
        ..Default::default()
    }
}

fn assert_clean(r: &kefu_loadtest::Report) {
    assert!(r.passed, "{}", r.table());
    assert_eq!((r.lost, r.duplicated, r.reordered, r.unacked), (0, 0, 0, 0));
    assert!(
        r.sent > 0 && r.acked == r.sent && r.delivered == r.acked,
        "{}",
        r.table()
    );
    assert_eq!(r.latency.count, r.delivered);
    let stored = r.stored.as_ref().expect("stored check ran");
    assert_eq!((stored.stored, stored.mismatched), (r.acked, 0));
}

#[tokio::test]
async fn chat_against_the_relay_is_clean() {
    let relay = relay().await;
    let r = chat::run(small_chat(relay.url())).await.unwrap();
    assert_clean(&r);
    assert_eq!((r.conversations, r.agents), (6, 2));
    // 120 msg/s for a second, give or take the schedule's phase offsets.
    assert!((100..=130).contains(&r.sent), "{}", r.sent);
}

#[tokio::test]
async fn longpoll_against_the_relay_is_clean() {
    let relay = relay().await;
    let r = longpoll::run(small_longpoll(relay.url())).await.unwrap();
    assert_clean(&r);
}

#[tokio::test(flavor = "current_thread")]
async fn defaults_work_on_a_current_thread_runtime() {
    let relay = relay().await;
    let r = chat::run(chat::ChatConfig {
        url: relay.url(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_clean(&r);
}

#[tokio::test]
async fn ramp_against_the_relay_steps_up() {
    let relay = relay().await;
    let r = ramp::run(ramp::RampConfig {
        url: relay.url(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(r.passed, "{}", r.table());
    let ramp = r.ramp.as_ref().unwrap();
    assert_eq!(ramp.steps.len(), 2, "{}", r.ramp_table().unwrap());
    assert_eq!(ramp.best_rate, Some(40.0));
}

#[tokio::test]
async fn connections_against_the_relay_open_and_measure_memory() {
    let relay = relay().await;
    let r = connections::run(connections::ConnectionsConfig {
        url: relay.url(),
        visitors: 30,
        agents: 2,
        hold: Duration::from_millis(300),
        sources: connections::loopback_sources(2),
        // The relay runs in this very process; its memory is what is read.
        server_pid: Some(std::process::id()),
        settle: Duration::from_millis(50),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(r.passed, "{}", r.table());
    let c = r.connections.as_ref().unwrap();
    assert_eq!((c.opened, c.failed, c.dropped), (32, 0, 0));
    assert_eq!(c.connect.count, 32);
    assert!(c.rss_before_kib.is_some() && c.bytes_per_connection.is_some());
}

#[tokio::test]
async fn a_storing_relay_commits_every_acked_message() {
    let dir = std::env::temp_dir().join(format!(
        "kefu-relay-store-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("log.db");
    let relay = relay::start("127.0.0.1:0".parse().unwrap(), Some(&path))
        .await
        .unwrap();
    let sockets = chat::run(small_chat(relay.url())).await.unwrap();
    assert_clean(&sockets);
    let polls = longpoll::run(small_longpoll(relay.url())).await.unwrap();
    assert_clean(&polls);
    let db = rusqlite::Connection::open(&path).unwrap();
    let (rows, repeated): (i64, i64) = db
        .query_row(
            "SELECT count(*), count(*) - count(DISTINCT conversation_id || ':' || seq) FROM messages",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (rows, repeated),
        (i64::try_from(sockets.acked + polls.acked).unwrap(), 0)
    );
    drop(relay);
    let _ = std::fs::remove_dir_all(&dir);
}
