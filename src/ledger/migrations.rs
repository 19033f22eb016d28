//! Schema migrations, embedded in the binary and applied by `webhook-delivery migrate` only:
//! `serve` runs no DDL, so a rolling deploy never takes a lock on a hot table from inside the
//! service. The order of a deploy is: `migrate` (older instances keep running: every migration
//! must be compatible with the previous release), then roll the pods. docs/migrations.md lists
//! each migration with the locks it takes.
//!
//! Migrations run one at a time under a session-level advisory lock, so several `migrate` runs
//! at once apply each migration exactly once.

use std::time::Duration;

use super::{Ledger, LedgerError};

/// How a migration is applied, which decides what it may lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// In one transaction with its `schema_migrations` row, under a short `lock_timeout`: it
    /// either applies whole or not at all, and it gives up instead of queueing the service's
    /// writes behind a lock it waits for. For new tables and brief catalogue changes.
    Transactional,
    /// Statement by statement, outside a transaction: `CREATE INDEX CONCURRENTLY` and
    /// `DROP INDEX CONCURRENTLY`, which never block reads or writes. A run that stops half-way
    /// is simply run again, so every statement must be repeatable (`IF [NOT] EXISTS`), and an
    /// index it builds is dropped first (`DROP INDEX CONCURRENTLY IF EXISTS`), because an
    /// interrupted concurrent build leaves an invalid index that `IF NOT EXISTS` would keep.
    Online,
}

struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
    mode: Mode,
}

/// Append only: never edit a migration that has shipped.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "ledger",
        sql: include_str!("../../sql/0001_ledger.sql"),
        mode: Mode::Transactional,
    },
    Migration {
        version: 2,
        name: "broker_circuits",
        sql: include_str!("../../sql/0002_broker_circuits.sql"),
        mode: Mode::Transactional,
    },
    Migration {
        version: 3,
        name: "pending_by_offset",
        sql: include_str!("../../sql/0003_pending_by_offset.sql"),
        mode: Mode::Transactional,
    },
    Migration {
        version: 4,
        name: "pending_by_load",
        sql: include_str!("../../sql/0004_pending_by_load.sql"),
        mode: Mode::Transactional,
    },
    Migration {
        version: 5,
        name: "attempt_indexes",
        sql: include_str!("../../sql/0005_attempt_indexes.sql"),
        mode: Mode::Transactional,
    },
    Migration {
        version: 8,
        name: "events_by_consumed_at",
        sql: include_str!("../../sql/0008_events_by_consumed_at.sql"),
        mode: Mode::Online,
    },
    Migration {
        version: 12,
        name: "dead_letters_by_time",
        sql: include_str!("../../sql/0012_dead_letters_by_time.sql"),
        mode: Mode::Online,
    },
    Migration {
        version: 13,
        name: "rejected_by_time",
        sql: include_str!("../../sql/0013_rejected_by_time.sql"),
        mode: Mode::Online,
    },
    Migration {
        version: 16,
        name: "delivery_counts",
        sql: include_str!("../../sql/0016_delivery_counts.sql"),
        mode: Mode::Transactional,
    },
    Migration {
        version: 17,
        name: "pending_probe_indexes",
        sql: include_str!("../../sql/0017_pending_probe_indexes.sql"),
        mode: Mode::Online,
    },
    Migration {
        version: 18,
        name: "drop_pending_by_age",
        sql: include_str!("../../sql/0018_drop_pending_by_age.sql"),
        mode: Mode::Online,
    },
    Migration {
        version: 19,
        name: "pending_by_partition",
        sql: include_str!("../../sql/0019_pending_by_partition.sql"),
        mode: Mode::Online,
    },
    Migration {
        version: 20,
        name: "delivered_attempt_in_row",
        sql: include_str!("../../sql/0020_delivered_attempt_in_row.sql"),
        mode: Mode::Transactional,
    },
    Migration {
        version: 21,
        name: "dead_error_in_counts",
        sql: include_str!("../../sql/0021_dead_error_in_counts.sql"),
        mode: Mode::Transactional,
    },
];

