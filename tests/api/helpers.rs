//! Test harness: real Postgres (a fresh database per test), real Kafka (a fresh topic and group
//! per test), real HTTP receivers (wiremock). Nothing is mocked.

use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_postgres::NoTls;
use webhook_delivery::config::Settings;
pub use webhook_delivery::ledger::MigrationScope;
use webhook_delivery::startup::Application;
use webhook_delivery::telemetry::{get_subscriber, init_subscriber, install_panic_hook};
use wiremock::{MockServer, Request};

pub const KAFKA: &str = "127.0.0.1:9092";
pub const ADMIN_DB_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
pub const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// Every log line of every in-process app, for tests that assert on logs (filter by an id the
/// test made unique). With TEST_LOG set, lines are also printed.
static LOG_LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct CaptureLogs;

impl std::io::Write for CaptureLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let line = String::from_utf8_lossy(buf).into_owned();
        if std::env::var("TEST_LOG").is_ok() {
            print!("{line}");
        }
        LOG_LINES.lock().unwrap().push(line);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static TRACING: LazyLock<()> = LazyLock::new(|| {
    init_subscriber(get_subscriber("test", "info", || CaptureLogs));
    install_panic_hook();
});

/// Captured log lines (as JSON) whose `msg` is `message` and that mention `needle`.
pub fn logged(message: &str, needle: &str) -> Vec<serde_json::Value> {
    LOG_LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains(needle))
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line.trim()).ok())
        .filter(|value| value["msg"] == message)
        .collect()
}

/// Every captured log line (raw) that contains `needle`.
pub fn log_lines_containing(needle: &str) -> Vec<String> {
    LOG_LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains(needle))
        .cloned()
        .collect()
}

/// A receiver that answers the n-th request with `statuses[n]` (the last one repeats) and
/// records when each request arrived.
pub struct ScriptedReceiver {
    pub server: MockServer,
    arrivals: Arc<Mutex<Vec<(Instant, String)>>>,
}

struct Script {
    statuses: Vec<u16>,
    delay: Duration,
    arrivals: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl wiremock::Respond for Script {
    fn respond(&self, request: &Request) -> wiremock::ResponseTemplate {
        let mut arrivals = self.arrivals.lock().unwrap();
        let index = arrivals.len().min(self.statuses.len() - 1);
        arrivals.push((Instant::now(), header(request, "webhook-id").to_owned()));
        wiremock::ResponseTemplate::new(self.statuses[index]).set_delay(self.delay)
    }
}

impl ScriptedReceiver {
    pub async fn start(statuses: &[u16]) -> ScriptedReceiver {
        Self::start_with_delay(statuses, Duration::ZERO).await
    }

    /// Every answer comes `delay` after the request arrived.
    pub async fn start_with_delay(statuses: &[u16], delay: Duration) -> ScriptedReceiver {
        let server = MockServer::start().await;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .respond_with(Script {
                statuses: statuses.to_vec(),
                delay,
                arrivals: arrivals.clone(),
            })
            .mount(&server)
            .await;
        ScriptedReceiver { server, arrivals }
    }

    pub fn arrivals(&self) -> Vec<Instant> {
        self.arrivals
            .lock()
            .unwrap()
            .iter()
            .map(|(at, _)| *at)
            .collect()
    }

    /// (arrival, webhook-id) of every request, in arrival order.
    pub fn requests(&self) -> Vec<(Instant, String)> {
        self.arrivals.lock().unwrap().clone()
    }
}

pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// The isolated world of one test: its database, topic and consumer group.
pub struct TestEnv {
    pub db_url: String,
    pub topic: String,
    pub group_id: String,
    pub db: tokio_postgres::Client,
    producer: FutureProducer,
}

impl TestEnv {
    pub async fn new(partitions: i32) -> TestEnv {
        Self::with_schema(partitions, MigrationScope::All).await
    }

