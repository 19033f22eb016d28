//! Production connections (issue 14): Postgres over TLS with libpq's sslmode meanings, librdkafka
//! built with SSL and SASL, refused Kafka properties named at start-up, and no secret in any
//! output. The local Postgres runs with ssl = on and Debian's self-signed "snakeoil" certificate
//! (CN and SAN `localhost`); Tansu listens in plaintext.

use std::io::BufRead;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::helpers::*;

const SNAKEOIL: &str = "/etc/ssl/certs/ssl-cert-snakeoil.pem";

/// A database of its own, with the ledger's tables. Returns its name.
async fn fresh_database() -> String {
    let name = unique("wd_tls").replace('-', "_");
    let (admin, connection) = tokio_postgres::connect(ADMIN_DB_URL, NoTls)
        .await
        .expect("postgres on 127.0.0.1:5432 (run scripts/services.sh)");
    tokio::spawn(connection);
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    name
}

/// Runs the real binary with only these `APP__*` variables on top of config/base.toml.
fn run(args: &[&str], vars: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_webhook-delivery"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("APP__ADMIN__BIND", "127.0.0.1:0")
        .envs(vars.iter().copied())
        .output()
        .expect("binary runs")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Bunyan lines at ERROR level (50) or above.
fn error_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["level"].as_u64().unwrap_or(0) >= 50)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_sslmode_require_the_service_delivers_over_encrypted_connections() {
    let env = TestEnv::new(1).await;
    let receiver = ok_receiver().await;
    env.add_broker("b1", &receiver.uri()).await;
    env.subscribe("b1", "L1").await;
    let application = unique("wd-tls");
    let mut settings = env.settings();
    settings.postgres.url = format!(
        "{}?sslmode=require&application_name={application}",
        env.db_url
    );
    let app = spawn_app(settings);
    env.produce_event(Some("e1"), "L1", "PICKED_UP").await;
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            1,
            Duration::from_secs(30)
        )
        .await,
        "the event is delivered"
    );
    let row = env
        .db
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl), min(s.version)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = $1",
            &[&application],
        )
        .await
        .unwrap();
    let (connections, encrypted, version): (i64, i64, Option<String>) =
        (row.get(0), row.get(1), row.get(2));
    assert!(connections >= 1, "the service holds connections");
    assert_eq!(encrypted, connections, "every connection is encrypted");
    assert!(
        version.as_deref().is_some_and(|v| v.starts_with("TLSv1.")),
        "{version:?}"
    );
    app.stop().await;
}

#[tokio::test]
async fn verify_full_against_the_self_signed_certificate_stops_serve_naming_the_setting() {
    let database = fresh_database().await;
    let password = unique("pg-password");
    let url =
        format!("postgres://postgres:{password}@127.0.0.1:5432/{database}?sslmode=verify-full");
    let output = run(&["serve"], &[("APP__POSTGRES__URL", &url)]);
    let (stdout, stderr) = text(&output);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        stderr.contains("certificate was refused (sslmode=verify-full)")
            && stderr.contains("set postgres.ca_file"),
        "{stderr}"
    );
    let errors = error_lines(&stdout);
    assert_eq!(errors.len(), 1, "one ERROR line: {stdout}");
    assert!(errors[0]["error.message"]
        .as_str()
        .unwrap()
        .contains("postgres.ca_file"));
    assert!(!stderr.contains("panic") && !stdout.contains("panic"));
    assert!(
        !stdout.contains(&password) && !stderr.contains(&password),
        "the password never appears: {stdout}{stderr}"
    );
}

/// The first DNS name in the certificate's subjectAltName (Debian's snakeoil certificate names
/// the host it was made on: `localhost` on this image, the machine's name elsewhere). A small DER
/// walk for short lengths, enough for that certificate.
fn certificate_dns_name(path: &str) -> String {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_file(path).expect("a PEM certificate");
    let der: &[u8] = der.as_ref();
    const SUBJECT_ALT_NAME: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x11];
    let at = der
        .windows(5)
        .position(|window| window == SUBJECT_ALT_NAME)
        .expect("the certificate has a subjectAltName")
        + 5;
    let mut rest = &der[at..];
    if rest[0] == 0x01 {
        rest = &rest[3..]; // the `critical` flag
    }
    assert!(rest[0] == 0x04 && rest[2] == 0x30, "OCTET STRING, SEQUENCE");
    let mut names = &rest[4..4 + usize::from(rest[3])];
    while names.len() >= 2 {
        let (tag, length) = (names[0], usize::from(names[1]));
        if tag == 0x82 {
            return String::from_utf8(names[2..2 + length].to_vec()).unwrap();
        }
        names = &names[2 + length..];
    }
    panic!("no DNS name in the certificate");
}

