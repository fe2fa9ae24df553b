//! WebSocket frames (contract §5): what clients send, what the server sends, and how a client
//! frame that cannot be understood is answered.
//!
//! Server frames are encoded once into a [`ByteString`] and that buffer is shared by every
//! connection it goes to, so fanning a message out costs a reference count per connection.

use bytestring::ByteString;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::conversations::{ConversationSummary, MessageView};
use crate::trace_context::TraceContext;

/// Longest `ref` echoed back; a longer one is dropped rather than stored per frame.
const MAX_REF_LEN: usize = 64;

/// Client frame types, for telling an unknown type from a known one with bad fields.
const CLIENT_TYPES: &[&str] = &[
    "send", "sync", "read", "typing", "close", "status", "transfer", "ping",
];

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Send {
        conversation_id: i64,
        client_msg_id: String,
        content: ClientContent,
    },
    Sync {
        conversation_id: i64,
        #[serde(default)]
        after_seq: i64,
    },
    Read {
        conversation_id: i64,
        seq: i64,
    },
    Typing {
        conversation_id: i64,
    },
    Close {
        conversation_id: i64,
    },
    Status {
        status: AgentStatus,
    },
    Transfer {
        conversation_id: i64,
        to_agent_id: Option<i64>,
        to_team: Option<String>,
    },
    Ping,
}

/// Message content a client may send. Only text for now; system messages use other kinds.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientContent {
    Text { text: String },
}

/// An agent's availability for new conversations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Online,
    Away,
}

/// A client frame that was refused, with what to answer.
#[derive(Debug)]
pub struct FrameError {
    pub reference: Option<Value>,
    pub code: &'static str,
    pub message: String,
}

/// A client frame, read.
#[derive(Debug)]
pub struct ParsedFrame {
    /// The client's `ref`, echoed on the answer.
    pub reference: Option<Value>,
    /// The frame's own W3C `traceparent`, when the client sends one (any frame may): the work
    /// it causes joins that trace. Malformed values are ignored.
    pub traceparent: Option<TraceContext>,
    pub frame: ClientFrame,
}

/// Parses one text frame into its `ref`, its `traceparent` and its content.
pub fn parse_client_frame(text: &str) -> Result<ParsedFrame, FrameError> {
    let value: Value = serde_json::from_str(text).map_err(|e| FrameError {
        reference: None,
        code: "malformed_frame",
        message: format!("not a JSON object: {e}"),
    })?;
    let Value::Object(mut obj) = value else {
        return Err(FrameError {
            reference: None,
            code: "malformed_frame",
            message: "a frame is a JSON object".into(),
        });
    };
    let reference = obj.remove("ref").filter(|r| match r {
        Value::String(s) => s.len() <= MAX_REF_LEN,
        Value::Number(_) => true,
        _ => false,
    });
    let traceparent = obj
        .remove("traceparent")
        .and_then(|t| t.as_str().and_then(TraceContext::parse));
    let kind = obj.get("type").and_then(Value::as_str).map(str::to_owned);
    match kind.as_deref() {
        None => Err(FrameError {
            reference,
            code: "invalid_frame",
            message: "the frame has no \"type\"".into(),
        }),
        Some(t) if !CLIENT_TYPES.contains(&t) => Err(FrameError {
            reference,
            code: "unknown_type",
            message: format!("unknown frame type {t:?}"),
        }),
        Some(t) => match serde_json::from_value::<ClientFrame>(Value::Object(obj)) {
            Ok(frame) => Ok(ParsedFrame {
                reference,
                traceparent,
                frame,
            }),
            Err(e) => Err(FrameError {
                reference,
                code: "invalid_frame",
                message: format!("{t}: {e}"),
            }),
        },
    }
}

/// The agent named in `assigned` frames.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentRef {
    pub id: i64,
    pub name: String,
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    Hello {
        node: &'a str,
        /// `agent` or `visitor`: who this connection is.
        role: &'a str,
        /// The agent or visitor id of this connection.
        id: i64,
        conversations: &'a [ConversationSummary],
    },
    Ack {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
        conversation_id: i64,
        client_msg_id: &'a str,
        id: i64,
        seq: i64,
        created_at: DateTime<Utc>,
        /// True when this `client_msg_id` was stored before and nothing new was stored.
        duplicate: bool,
    },
    Message(&'a MessageView),
    Synced {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
        conversation_id: i64,
        last_seq: i64,
    },
    Queue {
        conversation_id: i64,
        position: usize,
    },
    Assigned {
        conversation_id: i64,
        agent: &'a AgentRef,
    },
    Transferred {
        conversation_id: i64,
        from_agent_id: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        to_agent_id: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        to_team: Option<&'a str>,
    },
    Closed {
        conversation_id: i64,
        by: &'a str,
    },
    Typing {
        conversation_id: i64,
        /// `visitor` or `agent`.
        from: &'a str,
    },
    Read {
        conversation_id: i64,
        seq: i64,
        /// `visitor` or `agent`.
        by: &'a str,
    },
    /// An agent's status, echoed to all of that agent's connections.
    Status {
        status: AgentStatus,
    },
    Pong {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
    },
    Error {
        #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
        reference: Option<&'a Value>,
        code: &'a str,
        message: &'a str,
    },
}

impl ServerFrame<'_> {
    /// Encodes the frame once; the result is cheap to clone into many connections.
    pub fn encode(&self) -> ByteString {
        // Every field is a plain string, number, timestamp or already-valid JSON.
        ByteString::from(serde_json::to_string(self).expect("server frames always serialise"))
    }

    /// The same frame as a JSON value (long-poll answers embed frames in a list).
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("server frames always serialise")
    }
}

/// An `error` frame.
pub fn error_frame(reference: Option<&Value>, code: &str, message: &str) -> ByteString {
    ServerFrame::Error {
        reference,
        code,
        message,
    }
    .encode()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_parse_or_say_why_not() {
        let p = parse_client_frame(
            r#"{"type":"send","ref":"a1","conversation_id":3,"client_msg_id":"c1","content":{"kind":"text","text":"hi"},
                "traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#,
        )
        .unwrap();
        assert_eq!(p.reference, Some(Value::from("a1")));
        assert_eq!(
            p.traceparent.map(|t| t.trace_id).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert!(matches!(
            p.frame,
            ClientFrame::Send {
                conversation_id: 3,
                ..
            }
        ));
        let code = |s: &str| parse_client_frame(s).unwrap_err().code;
        assert_eq!(code("not json"), "malformed_frame");
        assert_eq!(code("[1]"), "malformed_frame");
        assert_eq!(code(r#"{"ref":1}"#), "invalid_frame");
        assert_eq!(code(r#"{"type":"dance"}"#), "unknown_type");
        assert_eq!(
            code(r#"{"type":"send","conversation_id":1}"#),
            "invalid_frame"
        );
        assert_eq!(
            code(
                r#"{"type":"send","conversation_id":1,"client_msg_id":"x","content":{"kind":"image"}}"#
            ),
            "invalid_frame"
        );
        let err = parse_client_frame(r#"{"type":"dance","ref":7}"#).unwrap_err();
        assert_eq!(err.reference, Some(Value::from(7)));
    }

    #[test]
    fn server_frames_carry_their_type() {
        let f = ServerFrame::Queue {
            conversation_id: 1,
            position: 2,
        }
        .to_value();
        assert_eq!(f["type"], "queue");
        assert_eq!(f["position"], 2);
        let e = error_frame(Some(&Value::from("r")), "bad", "no");
        assert_eq!(
            &*e,
            r#"{"type":"error","ref":"r","code":"bad","message":"no"}"#
        );
    }
}
