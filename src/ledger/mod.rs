//! The Postgres ledger: the only module that speaks SQL. Every statement is parameterized; batch
//! statements pass arrays through `unnest` so one poll batch is one round trip (docs/design.md 6).

mod backfill;
mod dead_letters;
mod migrations;
mod reports;
mod retention;
mod tls;

pub use backfill::{BackfillOutcome, BackfillRequest, BackfillSummary, BACKFILL_SCAN_ROWS};
pub use dead_letters::{
    DeadLetter, ReplayAnnouncements, ReplayOutcome, ReplaySelector, ReplayedBrokers,
};
pub use migrations::{
    known_schema_versions, latest_schema_version, MigrationScope, SchemaStatus,
    REQUIRED_SCHEMA_VERSION,
};
pub use reports::{AttemptStory, BrokerStatus, DeliveryStory, DuplicateDelivery, EventStory};
pub use retention::{
    DeliveriesBatch, EventCursor, EventsBatch, RetentionSession, EVENT_WALK_START,
};
pub use tls::{PostgresTlsError, SslMode};

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Statement, ToStatement};

use crate::config::PostgresSettings;
use crate::core::event::{IdempotencyKey, ShipmentEvent};
use crate::core::scheduler::PartitionCursor;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("invalid postgres url")]
    InvalidUrl(#[source] tokio_postgres::Error),
    #[error("could not build the connection pool: {0}")]
    PoolBuild(String),
    #[error("no database connection available")]
    Pool(#[source] deadpool_postgres::PoolError),
    /// TLS settings that cannot work, or a server certificate that was refused.
    #[error(transparent)]
    Tls(#[from] PostgresTlsError),
    #[error("database query failed: {}", describe(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("the database did not answer within {after:?}")]
    TimedOut { after: Duration },
    #[error("migration {version} failed: {}", describe(.source))]
    Migration {
        version: i32,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error(
        "the ledger schema is too old for this build (newest migration applied: {}, this build \
         needs every transactional migration up to {required}; missing: {missing:?}): run \
         `webhook-delivery migrate` first (safe while older instances run; RUNBOOK.md \"Deploying \
         a new version\")",
        applied.map_or_else(|| "none".to_owned(), |v| v.to_string())
    )]
    SchemaTooOld {
        applied: Option<i32>,
        required: i32,
        missing: Vec<i32>,
    },
}

/// What a ledger error means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The database is away, busy or was interrupted: back off and try the same thing again.
    Retryable,
    /// The database refused these values (SQLSTATE classes 22, 23, 54): trying again fails the
    /// same way. Split the batch and set the offending rows aside.
    Data,
    /// Anything else: a bug or a broken schema. Retried with backoff (skipping could lose
    /// events), and loud in the log.
    Other,
}

impl ErrorKind {
    /// The `kind` label of `webhook_delivery_ledger_errors_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Data => "data",
            ErrorKind::Other => "other",
        }
    }
}

/// Unique constraints that a claim races on by design: two claims of the same event resolve
/// through `ON CONFLICT`, so a violation of one of these is a race to retry, not bad data.
const IDEMPOTENCY_CONSTRAINTS: &[&str] =
    &["events_pkey", "deliveries_idempotency_key_broker_id_key"];

/// Classifies a SQLSTATE (and the constraint it names, if any). Pure, for unit tests.
pub fn classify_sqlstate(code: &str, constraint: Option<&str>) -> ErrorKind {
    let class = code.get(..2).unwrap_or("");
    match class {
        // 08 connection, 40 serialization/deadlock, 53 insufficient resources, 57 operator
        // intervention (admin shutdown, crash shutdown, statement_timeout/cancel), 55P03 lock
        // not available, 58 system error (I/O).
        "08" | "40" | "53" | "57" | "58" => ErrorKind::Retryable,
        "55" if code == "55P03" => ErrorKind::Retryable,
        "23" if code == "23505"
            && constraint.is_some_and(|c| IDEMPOTENCY_CONSTRAINTS.contains(&c)) =>
        {
            ErrorKind::Retryable
        }
        // 22 data exception (NUL in text, bad encoding, out of range), 23 integrity constraint,
        // 54 program limit exceeded (index row too large).
        "22" | "23" | "54" => ErrorKind::Data,
        _ => ErrorKind::Other,
    }
}

impl LedgerError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            // A refused certificate too: it may be fixed on the server while we wait.
            LedgerError::Pool(_) | LedgerError::TimedOut { .. } | LedgerError::Tls(_) => {
                ErrorKind::Retryable
            }
            LedgerError::Query(e) => match e.as_db_error() {
                Some(db) => classify_sqlstate(db.code().code(), db.constraint()),
                // No server error: the connection broke or the client could not encode a
                // value. A closed connection is retryable; an encoding error is data.
                None if e.is_closed() => ErrorKind::Retryable,
                None if std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>()) => {
                    ErrorKind::Retryable
                }
                None => ErrorKind::Other,
            },
            LedgerError::InvalidUrl(_)
            | LedgerError::PoolBuild(_)
            | LedgerError::Migration { .. }
            | LedgerError::SchemaTooOld { .. } => ErrorKind::Other,
        }
    }

    /// Retryable errors are the database being away or busy; callers back off and try again
    /// (never skip). Anything else is a bug, a broken schema or bad data and is worth a loud log.
    pub fn is_retryable(&self) -> bool {
        self.kind() == ErrorKind::Retryable
    }
}

