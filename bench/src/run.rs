//! One system's run of one scenario: fresh world, receivers, production, the system under test
//! in its own process, lag sampling, then the figures.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use webhook_delivery::config::KafkaSettings;
use webhook_delivery::offsets::partition_offsets;

use crate::analysis::{analyse, Observations};
use crate::cpu::{CpuShare, CpuSnapshot};
use crate::error::BenchError;
use crate::event::{now_micros, WARMUP_LOAD};
use crate::lag::{LagPoint, LagSampler};
use crate::producer::{EventProducer, Production};
use crate::report::{RunResult, SoakSeries};
use crate::scenario::{BrokerClass, Scenario, System, Workload, PARTITIONS};
use crate::settings::{write_and_load, REQUEST_TIMEOUT_MS};
use crate::sink::Sink;
use crate::soak::{DatabaseSampler, SoakSample};
use crate::sut::{SutLaunch, SutProcess};
use crate::world::History;
use crate::world::World;

const WARMUP_TIMEOUT: Duration = Duration::from_secs(60);
/// From this many brokers on, the run notes the open-files limit the system starts with.
const MANY_BROKERS: usize = 1_000;
const POLL_EVERY: Duration = Duration::from_millis(100);

/// What every run of one bench invocation shares.
pub struct BenchContext {
    pub run_id: String,
    pub config_dir: PathBuf,
    /// Per-run settings files and the systems' logs.
    pub logs_dir: PathBuf,
    /// After everything expected arrived, wait this long for late duplicates.
    pub settle: Duration,
    /// Postgres' host:port.
    pub postgres: String,
}

/// What happened while the system ran, before the receivers' log is read.
struct Exercised {
    production: Production,
    committed: HashMap<i32, i64>,
    clock_start_micros: u64,
    completed: bool,
    peak_rss_kib: Option<u64>,
    /// Cores busy per component from the clock start until everything arrived (or the deadline).
    cpu: CpuShare,
    /// What the results table cannot show (the ledger history written before the run).
    notes: Vec<String>,
    /// The database over time, for a scenario with retention windows (`soak`).
    soak: Vec<SoakSample>,
}

pub async fn run_one(
    context: &BenchContext,
    scenario: &Scenario,
    system: System,
) -> Result<RunResult, BenchError> {
    let label = format!(
        "{}_{}_{}",
        context.run_id,
        scenario.name.as_str(),
        system.as_str()
    );
    // Hanging brokers hold a request past both systems' 5 s timeout.
    let hold = Duration::from_millis(REQUEST_TIMEOUT_MS) + Duration::from_secs(1);
    let sink = Sink::start(&scenario.brokers, hold)?;
    let world = match World::create(&label, PARTITIONS, &context.postgres).await {
        Ok(world) => world,
        Err(error) => {
            sink.stop().await;
            return Err(error);
        }
    };
    let mut lag = Vec::new();
    let exercised = exercise(context, scenario, system, &sink, &world, &label, &mut lag).await;
    let requests = sink.stop().await;
    let mut depth_notes = Vec::new();
    for broker in 0..scenario.brokers.len() {
        if scenario.brokers[broker].class() != BrokerClass::Unavailable {
            continue;
        }
        let id = crate::world::broker_id(broker);
        if let Ok((pending, deepest)) = world.pending_depth(&id).await {
            depth_notes.push(format!(
                "{id} (answering 503) held {pending} pending deliveries at the end, {deepest} on its deepest load"
            ));
        }
    }
    let undelivered = match system {
        System::Service => {
            let counted: Vec<String> = (0..scenario.brokers.len())
                .filter(|&b| scenario.brokers[b].class().expects_deliveries())
                .map(crate::world::broker_id)
                .collect();
            world.undelivered(&counted).await.ok()
        }
        System::Baseline => None,
    };
    world.teardown().await;
    let mut exercised = exercised?;
    exercised.notes.extend(depth_notes);

    let mut figures = analyse(&Observations {
        events: &exercised.production.events,
        subscribers: &|load| scenario.subscribers(load),
        classes: &scenario.classes(),
        requests: &requests,
        committed: &exercised.committed,
        clock_start_micros: exercised.clock_start_micros,
        lag: &lag,
        peak_rss_kib: exercised.peak_rss_kib,
    });
    figures.undelivered_in_ledger = undelivered;
    let lag_series = lag
        .iter()
        .filter(|p| p.at_micros >= exercised.clock_start_micros)
        .map(|p| {
            let secs = (p.at_micros - exercised.clock_start_micros) as f64 / 1e6;
            (secs, p.lag)
        })
        .collect();
    Ok(RunResult {
        scenario: scenario.name,
        system,
        figures,
        completed: exercised.completed,
        cpu: exercised.cpu,
        deadline_secs: scenario.deadline.as_secs(),
        peak_rate: scenario.workload.peak_rate(),
        lag_series,
        notes: exercised.notes,
        soak: scenario.retention.map(|retention| SoakSeries {
            warm_up_secs: retention.warm_up().as_secs_f64(),
            samples: exercised.soak,
        }),
    })
}

