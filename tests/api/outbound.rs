//! Issue 9, outbound side: hostile answers and hostile broker rows cost one broker's deliveries,
//! never memory, another broker or the process; secrets stay out of every Debug output.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use flate2::{Compress, Compression, Crc, FlushCompress, Status};
use webhook_delivery::connection_budget::ConnectionBudget;
use webhook_delivery::core::ssrf::NetworkPolicy;
use webhook_delivery::webhook_client::{build_client, ClientSettings, WebhookRequest};
use wiremock::{MockServer, ResponseTemplate};

use crate::helpers::*;
use crate::instances::Instance;

/// Continues `deflate` over `input` and completes `flush`, returning the bytes produced.
fn deflate_step(deflate: &mut Compress, input: &[u8], flush: FlushCompress) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 << 10);
    let start = deflate.total_in();
    loop {
        if out.len() == out.capacity() {
            out.reserve(64 << 10);
        }
        let consumed = (deflate.total_in() - start) as usize;
        let status = deflate
            .compress_vec(&input[consumed..], &mut out, flush)
            .unwrap();
        let consumed = (deflate.total_in() - start) as usize;
        let done = match flush {
            FlushCompress::Finish => status == Status::StreamEnd,
            _ => consumed == input.len() && out.len() < out.capacity(),
        };
        if done {
            return out;
        }
    }
}

/// One valid gzip member that inflates to `mib` MiB of zeros, built without compressing them
/// all: after a full flush deflate starts afresh, so every further MiB of zeros compresses to
/// the same bytes, which are repeated; the CRC-32 of the whole is combined from one MiB's.
fn gzip_bomb(mib: u32) -> Vec<u8> {
    let zeros = vec![0u8; 1 << 20];
    let mut deflate = Compress::new(Compression::best(), false);
    let first = deflate_step(&mut deflate, &zeros, FlushCompress::Full);
    let repeated = deflate_step(&mut deflate, &zeros, FlushCompress::Full);
    assert_eq!(
        repeated,
        deflate_step(&mut deflate, &zeros, FlushCompress::Full),
        "a full flush makes every further MiB compress alike"
    );
    let end = deflate_step(&mut deflate, &[], FlushCompress::Finish);
    let mut one_mib = Crc::new();
    one_mib.update(&zeros);
    let mut crc = Crc::new();
    for _ in 0..mib {
        crc.combine(&one_mib);
    }
    let mut bomb = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    bomb.extend_from_slice(&first);
    for _ in 1..mib {
        bomb.extend_from_slice(&repeated);
    }
    bomb.extend_from_slice(&end);
    bomb.extend_from_slice(&crc.sum().to_le_bytes());
    bomb.extend_from_slice(&((u64::from(mib) << 20) as u32).to_le_bytes());
    bomb
}

#[test]
fn the_gzip_bomb_is_a_valid_gzip_stream() {
    use std::io::Read;
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(&gzip_bomb(4)[..])
        .read_to_end(&mut inflated)
        .expect("valid gzip, CRC and length included");
    assert_eq!(inflated.len(), 4 << 20);
    assert!(inflated.iter().all(|b| *b == 0));
}

/// The client on its own: it asks for `identity`, and a body compressed anyway is not read.
#[actix_rt::test]
async fn the_client_asks_for_identity_and_leaves_a_compressed_body_unread() {
    use webhook_delivery::webhook_client::send;

    let server = receiver(
        ResponseTemplate::new(200)
            .insert_header("content-encoding", "gzip")
            .set_body_bytes(gzip_bomb(64)),
    )
    .await;
    let timeout = Duration::from_secs(5);
    let client = local_client(
        timeout,
        ConnectionBudget::new(4, gauge(), &gauge(), counter()),
    );
    let (result, _) = send(&client, &webhook_to(&server), timeout, 4096).await;
    let response = result.expect("an answer");
    assert_eq!(response.status, 200);
    assert_eq!(
        response.body_excerpt.as_str(),
        "[gzip-encoded response body, not decoded]"
    );
    let requests = received(&server).await;
    assert_eq!(header(&requests[0], "accept-encoding"), "identity");
}