/// Time bounds on every database call (config `[postgres]`).
#[derive(Debug, Clone, Copy)]
pub struct TimeBounds {
    /// Sent as the session's `statement_timeout`.
    pub statement_timeout: Duration,
    /// Client-side bound on each round trip, and on waiting for a pooled connection.
    pub call_timeout: Duration,
    /// TCP keepalive idle time.
    pub keepalive_idle: Duration,
}

impl TimeBounds {
    /// The defaults of config/base.toml, for tools and tests without settings.
    pub const DEFAULT: TimeBounds = TimeBounds {
        statement_timeout: Duration::from_secs(15),
        call_timeout: Duration::from_secs(20),
        keepalive_idle: Duration::from_secs(30),
    };
}

/// A pooled connection whose every round trip is bounded by a client-side timeout: its methods
/// shadow the client's, so ledger code reads as plain tokio-postgres. (A transaction, used only by
/// migrations, is not bounded.)
struct BoundedClient {
    client: deadpool_postgres::Object,
    timeout: Duration,
}

impl BoundedClient {
    async fn within<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, LedgerError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(result) => result.map_err(LedgerError::from),
            Err(_) => Err(LedgerError::TimedOut {
                after: self.timeout,
            }),
        }
    }

    async fn prepare_cached(&self, query: &str) -> Result<Statement, LedgerError> {
        self.within(self.client.prepare_cached(query)).await
    }

    async fn query<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, LedgerError> {
        self.within(self.client.query(statement, params)).await
    }

    async fn query_one<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, LedgerError> {
        self.within(self.client.query_one(statement, params)).await
    }

    async fn query_opt<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, LedgerError> {
        self.within(self.client.query_opt(statement, params)).await
    }

    async fn execute<T: ?Sized + ToStatement>(
        &self,
        statement: &T,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, LedgerError> {
        self.within(self.client.execute(statement, params)).await
    }

    async fn simple_query(
        &self,
        query: &str,
    ) -> Result<Vec<tokio_postgres::SimpleQueryMessage>, LedgerError> {
        self.within(self.client.simple_query(query)).await
    }
}

impl std::ops::Deref for BoundedClient {
    type Target = deadpool_postgres::Object;
    fn deref(&self) -> &Self::Target {
        &self.client
    }
}

impl std::ops::DerefMut for BoundedClient {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.client
    }
}

/// Text columns get what is stored here: storable (no NUL, no control characters) and capped,
/// whatever the caller passed. The cap keeps one bad answer from bloating the ledger.
const STORED_TEXT_CAP: usize = 8 * 1024;

fn stored(text: &str) -> std::borrow::Cow<'_, str> {
    crate::core::storable::storable(text, STORED_TEXT_CAP)
}

/// tokio-postgres says only "db error" at the top; the server's message and SQLSTATE are what
/// on-call needs in the log line.
fn describe(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => error.to_string(),
    }
}

/// A message that is not a valid event, kept for diagnosis.
#[derive(Debug, Clone)]
pub struct RejectedMessage {
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    /// Already capped by the caller.
    pub raw_value: Option<Vec<u8>>,
    pub value_bytes: i32,
    /// Made storable when written.
    pub error: String,
}

/// A delivery that still has to be sent, with what sending it needs.
#[derive(Debug, Clone)]
pub struct PendingDelivery {
    pub delivery_id: i64,
    pub key: IdempotencyKey,
    pub broker_id: String,
    pub load_id: String,
    pub event_id: Option<String>,
    pub partition: i32,
    pub offset: i64,
    /// Attempts already made.
    pub attempts: u32,
    /// How long until it may be attempted (zero when due), by the database's clock.
    pub due_in: Duration,
    pub payload: Bytes,
}

/// A delivery created by a claim. `pending_predecessor_offset` is the offset of the newest
/// earlier delivery of the same (broker, load) that was still pending when it was claimed
/// (another delivery of the same claim included): it must not be sent before that one.
/// `claimed_at` is taken before the claim was sent, so it is no later than the commit (the
/// scheduler distrusts claims older than its last ledger page).
#[derive(Debug, Clone)]
pub struct ClaimedDelivery {
    pub delivery: PendingDelivery,
    pub pending_predecessor_offset: Option<i64>,
    pub claimed_at: std::time::Instant,
}

/// A `brokers` row as another system wrote it: unchecked text. `broker::BrokerEndpoint::from_row`
/// is the one place it is validated.
#[derive(Clone)]
pub struct BrokerRow {
    pub broker_id: String,
    pub webhook_url: String,
    pub signing_secret: String,
    pub enabled: bool,
}

/// Never prints the signing secret (nor the URL, which may carry credentials).
impl std::fmt::Debug for BrokerRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerRow")
            .field("broker_id", &self.broker_id)
            .field("webhook_url", &"<redacted>")
            .field("signing_secret", &"<redacted>")
            .field("enabled", &self.enabled)
            .finish()
    }
}

/// What happened to one attempt, ready to be written.
#[derive(Debug, Clone)]
pub struct AttemptRecord {
    pub delivery_id: i64,
    pub broker_id: String,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub latency: Duration,
    pub status_code: Option<u16>,
    pub error_class: Option<&'static str>,
    pub error_message: Option<String>,
    pub outcome: AttemptOutcome,
}

