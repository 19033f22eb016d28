//! Layered settings: `config/base.toml`, then `config/<APP_ENVIRONMENT>.toml`, then `--config FILE`,
//! then `APP__<SECTION>__<KEY>` environment variables. One struct per subsystem; every key is
//! documented in `config/base.toml`. Values are validated once here so the rest of the code can
//! trust them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Upper bound for the event text caps: an index row holds the value plus a broker id and must
/// stay below Postgres's btree limit (about 2,700 bytes).
const MAX_INDEXED_TEXT_BYTES: usize = 1024;

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
    pub retention: RetentionSettings,
}

#[derive(Clone, Deserialize)]
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
    /// A partition with lag whose committed offset has not moved for this long is reported stalled
    /// (so is a broker whose outcomes could not be written for this long).
    pub stall_after_ms: u64,
    /// Where a first deployment (empty ledger, no committed offset) starts. Unset: it does not
    /// consume until told (this key, or `webhook-delivery offsets seed`).
    #[serde(default)]
    pub initial_offsets: Option<InitialOffsets>,
}

/// `kafka.initial_offsets`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InitialOffsets {
    /// Everything the topic still retains: every historical status is sent again.
    Earliest,
    /// Only events produced from now on.
    Latest,
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    pub url: String,
    pub pool_size: usize,
    /// How long a partition lease lasts without renewal (see docs/design.md invariant 3).
    pub lease_ms: u64,
    /// PEM file with the CA(s) that sign the server's certificate. Empty: the built-in public
    /// roots. How it is used depends on `sslmode` in the URL (src/ledger/tls.rs).
    #[serde(default)]
    pub ca_file: String,
    /// Server-side bound on every statement (`statement_timeout`).
    pub statement_timeout_ms: u64,
    /// Client-side bound on every database round trip, and on waiting for a connection.
    pub call_timeout_ms: u64,
    /// Idle time before TCP keepalive probes start on a database connection.
    pub keepalive_idle_ms: u64,
    /// Whether an attempt outcome's commit waits for its WAL flush (claims keep the server's
    /// setting, whatever this says).
    pub outcome_commit: OutcomeCommit,
}

/// `postgres.outcome_commit`: how attempt outcomes are committed (docs/decisions.md 23).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeCommit {
    /// As the server's `synchronous_commit` says (normally: wait for the WAL flush).
    Durable,
    /// `synchronous_commit = off` for outcome writes: a database crash can forget the last
    /// fraction of a second of outcomes, and those deliveries are sent again, in order.
    Async,
}

impl OutcomeCommit {
    /// The `-c` option for the outcome writers' connections, if any.
    pub fn session_option(self) -> Option<&'static str> {
        match self {
            OutcomeCommit::Durable => None,
            OutcomeCommit::Async => Some("-c synchronous_commit=off"),
        }
    }
}

/// Never prints a secret: `kafka.client` values whose key names a password, secret or key
/// (`sasl.password`, `ssl.key.pem`, ...) are redacted. Settings are logged and end up in panic
/// messages; credentials must not.
impl std::fmt::Debug for KafkaSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let client: BTreeMap<&str, &str> = self
            .client
            .iter()
            .map(|(key, value)| {
                let shown = if is_secret_kafka_property(key) {
                    REDACTED
                } else {
                    value.as_str()
                };
                (key.as_str(), shown)
            })
            .collect();
        f.debug_struct("KafkaSettings")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("group_id", &self.group_id)
            .field("session_timeout_ms", &self.session_timeout_ms)
            .field("max_poll_interval_ms", &self.max_poll_interval_ms)
            .field("max_batch_messages", &self.max_batch_messages)
            .field("revoke_drain_timeout_ms", &self.revoke_drain_timeout_ms)
            .field("client", &client)
            .finish_non_exhaustive()
    }
}

const REDACTED: &str = "<redacted>";

/// librdkafka properties that hold credentials or key material (or a path to it, harmless to
/// hide): `sasl.password`, `ssl.key.password`, `ssl.keystore.password`, `ssl.key.pem`,
/// `sasl.oauthbearer.client.secret`, `sasl.oauthbearer.config`, `sasl.kerberos.keytab`, ...
pub(crate) fn is_secret_kafka_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "key",
        "pem",
        "oauthbearer.config",
        "jaas",
    ]
    .iter()
    .any(|word| key.contains(word))
}

