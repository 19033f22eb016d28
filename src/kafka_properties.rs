//! librdkafka's verdict on `kafka.client`. Those properties are passed through verbatim, so only
//! librdkafka knows whether a name or a value is valid. Asking it once at start-up, before any
//! actor or thread exists, turns a typo into one error naming `kafka.client.<name>` instead of a
//! failure deep inside the consumer thread.
//!
//! Secrets (`sasl.password`, `ssl.key.pem`, ...) never appear in what this module reports:
//! librdkafka quotes the refused value in some of its messages, so those values are scrubbed.

use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;

use crate::config::{is_secret_kafka_property, KafkaSettings};

/// No `#[source]`: librdkafka's reason is the whole story, and rdkafka's error type would print
/// the refused value, which may be a secret.
#[derive(Debug, thiserror::Error)]
pub enum KafkaPropertyError {
    #[error("kafka.client.{key} is refused by librdkafka: {reason}")]
    Property { key: String, reason: String },
    #[error("kafka.client is refused by librdkafka: {reason}")]
    Client { reason: String },
}

/// Checks every `kafka.client` property on its own (so a refusal names its key), then creates a
/// consumer from the exact configuration the service uses (so combinations and files, such as an
/// unreadable `ssl.ca.location`, are checked too). The consumer never subscribes and is dropped
/// at once. Blocking for a moment; call it before the runtime has work to do.
pub fn check(settings: &KafkaSettings) -> Result<(), KafkaPropertyError> {
    let scrub = |text: &str| scrub_secrets(text, settings);
    for (key, value) in &settings.client {
        if let Err(error) = ClientConfig::new().set(key, value).create_native_config() {
            return Err(KafkaPropertyError::Property {
                key: key.clone(),
                reason: scrub(&librdkafka_reason(&error)),
            });
        }
    }
    match crate::kafka::client_config(settings).create::<BaseConsumer>() {
        Ok(_consumer) => Ok(()),
        Err(error) => {
            let reason = scrub(&librdkafka_reason(&error));
            // librdkafka names the property it could not use ("ssl.ca.location failed: ...").
            match settings
                .client
                .keys()
                .filter(|key| reason.contains(key.as_str()))
                .max_by_key(|key| key.len())
            {
                Some(key) => Err(KafkaPropertyError::Property {
                    key: key.clone(),
                    reason,
                }),
                None => Err(KafkaPropertyError::Client { reason }),
            }
        }
    }
}

/// The optional parts librdkafka was built with (`ssl`, `sasl_plain`, `sasl_scram`, ...), as it
/// reports them in its `builtin.features` property.
pub fn builtin_features() -> Vec<String> {
    ClientConfig::new()
        .create_native_config()
        .and_then(|config| config.get("builtin.features"))
        .map(|features| {
            features
                .trim_end_matches('\0')
                .split(',')
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// librdkafka's own words, without rdkafka's wrapper (which appends the refused value).
fn librdkafka_reason(error: &KafkaError) -> String {
    match error {
        KafkaError::ClientConfig(_, description, _, _) => description.clone(),
        KafkaError::ClientCreation(reason) => reason.clone(),
        other => other.to_string(),
    }
}

fn scrub_secrets(text: &str, settings: &KafkaSettings) -> String {
    settings
        .client
        .iter()
        .filter(|(key, value)| is_secret_kafka_property(key) && !value.is_empty())
        .fold(text.to_owned(), |text, (_, value)| {
            text.replace(value.as_str(), "<redacted>")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The defaults of config/base.toml with these `kafka.client` properties only.
    fn settings(client: &[(&str, &str)]) -> KafkaSettings {
        let config_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut settings = crate::config::Settings::load(&config_dir, None)
            .unwrap()
            .kafka;
        settings.brokers = "127.0.0.1:9".into();
        settings.client = client
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>();
        settings
    }

    #[test]
    fn librdkafka_is_built_with_ssl_and_sasl() {
        let features = builtin_features();
        for feature in ["ssl", "sasl_plain", "sasl_scram"] {
            assert!(
                features.iter().any(|f| f == feature),
                "{feature} missing from {features:?}"
            );
        }
    }

    #[test]
    fn a_hosted_kafka_configuration_is_accepted() {
        let settings = settings(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "webhook-delivery"),
            ("sasl.password", "hunter2-but-longer"),
        ]);
        check(&settings).expect("librdkafka accepts SASL_SSL with SCRAM");
    }

    #[test]
    fn an_unknown_property_is_named() {
        let error = check(&settings(&[("no.such.property", "x")])).unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("kafka.client.no.such.property "), "{text}");
        assert!(text.contains("No such configuration property"), "{text}");
    }

    #[test]
    fn a_bad_value_is_named_with_librdkafkas_reason() {
        let error = check(&settings(&[("security.protocol", "SASL_TLS")])).unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("kafka.client.security.protocol "),
            "{text}"
        );
        assert!(text.contains("Invalid value"), "{text}");
    }

    #[test]
    fn a_property_librdkafka_cannot_use_at_creation_is_named() {
        let error = check(&settings(&[
            ("security.protocol", "SSL"),
            ("ssl.ca.location", "/nonexistent/ca.pem"),
        ]))
        .unwrap_err();
        let text = error.to_string();
        assert!(text.starts_with("kafka.client.ssl.ca.location "), "{text}");
    }

    #[test]
    fn secrets_are_scrubbed_from_reasons() {
        let settings = settings(&[("sasl.password", "s3cr3t-value")]);
        assert_eq!(
            scrub_secrets("bad value \"s3cr3t-value\" here", &settings),
            "bad value \"<redacted>\" here"
        );
        assert!(is_secret_kafka_property("ssl.key.password"));
        assert!(!is_secret_kafka_property("ssl.ca.location"));
        assert!(!is_secret_kafka_property("sasl.username"));
    }
}
