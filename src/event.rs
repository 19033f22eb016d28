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
    #[error("the parser panicked on this message (a bug: please report it with the offset)")]
    ParserPanicked,
}

/// The key that makes a (event, broker) delivery unique in the ledger: the producer's `eventId`
/// when it has one, else a hash of the exact value bytes (so a byte-identical resend matches).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn from_event_id(event_id: &str) -> Self {
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
    pub event_id: Option<String>,
    pub load_id: String,
    pub status: String,
    pub payload: bytes::Bytes,
}

/// Parses one message value. `max_bytes` is `[delivery] max_message_bytes`.
pub fn parse_event(value: Option<&[u8]>, max_bytes: usize) -> Result<ShipmentEvent, RejectReason> {
    let bytes = match value {
        None | Some([]) => return Err(RejectReason::Empty),
        Some(bytes) => bytes,
    };
    if bytes.len() > max_bytes {
        return Err(RejectReason::TooLarge {
            size: bytes.len(),
            limit: max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| RejectReason::NotUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| RejectReason::Malformed(e.to_string()))?;
    let fields = value.as_object().ok_or(RejectReason::NotAnObject)?;
    let required = |field: &'static str| match fields.get(field) {
        Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        _ => Err(RejectReason::BadField { field }),
    };
    let load_id = required("loadId")?;
    let status = required("status")?;
    let event_id = match fields.get("eventId") {
        None | Some(serde_json::Value::Null) => None,
        Some(_) => Some(required("eventId")?),
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

    #[test]
    fn event_id_is_the_key_when_present() {
        let event = parse_event(
            Some(br#"{"eventId":"e-1","loadId":"L1","status":"matched","extra":{"a":1}}"#),
            LIMIT,
        )
        .unwrap();
        assert_eq!(event.key.as_str(), "evt:e-1");
        assert_eq!(event.event_id.as_deref(), Some("e-1"));
        assert_eq!(event.load_id, "L1");
        assert_eq!(event.status, "matched");
    }

    #[test]
    fn without_event_id_the_key_is_the_hash_of_the_exact_bytes() {
        let a = parse_event(Some(br#"{"loadId":"L1","status":"matched"}"#), LIMIT).unwrap();
        let b = parse_event(Some(br#"{"loadId":"L1","status":"matched"}"#), LIMIT).unwrap();
        let c = parse_event(Some(br#"{"loadId":"L1", "status":"matched"}"#), LIMIT).unwrap();
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
        let event = parse_event(Some(raw), LIMIT).unwrap();
        assert_eq!(&event.payload[..], &raw[..]);
    }

    #[test]
    fn hostile_strings_are_just_strings() {
        let event = parse_event(
            Some(br#"{"loadId":"1 OR 1=1; DROP TABLE brokers; --","status":"matched"}"#),
            LIMIT,
        )
        .unwrap();
        assert_eq!(event.load_id, "1 OR 1=1; DROP TABLE brokers; --");
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
            assert_eq!(parse_event(input, LIMIT), Err(expected), "input {input:?}");
        }
        assert!(matches!(
            parse_event(Some(b"{not json"), LIMIT),
            Err(RejectReason::Malformed(_))
        ));
    }

    #[test]
    fn oversized_values_are_rejected_before_parsing() {
        let big = vec![b' '; LIMIT + 1];
        assert_eq!(
            parse_event(Some(&big), LIMIT),
            Err(RejectReason::TooLarge {
                size: LIMIT + 1,
                limit: LIMIT
            })
        );
    }
}