impl AttemptRecord {
    /// How long the outcome has waited for its save at `now`: since its response arrived (or,
    /// for an attempt not made, since it was decided), by the wall clock.
    pub fn save_wait(&self, now: DateTime<Utc>) -> Duration {
        let latency = chrono::Duration::from_std(self.latency).unwrap_or_default();
        (now - (self.started_at + latency))
            .to_std()
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AttemptOutcome {
    Delivered,
    RetryIn(Duration),
    Dead { reason: String },
}

impl AttemptOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::RetryIn(_) => "retry",
            AttemptOutcome::Dead { .. } => "dead",
        }
    }
}

/// One breaker transition, as stored in `broker_circuits`.
#[derive(Debug, Clone)]
pub struct CircuitRecord {
    pub broker_id: String,
    pub state: &'static str,
    pub since: DateTime<Utc>,
    pub consecutive_failures: u32,
    pub open_until: Option<DateTime<Utc>>,
    pub reason: String,
    pub instance_id: String,
}

#[derive(Clone)]
pub struct Ledger {
    pool: Pool,
    call_timeout: Duration,
    /// What the pool connects with, for the one connection that is not pooled: the listener of
    /// replay announcements (`replays_announced`).
    config: tokio_postgres::Config,
    tls: tls::PostgresTls,
}

/// Set in the transaction of a statement whose probes (`ORDER BY ... LIMIT` on one index) must
/// keep their one-step plan whatever the planner's statistics say: a sort is priced out, so an
/// index in the probe's order is its only plan without one; JIT is off because those prices
/// would pass `jit_above_cost` (why in full: `Ledger::claim_batch`).
pub const PROBE_PLAN_SETTINGS: &str = "SET LOCAL enable_sort = off; SET LOCAL jit = off";

/// The claim (`Ledger::claim_batch`): $1 topic, $2 partition, then one array per event field.
/// Public, with its settings, so a test can check its plan.
pub const CLAIM_STATEMENT: &str = "WITH input AS (
                     SELECT * FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::int8[], $8::bytea[])
                         AS t(idempotency_key, event_id, load_id, status, kafka_offset, payload)
                 ),
                 new_events AS (
                     INSERT INTO events (idempotency_key, event_id, load_id, status, topic, kafka_partition, kafka_offset, payload)
                     SELECT DISTINCT ON (idempotency_key)
                            idempotency_key, event_id, load_id, status, $1, $2, kafka_offset, payload
                     FROM input ORDER BY idempotency_key, kafka_offset
                     -- An event already recorded is left as it is but locked (DO UPDATE locks the
                     -- row even when its WHERE is false) until this claim commits: the retention
                     -- cleaner skips locked events, so it cannot remove one while this claim adds
                     -- a delivery to it (src/retention.rs). Only re-consumed events pay for this.
                     ON CONFLICT (idempotency_key) DO UPDATE SET kafka_offset = events.kafka_offset
                         WHERE false
                 ),
                 targets AS (
                     SELECT DISTINCT ON (i.idempotency_key, s.broker_id)
                            i.idempotency_key, s.broker_id, i.load_id, i.kafka_offset
                     FROM input i
                     JOIN broker_subscriptions s ON s.load_id = i.load_id
                     JOIN brokers b ON b.broker_id = s.broker_id AND b.enabled
                     ORDER BY i.idempotency_key, s.broker_id, i.kafka_offset
                 ),
                 inserted AS (
                     INSERT INTO deliveries (idempotency_key, broker_id, load_id, kafka_partition, kafka_offset)
                     SELECT idempotency_key, broker_id, load_id, $2, kafka_offset FROM targets
                     ON CONFLICT (idempotency_key, broker_id) DO NOTHING
                     RETURNING delivery_id, idempotency_key, broker_id, load_id, kafka_offset
                 ),
                 in_batch AS (
                     SELECT n.*, lag(n.kafka_offset) OVER (
                                     PARTITION BY n.broker_id, n.load_id ORDER BY n.kafka_offset
                                 ) AS previous_in_batch
                     FROM inserted n
                 )
                 -- A delivery's predecessor is the previous new row of its (broker, load) in this
                 -- batch; only the first row of each pair probes the ledger, and that probe is one
                 -- backward step on deliveries_pending_by_load starting below the row's own offset
                 -- (COALESCE evaluates the subquery only when needed). Its cost does not depend on
                 -- how many deliveries of the load are pending, and PROBE_PLAN_SETTINGS keep it that
                 -- plan whatever the statistics say (docs/performance.md). The subquery sees the
                 -- ledger as it was before this statement: earlier rows only.
                 SELECT b.delivery_id, b.idempotency_key, b.broker_id, b.load_id, b.kafka_offset,
                        COALESCE(b.previous_in_batch,
                                 (SELECT p.kafka_offset FROM deliveries p
                                  WHERE p.broker_id = b.broker_id AND p.load_id = b.load_id
                                    AND p.state = 'pending' AND p.kafka_offset < b.kafka_offset
                                  ORDER BY p.kafka_offset DESC
                                  LIMIT 1)) AS pending_predecessor_offset
                 FROM in_batch b
                 ORDER BY b.kafka_offset, b.broker_id";

