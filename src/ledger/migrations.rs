//! Schema migrations, embedded in the binary and applied in order under an advisory lock so that
//! several instances starting at once apply each migration exactly once.

use super::{Ledger, LedgerError};

/// (version, name, SQL). Append only: never edit a migration that has shipped.
const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "ledger", include_str!("../../sql/0001_ledger.sql")),
    (
        2,
        "broker_circuits",
        include_str!("../../sql/0002_broker_circuits.sql"),
    ),
    (
        3,
        "pending_by_offset",
        include_str!("../../sql/0003_pending_by_offset.sql"),
    ),
    (
        4,
        "pending_by_load",
        include_str!("../../sql/0004_pending_by_load.sql"),
    ),
    (
        5,
        "attempt_indexes",
        include_str!("../../sql/0005_attempt_indexes.sql"),
    ),
];

/// Arbitrary but fixed: the key of the advisory lock that serializes migrations.
const MIGRATION_LOCK_KEY: i64 = 0x7765_6268_6f6f_6b31;

impl Ledger {
    /// Applies pending migrations; returns the versions applied by this call.
    pub async fn migrate(&self) -> Result<Vec<i32>, LedgerError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Building an index on a large ledger, or waiting for another instance's migration,
        // may take longer than the statement_timeout meant for the hot path.
        tx.batch_execute("SET LOCAL statement_timeout = 0").await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
        let applied: Vec<i32> = tx
            .query("SELECT version FROM schema_migrations", &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut newly_applied = Vec::new();
        for (version, name, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            tx.batch_execute(sql)
                .await
                .map_err(|source| LedgerError::Migration {
                    version: *version,
                    source,
                })?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[version, name],
            )
            .await?;
            newly_applied.push(*version);
        }
        tx.commit().await?;
        Ok(newly_applied)
    }
}
