//! A broker's endpoint, parsed once from its `brokers` row. Pure: no I/O.
//!
//! The `brokers` table is written by another system, so every field is hostile until this
//! module says otherwise. `BrokerEndpoint::from_row` is the boundary: a row that fails here
//! costs that broker's deliveries a dead letter with the reason (class `invalid_broker`), never
//! another broker's, and nothing downstream re-checks the row.

use crate::core::signing::{SecretError, SigningSecret};
use crate::ledger::BrokerRow;

/// Longest `broker_id` we accept. It is a log field, a metric label and a CLI column.
pub const MAX_BROKER_ID_BYTES: usize = 200;
// `broker_id_problem`'s message names the number.
const _: () = assert!(MAX_BROKER_ID_BYTES == 200);
/// Longest `webhook_url` we accept (checked before parsing, so a huge value costs nothing).
pub const MAX_WEBHOOK_URL_BYTES: usize = 2048;
/// Most secrets one `signing_secret` may hold: a rotation needs two; each one costs an HMAC per
/// attempt and a signature in the header.
pub const MAX_SIGNING_SECRETS: usize = 4;
/// Longest `signing_secret` column we accept (room for `MAX_SIGNING_SECRETS` long secrets).
pub const MAX_SIGNING_SECRET_BYTES: usize = 1024;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EndpointError {
    #[error("broker is disabled")]
    Disabled,
    #[error("broker row no longer exists")]
    Missing,
    #[error("broker_id is not usable: {0}")]
    InvalidBrokerId(&'static str),
    #[error("webhook_url is not a valid URL: {0}")]
    InvalidUrl(String),
    #[error("webhook_url must be http or https, not `{0}`")]
    UnsupportedScheme(String),
    #[error("webhook_url must not carry credentials (user:password@); they would be logged")]
    CredentialsInUrl,
    #[error("signing_secret is invalid: {0}")]
    InvalidSecret(#[source] SecretError),
    #[error("signing_secret holds {0} secrets; at most {MAX_SIGNING_SECRETS} are allowed")]
    TooManySecrets(usize),
    #[error("signing_secret is {0} bytes; at most {MAX_SIGNING_SECRET_BYTES} are allowed")]
    SecretTooLong(usize),
}

/// Where and how to send a broker's webhooks. The URL holds no user info (refused in
/// `from_row`); Debug prints neither the secrets nor the URL's query, where some brokers put an
/// access token.
#[derive(Clone)]
pub struct BrokerEndpoint {
    pub url: url::Url,
    pub secrets: Vec<SigningSecret>,
}

impl std::fmt::Debug for BrokerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = self.url.clone();
        if shown.query().is_some() {
            shown.set_query(Some("<redacted>"));
        }
        shown.set_fragment(None);
        f.debug_struct("BrokerEndpoint")
            .field("url", &shown.as_str())
            .field("secrets", &self.secrets)
            .finish()
    }
}

impl BrokerEndpoint {
    /// `signing_secret` may hold several `whsec_` secrets separated by spaces (rotation).
    /// Error messages never echo the row's text: it may be huge, hold control characters, or be
    /// a secret.
    pub fn from_row(row: Option<&BrokerRow>) -> Result<BrokerEndpoint, EndpointError> {
        let row = row.ok_or(EndpointError::Missing)?;
        check_broker_id(&row.broker_id)?;
        if !row.enabled {
            return Err(EndpointError::Disabled);
        }
        let url = parse_webhook_url(&row.webhook_url)?;
        let secrets = parse_secrets(&row.signing_secret)?;
        Ok(BrokerEndpoint { url, secrets })
    }
}

fn check_broker_id(broker_id: &str) -> Result<(), EndpointError> {
    broker_id_problem(broker_id).map_or(Ok(()), |why| Err(EndpointError::InvalidBrokerId(why)))
}

/// Why `broker_id` is not a usable identifier, if it is not. Shared with the admin API, which
/// validates a `broker` filter the same way before it reaches the database.
pub fn broker_id_problem(broker_id: &str) -> Option<&'static str> {
    if broker_id.trim().is_empty() {
        Some("it is empty")
    } else if broker_id.len() > MAX_BROKER_ID_BYTES {
        Some("it is longer than 200 bytes")
    } else if broker_id.chars().any(char::is_control) {
        Some("it contains control characters")
    } else {
        None
    }
}

