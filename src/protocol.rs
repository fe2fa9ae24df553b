//! WebSocket frames (contract §5): what clients send, what the server sends, and how a client
//! frame that cannot be understood is answered.
//!
//! Server frames are encoded once into a [`ByteString`] and that buffer is shared by every
//! connection it goes to, so fanning a message out costs a reference count per connection.

use std::borrow::Cow;

use bytestring::ByteString;
use chrono::{DateTime, Datelike, Timelike, Utc};
use serde::de::IgnoredAny;
use serde::ser::Error as _;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;
use serde_json::error::Category;
use serde_json::value::RawValue;

use crate::conversations::{ConversationSummary, MessageView};
use crate::trace_context::TraceContext;

/// Longest `ref` echoed back; a longer one is dropped rather than stored per frame.
const MAX_REF_LEN: usize = 64;

/// A client frame, as the connection acts on it.
#[derive(Debug)]
pub enum ClientFrame {
    Send {
        conversation_id: i64,
        client_msg_id: String,
        content: ClientContent,
    },
    Sync {
        conversation_id: i64,
        /// 0 when the client leaves it out: everything.
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
#[serde(tag = "kind", rename_all = "snake_case", from = "ContentFields")]
pub enum ClientContent {
    Text { text: String },
}

/// What a client's content is read as. Text is the only kind a client may send, so a plain
/// struct reads it in one pass, where the tagged enum's own `Deserialize` buffers the object
/// and reads it again; unknown kinds and fields are refused all the same. A kind with other
/// fields would add them here as options.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContentFields {
    kind: ContentKind,
    text: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ContentKind {
    Text,
}

impl From<ContentFields> for ClientContent {
    fn from(c: ContentFields) -> Self {
        match c.kind {
            ContentKind::Text => ClientContent::Text { text: c.text },
        }
    }
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

/// Every field any client frame carries, each kept as its JSON text until the frame's `type`
/// says which it needs and as what. One pass over the frame, borrowing from it: reading a
/// frame into a `serde_json::Value` and then through an internally tagged enum (which buffers
/// the map once more) cost two and a half times as much, 3 % of the server's CPU under load
/// (docs/benchmarks.md, "A client frame in one pass"). Fields no frame has are skipped unread,
/// as before; a field given twice is refused, where a `Value` silently kept the last.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<&'a RawValue>,
    #[serde(rename = "ref", borrow)]
    reference: Option<&'a RawValue>,
    #[serde(borrow)]
    traceparent: Option<&'a RawValue>,
    #[serde(borrow)]
    conversation_id: Option<&'a RawValue>,
    #[serde(borrow)]
    client_msg_id: Option<&'a RawValue>,
    #[serde(borrow)]
    content: Option<&'a RawValue>,
    #[serde(borrow)]
    after_seq: Option<&'a RawValue>,
    #[serde(borrow)]
    seq: Option<&'a RawValue>,
    #[serde(borrow)]
    status: Option<&'a RawValue>,
    #[serde(borrow)]
    to_agent_id: Option<&'a RawValue>,
    #[serde(borrow)]
    to_team: Option<&'a RawValue>,
}

/// Parses one text frame into its `ref`, its `traceparent` and its content.
pub fn parse_client_frame(text: &str) -> Result<ParsedFrame, FrameError> {
    let malformed = |message: String| FrameError {
        reference: None,
        code: "malformed_frame",
        message,
    };
    // A derived struct also accepts a JSON array (its fields in order), so anything that is not
    // an object is told apart first, by the same parser that says what is wrong with it.
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => malformed("a frame is a JSON object".into()),
            Err(e) => malformed(format!("not a JSON object: {e}")),
        });
    }
    let fields: Fields = serde_json::from_str(text).map_err(|e| match e.classify() {
        Category::Data => FrameError {
            reference: None,
            code: "invalid_frame",
            message: reason(&e),
        },
        _ => malformed(format!("not a JSON object: {e}")),
    })?;
    let reference = fields
        .reference
        .and_then(|r| serde_json::from_str::<Value>(r.get()).ok())
        .filter(|r| match r {
            Value::String(s) => s.len() <= MAX_REF_LEN,
            Value::Number(_) => true,
            _ => false,
        });
    let traceparent = fields
        .traceparent
        .and_then(string)
        .and_then(|t| TraceContext::parse(&t));
    let Some(kind) = fields.kind.and_then(string) else {
        return Err(FrameError {
            reference,
            code: "invalid_frame",
            message: "the frame has no \"type\"".into(),
        });
    };
    match frame(&kind, &fields) {
        Ok(frame) => Ok(ParsedFrame {
            reference,
            traceparent,
            frame,
        }),
        Err(Refused::UnknownType) => Err(FrameError {
            reference,
            code: "unknown_type",
            message: format!("unknown frame type {kind:?}"),
        }),
        Err(Refused::Field(message)) => Err(FrameError {
            reference,
            code: "invalid_frame",
            message: format!("{kind}: {message}"),
        }),
    }
}