    /// A world whose ledger has only the migrations in `schema` applied.
    pub async fn with_schema(partitions: i32, schema: MigrationScope) -> TestEnv {
        LazyLock::force(&TRACING);
        let db_name = unique("wd_test").replace('-', "_");
        let (admin, connection) = tokio_postgres::connect(ADMIN_DB_URL, NoTls)
            .await
            .expect("postgres on 127.0.0.1:5432 (run scripts/services.sh)");
        tokio::spawn(connection);
        admin
            .batch_execute(&format!("CREATE DATABASE {db_name}"))
            .await
            .unwrap();
        let db_url = format!("postgres://postgres@127.0.0.1:5432/{db_name}");
        // The service creates the schema; tests need it before seeding brokers.
        webhook_delivery::ledger::Ledger::connect_lazy(&db_url, 1)
            .unwrap()
            .migrate_scope(schema)
            .await
            .unwrap();
        let (db, connection) = tokio_postgres::connect(&db_url, NoTls).await.unwrap();
        tokio::spawn(connection);

        let topic = unique("shipment-events");
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .create()
            .unwrap();
        let results = admin
            .create_topics(
                &[NewTopic::new(
                    &topic,
                    partitions,
                    TopicReplication::Fixed(1),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("kafka on 127.0.0.1:9092 (run scripts/services.sh)");
        for result in results {
            result.expect("topic created");
        }
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .set("message.timeout.ms", "10000")
            .create()
            .unwrap();
        TestEnv {
            db_url,
            group_id: unique("webhook-delivery"),
            topic,
            db,
            producer,
        }
    }

    /// Settings as in config/base.toml, pointed at this test's world, with short timings.
    pub fn settings(&self) -> Settings {
        let mut settings = Settings::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config"),
            None,
        )
        .expect("config/base.toml loads");
        settings.kafka.brokers = KAFKA.into();
        settings.kafka.topic = self.topic.clone();
        settings.kafka.group_id = self.group_id.clone();
        settings.kafka.session_timeout_ms = 6_000;
        settings.kafka.max_poll_interval_ms = 15_000;
        // Each test's topic and group are new: a first deployment, told to read everything.
        settings.kafka.initial_offsets = Some(webhook_delivery::config::InitialOffsets::Earliest);
        settings.postgres.url = self.db_url.clone();
        settings.postgres.lease_ms = 8_000;
        settings.delivery.request_timeout_ms = 2_000;
        settings.delivery.ledger_poll_interval_ms = 200;
        settings.retry.base_delay_ms = 200;
        settings.retry.max_delay_ms = 1_000;
        settings.shutdown.drain_timeout_ms = 3_000;
        // wiremock receivers listen on plain http on loopback.
        settings.delivery.allow_http = true;
        settings.delivery.allowed_networks = vec!["127.0.0.0/8".parse().unwrap()];
        // Any free port: tests run many apps at once.
        settings.admin.bind = "127.0.0.1:0".parse().unwrap();
        settings.validate().expect("test settings are valid");
        settings
    }

    /// The same settings as environment variables, for running the real binary.
    pub fn settings_env(&self) -> Vec<(String, String)> {
        let s = self.settings();
        [
            ("KAFKA__BROKERS", s.kafka.brokers),
            ("KAFKA__TOPIC", s.kafka.topic),
            ("KAFKA__GROUP_ID", s.kafka.group_id),
            ("KAFKA__INITIAL_OFFSETS", "earliest".to_owned()),
            (
                "KAFKA__SESSION_TIMEOUT_MS",
                s.kafka.session_timeout_ms.to_string(),
            ),
            (
                "KAFKA__MAX_POLL_INTERVAL_MS",
                s.kafka.max_poll_interval_ms.to_string(),
            ),
            ("POSTGRES__URL", s.postgres.url),
            ("POSTGRES__LEASE_MS", s.postgres.lease_ms.to_string()),
            (
                "DELIVERY__REQUEST_TIMEOUT_MS",
                s.delivery.request_timeout_ms.to_string(),
            ),
            (
                "DELIVERY__LEDGER_POLL_INTERVAL_MS",
                s.delivery.ledger_poll_interval_ms.to_string(),
            ),
            ("RETRY__BASE_DELAY_MS", s.retry.base_delay_ms.to_string()),
            ("RETRY__MAX_DELAY_MS", s.retry.max_delay_ms.to_string()),
            ("DELIVERY__ALLOW_HTTP", s.delivery.allow_http.to_string()),
            ("DELIVERY__ALLOWED_NETWORKS", "127.0.0.0/8".to_owned()),
            ("ADMIN__BIND", s.admin.bind.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (format!("APP__{k}"), v))
        .collect()
    }

    pub async fn add_broker(&self, broker_id: &str, url: &str) {
        self.db
            .execute(
                "INSERT INTO brokers (broker_id, webhook_url, signing_secret) VALUES ($1, $2, $3)",
                &[&broker_id, &url, &SECRET],
            )
            .await
            .unwrap();
    }

    pub async fn subscribe(&self, broker_id: &str, load_id: &str) {
        self.db
            .execute(
                "INSERT INTO broker_subscriptions (broker_id, load_id) VALUES ($1, $2)",
                &[&broker_id, &load_id],
            )
            .await
            .unwrap();
    }

    /// Produces one message and waits for its acknowledgement (one at a time, so every
    /// message is visible to consumers at once).
    pub async fn produce(&self, key: Option<&str>, value: &[u8]) {
        let mut record = FutureRecord::<str, [u8]>::to(&self.topic).payload(value);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.producer
            .send(record, Duration::from_secs(10))
            .await
            .expect("message produced");
    }

    pub async fn produce_event(
        &self,
        event_id: Option<&str>,
        load_id: &str,
        status: &str,
    ) -> Vec<u8> {
        let mut event = serde_json::json!({"loadId": load_id, "status": status, "occurredAt": "2026-11-25T10:00:00Z"});
        if let Some(id) = event_id {
            event["eventId"] = id.into();
        }
        let value = serde_json::to_vec(&event).unwrap();
        self.produce(Some(load_id), &value).await;
        value
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.db.query_one(sql, &[]).await.unwrap().get(0)
    }

    /// Polls a `SELECT count(*) ...` until it returns `expected` or `timeout` passes.
    pub async fn count_reaches(&self, sql: &str, expected: i64, timeout: Duration) -> bool {
        eventually(timeout, || async { self.count(sql).await == expected }).await
    }

    /// Sum of committed offsets of the test's group, as the broker sees them.
    pub fn committed_offsets(&self, partitions: i32) -> Vec<i64> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", KAFKA)
            .set("group.id", &self.group_id)
            .create()
            .unwrap();
        let mut list = rdkafka::TopicPartitionList::new();
        for p in 0..partitions {
            list.add_partition(&self.topic, p);
        }
        let committed = consumer
            .committed_offsets(list, Duration::from_secs(10))
            .unwrap();
        (0..partitions)
            .map(
                |p| match committed.find_partition(&self.topic, p).unwrap().offset() {
                    rdkafka::Offset::Offset(o) => o,
                    _ => 0,
                },
            )
            .collect()
    }
}

/// A running service inside this test process (its own thread and actix System).
pub struct TestApp {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub admin_port: u16,
}

pub fn spawn_app(settings: Settings) -> TestApp {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let app = Application::build(settings).await.expect("app builds");
            port_tx.send(app.admin_port()).unwrap();
            app.run_until_stopped(async {
                let _ = stop_rx.await;
            })
            .await
            .expect("app runs");
        });
    });
    let admin_port = port_rx.recv().expect("app started");
    TestApp {
        stop: Some(stop_tx),
        thread: Some(thread),
        admin_port,
    }
}