#[tokio::test]
async fn verify_ca_with_ca_file_passes_and_verify_full_checks_the_host_name() {
    let database = fresh_database().await;
    // `hostaddr` reaches the local server whatever the name resolves to; TLS checks `host`.
    let at = |host: &str, mode: &str| {
        format!("postgres://postgres@{host}:5432/{database}?sslmode={mode}&hostaddr=127.0.0.1")
    };
    let name = certificate_dns_name(SNAKEOIL);
    let passes = [
        at("127.0.0.1", "verify-ca"),
        at(&name, "verify-full"),
        // As in libpq, a configured CA makes `require` check the chain; this one is good.
        at("127.0.0.1", "require"),
    ];
    for url in &passes {
        let output = run(
            &["migrate"],
            &[
                ("APP__POSTGRES__URL", url),
                ("APP__POSTGRES__CA_FILE", SNAKEOIL),
            ],
        );
        assert!(output.status.success(), "{url}: {}", text(&output).1);
    }
    // The certificate names a host, not the address.
    let output = run(
        &["migrate"],
        &[
            ("APP__POSTGRES__URL", &at("127.0.0.1", "verify-full")),
            ("APP__POSTGRES__CA_FILE", SNAKEOIL),
        ],
    );
    let stderr = text(&output).1;
    assert!(!output.status.success());
    assert!(
        stderr.contains("is not a name the certificate was issued for")
            && stderr.contains("sslmode=verify-ca"),
        "{stderr}"
    );
    // The same CA given in the URL, libpq style.
    let url = format!("{}&sslrootcert={SNAKEOIL}", at(&name, "verify-full"));
    let output = run(&["migrate"], &[("APP__POSTGRES__URL", &url)]);
    assert!(output.status.success(), "{}", text(&output).1);
    // ...but not in both places.
    let output = run(
        &["migrate"],
        &[
            ("APP__POSTGRES__URL", &url),
            ("APP__POSTGRES__CA_FILE", SNAKEOIL),
        ],
    );
    assert!(!output.status.success());
    assert!(text(&output).1.contains("the CA is set twice"));
}

#[tokio::test]
async fn every_command_that_connects_uses_the_same_tls_settings() {
    let database = fresh_database().await;
    let password = unique("pg-password");
    let url = format!("postgres://postgres:{password}@127.0.0.1:5432/{database}?sslmode=verify-ca");
    let commands: [&[&str]; 5] = [
        &["migrate"],
        &["dead-letters", "list"],
        &["dead-letters", "replay", "--id", "1"],
        &["report", "deliveries", "--event-id", "e1"],
        &["report", "duplicates", "--since", "2026-01-01T00:00:00Z"],
    ];
    for args in commands {
        let output = run(args, &[("APP__POSTGRES__URL", &url)]);
        let (stdout, stderr) = text(&output);
        assert!(
            !output.status.success(),
            "{args:?} must refuse the certificate"
        );
        assert!(
            stderr.contains("certificate was refused (sslmode=verify-ca)"),
            "{args:?}: {stderr}"
        );
        assert!(!stdout.contains(&password) && !stderr.contains(&password));
        let output = run(
            args,
            &[
                ("APP__POSTGRES__URL", &url),
                ("APP__POSTGRES__CA_FILE", SNAKEOIL),
            ],
        );
        assert!(
            !text(&output).1.contains("certificate"),
            "{args:?} trusts the CA file: {}",
            text(&output).1
        );
    }
}

#[test]
fn a_kafka_property_librdkafka_refuses_stops_serve_with_one_error_line_naming_it() {
    let cases = [
        (
            "APP__KAFKA__CLIENT__NO__SUCH__PROPERTY",
            "x",
            "kafka.client.no.such.property",
            "No such configuration property",
        ),
        (
            "APP__KAFKA__CLIENT__SECURITY__PROTOCOL",
            "SASL_TLS",
            "kafka.client.security.protocol",
            "Invalid value \"SASL_TLS\"",
        ),
    ];
    for (variable, value, key, reason) in cases {
        let started = Instant::now();
        let output = run(&["serve"], &[(variable, value)]);
        let (stdout, stderr) = text(&output);
        assert_eq!(output.status.code(), Some(1), "{stderr}");
        assert!(started.elapsed() < Duration::from_secs(10), "fails at once");
        assert!(
            !stdout.contains("panic") && !stderr.contains("panic"),
            "{stdout}{stderr}"
        );
        let errors = error_lines(&stdout);
        assert_eq!(errors.len(), 1, "one ERROR line: {stdout}");
        let message = errors[0]["error.message"].as_str().unwrap();
        assert!(
            message.contains(key) && message.contains(reason),
            "{message}"
        );
        assert!(stderr.contains(key), "{stderr}");
        // Nothing was started: no migration, no consumer.
        assert!(!stdout.contains("webhook-delivery started"), "{stdout}");
    }
}