/// The process-wide connection budget: a socket holds its permit while it is open, idle in its
/// client's pool included; a client that finds none left makes no request and says it is a
/// local shortage (not the broker's failure); the permit comes back when the holding client is
/// dropped (a DeliveryActor drops its client after `delivery.connection_keep_alive_ms`).
#[actix_rt::test]
async fn a_socket_holds_its_budget_until_its_client_lets_it_go() {
    use webhook_delivery::webhook_client::{send, SendError};

    let first = receiver(ResponseTemplate::new(200)).await;
    let second = receiver(ResponseTemplate::new(200)).await;
    let timeout = Duration::from_secs(5);
    let open = gauge();
    let shortages = counter();
    let budget = ConnectionBudget::new(1, open.clone(), &gauge(), shortages.clone());
    let holder = local_client(timeout, budget.clone());
    let (result, _) = send(&holder, &webhook_to(&first), timeout, 4096).await;
    assert_eq!(result.expect("the first broker answers").status, 200);
    assert_eq!(open.get(), 1, "the idle socket still holds its permit");

    let other = local_client(timeout, budget.clone());
    let (result, latency) = send(&other, &webhook_to(&second), timeout, 4096).await;
    let error = result.expect_err("no permit left");
    assert!(
        matches!(error, SendError::LocalShortage(_)),
        "a local shortage, not the broker's failure: {error:?}"
    );
    assert_eq!(error.class(), "local_shortage");
    assert!(
        error.to_string().contains("max_outbound_connections"),
        "the message names the setting: {error}"
    );
    assert!(latency < timeout, "refused at once, not after the timeout");
    assert!(received(&second).await.is_empty(), "no request was made");

    drop(holder);
    // The pool closes its idle sockets in a task of their own (a graceful shutdown).
    for _ in 0..500 {
        if open.get() == 0 {
            break;
        }
        actix_rt::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(open.get(), 0, "dropping the client closed its socket");
    let (result, _) = send(&other, &webhook_to(&second), timeout, 4096).await;
    assert_eq!(result.expect("a permit is free again").status, 200);
    assert_eq!(budget.open(), 1);
}

fn gauge() -> prometheus::IntGauge {
    prometheus::IntGauge::new("g", "test gauge").unwrap()
}

fn counter() -> prometheus::IntCounter {
    prometheus::IntCounter::new("c", "test counter").unwrap()
}

/// A client as a DeliveryActor builds it, allowed to reach the local test receivers.
fn local_client(timeout: Duration, budget: Arc<ConnectionBudget>) -> awc::Client {
    build_client(ClientSettings {
        user_agent: "outbound-test",
        timeout,
        max_connections: 4,
        keep_alive: Duration::from_secs(15),
        policy: Arc::new(NetworkPolicy {
            allow_http: true,
            allowed_networks: vec!["127.0.0.0/8".parse().unwrap()],
        }),
        budget,
    })
}

fn webhook_to(server: &MockServer) -> WebhookRequest {
    WebhookRequest {
        url: server.uri().parse().unwrap(),
        webhook_id: "msg_test".into(),
        timestamp: 0,
        signature: "v1,test".into(),
        sequence: 1,
        body: bytes::Bytes::from_static(b"{}"),
    }
}

/// VmHWM (peak resident set) and VmRSS of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("VmHWM:"), field("VmRSS:"))
}

async fn attempts_of(env: &TestEnv, broker_id: &str) -> i64 {
    env.count(&format!(
        "SELECT coalesce(sum(attempts), 0)::int8 FROM deliveries WHERE broker_id = '{broker_id}'"
    ))
    .await
}