/// A broker's ledger page (`Ledger::pending_for_broker`): $1 broker, $2/$3 the partitions
/// being read and the offset each one's rows start after, $4 the rows per partition. Public so
/// a test can check its plan.
pub const PAGE_STATEMENT: &str = "WITH page AS (
                     SELECT d.delivery_id, d.idempotency_key, d.load_id, d.kafka_partition,
                            d.kafka_offset, d.attempts, d.next_attempt_at
                     FROM unnest($2::int4[], $3::int8[]) AS cursor(kafka_partition, after_offset)
                     CROSS JOIN LATERAL (
                         SELECT d.delivery_id, d.idempotency_key, d.load_id, d.kafka_partition,
                                d.kafka_offset, d.attempts, d.next_attempt_at
                         FROM deliveries d
                         WHERE d.broker_id = $1 AND d.state = 'pending'
                           AND d.kafka_partition = cursor.kafka_partition
                           AND d.kafka_offset > cursor.after_offset
                         ORDER BY d.kafka_offset
                         LIMIT $4) d)
                 SELECT p.delivery_id, p.idempotency_key, p.load_id, p.kafka_partition, p.kafka_offset,
                        p.attempts, GREATEST(0, (EXTRACT(EPOCH FROM (p.next_attempt_at - now())) * 1000))::int8,
                        e.payload, e.event_id
                 FROM page p JOIN events e ON e.idempotency_key = p.idempotency_key
                 ORDER BY p.kafka_partition, p.kafka_offset";

impl Ledger {
    /// The connection every command uses: `postgres.url` (with its `sslmode`),
    /// `postgres.ca_file` and the time bounds of [postgres]. Connections are opened on first use.
    pub fn connect(settings: &PostgresSettings) -> Result<Ledger, LedgerError> {
        Ledger::connect_with(
            &settings.url,
            settings.pool_size,
            settings.ca_file(),
            settings.time_bounds(),
            None,
        )
    }

    /// Where attempt outcomes are written, as `postgres.outcome_commit` says. `durable`: this
    /// ledger's own pool, shared with claims (a pool of their own made Postgres busier per
    /// delivery in `healthy`). `async`: `connections` more connections like `connect`'s, opened
    /// with `synchronous_commit=off`, so an outcome's COMMIT returns before its WAL reaches disk
    /// and the load's next delivery does not wait for the flush. A database crash can then
    /// forget the last outcomes written (never a claim: those stay on this pool), and those
    /// deliveries are sent again, in order (docs/decisions.md 23).
    pub fn for_outcomes(
        &self,
        settings: &PostgresSettings,
        connections: usize,
    ) -> Result<Ledger, LedgerError> {
        match settings.outcome_commit.session_option() {
            None => Ok(self.clone()),
            Some(option) => Ledger::connect_with(
                &settings.url,
                connections,
                settings.ca_file(),
                settings.time_bounds(),
                Some(option),
            ),
        }
    }

    /// `connect` without a CA file and with the default time bounds (tools and tests).
    pub fn connect_lazy(url: &str, pool_size: usize) -> Result<Ledger, LedgerError> {
        Ledger::connect_with(url, pool_size, None, TimeBounds::DEFAULT, None)
    }

