//! Why a bench run could not be carried out (as opposed to a system scoring badly, which is a
//! result, not an error).

use rdkafka::error::KafkaError;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid service configuration")]
    Config(#[from] webhook_delivery::config::ConfigError),
    #[error("could not prepare the ledger schema")]
    Ledger(#[from] webhook_delivery::ledger::LedgerError),
    #[error("could not read consumer-group offsets")]
    Offsets(#[from] webhook_delivery::offsets::OffsetsError),
    #[error("postgres: {context}")]
    Postgres {
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("kafka: {context}")]
    Kafka {
        context: String,
        #[source]
        source: KafkaError,
    },
    #[error("http client: {context}")]
    Http {
        context: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("the service failed: {0}")]
    Service(String),
}

impl BenchError {
    pub fn postgres(context: impl Into<String>, source: tokio_postgres::Error) -> BenchError {
        BenchError::Postgres {
            context: context.into(),
            source,
        }
    }

    pub fn kafka(context: impl Into<String>, source: KafkaError) -> BenchError {
        BenchError::Kafka {
            context: context.into(),
            source,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> BenchError {
        BenchError::Io {
            context: context.into(),
            source,
        }
    }
}

/// The error with its whole `source` chain, for the one line printed on failure.
pub fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}
