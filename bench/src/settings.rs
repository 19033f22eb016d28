//! The configuration both systems run with: config/base.toml plus the bench's overrides,
//! loaded through the service's own `Settings` (so an invalid value fails as it would in
//! production). The overrides are written to a file that the system-under-test process loads.

use std::path::{Path, PathBuf};

use webhook_delivery::config::Settings;

use crate::error::BenchError;
use crate::world::{World, KAFKA};

/// One webhook attempt may take this long; the baseline's fixed timeout is the same 5 s.
pub const REQUEST_TIMEOUT_MS: u64 = 5_000;

/// The bench's overrides of config/base.toml, as TOML.
pub fn overrides(world: &World) -> String {
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
    config_dir: &Path,
    path: PathBuf,
) -> Result<(Settings, PathBuf), BenchError> {
    std::fs::write(&path, overrides(world))
        .map_err(|e| BenchError::io(format!("writing {}", path.display()), e))?;
    let settings = Settings::load(config_dir, Some(&path))?;
    Ok((settings, path))
}