/// The newest migration this build's queries need. `serve` refuses a ledger that lacks any
/// transactional migration up to this one. Online migrations (index builds) are never required:
/// they only make queries faster, and may be applied while this build runs.
pub const REQUIRED_SCHEMA_VERSION: i32 = 21;

/// Which of the pending migrations a `migrate` run applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationScope {
    /// Every pending migration.
    All,
    /// Pending migrations up to and including this version (staged rollouts; tests).
    UpTo(i32),
    /// Only what this build's `serve` needs (the transactional migrations up to
    /// REQUIRED_SCHEMA_VERSION), so a deploy can start at once and leave the index builds, which
    /// take minutes on a large ledger, for a quieter hour.
    Required,
}

impl MigrationScope {
    fn includes(self, migration: &Migration) -> bool {
        match self {
            Self::All => true,
            Self::UpTo(target) => migration.version <= target,
            Self::Required => migration.is_required(),
        }
    }
}

impl Migration {
    fn is_required(&self) -> bool {
        self.mode == Mode::Transactional && self.version <= REQUIRED_SCHEMA_VERSION
    }
}

/// The newest migration this build knows.
pub fn latest_schema_version() -> i32 {
    MIGRATIONS.last().map_or(0, |migration| migration.version)
}

/// Every migration version this build knows, in order.
pub fn known_schema_versions() -> Vec<i32> {
    MIGRATIONS
        .iter()
        .map(|migration| migration.version)
        .collect()
}

/// How long a transactional migration waits for a table lock before giving up. The service's
/// claims and outcome writes would queue behind the waiting DDL, so waiting long is worse than
/// failing and running `migrate` again.
const MIGRATION_LOCK_TIMEOUT: Duration = Duration::from_secs(3);

/// Arbitrary but fixed: the key of the advisory lock that serializes migrations.
const MIGRATION_LOCK_KEY: i64 = 0x7765_6268_6f6f_6b31;

impl Ledger {
    /// Applies every pending migration; returns the versions applied by this call.
    pub async fn migrate(&self) -> Result<Vec<i32>, LedgerError> {
        self.migrate_scope(MigrationScope::All).await
    }

    /// Applies the pending migrations in `scope`; returns the versions applied.
    pub async fn migrate_scope(&self, scope: MigrationScope) -> Result<Vec<i32>, LedgerError> {
        let client = self.pooled_connection().await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK_KEY])
            .await?;
        let result = apply_pending(&client, scope).await;
        // The lock is per session and the connection goes back to the pool: always let go, and
        // put the session's timeouts back to what the pool configured.
        let unlocked = client
            .batch_execute(&format!(
                "SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY}); RESET lock_timeout; RESET statement_timeout"
            ))
            .await;
        let applied = result?;
        unlocked?;
        Ok(applied)
    }

    /// The migrations applied to this database, in version order (none if it was never migrated).
    pub async fn applied_schema_versions(&self) -> Result<Vec<i32>, LedgerError> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT version FROM schema_migrations ORDER BY version",
                &[],
            )
            .await;
        match rows {
            Ok(rows) => Ok(rows.iter().map(|row| row.get(0)).collect()),
            Err(LedgerError::Query(error))
                if error.code() == Some(&tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
            {
                Ok(Vec::new())
            }
            Err(error) => Err(error),
        }
    }

    /// What `serve` checks before it starts: every migration this build needs is applied. A
    /// newer schema (migrations this build does not know) is fine: migrations stay compatible
    /// with the previous release.
    pub async fn check_schema(&self) -> Result<SchemaStatus, LedgerError> {
        let applied = self.applied_schema_versions().await?;
        let missing: Vec<i32> = MIGRATIONS
            .iter()
            .filter(|migration| migration.is_required() && !applied.contains(&migration.version))
            .map(|migration| migration.version)
            .collect();
        if !missing.is_empty() {
            return Err(LedgerError::SchemaTooOld {
                applied: applied.last().copied(),
                required: REQUIRED_SCHEMA_VERSION,
                missing,
            });
        }
        Ok(SchemaStatus {
            newest_applied: applied.last().copied().unwrap_or(0),
            pending_optional: MIGRATIONS
                .iter()
                .map(|migration| migration.version)
                .filter(|version| !applied.contains(version))
                .collect(),
        })
    }
}

