//! The soak's database sampler: every `sample_every`, the database's size, the three big
//! tables' sizes, live and dead rows and autovacuum runs (all from the catalog and the
//! statistics views: no `count(*)` over a table that holds millions of rows), and the delivery
//! rate the receivers saw since the previous sample.

use std::time::{Duration, Instant};

use tokio_postgres::NoTls;

use crate::error::BenchError;

/// The tables retention keeps small, in the order the CSV and tables show them.
pub const TABLES: [&str; 3] = ["deliveries", "delivery_attempts", "events"];

/// One table at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TableSample {
    /// `pg_total_relation_size`: heap, indexes and TOAST.
    pub bytes: i64,
    /// `pg_stat_user_tables.n_live_tup` / `n_dead_tup` (estimates kept by Postgres).
    pub live_rows: i64,
    pub dead_rows: i64,
    /// `autovacuum_count`: how many times autovacuum has vacuumed it so far.
    pub autovacuums: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SoakSample {
    /// Since the run's clock start (production start).
    pub secs: f64,
    /// `pg_database_size(current_database())`.
    pub database_bytes: i64,
    /// By `TABLES` order.
    pub tables: [TableSample; 3],
    /// Distinct deliveries the receivers accepted since the previous sample, per second.
    pub deliveries_per_sec: f64,
}

const QUERY: &str = "SELECT pg_database_size(current_database()), s.relname::text, \
     pg_total_relation_size(s.relid), s.n_live_tup, s.n_dead_tup, s.autovacuum_count \
     FROM pg_stat_user_tables s WHERE s.relname = ANY($1)";

/// The server's vacuum settings, as one line for the run's notes: whether freed space can be
/// reused at all depends on them (a server with `autovacuum = off` never reclaims it).
pub async fn vacuum_settings(db_url: &str) -> Result<String, BenchError> {
    let (db, connection) = tokio_postgres::connect(db_url, NoTls)
        .await
        .map_err(|e| BenchError::postgres("connecting to read the vacuum settings", e))?;
    let connection = tokio::spawn(connection);
    let rows = db
        .query(
            "SELECT name, setting || coalesce(unit, '') FROM pg_settings \
             WHERE name IN ('autovacuum', 'autovacuum_naptime', 'autovacuum_vacuum_scale_factor', \
             'autovacuum_vacuum_threshold', 'autovacuum_vacuum_cost_limit', \
             'autovacuum_vacuum_cost_delay', 'server_version') ORDER BY name",
            &[],
        )
        .await
        .map_err(|e| BenchError::postgres("reading the vacuum settings", e))?;
    drop(db);
    let _ = connection.await;
    Ok(rows
        .iter()
        .map(|row| format!("{} = {}", row.get::<_, String>(0), row.get::<_, String>(1)))
        .collect::<Vec<_>>()
        .join(", "))
}

pub struct DatabaseSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<SoakSample>>,
}

impl DatabaseSampler {
    /// Samples at once, then every `every` until stopped; `delivered` reads the receivers'
    /// count of distinct accepted deliveries.
    pub async fn start(
        db_url: &str,
        every: Duration,
        delivered: impl Fn() -> u64 + Send + 'static,
    ) -> Result<DatabaseSampler, BenchError> {
        let (db, connection) = tokio_postgres::connect(db_url, NoTls)
            .await
            .map_err(|e| BenchError::postgres("connecting the soak sampler", e))?;
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let connection = tokio::spawn(connection);
            let began = Instant::now();
            let mut samples = Vec::new();
            let mut ticks = tokio::time::interval(every);
            let (mut last_count, mut last_at) = (delivered(), began);
            loop {
                let last_tick = tokio::select! {
                    _ = ticks.tick() => false,
                    _ = &mut stopped => true,
                };
                let (count, at) = (delivered(), Instant::now());
                let elapsed = at.duration_since(last_at).as_secs_f64();
                let rate = if elapsed > 0.0 {
                    count.saturating_sub(last_count) as f64 / elapsed
                } else {
                    0.0
                };
                (last_count, last_at) = (count, at);
                // A failed read (the database busy past the call) is a gap in the series.
                if let Ok(rows) = db.query(QUERY, &[&&TABLES[..]]).await {
                    let mut sample = SoakSample {
                        secs: at.duration_since(began).as_secs_f64(),
                        database_bytes: 0,
                        tables: [TableSample::default(); 3],
                        deliveries_per_sec: rate,
                    };
                    for row in rows {
                        sample.database_bytes = row.get(0);
                        let name: String = row.get(1);
                        if let Some(index) = TABLES.iter().position(|t| *t == name) {
                            sample.tables[index] = TableSample {
                                bytes: row.get(2),
                                live_rows: row.get(3),
                                dead_rows: row.get(4),
                                autovacuums: row.get(5),
                            };
                        }
                    }
                    samples.push(sample);
                }
                if last_tick {
                    break;
                }
            }
            drop(db);
            let _ = connection.await;
            samples
        });
        Ok(DatabaseSampler { stop, task })
    }

    /// Takes a last sample and returns them all.
    pub async fn stop(self) -> Vec<SoakSample> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}
