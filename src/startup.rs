//! Wiring: builds the actors, starts the consumer and the admin API, and shuts everything down
//! in order.

use std::future::Future;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use actix::Actor;

use crate::actors::delivery::{ByteBudget, DeliveryDeps};
use crate::actors::delivery_supervisor::{DeliveriesReplayed, DeliverySupervisor, DrainDeliveries};
use crate::actors::ledger_gateway::{LedgerGateway, LedgerWatch, MAX_GROUP_WRITES};
use crate::actors::partition::PartitionDeps;
use crate::actors::partition_supervisor::{PartitionSupervisor, StopPartitions};
use crate::admin::{self, AdminState, Health};
use crate::config::{KafkaSettings, OutcomeCommit, Settings};
use crate::connection_budget::{BudgetSource, ConnectionBudget};
use crate::kafka::{rebalance_channel, ConsumerError, KafkaConsumer};
use crate::kafka_properties::{self, KafkaPropertyError};
use crate::lease::LeaseBook;
use crate::ledger::{Ledger, LedgerError, ReplayedBrokers};
use crate::metrics::Metrics;
use crate::offsets::{SeedSource, StartDecision};
use crate::stall::{PartitionStalls, StallBook};

/// How often the ledger-wide gauges (pending, dead) are refreshed.
const GAUGE_REFRESH: Duration = Duration::from_secs(5);

