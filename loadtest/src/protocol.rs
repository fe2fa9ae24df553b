//! The frames the harness reads and writes, and how a message carries its send time.
//!
//! Frames are parsed into borrowed structs naming only the fields the harness uses: at tens of
//! thousands of frames a second a `serde_json::Value` per frame would cost the client more CPU
//! than the server under test spends on it.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

/// A server frame (WebSocket text frame, or one element of a long-poll `events` array).
#[derive(Debug, Deserialize)]
pub struct ServerFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default)]
    pub conversation_id: Option<i64>,
    #[serde(default)]
    pub id: Option<i64>,
    #[serde(default)]
    pub seq: Option<i64>,
    #[serde(default, borrow)]
    pub client_msg_id: Option<Cow<'a, str>>,
    #[serde(default, rename = "ref", borrow)]
    pub reference: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub sender: Option<Sender<'a>>,
    #[serde(default, borrow)]
    pub content: Option<Content<'a>>,
    #[serde(default, borrow)]
    pub conversations: Option<Vec<HelloConversation<'a>>>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub struct Sender<'a> {
    #[serde(borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default)]
    pub id: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct Content<'a> {
    #[serde(default, borrow)]
    pub text: Option<Cow<'a, str>>,
}

#[derive(Debug, Deserialize)]
pub struct HelloConversation<'a> {
    pub conversation_id: i64,
    #[serde(default, borrow)]
    pub status: Option<Cow<'a, str>>,
}

/// A long-poll answer.
#[derive(Debug, Deserialize)]
pub struct Events<'a> {
    #[serde(borrow)]
    pub events: Vec<ServerFrame<'a>>,
    #[serde(default)]
    pub last_seq: Option<i64>,
}

/// Which party a connection speaks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Visitor,
    Agent,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Visitor => "visitor",
            Side::Agent => "agent",
        }
    }

    fn letter(self) -> char {
        match self {
            Side::Visitor => 'v',
            Side::Agent => 'a',
        }
    }
}

#[derive(Serialize)]
struct TextContent<'a> {
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct SendFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(rename = "ref")]
    reference: &'a str,
    conversation_id: i64,
    client_msg_id: &'a str,
    content: TextContent<'a>,
}

/// The `send` frame; the `ref` is the client_msg_id, which is unique anyway.
pub fn send_frame(conversation_id: i64, client_msg_id: &str, text: &str) -> String {
    let frame = SendFrame {
        kind: "send",
        reference: client_msg_id,
        conversation_id,
        client_msg_id,
        content: TextContent { kind: "text", text },
    };
    // Plain strings and integers always serialise.
    serde_json::to_string(&frame).expect("a send frame serialises")
}

/// The body of a long-poll `POST .../messages`.
pub fn post_message_body(client_msg_id: &str, text: &str) -> serde_json::Value {
    serde_json::json!({"client_msg_id": client_msg_id, "content": {"kind": "text", "text": text}})
}

/// A client_msg_id unique in the tenant, naming the phase its send belongs to, so an ack can be
/// put in the right phase without a table of sends in flight.
pub fn client_msg_id(phase: u32, side: Side, party_id: i64, n: u64) -> String {
    format!("p{phase}-{}{party_id}-{n}", side.letter())
}

/// The phase named by [`client_msg_id`].
pub fn phase_of_client_msg_id(id: &str) -> Option<u32> {
    id.strip_prefix('p')?.split('-').next()?.parse().ok()
}

/// The text of a timed message: send instant (nanoseconds since the run's clock base) and phase.
pub fn stamp_text(sent_nanos: u64, phase: u32) -> String {
    format!("t:{sent_nanos} p:{phase}")
}

/// Reads back [`stamp_text`].
pub fn parse_stamp(text: &str) -> Option<(u64, u32)> {
    let rest = text.strip_prefix("t:")?;
    let (nanos, phase) = rest.split_once(" p:")?;
    Some((nanos.parse().ok()?, phase.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamp_round_trips() {
        assert_eq!(
            parse_stamp(&stamp_text(123_456_789, 4)),
            Some((123_456_789, 4))
        );
        assert_eq!(parse_stamp("hello"), None);
        assert_eq!(parse_stamp("t:12"), None);
    }

    #[test]
    fn client_msg_id_carries_its_phase() {
        let id = client_msg_id(7, Side::Agent, 42, 1001);
        assert_eq!(id, "p7-a42-1001");
        assert_eq!(phase_of_client_msg_id(&id), Some(7));
        assert_eq!(phase_of_client_msg_id("x-1"), None);
    }

    #[test]
    fn frames_parse_with_unknown_fields_and_system_senders() {
        let f: ServerFrame = serde_json::from_str(
            r#"{"type":"message","conversation_id":3,"id":9,"seq":1,"client_msg_id":null,
                "sender":{"kind":"system","id":null},
                "content":{"kind":"event","event":"assigned","agent_id":2},
                "created_at":"2026-11-26T04:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(f.kind, "message");
        assert_eq!(f.sender.unwrap().kind, "system");
        assert!(f.content.unwrap().text.is_none());

        let hello: ServerFrame = serde_json::from_str(
            r#"{"type":"hello","node":"n1","conversations":[{"conversation_id":5,"status":"active","last_seq":3}]}"#,
        )
        .unwrap();
        let convs = hello.conversations.unwrap();
        assert_eq!(convs[0].conversation_id, 5);
        assert_eq!(convs[0].status.as_deref(), Some("active"));
    }

    #[test]
    fn send_frame_is_the_contract_shape() {
        let v: serde_json::Value =
            serde_json::from_str(&send_frame(3, "p0-v1-1", "t:1 p:0")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"send","ref":"p0-v1-1","conversation_id":3,
                "client_msg_id":"p0-v1-1","content":{"kind":"text","text":"t:1 p:0"}})
        );
    }
}
