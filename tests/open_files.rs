//! A real `EMFILE`: the process runs out of file descriptors while a broker has a webhook to
//! send. The request is not made, nothing counts against the broker (no attempt spent, no
//! breaker failure), the shortage is logged with the operating system's own error, and once
//! descriptors are free again the webhook goes out once, at its first attempt.
//!
//! A test binary of its own: lowering RLIMIT_NOFILE affects the whole process, and no other
//! test may be opening sockets meanwhile.

#[allow(dead_code)]
#[path = "api/helpers.rs"]
mod helpers;

use std::fs::File;
use std::time::Duration;

use helpers::*;

/// The soft open-files limit lowered to the highest descriptor in use + 1, with every free
/// descriptor below it taken by /dev/null, so the next `socket()` anywhere in the process
/// fails with `EMFILE`. Dropping it gives everything back.
struct Squeeze {
    original: libc::rlimit,
    fillers: Vec<File>,
}

impl Squeeze {
    fn start() -> Squeeze {
        let mut original = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut original) },
            0
        );
        let highest = std::fs::read_dir("/proc/self/fd")
            .expect("/proc/self/fd lists this process's descriptors")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u64>().ok())
            .max()
            .expect("some descriptor is open");
        let squeezed = libc::rlimit {
            rlim_cur: highest + 1,
            rlim_max: original.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given, which lives for the call.
        assert_eq!(
            unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &squeezed) },
            0
        );
        let mut fillers = Vec::new();
        loop {
            match File::open("/dev/null") {
                Ok(file) => fillers.push(file),
                Err(error) => {
                    assert_eq!(error.raw_os_error(), Some(libc::EMFILE), "{error}");
                    break;
                }
            }
        }
        Squeeze { original, fillers }
    }
}

impl Drop for Squeeze {
    fn drop(&mut self) {
        self.fillers.clear();
        // SAFETY: setrlimit only reads the struct it is given, which lives for the call.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.original) };
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_no_request_is_made_and_nothing_counts_against_the_broker() {
    let env = TestEnv::new(1).await;
    let receiver = ok_receiver().await;
    let broker = unique("emfile");
    env.add_broker(&broker, &receiver.uri()).await;
    env.subscribe(&broker, "L1").await;
    let mut settings = env.settings();
    // One failure counted against the broker would open its breaker.
    settings.circuit_breaker.failure_threshold = 1;
    // The client (and its socket) is let go soon after each delivery, so the next one needs a
    // new socket.
    settings.delivery.connection_keep_alive_ms = 100;
    let app = spawn_app(settings);

    // Warm up: Kafka and Postgres connections are open before descriptors run out (the
    // service retries those too, but this test is about the broker's requests).
    for i in 1..=8 {
        env.produce_event(Some(&format!("e{i}")), "L1", "matched")
            .await;
    }
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            8,
            Duration::from_secs(30)
        )
        .await,
        "the warm-up is delivered"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    let squeeze = Squeeze::start();
    // Through connections that are already open: the producer's and the test's database
    // connection.
    env.produce_event(Some("e9"), "L1", "in_transit").await;
    let claimed = env
        .count_reaches(
            "SELECT count(*) FROM deliveries",
            9,
            Duration::from_secs(20),
        )
        .await;
    // A few of the one-second pauses a shortage costs.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let pending_while_short = env
        .count("SELECT count(*) FROM deliveries WHERE state = 'pending'")
        .await;
    drop(squeeze);

    assert!(claimed, "the event is claimed over open connections");
    assert_eq!(pending_while_short, 1, "no socket, so no request was made");
    let warnings = logged(
        "requests not made: this process is short of connections or file descriptors; \
         the brokers pause a second and nothing counts against them (RUNBOOK: \
         \"Requests not made: local shortage\")",
        &broker,
    );
    assert!(
        warnings.iter().any(|line| line["error.message"]
            .as_str()
            .is_some_and(|m| m.contains("os error 24"))),
        "the shortage is logged with the operating system's error: {warnings:?}"
    );
    assert!(
        env.count_reaches(
            "SELECT count(*) FROM deliveries WHERE state = 'delivered'",
            9,
            Duration::from_secs(30)
        )
        .await,
        "with descriptors free again, the webhook goes out"
    );
    assert_eq!(
        received_event_ids(&receiver).await,
        ["e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9"],
        "each once, in order"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM deliveries WHERE attempts <> 1")
            .await,
        0,
        "each delivered at its first attempt: a request not made is not an attempt"
    );
    assert_eq!(
        env.count("SELECT count(*) FROM delivery_attempt_history WHERE outcome <> 'delivered'")
            .await,
        0,
        "no failed attempt recorded"
    );
    assert!(
        logged("circuit state changed", &broker).is_empty(),
        "no breaker transition"
    );
    let shortages = app
        .metric_value("webhook_delivery_local_shortages_total", &[])
        .await
        .unwrap_or(0.0);
    assert!(
        shortages >= 1.0,
        "counted as a local shortage ({shortages})"
    );
    app.stop().await;
}
