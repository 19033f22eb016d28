//! Layered settings: `config/base.toml`, then `config/<APP_ENVIRONMENT>.toml`, then `--config FILE`,
//! then `APP__<SECTION>__<KEY>` environment variables. One struct per subsystem; every key is
//! documented in `config/base.toml`. Values are validated once here so the rest of the code can
//! trust them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not load configuration: {0}")]
    Load(#[source] config::ConfigError),
    #[error("configuration file {path} does not exist")]
    MissingFile { path: PathBuf },
    #[error("invalid configuration value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub postgres: PostgresSettings,
    pub delivery: DeliverySettings,
    pub retry: RetrySettings,
    pub circuit_breaker: CircuitBreakerSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: String,
    pub group_id: String,
    pub session_timeout_ms: u64,
    pub max_poll_interval_ms: u64,
    /// Most messages a PartitionActor claims in one ledger round trip.
    pub max_batch_messages: usize,
    /// How long a revoked partition may take to finish its current batch before we let go.
    pub revoke_drain_timeout_ms: u64,
    /// Extra librdkafka properties, passed through verbatim (the platform team's settings).
    #[serde(default)]
    pub client: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    pub url: String,
    pub pool_size: usize,
    /// How long a partition lease lasts without renewal (see docs/design.md invariant 3).
    pub lease_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    pub request_timeout_ms: u64,
    pub mailbox_capacity: usize,
    pub max_in_flight_per_broker: usize,
    pub max_message_bytes: usize,
    /// How often the ledger is swept for due deliveries that are not in any mailbox.
    pub ledger_poll_interval_ms: u64,
    /// Response bodies are read up to this many bytes (kept for diagnosis), the rest discarded.
    pub max_response_bytes: usize,
    pub user_agent: String,
    /// Plain-http webhook URLs are refused unless this is true (tests and local demos only).
    pub allow_http: bool,
    /// Internal address ranges (loopback, private, link-local...) that webhooks may target anyway.
    #[serde(default)]
    pub allowed_networks: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub base_delay_ms: u64,
    pub max_delay_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakerSettings {
    pub failure_threshold: u32,
    pub failure_ratio: f64,
    pub min_requests: u32,
    pub window_ms: u64,
    pub open_ms: u64,
    pub max_open_ms: u64,
    pub half_open_probes: u32,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSettings {
    pub bind: std::net::SocketAddr,
    /// Bearer token for the routes that change state. Empty: those routes are off.
    pub token: String,
}

/// Never prints the token.
impl std::fmt::Debug for AdminSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminSettings")
            .field("bind", &self.bind)
            .field(
                "token",
                &if self.token.is_empty() {
                    "<unset>"
                } else {
                    "<redacted>"
                },
            )
            .finish()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub level: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSettings {
    /// On SIGTERM, in-flight requests get this long to finish; the rest stay pending.
    pub drain_timeout_ms: u64,
}

impl Settings {
    /// Loads the layered configuration from `config_dir` (normally `./config`).
    pub fn load(config_dir: &Path, extra_file: Option<&Path>) -> Result<Settings, ConfigError> {
        let environment = std::env::var("APP_ENVIRONMENT").unwrap_or_else(|_| "local".into());
        let mut builder = config::Config::builder()
            .add_source(config::File::from(config_dir.join("base.toml")).required(true))
            .add_source(
                config::File::from(config_dir.join(format!("{environment}.toml"))).required(false),
            );
        if let Some(path) = extra_file {
            if !path.exists() {
                return Err(ConfigError::MissingFile {
                    path: path.to_path_buf(),
                });
            }
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("APP")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("delivery.allowed_networks")
                    .try_parsing(true),
            )
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(ConfigError::Load)?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks what serde cannot: ranges and relations between keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key,
                reason: reason.into(),
            }
        }
        fn positive(key: &'static str, value: u64) -> Result<(), ConfigError> {
            if value == 0 {
                return Err(invalid(key, "must be greater than 0"));
            }
            Ok(())
        }
        if self.kafka.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must name at least one host:port"));
        }
        if self.kafka.topic.trim().is_empty() {
            return Err(invalid("kafka.topic", "must not be empty"));
        }
        if self.kafka.group_id.trim().is_empty() {
            return Err(invalid("kafka.group_id", "must not be empty"));
        }
        positive("kafka.session_timeout_ms", self.kafka.session_timeout_ms)?;
        if self.kafka.max_poll_interval_ms < self.kafka.session_timeout_ms {
            return Err(invalid(
                "kafka.max_poll_interval_ms",
                "must be at least kafka.session_timeout_ms",
            ));
        }
        positive(
            "kafka.max_batch_messages",
            self.kafka.max_batch_messages as u64,
        )?;
        for key in self.kafka.client.keys() {
            if matches!(
                key.as_str(),
                "enable.auto.offset.store" | "group.id" | "bootstrap.servers"
            ) {
                return Err(invalid(
                    "kafka.client",
                    format!("`{key}` is set by the service itself and may not be overridden"),
                ));
            }
        }
        if !self.postgres.url.starts_with("postgres://")
            && !self.postgres.url.starts_with("postgresql://")
        {
            return Err(invalid(
                "postgres.url",
                "must be a postgres:// or postgresql:// URL",
            ));
        }
        positive("postgres.pool_size", self.postgres.pool_size as u64)?;
        positive(
            "delivery.request_timeout_ms",
            self.delivery.request_timeout_ms,
        )?;
        if self.postgres.lease_ms < 2 * self.delivery.request_timeout_ms + 1_000 {
            return Err(invalid(
                "postgres.lease_ms",
                "must exceed twice delivery.request_timeout_ms plus one second, \
                 so an in-flight request always ends inside the lease",
            ));
        }
        positive(
            "delivery.mailbox_capacity",
            self.delivery.mailbox_capacity as u64,
        )?;
        positive(
            "delivery.max_in_flight_per_broker",
            self.delivery.max_in_flight_per_broker as u64,
        )?;
        if self.delivery.max_message_bytes < 64 {
            return Err(invalid("delivery.max_message_bytes", "must be at least 64"));
        }
        positive(
            "delivery.ledger_poll_interval_ms",
            self.delivery.ledger_poll_interval_ms,
        )?;
        positive("retry.max_attempts", u64::from(self.retry.max_attempts))?;
        positive("retry.base_delay_ms", self.retry.base_delay_ms)?;
        if self.retry.max_delay_ms < self.retry.base_delay_ms {
            return Err(invalid(
                "retry.max_delay_ms",
                "must be at least retry.base_delay_ms",
            ));
        }
        let breaker = &self.circuit_breaker;
        positive(
            "circuit_breaker.failure_threshold",
            u64::from(breaker.failure_threshold),
        )?;
        if !(breaker.failure_ratio > 0.0 && breaker.failure_ratio <= 1.0) {
            return Err(invalid(
                "circuit_breaker.failure_ratio",
                "must be in (0, 1]",
            ));
        }
        positive(
            "circuit_breaker.min_requests",
            u64::from(breaker.min_requests),
        )?;
        positive("circuit_breaker.window_ms", breaker.window_ms)?;
        positive("circuit_breaker.open_ms", breaker.open_ms)?;
        if breaker.max_open_ms < breaker.open_ms {
            return Err(invalid(
                "circuit_breaker.max_open_ms",
                "must be at least circuit_breaker.open_ms",
            ));
        }
        positive(
            "circuit_breaker.half_open_probes",
            u64::from(breaker.half_open_probes),
        )?;
        if !self.admin.token.is_empty() && self.admin.token.len() < 16 {
            return Err(invalid(
                "admin.token",
                "must be empty (mutating routes off) or at least 16 characters",
            ));
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log.level).is_err() {
            return Err(invalid(
                "log.level",
                format!("`{}` is not a valid log filter", self.log.level),
            ));
        }
        Ok(())
    }
}

