//! Standard Webhooks signing (https://www.standardwebhooks.com). Pure: no I/O.

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::core::event::IdempotencyKey;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("signing secret must start with `whsec_`")]
    MissingPrefix,
    #[error("signing secret is not valid base64 after `whsec_`")]
    NotBase64,
    #[error("signing secret decodes to {0} bytes; at least 16 are required")]
    TooShort(usize),
}

/// A decoded `whsec_…` secret. Its Debug output never shows the key.
#[derive(Clone)]
pub struct SigningSecret(Vec<u8>);

impl std::fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecret(<redacted>)")
    }
}

impl SigningSecret {
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text
            .trim()
            .strip_prefix("whsec_")
            .ok_or(SecretError::MissingPrefix)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::NotBase64)?;
        if key.len() < 16 {
            return Err(SecretError::TooShort(key.len()));
        }
        Ok(SigningSecret(key))
    }
}

/// The `webhook-id` header: stable for one (event, broker) pair across every retry and replay,
/// so a receiver can deduplicate on it. The spec forbids `.` (it separates the signed parts), so
/// the idempotency key is base64url-encoded; long keys are hashed to keep the header short.
pub fn webhook_id(key: &IdempotencyKey) -> String {
    let raw = key.as_str().as_bytes();
    if raw.len() <= 96 {
        format!("msg_{}", URL_SAFE_NO_PAD.encode(raw))
    } else {
        use sha2::Digest;
        format!("msg_h{}", URL_SAFE_NO_PAD.encode(Sha256::digest(raw)))
    }
}

/// The `webhook-signature` header value: one `v1,<base64 HMAC-SHA256>` entry per secret,
/// space separated (several secrets while a broker rotates).
pub fn signature_header(
    secrets: &[SigningSecret],
    id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    let mut header = String::new();
    for secret in secrets {
        if !header.is_empty() {
            header.push(' ');
        }
        header.push_str("v1,");
        header.push_str(&STANDARD.encode(sign(secret, id, timestamp, body)));
    }
    header
}

fn sign(secret: &SigningSecret, id: &str, timestamp: i64, body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC accepts any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_published_standard_webhooks_vector() {
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let header = signature_header(
            &[secret],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn one_entry_per_secret() {
        let a = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let b = SigningSecret::parse("whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB").unwrap();
        let header = signature_header(&[a, b], "msg_x", 1, b"{}");
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|e| e.starts_with("v1,")));
        assert_ne!(entries[0], entries[1]);
    }

    #[test]
    fn bad_secrets_are_refused_without_echoing_them() {
        assert_eq!(
            SigningSecret::parse("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap_err(),
            SecretError::MissingPrefix
        );
        assert_eq!(
            SigningSecret::parse("whsec_not base64!").unwrap_err(),
            SecretError::NotBase64
        );
        assert_eq!(
            SigningSecret::parse("whsec_YWJj").unwrap_err(),
            SecretError::TooShort(3)
        );
        let secret = SigningSecret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        assert!(!format!("{secret:?}").contains("MfKQ"));
    }

    #[test]
    fn webhook_ids_are_stable_and_dot_free() {
        let key = IdempotencyKey::from_event_id("order.42.matched");
        assert_eq!(webhook_id(&key), webhook_id(&key));
        assert!(!webhook_id(&key).contains('.'));
        let long = IdempotencyKey::from_event_id(&"x".repeat(500));
        let id = webhook_id(&long);
        assert!(id.len() < 64 && !id.contains('.'));
        assert_ne!(
            webhook_id(&IdempotencyKey::from_event_id("a")),
            webhook_id(&IdempotencyKey::from_event_id("b"))
        );
    }
}