/// Why a frame with a `type` was refused.
enum Refused {
    UnknownType,
    /// A field missing or of the wrong kind, said in words.
    Field(String),
}

/// The frame its `type` names, from the fields that type has.
fn frame(kind: &str, f: &Fields) -> Result<ClientFrame, Refused> {
    Ok(match kind {
        "send" => ClientFrame::Send {
            conversation_id: required(f.conversation_id, "conversation_id")?,
            client_msg_id: required(f.client_msg_id, "client_msg_id")?,
            content: required(f.content, "content")?,
        },
        "sync" => ClientFrame::Sync {
            conversation_id: required(f.conversation_id, "conversation_id")?,
            after_seq: optional(f.after_seq, "after_seq")?.unwrap_or(0),
        },
        "read" => ClientFrame::Read {
            conversation_id: required(f.conversation_id, "conversation_id")?,
            seq: required(f.seq, "seq")?,
        },
        "typing" => ClientFrame::Typing {
            conversation_id: required(f.conversation_id, "conversation_id")?,
        },
        "close" => ClientFrame::Close {
            conversation_id: required(f.conversation_id, "conversation_id")?,
        },
        "status" => ClientFrame::Status {
            status: required(f.status, "status")?,
        },
        "transfer" => ClientFrame::Transfer {
            conversation_id: required(f.conversation_id, "conversation_id")?,
            to_agent_id: optional(f.to_agent_id, "to_agent_id")?,
            to_team: optional(f.to_team, "to_team")?,
        },
        "ping" => ClientFrame::Ping,
        _ => return Err(Refused::UnknownType),
    })
}

/// A field the frame's type must have. JSON `null` counts as missing.
fn required<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>, name: &str) -> Result<T, Refused> {
    optional(raw, name)?.ok_or_else(|| Refused::Field(format!("missing field `{name}`")))
}

/// A field the frame's type may have.
fn optional<'a, T: Deserialize<'a>>(
    raw: Option<&'a RawValue>,
    name: &str,
) -> Result<Option<T>, Refused> {
    raw.map(|r| serde_json::from_str(r.get()))
        .transpose()
        .map_err(|e| Refused::Field(format!("`{name}`: {}", reason(&e))))
}

/// A JSON string's text, borrowed unless it has escapes to undo.
fn string(raw: &RawValue) -> Option<Cow<'_, str>> {
    serde_json::from_str::<&str>(raw.get())
        .map(Cow::Borrowed)
        .or_else(|_| serde_json::from_str::<String>(raw.get()).map(Cow::Owned))
        .ok()
}