    /// `session_option`: one more `-c name=value` for every connection of this pool.
    fn connect_with(
        url: &str,
        pool_size: usize,
        ca_file: Option<&Path>,
        bounds: TimeBounds,
        session_option: Option<&str>,
    ) -> Result<Ledger, LedgerError> {
        let tls_url = tls::TlsUrl::parse(url)?;
        let ca_file = match (ca_file, tls_url.root_cert.as_deref()) {
            (Some(_), Some(_)) => return Err(PostgresTlsError::CaSetTwice.into()),
            (ca_file, root_cert) => ca_file.or(root_cert),
        };
        let tls = tls::PostgresTls::new(tls_url.mode, ca_file)?;
        let mut config =
            tokio_postgres::Config::from_str(&tls_url.url).map_err(LedgerError::InvalidUrl)?;
        config.ssl_mode(tls_url.mode.wire_mode());
        // A hung statement becomes an error (57014, retryable), a dead peer a closed connection.
        let statement_timeout = format!(
            "-c statement_timeout={}",
            bounds.statement_timeout.as_millis()
        );
        let options = [
            config.get_options(),
            Some(statement_timeout.as_str()),
            session_option,
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
        config
            .options(options)
            .keepalives(true)
            .keepalives_idle(bounds.keepalive_idle)
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(3)
            // Keepalives probe idle connections; this bounds a request the peer never acks.
            .tcp_user_timeout(bounds.call_timeout)
            .connect_timeout(Duration::from_secs(5));
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .recycle_timeout(Some(Duration::from_secs(5)))
            .build()
            .map_err(|e| LedgerError::PoolBuild(e.to_string()))?;
        Ok(Ledger {
            pool,
            call_timeout: bounds.call_timeout,
            config,
            tls,
        })
    }

    /// Runs `sql` in a transaction under PROBE_PLAN_SETTINGS, after `first` if given (a lock the
    /// statement's snapshot must come after), all within the per-call bound, lock waits
    /// included. A transaction cut short by the bound is rolled back when it is dropped.
    async fn query_with_probe_plans(
        &self,
        first: Option<(&str, &[&(dyn tokio_postgres::types::ToSql + Sync)])>,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, LedgerError> {
        let mut connection = self.pooled_connection().await?;
        let run = async {
            let transaction = connection.transaction().await?;
            if let Some((first_sql, first_params)) = first {
                transaction.execute(first_sql, first_params).await?;
            }
            transaction.batch_execute(PROBE_PLAN_SETTINGS).await?;
            let statement = transaction.prepare_cached(sql).await?;
            let rows = transaction.query(&statement, params).await?;
            transaction.commit().await?;
            Ok::<_, tokio_postgres::Error>(rows)
        };
        Ok(tokio::time::timeout(self.call_timeout, run)
            .await
            .map_err(|_| LedgerError::TimedOut {
                after: self.call_timeout,
            })??)
    }

    /// A pooled connection whose round trips are each bounded by `call_timeout`.
    async fn client(&self) -> Result<BoundedClient, LedgerError> {
        Ok(BoundedClient {
            client: self.pooled_connection().await?,
            timeout: self.call_timeout,
        })
    }

    /// A pooled connection without the per-call bound, for the one caller whose statements
    /// legitimately run for minutes: `migrate` building an index on a large ledger.
    async fn pooled_connection(&self) -> Result<deadpool_postgres::Object, LedgerError> {
        tokio::time::timeout(self.call_timeout, self.pool.get())
            .await
            .map_err(|_| LedgerError::TimedOut {
                after: self.call_timeout,
            })?
            .map_err(|error| {
                // Put a refused certificate first: its message names the setting to change.
                let tls = match &error {
                    deadpool_postgres::PoolError::Backend(backend) => {
                        std::error::Error::source(backend)
                            .and_then(|source| source.downcast_ref::<PostgresTlsError>())
                            .cloned()
                    }
                    _ => None,
                };
                tls.map_or(LedgerError::Pool(error), LedgerError::Tls)
            })
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        self.client().await?.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// `synchronous_commit` as this pool's connections have it: what the server made of the
    /// session option (a pooler in between may have dropped it).
    pub async fn synchronous_commit(&self) -> Result<String, LedgerError> {
        let row = self
            .client()
            .await?
            .query_one("SELECT current_setting('synchronous_commit')", &[])
            .await?;
        Ok(row.get(0))
    }

    /// Records the events of one poll batch and creates a pending delivery for every enabled
    /// subscribed broker, in one statement, under the partition's claim lock. Returns only the
    /// deliveries this call created: a redelivered or re-produced event creates none
    /// (docs/design.md 1).
    pub async fn claim_batch(
        &self,
        topic: &str,
        partition: i32,
        events: &[(i64, ShipmentEvent)],
    ) -> Result<Vec<ClaimedDelivery>, LedgerError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let claimed_at = std::time::Instant::now();
        let keys: Vec<&str> = events.iter().map(|(_, e)| e.key.as_str()).collect();
        let event_ids: Vec<Option<&str>> =
            events.iter().map(|(_, e)| e.event_id.as_deref()).collect();
        let load_ids: Vec<&str> = events.iter().map(|(_, e)| e.load_id.as_str()).collect();
        let statuses: Vec<&str> = events.iter().map(|(_, e)| e.status.as_str()).collect();
        let offsets: Vec<i64> = events.iter().map(|(offset, _)| *offset).collect();
        let payloads: Vec<&[u8]> = events.iter().map(|(_, e)| &e.payload[..]).collect();
        // Claims of one partition never overlap, even across instances (an old owner's claim
        // stuck behind a lock while the partition moved on): each must see the rows of the one
        // before it, or a delivery's predecessor below could be missed and a load's statuses
        // sent out of order. The lock is taken before the claim statement starts, so that
        // statement's snapshot includes the previous claim's rows.
        //
        // Planner statistics of a young or fast-changing ledger can price a sort of every
        // pending row of the broker as cheaply as the one-step predecessor probe: seen with one
        // broker, 3.8 s claims that read all its pending rows once per new delivery
        // (docs/performance.md, "The claim's probe, whatever the statistics say"). With sorts
        // priced out (PROBE_PLAN_SETTINGS), the probe's only plan without a sort is the backward
        // step on deliveries_pending_by_load; the statement's other sorts (and the counting
        // trigger's) have no sort-free alternative and stay as they are. Pricing them out
        // inflates every estimate past jit_above_cost, and compiling the statement would take
        // longer than running it: no JIT here.
        let rows = self
            .query_with_probe_plans(
                Some((
                    "SELECT pg_advisory_xact_lock(hashtext($1), $2)",
                    &[&topic, &partition],
                )),
                CLAIM_STATEMENT,
                &[
                    &topic, &partition, &keys, &event_ids, &load_ids, &statuses, &offsets,
                    &payloads,
                ],
            )
            .await?;
        let by_key: HashMap<&str, &ShipmentEvent> =
            events.iter().map(|(_, e)| (e.key.as_str(), e)).collect();
        Ok(rows
            .iter()
            .map(|row| {
                let key: String = row.get(1);
                let event = by_key[key.as_str()];
                ClaimedDelivery {
                    delivery: PendingDelivery {
                        delivery_id: row.get(0),
                        key: event.key.clone(),
                        broker_id: row.get(2),
                        load_id: row.get(3),
                        event_id: event.event_id.as_deref().map(str::to_owned),
                        partition,
                        offset: row.get(4),
                        attempts: 0,
                        due_in: Duration::ZERO,
                        payload: event.payload.clone(),
                    },
                    pending_predecessor_offset: row.get(5),
                    claimed_at,
                }
            })
            .collect())
    }

    /// Keeps messages that are not valid events. Idempotent per (topic, partition, offset).
    pub async fn record_rejected(
        &self,
        topic: &str,
        partition: i32,
        rejected: &[RejectedMessage],
    ) -> Result<(), LedgerError> {
        if rejected.is_empty() {
            return Ok(());
        }
        let offsets: Vec<i64> = rejected.iter().map(|r| r.offset).collect();
        let keys: Vec<Option<&[u8]>> = rejected.iter().map(|r| r.key.as_deref()).collect();
        let values: Vec<Option<&[u8]>> = rejected.iter().map(|r| r.raw_value.as_deref()).collect();
        let sizes: Vec<i32> = rejected.iter().map(|r| r.value_bytes).collect();
        let errors: Vec<std::borrow::Cow<'_, str>> =
            rejected.iter().map(|r| stored(&r.error)).collect();
        self.client()
            .await?
            .execute(
                "INSERT INTO rejected_messages (topic, kafka_partition, kafka_offset, message_key, raw_value, value_bytes, error)
                 SELECT $1, $2, * FROM unnest($3::int8[], $4::bytea[], $5::bytea[], $6::int4[], $7::text[])
                 ON CONFLICT DO NOTHING",
                &[&topic, &partition, &offsets, &keys, &values, &sizes, &errors],
            )
            .await?;
        Ok(())
    }

    /// One page of a broker's pending deliveries: up to `per_partition` rows of each cursor's
    /// partition after its offset, in (partition, offset) order. Not-yet-due rows are included
    /// (with `due_in`) so that every load's deliveries come back as an unbroken prefix, which is
    /// what keeps per-load order (docs/design.md 4): a load lives in one partition, and the page
    /// cuts each partition's rows at one offset. The scheduler walks the pages with its cursors,
    /// so rows it cannot use now (behind a retry) never hide the ones it can, and gives each
    /// partition an equal share, so one deep load does not crowd out the others.
    pub async fn pending_for_broker(
        &self,
        broker_id: &str,
        cursors: &[PartitionCursor],
        per_partition: usize,
    ) -> Result<Vec<PendingDelivery>, LedgerError> {
        let partitions: Vec<i32> = cursors.iter().map(|c| c.partition).collect();
        let afters: Vec<i64> = cursors
            .iter()
            .map(|c| c.after.unwrap_or(i64::MIN))
            .collect();
        let fetch = i64::try_from(per_partition).unwrap_or(i64::MAX);
        // One range scan of deliveries_pending_by_partition per cursor, each stopping at its
        // share, and one event probe per row of the page: bounded by the page size, whatever
        // the broker's pending depth (docs/performance.md, "A broker's ledger page"), and with
        // PROBE_PLAN_SETTINGS whatever the statistics say (another index of the broker's
        // pending rows plus a sort would read all of a partition's rows for every page).
        let rows = self
            .query_with_probe_plans(
                None,
                PAGE_STATEMENT,
                &[&broker_id, &partitions, &afters, &fetch],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| PendingDelivery {
                delivery_id: row.get(0),
                key: IdempotencyKey::from_stored(row.get(1)),
                broker_id: broker_id.to_owned(),
                load_id: row.get(2),
                partition: row.get(3),
                offset: row.get(4),
                attempts: u32::try_from(row.get::<_, i32>(5)).unwrap_or(0),
                due_in: Duration::from_millis(u64::try_from(row.get::<_, i64>(6)).unwrap_or(0)),
                payload: Bytes::from(row.get::<_, Vec<u8>>(7)),
                event_id: row.get(8),
            })
            .collect())
    }

    /// Brokers with pending deliveries in the given partitions that have been due for longer
    /// than `overdue_for`: the ledger sweep's safety net. Deliveries a DeliveryActor holds are
    /// normally sent within moments of coming due, so only work nobody holds (a replay, a row
    /// forgotten after a restart) stays overdue, and healthy brokers are left alone.
    pub async fn brokers_with_overdue_work(
        &self,
        partitions: &[i32],
        overdue_for: Duration,
    ) -> Result<Vec<String>, LedgerError> {
        let overdue_ms = i64::try_from(overdue_for.as_millis()).unwrap_or(i64::MAX);
        let rows = self
            .query_with_probe_plans(
                None,
                // One probe of deliveries_pending_due per (broker, partition) with pending work
                // (from delivery_counts): bounded by those pairs, not by the pending rows. The
                // LIMIT keeps each probe a nested index lookup, and PROBE_PLAN_SETTINGS keep it
                // on deliveries_pending_due, whatever the statistics say.
                "SELECT DISTINCT c.broker_id FROM delivery_counts c
                 CROSS JOIN LATERAL (SELECT 1 FROM deliveries d
                                     WHERE d.broker_id = c.broker_id AND d.kafka_partition = c.kafka_partition
                                       AND d.state = 'pending'
                                       AND d.next_attempt_at <= now() - $2::int8 * interval '1 millisecond'
                                     ORDER BY d.next_attempt_at LIMIT 1) overdue
                 WHERE c.kafka_partition = ANY($1) AND c.pending > 0",
                &[&partitions, &overdue_ms],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// The rows of these brokers (the ones that exist), in one statement: a primary-key probe
    /// per id. The caller keeps the list short (the DeliverySupervisor reads 1,000 at a time).
    pub async fn brokers(&self, broker_ids: &[String]) -> Result<Vec<BrokerRow>, LedgerError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT broker_id, webhook_url, signing_secret, enabled FROM brokers
                 WHERE broker_id = ANY($1)",
                &[&broker_ids],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| BrokerRow {
                broker_id: row.get(0),
                webhook_url: row.get(1),
                signing_secret: row.get(2),
                enabled: row.get(3),
            })
            .collect())
    }