impl KafkaSettings {
    pub fn revoke_drain_timeout(&self) -> Duration {
        Duration::from_millis(self.revoke_drain_timeout_ms)
    }
}

impl PostgresSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
}

impl DeliverySettings {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn ledger_poll_interval(&self) -> Duration {
        Duration::from_millis(self.ledger_poll_interval_ms)
    }
    pub fn network_policy(&self) -> crate::ssrf::NetworkPolicy {
        crate::ssrf::NetworkPolicy {
            allow_http: self.allow_http,
            allowed_networks: self.allowed_networks.clone(),
        }
    }
}

impl CircuitBreakerSettings {
    pub fn breaker_config(&self) -> crate::core::breaker::BreakerConfig {
        crate::core::breaker::BreakerConfig {
            failure_threshold: self.failure_threshold,
            failure_ratio: self.failure_ratio,
            min_requests: self.min_requests,
            window: Duration::from_millis(self.window_ms),
            open: Duration::from_millis(self.open_ms),
            max_open: Duration::from_millis(self.max_open_ms),
            half_open_probes: self.half_open_probes,
        }
    }
}

impl RetrySettings {
    pub fn policy(&self) -> crate::policy::RetryPolicy {
        crate::policy::RetryPolicy {
            max_attempts: self.max_attempts,
            base_delay: Duration::from_millis(self.base_delay_ms),
            max_delay: Duration::from_millis(self.max_delay_ms),
        }
    }
}

