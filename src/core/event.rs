//! Parsing a Kafka message into a shipment event, and deriving its idempotency key.
//! Pure: no I/O. Anything that fails here becomes a rejected message, never a crash.

use sha2::{Digest, Sha256};

/// Why a message could not be turned into an event. Always permanent: the same bytes fail the
/// same way on every redelivery, so they are recorded and skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    #[error("message has no value (tombstone)")]
    Empty,
    #[error("message value is {size} bytes, above the limit of {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("message value is not valid UTF-8 (first bad byte at {valid_up_to})")]
    NotUtf8 { valid_up_to: usize },
    #[error("message value is not valid JSON: {0}")]
    Malformed(String),
    #[error("message value is JSON but not an object")]
    NotAnObject,
    #[error("field `{field}` is missing or not a non-empty string")]
    BadField { field: &'static str },
    #[error("field `{field}` cannot be stored: {problem}")]
    Unstorable {
        field: &'static str,
        problem: TextProblem,
    },
    #[error("the parser panicked on this message (a bug: please report it with the offset)")]
    ParserPanicked,
}

/// Why a string field of an event is refused. The ledger stores ids and statuses as `text` and
/// indexes them with btree indexes: Postgres `text` cannot hold NUL, and an index row cannot
/// exceed about 2.7 kB, so either would fail the claim of the whole batch. Control characters are
/// refused too: no real id or status holds one, and they garble every log line and terminal that
/// shows the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextProblem {
    #[error("{len} bytes, above the limit of {limit}")]
    TooLong { len: usize, limit: usize },
    #[error("it holds a NUL character at byte {at}")]
    Nul { at: usize },
    #[error("it holds the control character U+{code:04X} at byte {at}")]
    Control { at: usize, code: u32 },
}

/// Byte caps for an event's text fields (`[delivery] max_event_id_bytes` and friends) and for
/// the whole value (`max_message_bytes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    pub max_message_bytes: usize,
    pub max_event_id_bytes: usize,
    pub max_load_id_bytes: usize,
    pub max_status_bytes: usize,
}

/// Checks that `text` can be stored and indexed: at most `limit` bytes, no NUL, no control
/// character.
pub fn check_storable_text(text: &str, limit: usize) -> Result<(), TextProblem> {
    if text.len() > limit {
        return Err(TextProblem::TooLong {
            len: text.len(),
            limit,
        });
    }
    match text.char_indices().find(|(_, c)| c.is_control()) {
        None => Ok(()),
        Some((at, '\0')) => Err(TextProblem::Nul { at }),
        Some((at, c)) => Err(TextProblem::Control {
            at,
            code: u32::from(c),
        }),
    }
}