impl TestApp {
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    /// `GET` on the admin API.
    pub async fn admin_get(&self, path: &str) -> reqwest::Response {
        reqwest::get(self.admin_url(path))
            .await
            .expect("admin API answers")
    }

    /// The value of the sample of `name` in `/metrics` whose labels include every one of
    /// `labels` (none: the series without labels).
    pub async fn metric_value(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let text = self.admin_get("/metrics").await.text().await.unwrap();
        text.lines()
            .find(|line| {
                line.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                    && labels.iter().all(|l| line.contains(l))
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
    }

    /// The row of `broker_id` in `GET /brokers`, if listed.
    pub async fn listed_broker(&self, broker_id: &str) -> Option<serde_json::Value> {
        let listed: serde_json::Value = self.admin_get("/brokers").await.json().await.unwrap();
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["broker_id"] == broker_id)
            .cloned()
    }

    /// `GET` on the admin API with `Authorization: Bearer <token>`.
    pub async fn admin_get_with_token(&self, path: &str, token: &str) -> reqwest::Response {
        reqwest::Client::new()
            .get(self.admin_url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("admin API answers")
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let thread = self.thread.take().unwrap();
        tokio::task::spawn_blocking(move || thread.join().expect("app thread exits cleanly"))
            .await
            .unwrap();
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Polls `check` until it is true or `timeout` passes; returns whether it became true.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn received(server: &MockServer) -> Vec<Request> {
    server.received_requests().await.unwrap_or_default()
}

/// The `eventId` of every webhook the receiver got, in arrival order.
pub async fn received_event_ids(server: &MockServer) -> Vec<String> {
    received(server)
        .await
        .iter()
        .map(|request| {
            let body: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            body["eventId"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Verifies a received webhook with the independent `standardwebhooks` implementation.
pub fn assert_signed(request: &Request) {
    let verifier = standardwebhooks::Webhook::new(SECRET).unwrap();
    verifier
        .verify(&request.body, &request.headers)
        .expect("signature verifies with the standardwebhooks crate");
}

pub fn header<'a>(request: &'a Request, name: &str) -> &'a str {
    request
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// A receiver that answers every POST with `response`.
pub async fn receiver(response: wiremock::ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(response)
        .mount(&server)
        .await;
    server
}

/// A receiver that answers 200 to every POST.
pub async fn ok_receiver() -> MockServer {
    receiver(wiremock::ResponseTemplate::new(200)).await
}

/// Runs the real binary with this test's configuration (`APP__*` variables).
pub fn run_cli(env: &TestEnv, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_webhook-delivery"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.settings_env())
        .output()
        .expect("binary runs")
}

/// Another session holding `LOCK TABLE <table> IN ACCESS EXCLUSIVE MODE` until `release`.
pub struct TableLock {
    session: tokio_postgres::Client,
    connection: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
}

impl TableLock {
    pub async fn take(env: &TestEnv, table: &str) -> TableLock {
        let (session, connection) = tokio_postgres::connect(&env.db_url, NoTls).await.unwrap();
        let connection = tokio::spawn(connection);
        session
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"
            ))
            .await
            .unwrap();
        TableLock {
            session,
            connection,
        }
    }

    pub async fn release(self) {
        self.session.batch_execute("COMMIT").await.unwrap();
        drop(self.session);
        let _ = self.connection.await;
    }
}
