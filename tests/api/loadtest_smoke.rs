//! A few seconds of each load-test scenario against a spawned server: the harness and the
//! server agree on the protocol, and nothing is lost, duplicated or reordered. No timing is
//! asserted; speed is the benchmark's business (`scripts/bench`).

use kefu_loadtest::scenarios::{chat, connections, longpoll, ramp};

use crate::helpers::{Api, Backend, spawn_app};

#[actix_web::test]
async fn chat_scenario() {
    let app = spawn_app(Backend::Sqlite).await;
    let r = chat::run(chat::ChatConfig {
        url: app.url(""),
        platform_key: app.platform_key.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(r.passed, "{}", r.table());
    assert!(r.acked > 0);
}

#[actix_web::test]
async fn longpoll_scenario() {
    let app = spawn_app(Backend::Sqlite).await;
    let r = longpoll::run(longpoll::LongpollConfig {
        url: app.url(""),
        platform_key: app.platform_key.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(r.passed, "{}", r.table());
}

#[actix_web::test]
async fn ramp_scenario() {
    let app = spawn_app(Backend::Sqlite).await;
    let r = ramp::run(ramp::RampConfig {
        url: app.url(""),
        platform_key: app.platform_key.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(
        (r.lost, r.duplicated, r.reordered),
        (0, 0, 0),
        "{}",
        r.table()
    );
}

#[actix_web::test]
async fn connections_scenario() {
    let app = spawn_app(Backend::Sqlite).await;
    let r = connections::run(connections::ConnectionsConfig {
        url: app.url(""),
        platform_key: app.platform_key.clone(),
        procs: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    assert!(r.passed, "{}", r.table());
}
