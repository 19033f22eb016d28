//! Local demo: three brokers (one healthy, one slow, one whose endpoint fails), a burst of
//! shipment events on a fresh topic, the real service in between, and what each broker received.
//! Run it with `scripts/demo.sh` (which brings the local stack up first).

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;
use tokio_postgres::NoTls;
use webhook_delivery::config::{default_config_dir, Settings};
use webhook_delivery::ledger::Ledger;
use webhook_delivery::startup::Application;
use webhook_delivery::telemetry::{get_subscriber, init_subscriber};
use wiremock::matchers::method;
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const STATUSES: [&str; 4] = ["matched", "accepted", "in_transit", "delivered"];

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let run = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut settings = Settings::load(&default_config_dir(), None)?;
    init_subscriber(get_subscriber(
        "webhook-delivery-demo",
        "error",
        std::io::stderr,
    ));

    // A fresh database and topic per run, so the demo always starts from nothing.
    let db_name = format!("wd_demo_{run}");
    let (admin_db, connection) = tokio_postgres::connect(&settings.postgres.url, NoTls).await?;
    tokio::spawn(connection);
    admin_db
        .batch_execute(&format!("CREATE DATABASE {db_name}"))
        .await?;
    let base_url = settings
        .postgres
        .url
        .rsplit_once('/')
        .map(|(b, _)| b.to_owned())
        .unwrap_or_default();
    settings.postgres.url = format!("{base_url}/{db_name}");
    settings.kafka.topic = format!("shipment-events-demo-{run}");
    settings.kafka.group_id = format!("webhook-delivery-demo-{run}");
    // A new topic and group: a first deployment, told to read the topic from its start.
    settings.kafka.initial_offsets = Some(webhook_delivery::config::InitialOffsets::Earliest);
    settings.delivery.request_timeout_ms = 2_000;
    settings.retry.base_delay_ms = 500;
    settings.retry.max_delay_ms = 2_000;
    settings.retry.max_attempts = 3;
    // The demo's receivers are plain http on loopback, which production refuses.
    settings.delivery.allow_http = true;
    settings.delivery.allowed_networks = vec!["127.0.0.0/8".parse()?];
    // Any free port, so the demo runs beside a local instance on the default 9090.
    settings.admin.bind = "127.0.0.1:0".parse()?;
    Ledger::connect_lazy(&settings.postgres.url, 1)?
        .migrate()
        .await?;
    let (db, connection) = tokio_postgres::connect(&settings.postgres.url, NoTls).await?;
    tokio::spawn(connection);

    let healthy = receiver(ResponseTemplate::new(200)).await;
    let slow = receiver(ResponseTemplate::new(200).set_delay(Duration::from_millis(300))).await;
    let failing = receiver(ResponseTemplate::new(503).set_body_string("maintenance")).await;
    let brokers = [
        ("acme-freight", &healthy),
        ("globex-logistics", &slow),
        ("initech-tms", &failing),
    ];
    for (i, (broker_id, server)) in brokers.iter().enumerate() {
        db.execute(
            "INSERT INTO brokers (broker_id, webhook_url, signing_secret) VALUES ($1, $2, $3)",
            &[broker_id, &server.uri(), &SECRET],
        )
        .await?;
        // Broker i follows loads i..i+3 of LOAD-0..LOAD-5.
        for load in i..i + 3 {
            db.execute(
                "INSERT INTO broker_subscriptions (broker_id, load_id) VALUES ($1, $2)",
                &[broker_id, &format!("LOAD-{load}")],
            )
            .await?;
        }
    }

    let kafka_admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.brokers)
        .create()?;
    kafka_admin
        .create_topics(
            &[NewTopic::new(
                &settings.kafka.topic,
                3,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await?;

    let app_settings = settings.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let app = Application::build(app_settings)
                .await
                .expect("service starts");
            app.run_until_stopped(async {
                let _ = stop_rx.await;
            })
            .await
            .expect("service runs");
        })
    });

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &settings.kafka.brokers)
        .create()?;
    let mut produced = 0;
    for status in STATUSES {
        for load in 0..6 {
            let load_id = format!("LOAD-{load}");
            let value = serde_json::json!({
                "eventId": format!("{load_id}-{status}"), "loadId": load_id, "status": status,
                "occurredAt": chrono::Utc::now().to_rfc3339(),
            })
            .to_string();
            producer
                .send(
                    FutureRecord::to(&settings.kafka.topic)
                        .key(&load_id)
                        .payload(&value),
                    Duration::from_secs(5),
                )
                .await
                .map_err(|(e, _)| e)?;
            produced += 1;
        }
    }
    // A producer retry: the same event again. It must not reach anyone twice.
    let duplicate = r#"{"eventId":"LOAD-0-matched","loadId":"LOAD-0","status":"matched"}"#;
    producer
        .send(
            FutureRecord::to(&settings.kafka.topic)
                .key("LOAD-0")
                .payload(duplicate),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(e, _)| e)?;
    println!(
        "produced {} events (one of them a duplicate) to {}",
        produced + 1,
        settings.kafka.topic
    );

    // The failing broker's circuit opens and holds its deliveries in the ledger, so "nothing
    // pending" may not come; 15 s is plenty for the healthy ones.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        let row = db
            .query_one(
                "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM deliveries WHERE state = 'pending')",
                &[],
            )
            .await?;
        let (events, pending): (i64, i64) = (row.get(0), row.get(1));
        if events == produced && pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = stop_tx.send(());
    let _ = tokio::task::spawn_blocking(move || service.join()).await;

    println!();
    for (broker_id, server) in brokers {
        let requests = server.received_requests().await.unwrap_or_default();
        println!("{broker_id}: {} requests received", requests.len());
        for request in requests.iter().take(4) {
            let body: serde_json::Value = serde_json::from_slice(&request.body)?;
            println!(
                "    {} {} {:<10} webhook-id={}",
                body["loadId"].as_str().unwrap_or("?"),
                request
                    .headers
                    .get("webhook-sequence")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?"),
                body["status"].as_str().unwrap_or("?"),
                request
                    .headers
                    .get("webhook-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("?"),
            );
        }
        if requests.len() > 4 {
            println!("    ...");
        }
        let rows = db
            .query(
                "SELECT state, count(*), max(last_error) FROM deliveries WHERE broker_id = $1 GROUP BY state ORDER BY state",
                &[&broker_id],
            )
            .await?;
        if let Some(circuit) = db
            .query_opt(
                "SELECT state, reason FROM broker_circuits WHERE broker_id = $1",
                &[&broker_id],
            )
            .await?
        {
            let (state, reason): (String, String) = (circuit.get(0), circuit.get(1));
            println!("    circuit: {state} ({reason})");
        }
        for row in rows {
            let (state, count, error): (String, i64, Option<String>) =
                (row.get(0), row.get(1), row.get(2));
            match (state.as_str(), error) {
                ("delivered", _) | (_, None) => println!("    ledger: {count} {state}"),
                (_, Some(error)) => println!("    ledger: {count} {state} (last error: {error})"),
            }
        }
    }
    println!(
        "\n(a broker whose circuit is open gets no requests; its deliveries wait in the ledger and resume when it recovers)"
    );
    println!(
        "\nledger database: {}  (inspect with psql)",
        settings.postgres.url
    );
    Ok(())
}

async fn receiver(response: ResponseTemplate) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(response)
        .mount(&server)
        .await;
    server
}
