//! A broker's endpoint, parsed once from its `brokers` row. Pure: no I/O.

use crate::ledger::BrokerRow;
use crate::signing::{SecretError, SigningSecret};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EndpointError {
    #[error("broker is disabled")]
    Disabled,
    #[error("broker row no longer exists")]
    Missing,
    #[error("webhook_url is not a valid URL: {0}")]
    InvalidUrl(String),
    #[error("webhook_url must be http or https, not `{0}`")]
    UnsupportedScheme(String),
    #[error("signing_secret is invalid: {0}")]
    InvalidSecret(#[source] SecretError),
}

/// Where and how to send a broker's webhooks. Debug never prints the secrets.
#[derive(Debug, Clone)]
pub struct BrokerEndpoint {
    pub url: url::Url,
    pub secrets: Vec<SigningSecret>,
}

impl BrokerEndpoint {
    /// `signing_secret` may hold several `whsec_` secrets separated by spaces (rotation).
    pub fn from_row(row: Option<&BrokerRow>) -> Result<BrokerEndpoint, EndpointError> {
        let row = row.ok_or(EndpointError::Missing)?;
        if !row.enabled {
            return Err(EndpointError::Disabled);
        }
        let url = url::Url::parse(row.webhook_url.trim())
            .map_err(|e| EndpointError::InvalidUrl(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(EndpointError::UnsupportedScheme(url.scheme().to_owned()));
        }
        let secrets = row
            .signing_secret
            .split_whitespace()
            .map(SigningSecret::parse)
            .collect::<Result<Vec<_>, _>>()
            .map_err(EndpointError::InvalidSecret)?;
        if secrets.is_empty() {
            return Err(EndpointError::InvalidSecret(SecretError::MissingPrefix));
        }
        Ok(BrokerEndpoint { url, secrets })
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
}
