//! The configuration both systems run with: config/base.toml plus the bench's overrides,
//! loaded through the service's own `Settings` (so an invalid value fails as it would in
//! production). The overrides are written to a file that the system-under-test process loads.

use std::path::{Path, PathBuf};

use webhook_delivery::config::Settings;

use crate::error::BenchError;
use crate::scenario::{SettingsProfile, SoakRetention};
use crate::world::{World, KAFKA};

/// One webhook attempt may take this long; the baseline's fixed timeout is the same 5 s.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;

/// What the shipped-defaults profile changes in config/base.toml, as printed with the results.
pub const SHIPPED_DEFAULTS_CHANGES: &str = "kafka.brokers, kafka.topic, kafka.group_id and \
     postgres.url (the run's topic, group and database; sslmode as shipped), \
     kafka.initial_offsets = \"earliest\" (a first deployment's starting point, which has no \
     default: the backlog is already in the topic), admin.bind (a free port), \
     delivery.allow_http and delivery.allowed_networks = [\"127.0.0.0/8\"] (the receivers are \
     plain http on loopback); nothing else";

/// The run's overrides of config/base.toml, as TOML.
pub fn overrides(
    world: &World,
    profile: SettingsProfile,
    retention: Option<&SoakRetention>,
) -> String {
    let mut toml = match profile {
        SettingsProfile::Bench => bench_overrides(world),
        SettingsProfile::ShippedDefaults => shipped_defaults(world),
    };
    if let Some(retention) = retention {
        toml.push_str(&retention_overrides(retention));
    }
    toml
}

/// A soak's windows; batch_rows and batch_pause_ms stay as shipped, since whether the shipped
/// pacing keeps up with the rate is part of what the soak shows.
fn retention_overrides(retention: &SoakRetention) -> String {
    let ms = |d: std::time::Duration| d.as_millis();
    format!(
        r#"
[retention]
# The soak: windows in minutes so that many of them pass during the run.
enabled = true
delivered_ms = {}
dead_ms = {}
rejected_ms = {}
interval_ms = {}
"#,
        ms(retention.delivered),
        ms(retention.dead),
        ms(retention.rejected),
        ms(retention.interval),
    )
}

/// Only where the local stack is: every tuning key keeps its value from config/base.toml.
fn shipped_defaults(world: &World) -> String {
    format!(
        r#"# Written by webhook-delivery-bench for one run: the shipped defaults (config/base.toml),
# changed only where the local stack is and to let the service reach the loopback receivers.
[kafka]
brokers = "{KAFKA}"
topic = "{topic}"
group_id = "{group}"
initial_offsets = "earliest"

[postgres]
url = "{db_url}"

[delivery]
allow_http = true
allowed_networks = ["127.0.0.0/8"]

[admin]
bind = "127.0.0.1:0"
"#,
        topic = world.topic,
        group = world.group_id,
        db_url = world.db_url,
    )
}

/// The bench's tuning (docs/performance.md, "The bench configuration").
fn bench_overrides(world: &World) -> String {
    format!(
        r#"# Written by webhook-delivery-bench for one run.
[kafka]
brokers = "{KAFKA}"
topic = "{topic}"
group_id = "{group}"
session_timeout_ms = 6000
# A new member waits up to this long for the partitions of a killed one.
max_poll_interval_ms = 15000
max_batch_messages = 2000
# Each run's topic and group are new (a first deployment): read everything the run produced.
initial_offsets = "earliest"

[kafka.client]
# Tansu answers a fetch only when fetch.wait.max.ms (default 500) runs out, even with data
# waiting; Kafka answers as soon as fetch.min.bytes (1) is there. Same setting for both systems.
"fetch.wait.max.ms" = "20"

[postgres]
# Plain text, as the baseline's NoTls client and the recorded figures (the local server offers
# TLS, which sslmode's default, prefer, would take).
url = "{db_url}?sslmode=disable"

[delivery]
request_timeout_ms = {REQUEST_TIMEOUT_MS}
max_in_flight_per_broker = 64
# The receivers are plain http on loopback.
allow_http = true
allowed_networks = ["127.0.0.0/8"]

[retry]
# Shorter than production (5 s doubling to 30 min) so a run ends in minutes.
base_delay_ms = 1000
max_delay_ms = 10000

[admin]
bind = "127.0.0.1:0"

[log]
# Keeps logging off the hot path; warnings still reach the run's log file.
level = "warn"

[shutdown]
drain_timeout_ms = 3000
"#,
        topic = world.topic,
        group = world.group_id,
        db_url = world.db_url,
    )
}