async fn exercise(
    context: &BenchContext,
    scenario: &Scenario,
    system: System,
    sink: &Sink,
    world: &World,
    label: &str,
    lag: &mut Vec<LagPoint>,
) -> Result<Exercised, BenchError> {
    let urls: Vec<String> = (0..=scenario.brokers.len())
        .map(|broker| sink.url(broker as u16))
        .collect();
    let subscriptions: Vec<(u16, u32)> = (0..scenario.loads)
        .flat_map(|load| {
            scenario
                .subscribers(load)
                .into_iter()
                .map(move |broker| (broker, load))
        })
        .collect();
    world.seed(&urls, &subscriptions).await?;
    let mut notes = Vec::new();
    if scenario.brokers.len() >= MANY_BROKERS {
        if let Some(limit) = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|limits| open_files_limit(&limits))
        {
            notes.push(format!(
                "the system under test inherited a limit of {limit} open files; it holds at least one connection per broker, and more per busy broker"
            ));
        }
    }
    if scenario.history_rows > 0 {
        let rows = scenario.history_rows;
        eprintln!("bench:   writing a ledger history of {rows} delivered deliveries");
        let started = Instant::now();
        let payload = crate::event::event_json(0, 0, 0);
        let written = world
            .write_history(&History {
                rows,
                brokers: scenario.brokers.len() as u32,
                loads: scenario.loads,
                per_load: scenario.per_load(),
                stride: scenario.subscriber_stride(),
                partitions: PARTITIONS,
                payload: &payload,
            })
            .await?;
        notes.push(format!(
            "the ledger already held {written} delivered deliveries (each at its first attempt, with \
             their events; written, vacuumed and checkpointed in {:.0} s before the system started)",
            started.elapsed().as_secs_f64()
        ));
    }
    if scenario.retention.is_some() {
        let vacuum = crate::soak::vacuum_settings(&world.db_url).await?;
        notes.push(format!("the Postgres server at {}: {vacuum}", world.server));
    }
    let (settings, settings_file) = write_and_load(
        world,
        scenario.settings,
        scenario.retention.as_ref(),
        &context.config_dir,
        context.logs_dir.join(format!("{label}.toml")),
    )?;

    let mut producer = EventProducer::new(&world.topic, scenario.loads)?;
    if let Workload::Backlog { events } = scenario.workload {
        eprintln!("bench:   producing a backlog of {events} events");
        producer = blocking(move || {
            producer.produce_backlog(events)?;
            producer.flush_partitions(PARTITIONS)?;
            Ok(producer)
        })
        .await?;
    }

    let production_secs: u64 = match &scenario.workload {
        Workload::Rate(phases) => phases.iter().map(|p| p.duration.as_secs()).sum(),
        Workload::Backlog { .. } => 0,
    };
    let max_lifetime = WARMUP_TIMEOUT
        + Duration::from_secs(production_secs + 30)
        + scenario.deadline
        + context.settle;
    let log_file = context.logs_dir.join(format!(
        "{}-{}.log",
        scenario.name.as_str(),
        system.as_str()
    ));
    let mut sut = SutProcess::spawn(SutLaunch {
        system,
        settings_file: &settings_file,
        config_dir: &context.config_dir,
        log_file: &log_file,
        max_lifetime,
    })?;
    let sampler = LagSampler::start(settings.kafka.clone());

    let outcome = drive(
        context,
        scenario,
        sink,
        &mut sut,
        producer,
        &settings.kafka,
        world,
    )
    .await
    .map(|mut exercised| {
        exercised.notes.splice(0..0, notes);
        exercised
    });
    let status = sut.stop().await;
    lag.extend(sampler.stop().await);
    if outcome.is_err() {
        eprintln!(
            "bench:   {} stopped ({status}); its log: {}",
            system.as_str(),
            log_file.display()
        );
    }
    outcome
}