    /// Writes a batch of attempt outcomes in one statement: the new state of each delivery, with
    /// the attempt that delivered it, and every other attempt as history. A delivery that is no
    /// longer pending is left as it is.
    pub async fn record_attempts(&self, records: &[AttemptRecord]) -> Result<(), LedgerError> {
        if records.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = records.iter().map(|r| r.delivery_id).collect();
        let brokers: Vec<&str> = records.iter().map(|r| r.broker_id.as_str()).collect();
        let attempts: Vec<i32> = records
            .iter()
            .map(|r| i32::try_from(r.attempt).unwrap_or(i32::MAX))
            .collect();
        let started: Vec<DateTime<Utc>> = records.iter().map(|r| r.started_at).collect();
        let latencies: Vec<i32> = records
            .iter()
            .map(|r| i32::try_from(r.latency.as_millis()).unwrap_or(i32::MAX))
            .collect();
        let codes: Vec<Option<i32>> = records
            .iter()
            .map(|r| r.status_code.map(i32::from))
            .collect();
        let classes: Vec<Option<&str>> = records.iter().map(|r| r.error_class).collect();
        let messages: Vec<Option<std::borrow::Cow<'_, str>>> = records
            .iter()
            .map(|r| r.error_message.as_deref().map(stored))
            .collect();
        let outcomes: Vec<&str> = records.iter().map(|r| r.outcome.as_str()).collect();
        let retry_in: Vec<Option<i64>> = records
            .iter()
            .map(|r| match r.outcome {
                AttemptOutcome::RetryIn(delay) => {
                    Some(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
                }
                _ => None,
            })
            .collect();
        let dead_reasons: Vec<Option<std::borrow::Cow<'_, str>>> = records
            .iter()
            .map(|r| match &r.outcome {
                AttemptOutcome::Dead { reason } => Some(stored(reason)),
                _ => None,
            })
            .collect();
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "WITH input AS (
                     SELECT * FROM unnest($1::int8[], $2::text[], $3::int4[], $4::timestamptz[], $5::int4[],
                                          $6::int4[], $7::text[], $8::text[], $9::text[], $10::int8[], $11::text[])
                         AS t(delivery_id, broker_id, attempt, started_at, latency_ms, status_code,
                              error_class, error_message, outcome, retry_in_ms, dead_reason)
                 ),
                 saved AS (
                     UPDATE deliveries d SET
                         state = CASE i.outcome WHEN 'retry' THEN 'pending' ELSE i.outcome END,
                         attempts = i.attempt,
                         next_attempt_at = CASE WHEN i.outcome = 'retry'
                                                THEN now() + i.retry_in_ms * interval '1 millisecond'
                                                ELSE d.next_attempt_at END,
                         last_status_code = i.status_code,
                         last_error = i.error_message,
                         dead_reason = i.dead_reason,
                         delivered_at = CASE WHEN i.outcome = 'delivered' THEN now() END,
                         delivered_started_at = CASE WHEN i.outcome = 'delivered' THEN i.started_at END,
                         delivered_latency_ms = CASE WHEN i.outcome = 'delivered' THEN i.latency_ms END,
                         updated_at = now()
                     FROM input i
                     -- The pending check is written so that the planner cannot estimate it: with
                     -- statistics taken while few rows were pending (a ledger of delivered history),
                     -- a plain `d.state = 'pending'` made it hash every pending row instead of one
                     -- primary-key probe per outcome (docs/performance.md, \"Outcome writes\").
                     WHERE d.delivery_id = i.delivery_id
                       AND (CASE WHEN d.state = 'pending' THEN true END)
                     RETURNING d.delivery_id, d.state
                 )
                 -- The attempt that delivered lives on its delivery's row (migration 20); every
                 -- other attempt is history. So is a 2xx for a delivery that was no longer
                 -- pending: a second send, which `report duplicates` must find.
                 INSERT INTO delivery_attempts (delivery_id, broker_id, attempt, started_at, latency_ms,
                                                status_code, error_class, error_message, outcome)
                 SELECT i.delivery_id, i.broker_id, i.attempt, i.started_at, i.latency_ms, i.status_code,
                        i.error_class, i.error_message, i.outcome
                 FROM input i
                 WHERE i.outcome <> 'delivered'
                    OR NOT EXISTS (SELECT 1 FROM saved s
                                   WHERE s.delivery_id = i.delivery_id AND s.state = 'delivered')",
            )
            .await?;
        client
            .execute(
                &statement,
                &[
                    &ids,
                    &brokers,
                    &attempts,
                    &started,
                    &latencies,
                    &codes,
                    &classes,
                    &messages,
                    &outcomes,
                    &retry_in,
                    &dead_reasons,
                ],
            )
            .await?;
        Ok(())
    }