macro_rules! storable_field {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub struct $name(String);

        impl $name {
            /// The only way in from outside: non-empty, storable, within `limit` bytes.
            pub fn parse(text: &str, limit: usize) -> Result<$name, RejectReason> {
                if text.is_empty() {
                    return Err(RejectReason::BadField { field: $field });
                }
                check_storable_text(text, limit).map_err(|problem| RejectReason::Unstorable {
                    field: $field,
                    problem,
                })?;
                Ok($name(text.to_owned()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::ops::Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

storable_field!(
    /// The producer's `eventId`: what makes a re-produced event a duplicate.
    EventId,
    "eventId"
);
storable_field!(
    /// The shipment (`loadId`): the unit of ordering and of subscription.
    LoadId,
    "loadId"
);
storable_field!(
    /// The new status (`status`), as the producer wrote it.
    Status,
    "status"
);

/// The key that makes a (event, broker) delivery unique in the ledger: the producer's `eventId`
/// when it has one, else a hash of the exact value bytes (so a byte-identical resend matches).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn from_event_id(event_id: &str) -> Self {
        // Callers pass an EventId (storable, capped); the prefix keeps the key storable too.
        IdempotencyKey(format!("evt:{event_id}"))
    }
    pub fn from_value_bytes(value: &[u8]) -> Self {
        IdempotencyKey(format!("sha256:{}", hex::encode(Sha256::digest(value))))
    }
    /// For keys read back from the ledger.
    pub fn from_stored(key: String) -> Self {
        IdempotencyKey(key)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A parsed, validated event. `payload` is the message value exactly as consumed: it is what we
/// sign and send, so existing TMS integrations see the same JSON they always did.
#[derive(Debug, Clone, PartialEq)]
pub struct ShipmentEvent {
    pub key: IdempotencyKey,
    pub event_id: Option<EventId>,
    pub load_id: LoadId,
    pub status: Status,
    pub payload: bytes::Bytes,
}

/// Parses one message value. Every string that comes out of it is storable (see [`TextProblem`]).
pub fn parse_event(
    value: Option<&[u8]>,
    limits: &EventLimits,
) -> Result<ShipmentEvent, RejectReason> {
    let bytes = match value {
        None | Some([]) => return Err(RejectReason::Empty),
        Some(bytes) => bytes,
    };
    if bytes.len() > limits.max_message_bytes {
        return Err(RejectReason::TooLarge {
            size: bytes.len(),
            limit: limits.max_message_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| RejectReason::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    // serde_json's messages name a line and column, but are made storable anyway: the reason is
    // written to the ledger and no text derived from input is trusted there.
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        RejectReason::Malformed(crate::core::storable::storable(&e.to_string(), 512).into_owned())
    })?;
    let fields = value.as_object().ok_or(RejectReason::NotAnObject)?;
    let string = |field: &'static str| match fields.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.as_str()),
        _ => Err(RejectReason::BadField { field }),
    };
    let load_id = LoadId::parse(string("loadId")?, limits.max_load_id_bytes)?;
    let status = Status::parse(string("status")?, limits.max_status_bytes)?;
    let event_id = match fields.get("eventId") {
        None | Some(serde_json::Value::Null) => None,
        Some(_) => Some(EventId::parse(
            string("eventId")?,
            limits.max_event_id_bytes,
        )?),
    };
    let key = match &event_id {
        Some(id) => IdempotencyKey::from_event_id(id),
        None => IdempotencyKey::from_value_bytes(bytes),
    };
    Ok(ShipmentEvent {
        key,
        event_id,
        load_id,
        status,
        payload: bytes::Bytes::copy_from_slice(bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 1024;
    const LIMITS: EventLimits = EventLimits {
        max_message_bytes: LIMIT,
        max_event_id_bytes: 64,
        max_load_id_bytes: 64,
        max_status_bytes: 16,
    };

    #[test]
    fn event_id_is_the_key_when_present() {
        let event = parse_event(
            Some(br#"{"eventId":"e-1","loadId":"L1","status":"matched","extra":{"a":1}}"#),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(event.key.as_str(), "evt:e-1");
        assert_eq!(event.event_id.as_deref(), Some("e-1"));
        assert_eq!(event.load_id.as_str(), "L1");
        assert_eq!(event.status.as_str(), "matched");
    }

    #[test]
    fn without_event_id_the_key_is_the_hash_of_the_exact_bytes() {
        let a = parse_event(Some(br#"{"loadId":"L1","status":"matched"}"#), &LIMITS).unwrap();
        let b = parse_event(Some(br#"{"loadId":"L1","status":"matched"}"#), &LIMITS).unwrap();
        let c = parse_event(Some(br#"{"loadId":"L1", "status":"matched"}"#), &LIMITS).unwrap();
        assert_eq!(a.key, b.key);
        assert_ne!(a.key, c.key);
        assert!(a.key.as_str().starts_with("sha256:"));
    }

    #[test]
    fn an_event_id_cannot_collide_with_a_hash_key() {
        let hashed = IdempotencyKey::from_value_bytes(b"x");
        let spoofed = IdempotencyKey::from_event_id(hashed.as_str());
        assert_ne!(hashed, spoofed);
    }

    #[test]
    fn payload_is_kept_byte_for_byte() {
        let raw = br#"{"loadId":"L1","status":"delivered","unknown":[1,2,{"x":null}]}"#;
        let event = parse_event(Some(raw), &LIMITS).unwrap();
        assert_eq!(&event.payload[..], &raw[..]);
    }

    #[test]
    fn hostile_strings_are_just_strings() {
        let event = parse_event(
            Some(br#"{"loadId":"1 OR 1=1; DROP TABLE brokers; --","status":"matched"}"#),
            &LIMITS,
        )
        .unwrap();
        assert_eq!(event.load_id.as_str(), "1 OR 1=1; DROP TABLE brokers; --");
    }

    #[test]
    fn bad_input_is_classified() {
        let cases: Vec<(Option<&[u8]>, RejectReason)> = vec![
            (None, RejectReason::Empty),
            (Some(b""), RejectReason::Empty),
            (
                Some(&[b'{', 0xff, b'}']),
                RejectReason::NotUtf8 { valid_up_to: 1 },
            ),
            (Some(b"[1,2]"), RejectReason::NotAnObject),
            (Some(b"\"loadId\""), RejectReason::NotAnObject),
            (
                Some(br#"{"status":"matched"}"#),
                RejectReason::BadField { field: "loadId" },
            ),
            (
                Some(br#"{"loadId":42,"status":"matched"}"#),
                RejectReason::BadField { field: "loadId" },
            ),
            (
                Some(br#"{"loadId":"","status":"matched"}"#),
                RejectReason::BadField { field: "loadId" },
            ),
            (
                Some(br#"{"loadId":"L1"}"#),
                RejectReason::BadField { field: "status" },
            ),
            (
                Some(br#"{"loadId":"L1","status":"x","eventId":7}"#),
                RejectReason::BadField { field: "eventId" },
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(
                parse_event(input, &LIMITS),
                Err(expected),
                "input {input:?}"
            );
        }
        assert!(matches!(
            parse_event(Some(b"{not json"), &LIMITS),
            Err(RejectReason::Malformed(_))
        ));
    }

    #[test]
    fn oversized_values_are_rejected_before_parsing() {
        let big = vec![b' '; LIMIT + 1];
        assert_eq!(
            parse_event(Some(&big), &LIMITS),
            Err(RejectReason::TooLarge {
                size: LIMIT + 1,
                limit: LIMIT
            })
        );
    }

    #[test]
    fn unstorable_fields_are_rejected_with_the_reason() {
        let nul = parse_event(Some(br#"{"loadId":"L\u0000","status":"x"}"#), &LIMITS);
        assert_eq!(
            nul,
            Err(RejectReason::Unstorable {
                field: "loadId",
                problem: TextProblem::Nul { at: 1 }
            })
        );
        let control = parse_event(Some(br#"{"loadId":"L","status":"a\u001bb"}"#), &LIMITS);
        assert_eq!(
            control,
            Err(RejectReason::Unstorable {
                field: "status",
                problem: TextProblem::Control { at: 1, code: 0x1b }
            })
        );
        let long_id = format!(
            r#"{{"loadId":"L","status":"x","eventId":"{}"}}"#,
            "e".repeat(65)
        );
        assert_eq!(
            parse_event(Some(long_id.as_bytes()), &LIMITS),
            Err(RejectReason::Unstorable {
                field: "eventId",
                problem: TextProblem::TooLong { len: 65, limit: 64 }
            })
        );
        let nul_id = parse_event(
            Some(br#"{"loadId":"L","status":"x","eventId":"\u0000"}"#),
            &LIMITS,
        );
        assert!(matches!(
            nul_id,
            Err(RejectReason::Unstorable {
                field: "eventId",
                ..
            })
        ));
        let message = nul_id.unwrap_err().to_string();
        assert!(!message.contains('\0'), "{message:?}");
    }

    #[test]
    fn limits_are_inclusive_and_count_bytes() {
        assert!(LoadId::parse(&"x".repeat(32), 32).is_ok());
        assert!(LoadId::parse(&"é".repeat(16), 32).is_ok());
        assert!(LoadId::parse(&"é".repeat(17), 32).is_err());
        assert!(Status::parse("", 16).is_err());
    }
}