/// The service runs as its own process so that its memory, and nothing else's, is measured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_answer_is_never_inflated_and_memory_stays_bounded() {
    let env = TestEnv::new(1).await;
    let bomb = gzip_bomb(1024);
    println!(
        "gzip bomb: {} KiB on the wire, 1 GiB inflated",
        bomb.len() >> 10
    );
    let bomber = receiver(
        ResponseTemplate::new(503)
            .insert_header("content-encoding", "gzip")
            .insert_header("content-type", "text/plain")
            .set_body_bytes(bomb),
    )
    .await;
    let calm = ok_receiver().await;
    env.add_broker("calm", &calm.uri()).await;
    env.add_broker("bomber", &bomber.uri()).await;
    env.subscribe("calm", "L-warm").await;
    env.subscribe("calm", "L-bomb").await;
    env.subscribe("bomber", "L-bomb").await;
    env.produce_event(Some("e-warm"), "L-warm", "matched").await;

    let instance = Instance::start_with(&env, &[], Stdio::null());
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            1,
            Duration::from_secs(30)
        )
        .await,
        "warm-up delivery"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (peak_before, rss_before) = memory_kib(instance.pid());

    env.produce_event(Some("e-bomb"), "L-bomb", "matched").await;
    assert!(
        eventually(Duration::from_secs(40), || async {
            attempts_of(&env, "bomber").await >= 3
        })
        .await,
        "the bomber is attempted (and retried) several times"
    );
    let (peak_after, rss_after) = memory_kib(instance.pid());
    println!(
        "service memory: VmHWM {peak_before} -> {peak_after} KiB, VmRSS {rss_before} -> {rss_after} KiB"
    );
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE broker_id = 'calm' AND state = 'delivered'",
            2,
            Duration::from_secs(20)
        )
        .await,
        "the other broker on the same load is unaffected"
    );
    assert!(instance.sigterm().success());

    // Inflating even one network read of this body raised the peak by about 16 MiB (measured
    // with decompression on); not reading it costs well under 1 MiB.
    assert!(
        peak_after.saturating_sub(peak_before) < 8 * 1024,
        "peak RSS grew from {peak_before} to {peak_after} KiB"
    );
    for request in received(&bomber).await {
        assert_eq!(header(&request, "accept-encoding"), "identity");
    }
    let last_error: String = env
        .db
        .query_one(
            "SELECT last_error FROM deliveries WHERE broker_id = 'bomber'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        last_error, "HTTP 503: [gzip-encoded response body, not decoded]",
        "the compressed body is not read at all"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_does_not_resolve_is_retried_not_dead_at_once() {
    let env = TestEnv::new(1).await;
    // .invalid never resolves (RFC 6761).
    env.add_broker("nowhere", "https://no-such-host.invalid/hooks")
        .await;
    env.subscribe("nowhere", "L1").await;
    env.produce_event(Some("e1"), "L1", "matched").await;
    let mut settings = env.settings();
    settings.retry.max_attempts = 3;
    settings.retry.base_delay_ms = 100;
    settings.retry.max_delay_ms = 100;
    let app = spawn_app(settings);
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'dead'",
            1,
            Duration::from_secs(30)
        )
        .await
    );
    app.stop().await;
    let row = env
        .db
        .query_one("SELECT attempts, last_error FROM deliveries", &[])
        .await
        .unwrap();
    let (attempts, last_error): (i32, String) = (row.get(0), row.get(1));
    assert_eq!(attempts, 3, "retried up to max_attempts: {last_error}");
    assert!(
        !last_error.contains("SSRF"),
        "a DNS failure is not a refusal: {last_error}"
    );
}

async fn add_raw_broker(env: &TestEnv, broker_id: &str, url: &str, secret: &str) {
    env.db
        .execute(
            "INSERT INTO brokers (broker_id, webhook_url, signing_secret) VALUES ($1, $2, $3)",
            &[&broker_id, &url, &secret],
        )
        .await
        .unwrap();
    env.subscribe(broker_id, "L1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_broker_row_costs_only_that_brokers_deliveries() {
    let env = TestEnv::new(1).await;
    let healthy = ok_receiver().await;
    let bad_target = ok_receiver().await;
    env.add_broker("healthy", &healthy.uri()).await;
    env.subscribe("healthy", "L1").await;
    let hostile_id = format!("evil\n{{\"msg\":\"forged\"}}\u{1b}[31m{}", "x".repeat(300));
    let bad_url = bad_target.uri();
    let cases: Vec<(String, String, String, &str)> = vec![
        (
            hostile_id.clone(),
            bad_url.clone(),
            SECRET.to_owned(),
            "broker_id is not usable",
        ),
        (
            "long-url".into(),
            format!("{bad_url}/{}", "a".repeat(5000)),
            SECRET.to_owned(),
            "at most 2048 are allowed",
        ),
        (
            "newline-url".into(),
            format!("{bad_url}/ho\noks"),
            SECRET.to_owned(),
            "control characters",
        ),
        (
            "credentials".into(),
            bad_url.replace("http://", "http://user:hunter2@"),
            SECRET.to_owned(),
            "must not carry credentials",
        ),
        (
            "scheme".into(),
            "gopher://tms.example.com/".into(),
            SECRET.to_owned(),
            "must be http or https",
        ),
        (
            "bad-secret".into(),
            bad_url.clone(),
            "hunter2".into(),
            "signing_secret is invalid",
        ),
        (
            "many-secrets".into(),
            bad_url.clone(),
            [SECRET; 6].join(" "),
            "at most 4 are allowed",
        ),
    ];
    for (broker_id, url, secret, _) in &cases {
        add_raw_broker(&env, broker_id, url, secret).await;
    }
    for i in 0..3 {
        env.produce_event(Some(&format!("e{i}")), "L1", &format!("s{i}"))
            .await;
    }
    let app = spawn_app(env.settings());
    let bad_deliveries = 3 * cases.len() as i64;
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'dead'",
            bad_deliveries,
            Duration::from_secs(30)
        )
        .await
    );
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE broker_id = 'healthy' AND state = 'delivered'",
            3,
            Duration::from_secs(20)
        )
        .await,
        "the healthy broker gets everything"
    );
    assert_eq!(received(&healthy).await.len(), 3);
    assert!(
        received(&bad_target).await.is_empty(),
        "no request goes out for an invalid row"
    );
    for (broker_id, _, _, reason) in &cases {
        let row = env
            .db
            .query_one(
                "SELECT count(*), min(dead_reason), max(attempts) FROM deliveries WHERE broker_id = $1",
                &[broker_id],
            )
            .await
            .unwrap();
        let (count, dead_reason, attempts): (i64, String, i32) =
            (row.get(0), row.get(1), row.get(2));
        assert_eq!(count, 3, "{broker_id:?}");
        assert!(dead_reason.contains(reason), "{broker_id:?}: {dead_reason}");
        assert!(!dead_reason.contains("hunter2"), "{dead_reason}");
        assert!(attempts <= 1, "dead at once, not retried: {broker_id:?}");
    }

    // The admin API and the logs carry the hostile id escaped, as data.
    let brokers = app.admin_get("/brokers").await;
    assert_eq!(brokers.status(), 200);
    let brokers: Vec<serde_json::Value> = brokers.json().await.unwrap();
    assert!(brokers
        .iter()
        .any(|b| b["broker_id"] == hostile_id.as_str()));
    let query = format!(
        "/dead-letters?limit=1000&broker={}",
        url_encode(&hostile_id)
    );
    let letters = app.admin_get(&query).await;
    assert_eq!(
        letters.status(),
        400,
        "a control character is not a broker id"
    );
    let metrics = app.admin_get("/metrics").await.text().await.unwrap();
    for line in metrics.lines().filter(|l| !l.is_empty()) {
        assert!(
            line.starts_with('#') || line.starts_with("webhook_delivery_"),
            "a label value broke the exposition format: {line:.120}"
        );
    }
    app.stop().await;
    let lines = log_lines_containing("forged");
    assert!(!lines.is_empty());
    for line in lines {
        let parsed: serde_json::Value =
            serde_json::from_str(line.trim()).expect("every log line stays one JSON object");
        assert_ne!(parsed["msg"], "forged", "no forged log line");
    }
}

fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Every settings type and every broker type, formatted with `{:?}`: no secret appears.
#[test]
fn debug_output_never_shows_a_secret_or_the_database_password() {
    use std::io::Write;
    use webhook_delivery::broker::BrokerEndpoint;
    use webhook_delivery::config::Settings;
    use webhook_delivery::core::signing::SigningSecret;
    use webhook_delivery::ledger::BrokerRow;

    let secrets = [
        "PgPassw0rd-in-userinfo",
        "PgPassw0rd-in-query",
        "KafkaSaslPassw0rd",
        "KafkaKeyPem-BEGIN",
        "KafkaOauthSecr3t",
        "admin-T0ken-0123456789",
        "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB",
        "url-passw0rd",
    ];
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    write!(
        file,
        r#"
[postgres]
url = "postgres://svc:{}@db.internal:5432/ledger?sslmode=require&password={}"
[kafka.client]
"sasl.password" = "{}"
"ssl.key.pem" = "{}"
"sasl.oauthbearer.client.secret" = "{}"
"security.protocol" = "SASL_SSL"
[admin]
token = "{}"
"#,
        secrets[0], secrets[1], secrets[2], secrets[3], secrets[4], secrets[5]
    )
    .unwrap();
    let settings = Settings::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config"),
        Some(file.path()),
    )
    .expect("settings with secrets load");
    let row = BrokerRow {
        broker_id: "acme-freight".into(),
        webhook_url: format!("https://tms.example.com/hooks?token={}", secrets[8]),
        signing_secret: format!("whsec_{} whsec_{}", secrets[6], secrets[7]),
        enabled: true,
    };
    let endpoint = BrokerEndpoint::from_row(Some(&row)).unwrap();
    let bad_secret = BrokerEndpoint::from_row(Some(&BrokerRow {
        signing_secret: format!("whsec_{}!", secrets[6]),
        ..row.clone()
    }))
    .unwrap_err();
    let outputs = [
        format!("{settings:?}"),
        format!("{settings:#?}"),
        format!("{:?}", settings.kafka),
        format!("{:?}", settings.postgres),
        format!("{:?}", settings.delivery),
        format!("{:?}", settings.retry),
        format!("{:?}", settings.circuit_breaker),
        format!("{:?}", settings.admin),
        format!("{:?}", settings.log),
        format!("{:?}", settings.shutdown),
        format!("{row:?}"),
        format!("{endpoint:?}"),
        format!(
            "{:?}",
            SigningSecret::parse(&format!("whsec_{}", secrets[6])).unwrap()
        ),
        format!("{bad_secret:?} {bad_secret}"),
    ];
    for output in &outputs {
        for secret in secrets {
            assert!(!output.contains(secret), "{secret} leaked in {output}");
        }
    }
    let all = outputs.join("\n");
    for visible in [
        "db.internal:5432",
        "sslmode=require",
        "SASL_SSL",
        "acme-freight",
    ] {
        assert!(all.contains(visible), "{visible} is still shown: {all}");
    }
}