fn parse_webhook_url(text: &str) -> Result<url::Url, EndpointError> {
    let text = text.trim();
    if text.len() > MAX_WEBHOOK_URL_BYTES {
        return Err(EndpointError::InvalidUrl(format!(
            "it is {} bytes; at most {MAX_WEBHOOK_URL_BYTES} are allowed",
            text.len()
        )));
    }
    // The URL parser silently drops tabs and newlines inside a URL; refuse them instead, so what
    // we call is exactly what the row says.
    if text.chars().any(char::is_control) {
        return Err(EndpointError::InvalidUrl(
            "it contains control characters".to_owned(),
        ));
    }
    let url = url::Url::parse(text).map_err(|e| EndpointError::InvalidUrl(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(EndpointError::UnsupportedScheme(
            url.scheme().chars().take(16).collect(),
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(EndpointError::CredentialsInUrl);
    }
    Ok(url)
}

fn parse_secrets(text: &str) -> Result<Vec<SigningSecret>, EndpointError> {
    if text.len() > MAX_SIGNING_SECRET_BYTES {
        return Err(EndpointError::SecretTooLong(text.len()));
    }
    let secrets = text
        .split_whitespace()
        .map(SigningSecret::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(EndpointError::InvalidSecret)?;
    match secrets.len() {
        0 => Err(EndpointError::InvalidSecret(SecretError::MissingPrefix)),
        n if n > MAX_SIGNING_SECRETS => Err(EndpointError::TooManySecrets(n)),
        _ => Ok(secrets),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn row(url: &str, secret: &str, enabled: bool) -> BrokerRow {
        BrokerRow {
            broker_id: "b1".into(),
            webhook_url: url.into(),
            signing_secret: secret.into(),
            enabled,
        }
    }

    #[test]
    fn parses_a_valid_row_with_rotated_secrets() {
        let endpoint = BrokerEndpoint::from_row(Some(&row(
            "https://tms.example.com/hooks",
            &format!("{SECRET} whsec_QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"),
            true,
        )))
        .unwrap();
        assert_eq!(endpoint.secrets.len(), 2);
        assert!(!format!("{endpoint:?}").contains("MfKQ"));
        let with_token = BrokerEndpoint::from_row(Some(&row(
            "https://tms.example.com/hooks?key=abc123#frag",
            SECRET,
            true,
        )))
        .unwrap();
        let shown = format!("{with_token:?}");
        assert!(shown.contains("https://tms.example.com/hooks?"), "{shown}");
        assert!(
            !shown.contains("abc123") && !shown.contains("frag"),
            "{shown}"
        );
    }

    #[test]
    fn refuses_bad_rows_with_a_reason() {
        assert_eq!(
            BrokerEndpoint::from_row(None).unwrap_err(),
            EndpointError::Missing
        );
        assert_eq!(
            BrokerEndpoint::from_row(Some(&row("https://x", SECRET, false))).unwrap_err(),
            EndpointError::Disabled
        );
        assert!(matches!(
            BrokerEndpoint::from_row(Some(&row("not a url", SECRET, true))),
            Err(EndpointError::InvalidUrl(_))
        ));
        assert!(matches!(
            BrokerEndpoint::from_row(Some(&row("ftp://x", SECRET, true))),
            Err(EndpointError::UnsupportedScheme(_))
        ));
        assert!(matches!(
            BrokerEndpoint::from_row(Some(&row("https://x", "hunter2", true))),
            Err(EndpointError::InvalidSecret(_))
        ));
        assert!(matches!(
            BrokerEndpoint::from_row(Some(&row("https://x", "  ", true))),
            Err(EndpointError::InvalidSecret(_))
        ));
    }

    fn refusal(row: &BrokerRow) -> EndpointError {
        BrokerEndpoint::from_row(Some(row)).expect_err("row is refused")
    }

    #[test]
    fn hostile_broker_ids_are_refused_without_being_echoed() {
        for id in [
            String::new(),
            "   ".to_owned(),
            "b".repeat(MAX_BROKER_ID_BYTES + 1),
            "acme\nfake log line".to_owned(),
            "acme\u{1b}[31mred".to_owned(),
            "acme\r".to_owned(),
            "acme\u{85}".to_owned(),
        ] {
            let mut bad = row("https://tms.example.com/hooks", SECRET, true);
            bad.broker_id = id.clone();
            let error = refusal(&bad);
            assert!(
                matches!(error, EndpointError::InvalidBrokerId(_)),
                "{id:?}: {error:?}"
            );
        }
        let mut fine = row("https://tms.example.com/hooks", SECRET, true);
        fine.broker_id = format!("Spedition Müller & Söhne {}", "x".repeat(150));
        assert!(BrokerEndpoint::from_row(Some(&fine)).is_ok());
    }

    #[test]
    fn hostile_urls_are_refused_with_a_bounded_reason() {
        let huge = format!("https://tms.example.com/{}", "a".repeat(10_000_000));
        let error = refusal(&row(&huge, SECRET, true));
        assert!(matches!(error, EndpointError::InvalidUrl(_)), "{error:?}");
        assert!(error.to_string().len() < 200, "the URL is not echoed");
        for text in [
            "https://tms.exa\nmple.com/hooks",
            "https://tms.example.com/ho\toks",
            "https://tms.example.com/\u{0}",
            "https://tms.example.com/\u{7f}",
        ] {
            assert!(
                matches!(
                    refusal(&row(text, SECRET, true)),
                    EndpointError::InvalidUrl(_)
                ),
                "{text:?}"
            );
        }
        for text in [
            "https://user:hunter2@tms.example.com/hooks",
            "https://user@tms.example.com/hooks",
        ] {
            let error = refusal(&row(text, SECRET, true));
            assert_eq!(error, EndpointError::CredentialsInUrl);
            assert!(!error.to_string().contains("hunter2"));
        }
        for text in [
            "javascript:alert(1)",
            "file:///etc/passwd",
            "data:text/plain,x",
        ] {
            assert!(
                matches!(
                    refusal(&row(text, SECRET, true)),
                    EndpointError::UnsupportedScheme(_)
                ),
                "{text}"
            );
        }
        assert_eq!(
            BrokerEndpoint::from_row(Some(&row("  https://tms.example.com/h  ", SECRET, true)))
                .unwrap()
                .url
                .as_str(),
            "https://tms.example.com/h",
            "surrounding whitespace is trimmed"
        );
    }

    #[test]
    fn secrets_are_bounded_in_count_and_size() {
        let five = [SECRET; 5].join(" ");
        assert_eq!(
            refusal(&row("https://x", &five, true)),
            EndpointError::TooManySecrets(5)
        );
        let long = format!("whsec_{}", "QUFB".repeat(1000));
        assert!(matches!(
            refusal(&row("https://x", &long, true)),
            EndpointError::SecretTooLong(_)
        ));
        let error = refusal(&row("https://x", "whsec_not*base64*at*all", true));
        assert!(!error.to_string().contains("not*base64"), "{error}");
        assert!(!format!("{:?}", row("https://x", SECRET, true)).contains("MfKQ"));
    }
}