    /// Last resort for a delivery whose attempt outcome the database refuses even without its
    /// text: dead-letter it with the reason, so it is never attempted again unrecorded.
    pub async fn dead_letter(&self, delivery_id: i64, reason: &str) -> Result<(), LedgerError> {
        self.client()
            .await?
            .execute(
                "UPDATE deliveries SET state = 'dead', dead_reason = $2, updated_at = now()
                 WHERE delivery_id = $1 AND state = 'pending'",
                &[&delivery_id, &stored(reason)],
            )
            .await?;
        Ok(())
    }

    /// Records a breaker transition (the latest one per broker wins).
    pub async fn record_circuit(&self, circuit: &CircuitRecord) -> Result<(), LedgerError> {
        self.client()
            .await?
            .execute(
                "INSERT INTO broker_circuits (broker_id, state, since, consecutive_failures, open_until, reason, instance_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (broker_id) DO UPDATE SET
                     state = EXCLUDED.state, since = EXCLUDED.since,
                     consecutive_failures = EXCLUDED.consecutive_failures,
                     open_until = EXCLUDED.open_until, reason = EXCLUDED.reason,
                     instance_id = EXCLUDED.instance_id",
                &[
                    &circuit.broker_id,
                    &circuit.state,
                    &circuit.since,
                    &i32::try_from(circuit.consecutive_failures).unwrap_or(i32::MAX),
                    &circuit.open_until,
                    &stored(&circuit.reason),
                    &circuit.instance_id,
                ],
            )
            .await?;
        Ok(())
    }