impl ShutdownSettings {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// Where `config/` lives: `APP_CONFIG_DIR` if set, else `./config`.
pub fn default_config_dir() -> PathBuf {
    std::env::var_os("APP_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("config"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn config_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
    }

    fn load_with(toml: &str) -> Result<Settings, ConfigError> {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(toml.as_bytes()).unwrap();
        Settings::load(&config_dir(), Some(file.path()))
    }

    fn message(result: Result<Settings, ConfigError>) -> String {
        let error = result.expect_err("configuration is refused");
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    }

    #[test]
    fn the_defaults_file_is_valid() {
        let settings = Settings::load(&config_dir(), None).unwrap();
        assert_eq!(settings.kafka.topic, "shipment-events");
        assert_eq!(settings.kafka.client["auto.offset.reset"], "earliest");
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key() {
        let text = message(load_with("[delivery]\nrequest_timeout_ms = \"soon\"\n"));
        assert!(text.contains("request_timeout_ms"), "{text}");
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let text = message(load_with("[delivery]\nrequest_timeout = 5\n"));
        assert!(text.contains("request_timeout"), "{text}");
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        let cases = [
            (
                "[delivery]\nmax_in_flight_per_broker = 0\n",
                "delivery.max_in_flight_per_broker",
            ),
            (
                "[delivery]\nmailbox_capacity = 0\n",
                "delivery.mailbox_capacity",
            ),
            ("[retry]\nmax_delay_ms = 1\n", "retry.max_delay_ms"),
            (
                "[circuit_breaker]\nfailure_ratio = 1.5\n",
                "circuit_breaker.failure_ratio",
            ),
            (
                "[circuit_breaker]\nmax_open_ms = 1\n",
                "circuit_breaker.max_open_ms",
            ),
            ("[postgres]\nurl = \"mysql://x\"\n", "postgres.url"),
            ("[postgres]\nlease_ms = 1000\n", "postgres.lease_ms"),
            (
                "[kafka]\nmax_poll_interval_ms = 1\n",
                "kafka.max_poll_interval_ms",
            ),
            ("[kafka.client]\n\"group.id\" = \"other\"\n", "kafka.client"),
            ("[log]\nlevel = \"info,[\"\n", "log.level"),
            ("[admin]\ntoken = \"short\"\n", "admin.token"),
        ];
        for (toml, key) in cases {
            let text = message(load_with(toml));
            assert!(text.contains(key), "{key}: {text}");
        }
    }

    #[test]
    fn allowed_networks_parse_as_cidrs_and_bad_ones_name_the_key() {
        let settings =
            load_with("[delivery]\nallowed_networks = [\"127.0.0.0/8\", \"::1/128\"]\n").unwrap();
        assert_eq!(settings.delivery.allowed_networks.len(), 2);
        let text = message(load_with(
            "[delivery]\nallowed_networks = [\"localhost\"]\n",
        ));
        assert!(text.contains("allowed_networks"), "{text}");
    }

    #[test]
    fn a_missing_config_file_is_reported() {
        let result = Settings::load(&config_dir(), Some(Path::new("/nonexistent/wd.toml")));
        assert!(message(result).contains("/nonexistent/wd.toml"));
    }
}