#[test]
fn librdkafka_is_built_with_ssl_and_sasl_plain_and_scram() {
    let config = rdkafka::ClientConfig::new()
        .create_native_config()
        .expect("librdkafka configuration");
    let features = config.get("builtin.features").unwrap();
    let features: Vec<&str> = features.trim_end_matches('\0').split(',').collect();
    for feature in ["ssl", "sasl_plain", "sasl_scram"] {
        assert!(
            features.contains(&feature),
            "{feature} missing: {features:?}"
        );
    }
    assert_eq!(
        webhook_delivery::kafka_properties::builtin_features(),
        features
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sasl_ssl_against_a_plaintext_listener_logs_a_tls_error_without_secrets_and_stays_up() {
    let env = TestEnv::new(1).await;
    let sasl_password = unique("sasl-password");
    let pg_password = unique("pg-password");
    let url = env
        .db_url
        .replacen("postgres@", &format!("postgres:{pg_password}@"), 1);
    let mut child = Command::new(env!("CARGO_BIN_EXE_webhook-delivery"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .envs(env.settings_env())
        .env("APP__POSTGRES__URL", &url)
        .env("APP__KAFKA__CLIENT__SECURITY__PROTOCOL", "SASL_SSL")
        .env("APP__KAFKA__CLIENT__SASL__MECHANISM", "SCRAM-SHA-512")
        .env("APP__KAFKA__CLIENT__SASL__USERNAME", "webhook-delivery")
        .env("APP__KAFKA__CLIENT__SASL__PASSWORD", &sasl_password)
        // Tansu takes the ClientHello for the start of a huge request and waits for the rest, so
        // the handshake ends by this timeout (a Kafka broker hangs up at once instead).
        .env(
            "APP__KAFKA__CLIENT__SOCKET__CONNECTION__SETUP__TIMEOUT__MS",
            "2000",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("binary starts");
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let readers = [
        collect_lines(child.stdout.take().unwrap(), lines.clone()),
        collect_lines(child.stderr.take().unwrap(), lines.clone()),
    ];
    let tls_error = |lines: &[String]| {
        lines.iter().any(|line| {
            serde_json::from_str::<serde_json::Value>(line).is_ok_and(|line| {
                line["level"].as_u64().unwrap_or(0) >= 40
                    && line["msg"].as_str().is_some_and(|msg| {
                        msg.contains("SSL handshake failed") || msg.contains("state SSL_HANDSHAKE")
                    })
            })
        })
    };
    let logged = eventually(Duration::from_secs(30), || async {
        tls_error(&lines.lock().unwrap())
    })
    .await;
    assert!(child.try_wait().unwrap().is_none(), "the process stays up");
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    for reader in readers {
        reader.join().unwrap();
    }
    let lines = lines.lock().unwrap();
    assert!(logged, "a TLS error is logged: {lines:#?}");
    assert!(status.success(), "a clean stop on SIGTERM");
    for line in lines.iter() {
        assert!(
            !line.contains(&sasl_password) && !line.contains(&pg_password),
            "a secret was logged: {line}"
        );
        assert!(!line.contains("\"msg\":\"panic\""), "{line}");
    }
}

fn collect_lines(
    stream: impl std::io::Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stream)
            .lines()
            .map_while(Result::ok)
        {
            lines.lock().unwrap().push(line);
        }
    })
}

#[tokio::test]
async fn disable_stays_plain_text_and_prefer_takes_tls_when_the_server_offers_it() {
    let database = fresh_database().await;
    let (db, connection) = tokio_postgres::connect(ADMIN_DB_URL, NoTls).await.unwrap();
    tokio::spawn(connection);
    for (mode, encrypted) in [("disable", false), ("prefer", true), ("", true)] {
        let application = unique("wd-tls");
        // "": no sslmode at all, which means prefer.
        let sslmode = match mode {
            "" => String::new(),
            mode => format!("&sslmode={mode}"),
        };
        let url = format!(
            "postgres://postgres@127.0.0.1:5432/{database}?application_name={application}{sslmode}"
        );
        let ledger = webhook_delivery::ledger::Ledger::connect_lazy(&url, 1).unwrap();
        ledger.ping().await.unwrap();
        let row = db
            .query_one(
                "SELECT bool_and(s.ssl) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.application_name = $1",
                &[&application],
            )
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, Option<bool>>(0),
            Some(encrypted),
            "sslmode={mode}"
        );
    }
}