    /// A broker answered 410 Gone: stop sending to it until someone re-enables it.
    pub async fn disable_broker(&self, broker_id: &str, reason: &str) -> Result<(), LedgerError> {
        self.client()
            .await?
            .execute(
                "UPDATE brokers SET enabled = false, disabled_reason = $2 WHERE broker_id = $1",
                &[&broker_id, &stored(reason)],
            )
            .await?;
        Ok(())
    }

    /// Takes or renews the lease on a partition. Returns false while another live instance holds it.
    pub async fn acquire_lease(
        &self,
        topic: &str,
        partition: i32,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, LedgerError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let row = self
            .client()
            .await?
            .query_opt(
                "INSERT INTO partition_leases (topic, kafka_partition, owner_id, expires_at)
                 VALUES ($1, $2, $3, now() + $4::int8 * interval '1 millisecond')
                 ON CONFLICT (topic, kafka_partition) DO UPDATE
                     SET owner_id = EXCLUDED.owner_id, expires_at = EXCLUDED.expires_at
                     WHERE partition_leases.owner_id = EXCLUDED.owner_id
                        OR partition_leases.expires_at < now()
                 RETURNING owner_id",
                &[&topic, &partition, &owner, &lease_ms],
            )
            .await?;
        Ok(row.is_some())
    }

    /// Gives a lease up early: it ends `linger` from now, long enough for requests already in
    /// flight to finish, so the next owner never overlaps with them.
    pub async fn release_lease(
        &self,
        topic: &str,
        partition: i32,
        owner: &str,
        linger: Duration,
    ) -> Result<(), LedgerError> {
        let linger_ms = i64::try_from(linger.as_millis()).unwrap_or(i64::MAX);
        self.client()
            .await?
            .execute(
                "UPDATE partition_leases
                 SET expires_at = LEAST(expires_at, now() + $4::int8 * interval '1 millisecond')
                 WHERE topic = $1 AND kafka_partition = $2 AND owner_id = $3",
                &[&topic, &partition, &owner, &linger_ms],
            )
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{classify_sqlstate, AttemptOutcome, AttemptRecord, ErrorKind};
    use chrono::{TimeZone, Utc};
    use std::time::Duration;

    #[test]
    fn an_outcome_waits_for_its_save_from_its_response() {
        let started_at = Utc.with_ymd_and_hms(2026, 12, 1, 10, 0, 0).unwrap();
        let record = AttemptRecord {
            delivery_id: 1,
            broker_id: "acme".to_owned(),
            attempt: 1,
            started_at,
            latency: Duration::from_millis(30),
            status_code: Some(200),
            error_class: None,
            error_message: None,
            outcome: AttemptOutcome::Delivered,
        };
        let saved_at = started_at + chrono::Duration::milliseconds(35);
        assert_eq!(record.save_wait(saved_at), Duration::from_millis(5));
        // A wall clock stepped back says nothing rather than a negative wait.
        assert_eq!(record.save_wait(started_at), Duration::ZERO);
    }

    #[test]
    fn sqlstates_are_classified() {
        let cases = [
            // The database away, busy or interrupted.
            ("08006", None, ErrorKind::Retryable), // connection failure
            ("40001", None, ErrorKind::Retryable), // serialization failure
            ("40P01", None, ErrorKind::Retryable), // deadlock
            ("53300", None, ErrorKind::Retryable), // too many connections
            ("57P01", None, ErrorKind::Retryable), // admin shutdown
            ("57014", None, ErrorKind::Retryable), // statement_timeout
            ("55P03", None, ErrorKind::Retryable), // lock not available
            ("58030", None, ErrorKind::Retryable), // I/O error
            // The values themselves.
            ("22021", None, ErrorKind::Data), // NUL / bad encoding in text
            ("22001", None, ErrorKind::Data), // string too long
            ("22003", None, ErrorKind::Data), // numeric out of range
            ("23502", None, ErrorKind::Data), // not null
            ("23514", Some("deliveries_state_check"), ErrorKind::Data),
            ("23505", Some("rejected_messages_pkey"), ErrorKind::Data),
            ("54000", None, ErrorKind::Data), // index row too large
            // The idempotency conflict is a race, not bad data.
            ("23505", Some("events_pkey"), ErrorKind::Retryable),
            (
                "23505",
                Some("deliveries_idempotency_key_broker_id_key"),
                ErrorKind::Retryable,
            ),
            // Bugs and broken schemas.
            ("42P01", None, ErrorKind::Other), // undefined table
            ("42703", None, ErrorKind::Other), // undefined column
            ("55000", None, ErrorKind::Other),
            ("", None, ErrorKind::Other),
        ];
        for (code, constraint, kind) in cases {
            assert_eq!(
                classify_sqlstate(code, constraint),
                kind,
                "{code} {constraint:?}"
            );
        }
    }
}