async fn drive(
    context: &BenchContext,
    scenario: &Scenario,
    sink: &Sink,
    sut: &mut SutProcess,
    mut producer: EventProducer,
    kafka: &KafkaSettings,
    world: &World,
) -> Result<Exercised, BenchError> {
    let db_name = world.db_name.as_str();
    let mut database = None;
    let mut cpu_start = CpuSnapshot::take(sut.pid(), db_name);
    let clock_start_micros = match &scenario.workload {
        Workload::Backlog { .. } => sut.started_micros,
        Workload::Rate(phases) => {
            producer = warm_up(producer, sink, sut).await?;
            eprintln!(
                "bench:   consuming after {:.1} s; producing {}",
                sut.started.elapsed().as_secs_f64(),
                scenario.workload.describe()
            );
            cpu_start = CpuSnapshot::take(sut.pid(), db_name);
            if let Some(retention) = scenario.retention {
                database = Some(
                    DatabaseSampler::start(
                        &world.db_url,
                        retention.sample_every,
                        sink.delivered_counter(),
                    )
                    .await?,
                );
            }
            let start = now_micros();
            let phases = phases.clone();
            producer = blocking(move || {
                producer.produce_at_rate(&phases)?;
                producer.flush_partitions(PARTITIONS)?;
                Ok(producer)
            })
            .await?;
            start
        }
    };
    let production = blocking(move || Ok(producer.finish())).await?;
    if production.failed > 0 {
        eprintln!(
            "bench:   {} events were not acknowledged by Kafka (left out of the results)",
            production.failed
        );
    }
    let classes = scenario.classes();
    let expected: u64 = production
        .events
        .iter()
        .map(|event| {
            scenario
                .subscribers(event.load)
                .iter()
                .filter(|&&b| classes[b as usize].expects_deliveries())
                .count() as u64
        })
        .sum();

    let deadline = Instant::now()
        + scenario.deadline.saturating_sub(Duration::from_micros(
            now_micros().saturating_sub(clock_start_micros),
        ));
    let mut completed = false;
    while Instant::now() < deadline {
        if sink.delivered() >= expected {
            completed = true;
            break;
        }
        if let Some(status) = sut.exited() {
            return Err(BenchError::Service(format!(
                "exited during the run ({status})"
            )));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
    let cpu = cpu_start.share_until(&CpuSnapshot::take(sut.pid(), db_name));
    let soak = match database {
        Some(database) => database.stop().await,
        None => Vec::new(),
    };
    tokio::time::sleep(context.settle).await;

    let kafka = kafka.clone();
    let committed = blocking(move || Ok(partition_offsets(&kafka, Duration::from_secs(5))?))
        .await?
        .into_iter()
        .filter_map(|p| Some((p.partition, p.committed?)))
        .collect();
    Ok(Exercised {
        production,
        committed,
        clock_start_micros,
        completed,
        peak_rss_kib: sut.peak_rss_kib(),
        cpu,
        notes: Vec::new(),
        soak,
    })
}

/// Produces the warm-up event and waits until the warm-up broker receives it: the system is
/// then consuming, and the rate clock can start.
async fn warm_up(
    producer: EventProducer,
    sink: &Sink,
    sut: &mut SutProcess,
) -> Result<EventProducer, BenchError> {
    let producer = blocking(move || {
        producer.send_marker("warmup", WARMUP_LOAD, None)?;
        Ok(producer)
    })
    .await?;
    let give_up = Instant::now() + WARMUP_TIMEOUT;
    while !sink.warmed_up() {
        if let Some(status) = sut.exited() {
            return Err(BenchError::Service(format!(
                "exited before consuming ({status})"
            )));
        }
        if Instant::now() > give_up {
            return Err(BenchError::Timeout(format!(
                "the warm-up webhook did not arrive within {} s",
                WARMUP_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(producer)
}

/// The soft "Max open files" limit from the text of /proc/<pid>/limits.
fn open_files_limit(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|soft| soft.parse().ok())
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, BenchError> + Send + 'static,
) -> Result<T, BenchError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| BenchError::io("a blocking task panicked", std::io::Error::other(e)))?
}

#[cfg(test)]
mod tests {
    use super::open_files_limit;

    #[test]
    fn reads_the_soft_open_files_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95000                95000                processes \n\
                      Max open files            20000                40000                files     \n";
        assert_eq!(open_files_limit(limits), Some(20_000));
        assert_eq!(
            open_files_limit("Max open files  unlimited  unlimited  files"),
            None
        );
    }
}