/// How often an undecided first deployment looks again for seeded offsets.
const FIRST_START_RECHECK: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("the ledger database is not usable")]
    Ledger(#[from] LedgerError),
    #[error("could not start consuming from Kafka")]
    Kafka(#[from] ConsumerError),
    #[error(transparent)]
    KafkaProperty(#[from] KafkaPropertyError),
    #[error("could not check where to start consuming")]
    StartingPoint(#[source] crate::offsets::OffsetsError),
    #[error("could not listen on admin.bind {address}")]
    AdminBind {
        address: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub struct Application {
    settings: Settings,
    ledger: Ledger,
    /// Where attempt outcomes are written (`Ledger::for_outcomes`).
    outcome_ledger: Ledger,
    instance_id: String,
    admin_listener: TcpListener,
}

impl Application {
    /// Checks the Kafka client settings with librdkafka, connects to Postgres, checks that the
    /// ledger schema is one this build can run on and binds the admin port. It runs no DDL:
    /// migrations are `webhook-delivery migrate`, a separate deploy step (docs/migrations.md).
    pub async fn build(settings: Settings) -> Result<Application, StartupError> {
        // First, while nothing else runs (it blocks for a moment): a refused property must stop
        // start-up with its name, not fail later inside the consumer thread.
        kafka_properties::check(&settings.kafka)?;
        let ledger = Ledger::connect(&settings.postgres)?;
        let outcome_ledger = ledger.for_outcomes(&settings.postgres, MAX_GROUP_WRITES)?;
        let schema = ledger.check_schema().await?;
        if !schema.pending_optional.is_empty() {
            tracing::info!(
                versions = ?schema.pending_optional,
                "ledger migrations not applied yet (optional for this build: online index builds); run `webhook-delivery migrate`"
            );
        }
        let outcome_synchronous_commit = outcome_ledger.synchronous_commit().await?;
        let outcome_commit = settings.postgres.outcome_commit;
        if outcome_commit == OutcomeCommit::Async && outcome_synchronous_commit != "off" {
            tracing::warn!(
                synchronous_commit = %outcome_synchronous_commit,
                "postgres.outcome_commit is \"async\" but the outcome connections did not get synchronous_commit = off (a connection pooler that drops startup options?): outcomes wait for the WAL flush, which is safe but slower on deep loads"
            );
        } else {
            tracing::info!(
                ?outcome_commit,
                synchronous_commit = %outcome_synchronous_commit,
                "attempt outcomes are committed with this synchronous_commit; claims with the server's own"
            );
        }
        let admin_listener =
            TcpListener::bind(settings.admin.bind).map_err(|source| StartupError::AdminBind {
                address: settings.admin.bind,
                source,
            })?;
        Ok(Application {
            settings,
            ledger,
            outcome_ledger,
            instance_id: instance_id(),
            admin_listener,
        })
    }

    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The admin API's port (useful when `admin.bind` asks for port 0).
    pub fn admin_port(&self) -> u16 {
        self.admin_listener
            .local_addr()
            .map(|address| address.port())
            .unwrap_or_default()
    }

    /// Runs until `shutdown` resolves, then stops in order: stop reading partitions (each
    /// finishes its batch and stores its offset), let in-flight webhooks finish within
    /// `shutdown.drain_timeout_ms`, commit offsets and leave the group. Must run inside an actix
    /// System.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), StartupError> {
        let Application {
            settings,
            ledger,
            outcome_ledger,
            instance_id,
            admin_listener,
        } = self;
        let metrics = Arc::new(Metrics::new());
        let health = Health::default();
        let leases = LeaseBook::default();
        let stalls = StallBook::default();
        let ledger_gateway = LedgerGateway::new(
            ledger.clone(),
            outcome_ledger,
            LedgerWatch {
                metrics: metrics.clone(),
                health: health.clone(),
                stalls: stalls.clone(),
                stall_after: settings.kafka.stall_after(),
            },
        )
        .start();
        let (connections, budget_source) = ConnectionBudget::for_process(
            settings.delivery.max_outbound_connections,
            metrics.outbound_connections.clone(),
            &metrics.outbound_connections_max,
            metrics.local_shortages.clone(),
        );
        tracing::info!(
            max = connections.max(),
            source = %budget_source,
            "outbound connection budget"
        );
        if let BudgetSource::Configured {
            open_files_limit: Some(limit),
        } = budget_source
        {
            if connections.max() as u64 >= limit {
                tracing::warn!(max = connections.max(), open_files_limit = limit,
                    "delivery.max_outbound_connections is not below the open-files limit: the process runs out of file descriptors before the budget does (requests are then refused by the kernel, still without counting against brokers); set it to 0 or below the limit");
            }
        }
        let deliveries = DeliverySupervisor::new(DeliveryDeps {
            ledger: ledger_gateway.clone(),
            leases: leases.clone(),
            settings: settings.delivery.clone(),
            retry: settings.retry.policy(),
            breaker: settings.circuit_breaker.breaker_config(),
            metrics: metrics.clone(),
            instance_id: instance_id.clone(),
            ledger_loads: Arc::new(tokio::sync::Semaphore::new(
                settings.delivery.max_concurrent_ledger_loads,
            )),
            buffered: ByteBudget::new(
                settings.delivery.max_buffered_bytes,
                metrics.buffered_bytes.clone(),
                &metrics.buffered_bytes_max,
            ),
            connections,
        })
        .start();
        let (rebalance_events, rebalances) = rebalance_channel();
        let partitions = PartitionSupervisor::new(
            PartitionDeps {
                topic: settings.kafka.topic.clone(),
                ledger: ledger_gateway,
                deliveries: deliveries.clone(),
                leases: leases.clone(),
                instance_id: instance_id.clone(),
                lease: settings.postgres.lease(),
                request_timeout: settings.delivery.request_timeout(),
                event_limits: settings.delivery.event_limits(),
                max_batch_messages: settings.kafka.max_batch_messages,
                metrics: metrics.clone(),
                health: health.clone(),
            },
            rebalances,
            settings.kafka.revoke_drain_timeout(),
        )
        .start();
        let admin_server = admin::serve(
            admin_listener,
            AdminState {
                ledger: ledger.clone(),
                deliveries: deliveries.clone(),
                metrics: metrics.clone(),
                health: health.clone(),
                token: Some(settings.admin.token.clone()).filter(|t| !t.is_empty()),
            },
        )
        .map_err(|source| StartupError::AdminBind {
            address: settings.admin.bind,
            source,
        })?;
        let admin_handle = admin_server.handle();
        actix_rt::spawn(admin_server);
        let cleaner = actix_rt::spawn(crate::retention::run_cleaner(
            ledger.clone(),
            settings.retention.clone(),
            metrics.clone(),
        ));
        let gauges = actix_rt::spawn(refresh_gauges(
            ledger.clone(),
            settings.kafka.clone(),
            leases.clone(),
            metrics.clone(),
            health.clone(),
            PartitionStalls::new(
                settings.kafka.topic.clone(),
                stalls,
                health.clone(),
                settings.kafka.stall_after(),
            ),
        ));
        let mut shutdown = std::pin::pin!(shutdown);
        let decided = tokio::select! {
            decided = await_starting_point(&settings.kafka, &ledger, &health) => decided.map(|()| true),
            () = &mut shutdown => Ok(false),
        };
        let decided = match decided {
            Ok(decided) => decided,
            Err(error) => {
                gauges.abort();
                admin_handle.stop(true).await;
                return Err(error);
            }
        };
        if !decided {
            tracing::info!(instance_id = %instance_id, "stopped before consuming anything");
            gauges.abort();
            admin_handle.stop(true).await;
            return Ok(());
        }
        let consumer = match KafkaConsumer::start(&settings.kafka, rebalance_events, health) {
            Ok(consumer) => consumer,
            Err(error) => {
                // The actors above may not have been polled yet; actix would start them while
                // the System is dropped, outside the runtime, and panic. Let them start first.
                tokio::task::yield_now().await;
                return Err(error.into());
            }
        };
        tracing::info!(
            instance_id = %instance_id,
            topic = %settings.kafka.topic,
            group_id = %settings.kafka.group_id,
            admin = %settings.admin.bind,
            "webhook-delivery started"
        );
        let replays = actix_rt::spawn(announce_replays(ledger.clone(), deliveries.clone()));

        shutdown.await;
        tracing::info!(instance_id = %instance_id, "shutting down: finishing current batches");
        // StopPartitions enforces kafka.revoke_drain_timeout_ms itself; this only guards
        // against a wedged supervisor.
        let _ = tokio::time::timeout(
            settings.kafka.revoke_drain_timeout() + Duration::from_secs(1),
            partitions.send(StopPartitions),
        )
        .await;
        let drained = deliveries
            .send(DrainDeliveries {
                timeout: settings.shutdown.drain_timeout(),
            })
            .await
            .unwrap_or(false);
        if !drained {
            tracing::warn!(
                "in-flight webhooks did not finish within shutdown.drain_timeout_ms; they stay pending and will be sent again"
            );
        }
        let _ = actix_rt::task::spawn_blocking(move || consumer.shutdown()).await;
        gauges.abort();
        replays.abort();
        // Mid-pass, the cleaner's connection is closed rather than pooled: its lock goes with it.
        cleaner.abort();
        admin_handle.stop(true).await;
        tracing::info!(instance_id = %instance_id, "stopped");
        Ok(())
    }
}

/// The first-start gate (RUNBOOK.md "Cutover"). A first deployment (empty
/// ledger, no committed offset) must not read the topic's whole retention by accident: it starts
/// where `kafka.initial_offsets` says (committed first, so the choice survives a restart), or
/// waits, rechecking, until `webhook-delivery offsets seed` has committed a starting point.
/// Kafka or database trouble here is retried: it is a start-up wait, not a crash.
/// A Kafka client that cannot even be created (a broken `kafka.client` property) is fatal.
async fn await_starting_point(
    kafka: &KafkaSettings,
    ledger: &Ledger,
    health: &Health,
) -> Result<(), StartupError> {
    let mut told = false;
    loop {
        match starting_point(kafka, ledger).await {
            Ok(StartDecision::Consume) => {
                if told {
                    tracing::info!(topic = %kafka.topic, group_id = %kafka.group_id,
                        "starting offsets found; consuming");
                }
                return Ok(());
            }
            Ok(StartDecision::Seed(initial)) => {
                let source = match initial {
                    crate::config::InitialOffsets::Earliest => SeedSource::Earliest,
                    crate::config::InitialOffsets::Latest => SeedSource::Latest,
                };
                let settings = kafka.clone();
                let seeded = actix_rt::task::spawn_blocking(move || {
                    let rows =
                        crate::offsets::plan_seed(&settings, &source, Duration::from_secs(10))?;
                    crate::offsets::commit_seed(&settings, &rows, Duration::from_secs(10))?;
                    Ok::<_, crate::offsets::OffsetsError>(rows)
                })
                .await;
                match seeded {
                    Ok(Ok(rows)) => {
                        let offsets: Vec<(i32, i64)> =
                            rows.iter().map(|row| (row.partition, row.seed)).collect();
                        tracing::info!(topic = %kafka.topic, group_id = %kafka.group_id,
                            initial_offsets = ?initial, offsets = ?offsets,
                            "first deployment: committed the starting offsets from kafka.initial_offsets");
                        return Ok(());
                    }
                    Ok(Err(error)) => tracing::warn!(topic = %kafka.topic, error.message = %error,
                        "could not commit the first deployment's starting offsets; retrying"),
                    Err(error) => {
                        tracing::warn!(error.message = %error, "seeding task failed; retrying")
                    }
                }
            }
            Ok(StartDecision::Wait) => {
                if !told {
                    told = true;
                    tracing::error!(
                        topic = %kafka.topic,
                        group_id = %kafka.group_id,
                        "first deployment: the ledger is empty and the group has no committed offsets, so nothing is consumed \
                         (reading the whole topic would re-send its history). Run `webhook-delivery offsets seed --from-group OLD_GROUP` \
                         (or --at TIME / --latest), or set kafka.initial_offsets; see RUNBOOK.md \"Cutover\""
                    );
                    health.mark_not_joined(format!(
                        "first deployment: not consuming until group `{}` has starting offsets; run `webhook-delivery offsets seed` or set kafka.initial_offsets",
                        kafka.group_id
                    ));
                }
            }
            Err(StartingPointError::Kafka(error @ crate::offsets::OffsetsError::Create(_))) => {
                return Err(StartupError::StartingPoint(error));
            }
            Err(error) => tracing::warn!(topic = %kafka.topic, error.message = %error,
                "could not check whether this is a first deployment; retrying"),
        }
        tokio::time::sleep(FIRST_START_RECHECK).await;
    }
}

#[derive(Debug, thiserror::Error)]
enum StartingPointError {
    #[error("Kafka: {0}")]
    Kafka(#[source] crate::offsets::OffsetsError),
    #[error("the ledger: {0}")]
    Ledger(#[source] LedgerError),
    #[error("the Kafka offsets task failed")]
    Task(#[source] tokio::task::JoinError),
}

async fn starting_point(
    kafka: &KafkaSettings,
    ledger: &Ledger,
) -> Result<StartDecision, StartingPointError> {
    let settings = kafka.clone();
    let offsets = actix_rt::task::spawn_blocking(move || {
        crate::offsets::partition_offsets(&settings, Duration::from_secs(10))
    })
    .await
    .map_err(StartingPointError::Task)?
    .map_err(StartingPointError::Kafka)?;
    // Committed offsets settle it without the database (which may be locked or slow right now).
    let has_events = !offsets.iter().any(|p| p.committed.is_some())
        && ledger
            .has_events()
            .await
            .map_err(StartingPointError::Ledger)?;
    Ok(crate::offsets::start_decision(
        has_events,
        &offsets,
        kafka.initial_offsets,
    ))
}

/// Tells the schedulers about every replay committed anywhere (the CLI, the admin API, another
/// instance), so that a replayed delivery goes before later deliveries of its load not yet sent.
/// A replay committed while the listener was not listening (the database restarting, or before
/// the first connection) was not heard: whenever it starts listening, every active broker
/// reads its ledger from the start, as after a replay (a scheduler's sweeps otherwise start
/// after the rows it holds, and replayed rows are earlier).
async fn announce_replays(ledger: Ledger, deliveries: actix::Addr<DeliverySupervisor>) {
    loop {
        match ledger.replays_announced().await {
            Ok(mut announcements) => {
                // At startup no broker holds anything yet, and this costs nothing.
                tracing::info!("listening for replays; every broker active re-reads its ledger in case one was missed");
                deliveries.do_send(DeliveriesReplayed(ReplayedBrokers {
                    brokers: Default::default(),
                    every_broker: true,
                }));
                while let Some(replayed) = announcements.next().await {
                    tracing::info!(
                        brokers = ?replayed.brokers,
                        every_broker = replayed.every_broker,
                        "replays committed; those brokers' schedulers re-read their ledger"
                    );
                    deliveries.do_send(DeliveriesReplayed(replayed));
                }
                tracing::warn!(
                    "the replay listener's connection closed; reconnecting (replays made meanwhile are read once it is back)"
                );
            }
            Err(error) => tracing::warn!(
                error.message = %error,
                "could not listen for replays; retrying in 5 s (replays made meanwhile are read once it listens)"
            ),
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Keeps the polled gauges current: pending and dead deliveries and the oldest pending age
/// (one query over partial indexes), the consumer lag of the partitions this instance holds,
/// and readiness as `/readyz` judges it (so an alert sees a pod that is up but not ready); and
/// watches those partitions for stalls.
async fn refresh_gauges(
    ledger: Ledger,
    kafka: crate::config::KafkaSettings,
    leases: LeaseBook,
    metrics: Arc<Metrics>,
    health: Health,
    mut stalls: PartitionStalls,
) {
    loop {
        match ledger.delivery_totals().await {
            Ok((pending, dead, oldest_pending_age_seconds)) => {
                metrics.pending_deliveries.set(pending);
                metrics.dead_deliveries.set(dead);
                metrics.oldest_pending_age.set(oldest_pending_age_seconds);
            }
            Err(error) => {
                tracing::warn!(error.message = %error, "could not refresh the pending/dead gauges")
            }
        }
        // The same test as /readyz, with the same bound on the database.
        let database_answers = matches!(
            tokio::time::timeout(admin::READY_DATABASE_TIMEOUT, ledger.ping()).await,
            Ok(Ok(()))
        );
        let ready = database_answers && health.not_ready_reason().is_none();
        metrics.ready.set(i64::from(ready));
        let settings = kafka.clone();
        let offsets = actix_rt::task::spawn_blocking(move || {
            crate::offsets::partition_offsets(&settings, Duration::from_secs(5))
        })
        .await;
        match offsets {
            Ok(Ok(offsets)) => {
                let held = leases.held(std::time::Instant::now());
                metrics.consumer_lag.reset();
                for partition in offsets.iter().filter(|p| held.contains(&p.partition)) {
                    metrics
                        .consumer_lag
                        .with_label_values(&[partition.partition.to_string()])
                        .set(partition.lag);
                }
                stalls.observe(&offsets, &held, &metrics);
            }
            Ok(Err(error)) => {
                tracing::warn!(error.message = %error, "could not read partition offsets for the lag gauge")
            }
            Err(_) => {}
        }
        tokio::time::sleep(GAUGE_REFRESH).await;
    }
}

/// Identifies this process in partition leases: the pod name when there is one, plus a random
/// suffix so a restarted pod never mistakes its predecessor's lease for its own.
fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}