/// What serde_json says is wrong, without its position: a field is parsed on its own, so the
/// line and column would count from the field's start, not the frame's.
fn reason(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(at) if e.line() != 0 => text[..at].to_owned(),
        _ => text,
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
        #[serde(serialize_with = "rfc3339")]
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

/// Serialises a time as chrono's `Serialize` does for `DateTime<Utc>` (RFC 3339, the fraction
/// in 0, 3, 6 or 9 digits as its precision needs, `Z`), but written into one buffer and handed
/// to the serialiser whole. chrono writes it through `fmt` in a dozen pieces, each of which
/// serde_json checks for characters to escape; every `ack` and `message` frame carries a time,
/// and that was a third of encoding them. Years chrono writes with a sign, and leap seconds,
/// are left to chrono.
pub fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    let year = t.year();
    let nano = t.nanosecond();
    if !(0..=9999).contains(&year) || nano >= 1_000_000_000 {
        return t.serialize(s);
    }
    let mut buf = *b"0000-00-00T00:00:00.000000000Z";
    let mut put = |at: usize, width: usize, mut n: u32| {
        for i in (at..at + width).rev() {
            buf[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    // The range check above makes the year's cast lossless.
    put(0, 4, year as u32);
    put(5, 2, t.month());
    put(8, 2, t.day());
    put(11, 2, t.hour());
    put(14, 2, t.minute());
    put(17, 2, t.second());
    let digits = match nano {
        0 => 0,
        n if n % 1_000_000 == 0 => 3,
        n if n % 1_000 == 0 => 6,
        _ => 9,
    };
    put(20, digits, nano / 10u32.pow(9 - digits as u32));
    let len = if digits == 0 { 19 } else { 20 + digits };
    buf[len] = b'Z';
    match std::str::from_utf8(&buf[..=len]) {
        Ok(text) => s.serialize_str(text),
        Err(e) => Err(S::Error::custom(e)),
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
    fn client_frames_at_their_edges() {
        let parse = |s: &str| parse_client_frame(s);
        let refused = |s: &str| {
            let e = parse(s).unwrap_err();
            (e.code, e.message)
        };
        // Whitespace before the object, fields no frame has, a `type` with escapes, `null`
        // for an optional field: all accepted.
        let p = parse(
            " \n{\"type\":\"tr\\u0061nsfer\",\"conversation_id\":2,\"to_agent_id\":null,\"to_team\":\"vip\",\"x\":[1,{}]}",
        )
        .unwrap();
        assert!(matches!(
            p.frame,
            ClientFrame::Transfer { conversation_id: 2, to_agent_id: None, to_team: Some(ref t) } if t == "vip"
        ));
        assert!(matches!(
            parse(r#"{"type":"sync","conversation_id":2}"#)
                .unwrap()
                .frame,
            ClientFrame::Sync { after_seq: 0, .. }
        ));
        assert!(matches!(
            parse(r#"{"type":"status","status":"away"}"#).unwrap().frame,
            ClientFrame::Status {
                status: AgentStatus::Away
            }
        ));
        // Not an object, or not JSON at all.
        assert_eq!(refused("[]").0, "malformed_frame");
        assert_eq!(refused(r#"["send",1]"#).0, "malformed_frame");
        assert_eq!(refused("\"send\"").0, "malformed_frame");
        assert_eq!(refused("").0, "malformed_frame");
        assert_eq!(refused(r#"{"type":"ping"} x"#).0, "malformed_frame");
        assert_eq!(refused(r#"{"type":"ping""#).0, "malformed_frame");
        // A field twice is refused rather than one copy silently chosen.
        assert_eq!(
            refused(r#"{"type":"close","conversation_id":1,"conversation_id":2}"#).0,
            "invalid_frame"
        );
        // A mistyped field is named, without a position counted from the field's own start.
        assert_eq!(
            refused(r#"{"type":"read","conversation_id":"1","seq":3}"#),
            (
                "invalid_frame",
                "read: `conversation_id`: invalid type: string \"1\", expected i64".to_owned()
            )
        );
        assert_eq!(
            refused(r#"{"type":"read","conversation_id":1}"#).1,
            "read: missing field `seq`"
        );
        assert_eq!(refused(r#"{"type":5}"#).0, "invalid_frame");
        assert_eq!(
            refused(r#"{"type":"status","status":"asleep"}"#).0,
            "invalid_frame"
        );
        // A `ref` that is neither a short string nor a number is dropped, the frame kept.
        assert_eq!(
            parse(r#"{"type":"ping","ref":{"a":1}}"#).unwrap().reference,
            None
        );
        assert_eq!(
            parse(&format!(r#"{{"type":"ping","ref":"{}"}}"#, "r".repeat(65)))
                .unwrap()
                .reference,
            None
        );
        // The `ref` survives a refusal of the rest.
        let e = parse(r#"{"ref":"k","type":"send","conversation_id":1,"client_msg_id":"c","content":{"kind":"text","text":"hi","x":1}}"#)
            .unwrap_err();
        assert_eq!(
            (e.code, e.reference),
            ("invalid_frame", Some(Value::from("k")))
        );
    }

    #[test]
    fn times_are_written_as_chrono_writes_them() {
        #[derive(Serialize)]
        struct Ours(#[serde(serialize_with = "rfc3339")] DateTime<Utc>);
        let check = |t: DateTime<Utc>| {
            assert_eq!(
                serde_json::to_string(&Ours(t)).unwrap(),
                serde_json::to_string(&t).unwrap(),
                "{t:?}"
            );
        };
        let at = |secs: i64, nanos: u32| DateTime::from_timestamp(secs, nanos).unwrap();
        // A pseudo-random walk over years 0 to 9999 and every precision of the fraction.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 0..20_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = (x % 315_537_897_600) as i64 - 62_167_219_200;
            let nanos = (x >> 20) as u32 % 1_000_000_000;
            let nanos = match i % 4 {
                0 => 0,
                1 => nanos / 1_000_000 * 1_000_000,
                2 => nanos / 1_000 * 1_000,
                _ => nanos,
            };
            check(at(secs, nanos));
        }
        check(at(-62_167_219_200, 0)); // 0000-01-01
        check(at(253_402_300_799, 999_999_999)); // 9999-12-31, the last instant
        check(at(253_402_300_800, 0)); // 10000: chrono's, with a sign
        check(at(-62_167_219_201, 5_000_000)); // -0001: chrono's
        check(at(1_483_228_799, 1_500_000_000)); // a leap second: chrono's
        check(at(1_700_000_000, 10)); // nanoseconds with leading zeros
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