/// Never prints the database password: the URL is shown with its password (in the user info or
/// a `password=` query parameter) replaced.
impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("url", &redact_postgres_url(&self.url))
            .field("pool_size", &self.pool_size)
            .field("lease_ms", &self.lease_ms)
            .field("ca_file", &self.ca_file)
            .field("statement_timeout_ms", &self.statement_timeout_ms)
            .field("call_timeout_ms", &self.call_timeout_ms)
            .field("keepalive_idle_ms", &self.keepalive_idle_ms)
            .finish_non_exhaustive()
    }
}

fn redact_postgres_url(text: &str) -> String {
    let Ok(mut url) = url::Url::parse(text) else {
        return "<unparseable url, redacted>".to_owned();
    };
    if url.password().is_some() {
        // Cannot fail: a URL that has a password has a host.
        let _ = url.set_password(Some(REDACTED));
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> = url
            .query_pairs()
            .map(|(key, value)| {
                let value = if key.to_ascii_lowercase().contains("password") {
                    REDACTED.to_owned()
                } else {
                    value.into_owned()
                };
                (key.into_owned(), value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    url.to_string()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliverySettings {
    pub request_timeout_ms: u64,
    pub mailbox_capacity: usize,
    pub max_in_flight_per_broker: usize,
    /// Whether a broker's concurrency adapts to its endpoint's round trips, up to
    /// `max_in_flight_per_broker` (src/core/concurrency.rs); if not, it is fixed at that.
    pub adaptive_in_flight: bool,
    /// Ledger page reads under way at once across all DeliveryActors.
    pub max_concurrent_ledger_loads: usize,
    /// A broker's actor with nothing to do for this long stops; a new one starts on demand.
    pub idle_actor_ms: u64,
    /// Bytes of deliveries held in memory, all brokers together.
    pub max_buffered_bytes: usize,
    /// Webhook sockets open at once, all brokers together; 0: three quarters of the open-files
    /// limit (src/connection_budget.rs).
    pub max_outbound_connections: usize,
    /// A broker's idle sockets are closed (and their budget given back) once none of its
    /// requests has been in flight for this long.
    pub connection_keep_alive_ms: u64,
    pub max_message_bytes: usize,
    /// Byte caps for an event's `eventId`, `loadId` and `status` (storable and indexable).
    pub max_event_id_bytes: usize,
    pub max_load_id_bytes: usize,
    pub max_status_bytes: usize,
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
                    REDACTED
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

/// How long finished rows stay in the ledger, and how the cleaner paces itself (src/retention.rs).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSettings {
    /// Off: nothing is ever removed.
    pub enabled: bool,
    /// Delivered deliveries (with their attempts) are removed this long after delivery; events
    /// this long after consumption, once none of their deliveries is left.
    pub delivered_ms: u64,
    /// Dead deliveries (with their attempts) are removed this long after they died.
    pub dead_ms: u64,
    /// Rejected messages are removed this long after they were rejected.
    pub rejected_ms: u64,
    /// Pause between two cleaning passes.
    pub interval_ms: u64,
    /// Rows one cleaning statement looks at (its LIMIT).
    pub batch_rows: u32,
    /// Pause between two statements of a pass.
    pub batch_pause_ms: u64,
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
        let (client_properties, environment) =
            split_kafka_client_environment(std::env::vars_os().filter_map(|(name, value)| {
                Some((name.into_string().ok()?, value.into_string().ok()?))
            }));
        let mut settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("APP")
                    .prefix_separator("__")
                    .separator("__")
                    .list_separator(",")
                    .with_list_parse_key("delivery.allowed_networks")
                    .try_parsing(true)
                    .source(Some(environment)),
            )
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(ConfigError::Load)?;
        settings.kafka.client.extend(client_properties);
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
        if self.kafka.client.contains_key("auto.offset.reset") {
            return Err(invalid(
                "kafka.client",
                "`auto.offset.reset` is set by the service itself (a partition without a committed \
                 offset starts at the earliest message); a first deployment's starting point is \
                 kafka.initial_offsets or `webhook-delivery offsets seed`",
            ));
        }
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
            "postgres.statement_timeout_ms",
            self.postgres.statement_timeout_ms,
        )?;
        if self.postgres.call_timeout_ms <= self.postgres.statement_timeout_ms {
            return Err(invalid(
                "postgres.call_timeout_ms",
                "must exceed postgres.statement_timeout_ms, so the server's error arrives first",
            ));
        }
        if self.postgres.keepalive_idle_ms < 1_000 {
            return Err(invalid(
                "postgres.keepalive_idle_ms",
                "must be at least 1000",
            ));
        }
        if self.kafka.stall_after_ms < 5_000 {
            return Err(invalid(
                "kafka.stall_after_ms",
                "must be at least 5000 (offsets are committed every second; shorter reports noise)",
            ));
        }
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
        if !(1..=self.postgres.pool_size).contains(&self.delivery.max_concurrent_ledger_loads) {
            return Err(invalid(
                "delivery.max_concurrent_ledger_loads",
                "must be between 1 and postgres.pool_size (claims and outcome writes need connections too)",
            ));
        }
        positive("delivery.idle_actor_ms", self.delivery.idle_actor_ms)?;
        positive(
            "delivery.connection_keep_alive_ms",
            self.delivery.connection_keep_alive_ms,
        )?;
        if self.delivery.max_buffered_bytes < 2 * self.delivery.max_message_bytes {
            return Err(invalid(
                "delivery.max_buffered_bytes",
                "must be at least twice delivery.max_message_bytes, so the largest event always fits",
            ));
        }
        if self.delivery.max_message_bytes < 64 {
            return Err(invalid("delivery.max_message_bytes", "must be at least 64"));
        }
        for (key, value) in [
            (
                "delivery.max_event_id_bytes",
                self.delivery.max_event_id_bytes,
            ),
            (
                "delivery.max_load_id_bytes",
                self.delivery.max_load_id_bytes,
            ),
            ("delivery.max_status_bytes", self.delivery.max_status_bytes),
        ] {
            // 1024 keeps every index row (a key plus a broker id) far below Postgres's ~2.7 kB.
            if !(1..=MAX_INDEXED_TEXT_BYTES).contains(&value) {
                return Err(invalid(
                    key,
                    format!("must be between 1 and {MAX_INDEXED_TEXT_BYTES}"),
                ));
            }
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
        let retention = &self.retention;
        positive("retention.delivered_ms", retention.delivered_ms)?;
        positive("retention.dead_ms", retention.dead_ms)?;
        positive("retention.rejected_ms", retention.rejected_ms)?;
        positive("retention.interval_ms", retention.interval_ms)?;
        // Large enough to keep up with thousands of deliveries a second, small enough that one
        // statement stays far below statement_timeout_ms and holds its row locks briefly.
        if !(100..=50_000).contains(&retention.batch_rows) {
            return Err(invalid(
                "retention.batch_rows",
                "must be between 100 and 50000",
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
    pub fn stall_after(&self) -> Duration {
        Duration::from_millis(self.stall_after_ms)
    }
}

impl PostgresSettings {
    pub fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms)
    }
    pub fn ca_file(&self) -> Option<&Path> {
        Some(Path::new(&self.ca_file)).filter(|_| !self.ca_file.is_empty())
    }

    pub fn time_bounds(&self) -> crate::ledger::TimeBounds {
        crate::ledger::TimeBounds {
            statement_timeout: Duration::from_millis(self.statement_timeout_ms),
            call_timeout: Duration::from_millis(self.call_timeout_ms),
            keepalive_idle: Duration::from_millis(self.keepalive_idle_ms),
        }
    }
}

impl DeliverySettings {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn ledger_poll_interval(&self) -> Duration {
        Duration::from_millis(self.ledger_poll_interval_ms)
    }
    pub fn idle_actor(&self) -> Duration {
        Duration::from_millis(self.idle_actor_ms)
    }
    pub fn connection_keep_alive(&self) -> Duration {
        Duration::from_millis(self.connection_keep_alive_ms)
    }
    pub fn event_limits(&self) -> crate::core::event::EventLimits {
        crate::core::event::EventLimits {
            max_message_bytes: self.max_message_bytes,
            max_event_id_bytes: self.max_event_id_bytes,
            max_load_id_bytes: self.max_load_id_bytes,
            max_status_bytes: self.max_status_bytes,
        }
    }
    pub fn network_policy(&self) -> crate::core::ssrf::NetworkPolicy {
        crate::core::ssrf::NetworkPolicy {
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
    pub fn policy(&self) -> crate::core::policy::RetryPolicy {
        crate::core::policy::RetryPolicy {
            max_attempts: self.max_attempts,
            base_delay: Duration::from_millis(self.base_delay_ms),
            max_delay: Duration::from_millis(self.max_delay_ms),
        }
    }
}

impl RetentionSettings {
    pub fn delivered(&self) -> Duration {
        Duration::from_millis(self.delivered_ms)
    }
    pub fn dead(&self) -> Duration {
        Duration::from_millis(self.dead_ms)
    }
    pub fn rejected(&self) -> Duration {
        Duration::from_millis(self.rejected_ms)
    }
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms)
    }
    pub fn batch_pause(&self) -> Duration {
        Duration::from_millis(self.batch_pause_ms)
    }
}

impl ShutdownSettings {
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

/// Separates `APP__KAFKA__CLIENT__<NAME>` variables from the rest of the environment. Their name
/// maps to the librdkafka property with `__` as the dot (`APP__KAFKA__CLIENT__SASL__PASSWORD` is
/// `sasl.password`), and their value is kept verbatim: the generic parsing would turn a password
/// such as `007` into the number 7, and a dotted name into a nested table.
fn split_kafka_client_environment(
    variables: impl Iterator<Item = (String, String)>,
) -> (BTreeMap<String, String>, config::Map<String, String>) {
    const PREFIX: &str = "app__kafka__client__";
    let mut client = BTreeMap::new();
    let mut rest = config::Map::new();
    for (name, value) in variables {
        let lower = name.to_ascii_lowercase();
        match lower.strip_prefix(PREFIX) {
            Some(property) if !property.is_empty() => {
                client.insert(property.replace("__", "."), value);
            }
            _ => {
                rest.insert(name, value);
            }
        }
    }
    (client, rest)
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
        // A first deployment must be told where to start.
        assert_eq!(settings.kafka.initial_offsets, None);
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
            (
                "[kafka.client]\n\"auto.offset.reset\" = \"latest\"\n",
                "kafka.initial_offsets",
            ),
            ("[kafka]\ninitial_offsets = \"newest\"\n", "initial_offsets"),
            ("[postgres]\noutcome_commit = \"fast\"\n", "outcome_commit"),
            ("[log]\nlevel = \"info,[\"\n", "log.level"),
            ("[admin]\ntoken = \"short\"\n", "admin.token"),
            ("[retention]\ndelivered_ms = 0\n", "retention.delivered_ms"),
            ("[retention]\nbatch_rows = 1\n", "retention.batch_rows"),
            (
                "[delivery]\nmax_event_id_bytes = 5000\n",
                "delivery.max_event_id_bytes",
            ),
            (
                "[delivery]\nmax_status_bytes = 0\n",
                "delivery.max_status_bytes",
            ),
            (
                "[postgres]\ncall_timeout_ms = 10\n",
                "postgres.call_timeout_ms",
            ),
            ("[kafka]\nstall_after_ms = 10\n", "kafka.stall_after_ms"),
            (
                "[delivery]\nconnection_keep_alive_ms = 0\n",
                "delivery.connection_keep_alive_ms",
            ),
            (
                "[delivery]\nmax_outbound_connections = -1\n",
                "max_outbound_connections",
            ),
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
    fn kafka_client_variables_map_to_dotted_properties_verbatim() {
        let (client, rest) = split_kafka_client_environment(
            [
                ("APP__KAFKA__CLIENT__SASL__PASSWORD", "007"),
                ("APP__KAFKA__CLIENT__SECURITY__PROTOCOL", "SASL_SSL"),
                ("APP__KAFKA__BROKERS", "b:9093"),
                ("PATH", "/bin"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        );
        assert_eq!(client["sasl.password"], "007");
        assert_eq!(client["security.protocol"], "SASL_SSL");
        assert_eq!(client.len(), 2);
        assert_eq!(rest["APP__KAFKA__BROKERS"], "b:9093");
        assert!(rest.contains_key("PATH"));
    }

    #[test]
    fn debug_hides_the_database_password_and_kafka_credentials() {
        for (url, shown) in [
            (
                "postgres://svc:s3cret@db:5432/ledger",
                "postgres://svc:%3Credacted%3E@db:5432/ledger",
            ),
            (
                "postgres://svc@db/ledger?sslmode=require&password=s3cret",
                "postgres://svc@db/ledger?sslmode=require&password=%3Credacted%3E",
            ),
            ("postgres://svc@db/ledger", "postgres://svc@db/ledger"),
            ("postgres://svc:s3cret@[::1", "<unparseable url, redacted>"),
        ] {
            assert_eq!(redact_postgres_url(url), shown);
        }
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "ssl.key.pem",
            "sasl.oauthbearer.client.secret",
            "sasl.oauthbearer.config",
        ] {
            assert!(is_secret_kafka_property(key), "{key}");
        }
        for key in ["security.protocol", "sasl.mechanism", "sasl.username"] {
            assert!(!is_secret_kafka_property(key), "{key}");
        }
    }

    #[test]
    fn a_missing_config_file_is_reported() {
        let result = Settings::load(&config_dir(), Some(Path::new("/nonexistent/wd.toml")));
        assert!(message(result).contains("/nonexistent/wd.toml"));
    }
}