/// A schema `serve` can run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchemaStatus {
    pub newest_applied: i32,
    /// Known migrations not applied yet that this build does not need (online index builds).
    pub pending_optional: Vec<i32>,
}

async fn apply_pending(
    client: &deadpool_postgres::Object,
    scope: MigrationScope,
) -> Result<Vec<i32>, LedgerError> {
    client
        .batch_execute(&format!(
            "SET lock_timeout = {}; SET statement_timeout = 0;
             CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
            MIGRATION_LOCK_TIMEOUT.as_millis()
        ))
        .await?;
    let applied: Vec<i32> = client
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut newly_applied = Vec::new();
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) || !scope.includes(migration) {
            continue;
        }
        let failed = |source| LedgerError::Migration {
            version: migration.version,
            source,
        };
        match migration.mode {
            Mode::Transactional => {
                // A multi-statement simple query runs as one implicit transaction.
                client
                    .batch_execute(&format!(
                        "{}\n;INSERT INTO schema_migrations (version, name) VALUES ({}, '{}')",
                        migration.sql, migration.version, migration.name
                    ))
                    .await
                    .map_err(failed)?;
            }
            Mode::Online => {
                for statement in online_statements(migration.sql) {
                    client.batch_execute(&statement).await.map_err(failed)?;
                }
                client
                    .execute(
                        "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                        &[&migration.version, &migration.name],
                    )
                    .await?;
            }
        }
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "ledger migration applied"
        );
        newly_applied.push(migration.version);
    }
    Ok(newly_applied)
}

/// The statements of an online migration, each sent on its own: several statements in one
/// query string would run as one implicit transaction, where `CONCURRENTLY` is not allowed.
/// Online migrations hold plain DDL only: `--` comments are dropped first (they may contain
/// `;`), then the text is split at each `;`.
fn online_statements(sql: &str) -> Vec<String> {
    let code: String = sql
        .lines()
        .map(|line| line.split("--").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(|statement| statement.trim().to_owned())
        .filter(|statement| !statement.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_in_version_order_without_duplicates() {
        let versions: Vec<i32> = MIGRATIONS.iter().map(|m| m.version).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(versions, sorted);
        assert!(versions.contains(&REQUIRED_SCHEMA_VERSION));
        assert!(REQUIRED_SCHEMA_VERSION <= latest_schema_version());
    }

    #[test]
    fn online_migrations_only_use_concurrent_index_statements() {
        for migration in MIGRATIONS.iter().filter(|m| m.mode == Mode::Online) {
            for statement in online_statements(migration.sql) {
                assert!(
                    statement.contains("INDEX CONCURRENTLY") && statement.contains("EXISTS"),
                    "migration {} statement is not a repeatable concurrent index change: {statement}",
                    migration.version
                );
            }
        }
    }

    #[test]
    fn online_statements_drop_comments_before_splitting() {
        let sql = "-- why; with a semicolon\nDROP INDEX CONCURRENTLY IF EXISTS a;\n-- build\nCREATE INDEX CONCURRENTLY IF NOT EXISTS a\n    ON t (x); -- trailing\n";
        assert_eq!(
            online_statements(sql),
            vec![
                "DROP INDEX CONCURRENTLY IF EXISTS a",
                "CREATE INDEX CONCURRENTLY IF NOT EXISTS a\n    ON t (x)"
            ]
        );
    }
}