/// Writes the overrides next to the run's logs and loads them the way the service would.
pub fn write_and_load(
    world: &World,
    profile: SettingsProfile,
    retention: Option<&SoakRetention>,
    config_dir: &Path,
    path: PathBuf,
) -> Result<(Settings, PathBuf), BenchError> {
    std::fs::write(&path, overrides(world, profile, retention))
        .map_err(|e| BenchError::io(format!("writing {}", path.display()), e))?;
    let settings = Settings::load(config_dir, Some(&path))?;
    Ok((settings, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world() -> World {
        World {
            server: "127.0.0.1:5432".into(),
            db_name: "wd_bench_x".into(),
            db_url: "postgres://postgres@127.0.0.1:5432/wd_bench_x".into(),
            topic: "wd-bench-x".into(),
            group_id: "wd-bench-x-group".into(),
        }
    }

    #[test]
    fn the_shipped_defaults_profile_changes_no_tuning_key() {
        let config_dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../config"));
        let file =
            std::env::temp_dir().join(format!("wd-bench-shipped-{}.toml", std::process::id()));
        let (mut shipped, _) = write_and_load(
            &world(),
            SettingsProfile::ShippedDefaults,
            None,
            config_dir,
            file.clone(),
        )
        .unwrap();
        let _ = std::fs::remove_file(&file);
        let base = Settings::load(config_dir, None).unwrap();
        assert_eq!(shipped.postgres.url, world().db_url);
        assert!(shipped.delivery.allow_http);
        shipped.delivery.allow_http = base.delivery.allow_http;
        shipped.delivery.allowed_networks = base.delivery.allowed_networks.clone();
        let debug = |s: &Settings| {
            format!(
                "{:?} {:?} {:?} {:?} {:?}",
                s.delivery, s.retry, s.circuit_breaker, s.log, s.shutdown
            )
        };
        assert_eq!(debug(&shipped), debug(&base));
        let kafka = |s: &Settings| {
            (
                s.kafka.session_timeout_ms,
                s.kafka.max_poll_interval_ms,
                s.kafka.max_batch_messages,
                s.kafka.client.clone(),
            )
        };
        assert_eq!(kafka(&shipped), kafka(&base));
        let postgres = |s: &Settings| {
            (
                s.postgres.pool_size,
                s.postgres.statement_timeout_ms,
                s.postgres.call_timeout_ms,
            )
        };
        assert_eq!(postgres(&shipped), postgres(&base));
    }

    #[test]
    fn a_soak_runs_with_its_windows_and_the_shipped_pacing() {
        let config_dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../config"));
        let file = std::env::temp_dir().join(format!("wd-bench-soak-{}.toml", std::process::id()));
        let soak = crate::scenario::Scenario::new(crate::scenario::ScenarioName::Soak, false);
        let (settings, _) = write_and_load(
            &world(),
            soak.settings,
            soak.retention.as_ref(),
            config_dir,
            file.clone(),
        )
        .unwrap();
        let _ = std::fs::remove_file(&file);
        let base = Settings::load(config_dir, None).unwrap();
        let retention = &settings.retention;
        assert!(retention.enabled);
        assert_eq!(retention.delivered_ms, 120_000);
        assert_eq!(retention.interval_ms, 20_000);
        assert_eq!(retention.batch_rows, base.retention.batch_rows);
        assert_eq!(retention.batch_pause_ms, base.retention.batch_pause_ms);
    }
}
