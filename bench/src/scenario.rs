//! The scenarios: who the brokers are and how they behave, which loads they follow, and how
//! events arrive. Full sizes are what the targets are about; `--smoke` sizes only check
//! correctness and finish in seconds.

use std::time::Duration;

/// How one broker's endpoint answers (the receiver applies it per request).
#[derive(Debug, Clone, PartialEq)]
pub struct Behaviour {
    /// Added before every answer.
    pub latency: Duration,
    /// Share of requests answered 500.
    pub error_rate: f64,
    /// Share of requests answered 429 with `Retry-After: retry_after_secs`.
    pub throttle_rate: f64,
    pub retry_after_secs: u32,
    /// Never answers within any client's timeout.
    pub hangs: bool,
    /// Answers every request 503 at once: the service's breaker for it opens and its
    /// deliveries pile up in the ledger.
    pub unavailable: bool,
}

impl Behaviour {
    pub fn healthy() -> Behaviour {
        Behaviour {
            latency: Duration::ZERO,
            error_rate: 0.0,
            throttle_rate: 0.0,
            retry_after_secs: 0,
            hangs: false,
            unavailable: false,
        }
    }

    /// Healthy, but every answer takes `latency`.
    pub fn answering_in(latency: Duration) -> Behaviour {
        Behaviour {
            latency,
            ..Behaviour::healthy()
        }
    }

    pub fn unavailable() -> Behaviour {
        Behaviour {
            unavailable: true,
            ..Behaviour::healthy()
        }
    }

    pub fn failing(error_rate: f64) -> Behaviour {
        Behaviour {
            error_rate,
            ..Behaviour::healthy()
        }
    }

    pub fn throttling(throttle_rate: f64, retry_after_secs: u32) -> Behaviour {
        Behaviour {
            throttle_rate,
            retry_after_secs,
            ..Behaviour::healthy()
        }
    }

    pub fn hanging() -> Behaviour {
        Behaviour {
            hangs: true,
            ..Behaviour::healthy()
        }
    }

    pub fn class(&self) -> BrokerClass {
        if self.hangs {
            BrokerClass::Hanging
        } else if self.unavailable {
            BrokerClass::Unavailable
        } else if self.error_rate > 0.0 || self.throttle_rate > 0.0 {
            BrokerClass::Flaky
        } else {
            BrokerClass::Healthy
        }
    }
}

/// How a broker counts in the results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerClass {
    /// Answers 2xx at once (or after its latency): its deliveries count for latency.
    Healthy,
    /// Sometimes answers 5xx/429: every delivery must still arrive (retries), latency not counted.
    Flaky,
    /// Never answers in time: excluded from loss (nothing can be delivered to it).
    Hanging,
    /// Answers 503 to everything: excluded from loss too; its deliveries wait in the ledger.
    Unavailable,
}

impl BrokerClass {
    /// Whether this broker's deliveries must arrive during the run.
    pub fn expects_deliveries(self) -> bool {
        matches!(self, BrokerClass::Healthy | BrokerClass::Flaky)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum ScenarioName {
    Healthy,
    Incident,
    Backlog,
    Memory,
    #[value(name = "onebroker")]
    OneBroker,
    #[value(name = "hotload")]
    HotLoad,
    #[value(name = "deepload")]
    DeepLoad,
    #[value(name = "manybrokers")]
    ManyBrokers,
    Growth,
    Soak,
}

impl ScenarioName {
    pub const ALL: [ScenarioName; 10] = [
        ScenarioName::Healthy,
        ScenarioName::Incident,
        ScenarioName::Backlog,
        ScenarioName::Memory,
        ScenarioName::OneBroker,
        ScenarioName::HotLoad,
        ScenarioName::DeepLoad,
        ScenarioName::ManyBrokers,
        ScenarioName::Growth,
        ScenarioName::Soak,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ScenarioName::Healthy => "healthy",
            ScenarioName::Incident => "incident",
            ScenarioName::Backlog => "backlog",
            ScenarioName::Memory => "memory",
            ScenarioName::OneBroker => "onebroker",
            ScenarioName::HotLoad => "hotload",
            ScenarioName::DeepLoad => "deepload",
            ScenarioName::ManyBrokers => "manybrokers",
            ScenarioName::Growth => "growth",
            ScenarioName::Soak => "soak",
        }
    }

    /// The scenario this one's throughput is judged against, run in the same invocation:
    /// `hotload` has `backlog`'s event count and brokers but few, deep loads; `growth` is
    /// `backlog` exactly, on a ledger already holding millions of delivered rows, so `backlog`
    /// is its empty-ledger run.
    pub fn reference(self) -> Option<ScenarioName> {
        match self {
            ScenarioName::HotLoad | ScenarioName::Growth => Some(ScenarioName::Backlog),
            _ => None,
        }
    }
}

/// Which configuration the service runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingsProfile {
    /// config/base.toml plus the bench's tuning (docs/performance.md lists it).
    Bench,
    /// config/base.toml as shipped; only where things are (Kafka, topic, group, database URL,
    /// admin port) and the loopback receivers' permission (allow_http, allowed_networks) change.
    ShippedDefaults,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum System {
    /// webhook-delivery, this repository's service.
    Service,
    /// The original inline consumer (src/baseline.rs).
    Baseline,
}

impl System {
    pub fn as_str(self) -> &'static str {
        match self {
            System::Service => "service",
            System::Baseline => "baseline",
        }
    }
}

/// A stretch of steady production.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub events_per_sec: u32,
    pub duration: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    /// Produced while the system runs, phase after phase.
    Rate(Vec<Phase>),
    /// Already in the topic when the system starts.
    Backlog { events: u32 },
}

impl Workload {
    pub fn events(&self) -> u64 {
        match self {
            Workload::Rate(phases) => phases
                .iter()
                .map(|p| (f64::from(p.events_per_sec) * p.duration.as_secs_f64()).round() as u64)
                .sum(),
            Workload::Backlog { events } => u64::from(*events),
        }
    }

    pub fn peak_rate(&self) -> Option<u32> {
        match self {
            Workload::Rate(phases) => phases.iter().map(|p| p.events_per_sec).max(),
            Workload::Backlog { .. } => None,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Workload::Rate(phases) => format!(
                "{} events produced at {}",
                self.events(),
                phases
                    .iter()
                    .map(|p| format!("{}/s for {} s", p.events_per_sec, p.duration.as_secs()))
                    .collect::<Vec<_>>()
                    .join(", then ")
            ),
            Workload::Backlog { events } => format!("{events} events already in the topic"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: ScenarioName,
    /// One entry per broker, by index.
    pub brokers: Vec<Behaviour>,
    pub loads: u32,
    pub subscribers_per_load: u32,
    pub workload: Workload,
    /// The run ends this long after its clock starts (production start, or system start for a
    /// backlog), delivered or not.
    pub deadline: Duration,
    pub systems: Vec<System>,
    pub settings: SettingsProfile,
    /// Delivered deliveries (each with its event share and attempt) written into the ledger
    /// before the system starts: the ledger's history.
    pub history_rows: u64,
    /// Retention windows short enough to pass several times during the run; with them the
    /// run samples the database's size (`soak`). `None`: config/base.toml's days, never reached.
    pub retention: Option<SoakRetention>,
}

/// `[retention]` for a soak: windows in minutes (seconds for the smoke), and how often the
/// database size is sampled.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoakRetention {
    pub delivered: Duration,
    pub dead: Duration,
    pub rejected: Duration,
    pub interval: Duration,
    pub sample_every: Duration,
    /// How long the ledger gets, after the first removals, to reach its steady size: the heaps
    /// need a few autovacuum cycles before freed space is reused at the pace rows are freed, and
    /// the indexes longer (their pages emptied by retention are reused only after vacuum has
    /// deleted them and a later vacuum recycled them).
    pub settle: Duration,
}

impl SoakRetention {
    /// Until then the ledger is filling up to its steady size: the first delivered rows leave
    /// `delivered` after delivery, the pass that removes them may start up to one interval
    /// later and take up to another, and then the tables and their indexes settle.
    pub fn warm_up(&self) -> Duration {
        self.delivered + 2 * self.interval + self.settle
    }
}

/// `soak` at full size: 1,000 events/s x 2 subscribers = the issue's 2,000 deliveries/s.
const SOAK_EVENTS_PER_SEC: u32 = 1_000;
/// `soak`'s length: its 25-minute warm-up, then 30 minutes judged.
const SOAK_MINUTES: u64 = 55;
/// After production stops, the run waits this long at most for the last deliveries.
const SOAK_DRAIN: Duration = Duration::from_secs(60);

pub const PARTITIONS: i32 = 6;

/// `growth`'s ledger history at full size: the issue's 10 million delivered rows.
pub const GROWTH_HISTORY_ROWS: u64 = 10_000_000;

impl Scenario {
    pub fn new(name: ScenarioName, smoke: bool) -> Scenario {
        let secs = Duration::from_secs;
        let both = vec![System::Service, System::Baseline];
        match (name, smoke) {
            (ScenarioName::Healthy, false) => Scenario {
                name,
                brokers: vec![Behaviour::healthy(); 20],
                loads: 3_000,
                subscribers_per_load: 3,
                // 3,500 events/s x 3 subscribers = 10,500 deliveries/s offered.
                workload: Workload::Rate(vec![Phase {
                    events_per_sec: 3_500,
                    duration: secs(20),
                }]),
                deadline: secs(90),
                systems: both.clone(),
                settings: SettingsProfile::Bench,
                history_rows: 0,
                retention: None,
            },
            (ScenarioName::Incident, false) => Scenario {
                name,
                brokers: incident_brokers(20, 0.2),
                loads: 3_000,
                subscribers_per_load: 3,
                workload: Workload::Rate(vec![
                    Phase {
                        events_per_sec: 1_000,
                        duration: secs(10),
                    },
                    Phase {
                        events_per_sec: 3_000,
                        duration: secs(10),
                    },
                    Phase {
                        events_per_sec: 1_000,
                        duration: secs(10),
                    },
                ]),
                deadline: secs(90),
                systems: both.clone(),
                settings: SettingsProfile::Bench,
                history_rows: 0,
                retention: None,
            },
            (ScenarioName::Backlog, false) => Scenario {
                name,
                brokers: vec![Behaviour::healthy(); 20],
                loads: 3_000,
                subscribers_per_load: 3,
                workload: Workload::Backlog { events: 42_000 },
                deadline: secs(90),
                systems: both.clone(),
                settings: SettingsProfile::Bench,
                history_rows: 0,
                retention: None,
            },
            (ScenarioName::Memory, false) => Scenario {
                name,
                brokers: vec![Behaviour::healthy(); 20],
                loads: 3_000,
                subscribers_per_load: 3,
                workload: Workload::Backlog { events: 100_000 },
                deadline: secs(180),
                systems: both.clone(),
                settings: SettingsProfile::Bench,
                history_rows: 0,
                retention: None,
            },
            // The issue-12 scenarios run the service only: they measure its limits, which the
            // baseline's comparison says nothing about.
            (ScenarioName::OneBroker, smoke) => Scenario {
                name,
                brokers: vec![Behaviour::answering_in(Duration::from_millis(1))],
                loads: if smoke { 40 } else { 3_000 },
                subscribers_per_load: 1,
                workload: Workload::Backlog {
                    events: if smoke { 400 } else { 30_000 },
                },
                deadline: secs(if smoke { 30 } else { 120 }),
                systems: vec![System::Service],
                settings: SettingsProfile::ShippedDefaults,
                history_rows: 0,
                retention: None,
            },
            (ScenarioName::HotLoad, smoke) => {
                // Broker 0 answers 503 to everything; the loads it follows grow while the
                // others deliver. Same event count as `backlog`, on few loads.
                let (brokers, loads, events) = if smoke { (4, 4, 400) } else { (20, 20, 42_000) };
                let mut behaviours = vec![Behaviour::healthy(); brokers];
                behaviours[0] = Behaviour::unavailable();
                Scenario {
                    name,
                    brokers: behaviours,
                    loads,
                    subscribers_per_load: 3,
                    workload: Workload::Backlog { events },
                    deadline: secs(if smoke { 20 } else { 120 }),
                    systems: vec![System::Service],
                    settings: SettingsProfile::Bench,
                    history_rows: 0,
                    retention: None,
                }
            }
            // Issue 12's opening report, as a new user tried it: 100,000 events over 50 loads
            // (2,000 per load), 3 brokers answering at once and following every load, all in
            // the topic before the service starts, the shipped defaults. The build it was
            // reported against delivered about 300/s: its claims cost grew with a load's depth.
            (ScenarioName::DeepLoad, smoke) => Scenario {
                name,
                brokers: vec![Behaviour::healthy(); 3],
                loads: if smoke { 4 } else { 50 },
                subscribers_per_load: 3,
                workload: Workload::Backlog {
                    events: if smoke { 400 } else { 100_000 },
                },
                deadline: secs(if smoke { 30 } else { 180 }),
                systems: vec![System::Service],
                settings: SettingsProfile::ShippedDefaults,
                history_rows: 0,
                retention: None,
            },
            (ScenarioName::ManyBrokers, smoke) => {
                // Every broker follows 3 loads; every load gets 3 events.
                let brokers = if smoke { 300 } else { 10_000 };
                Scenario {
                    name,
                    brokers: vec![Behaviour::healthy(); brokers],
                    loads: brokers as u32,
                    subscribers_per_load: 3,
                    workload: Workload::Backlog {
                        events: 3 * brokers as u32,
                    },
                    deadline: secs(if smoke { 30 } else { 180 }),
                    systems: vec![System::Service],
                    settings: SettingsProfile::Bench,
                    history_rows: 0,
                    retention: None,
                }
            }
            (ScenarioName::Growth, smoke) => Scenario {
                name,
                systems: vec![System::Service],
                history_rows: if smoke { 20_000 } else { GROWTH_HISTORY_ROWS },
                ..Scenario::new(ScenarioName::Backlog, smoke)
            },
            // Retention in minutes under a steady rate: the database must stop growing once the
            // first window has passed. The smoke keeps the shape at seconds and a trickle, so it
            // still sees passes remove rows without lengthening CI much.
            (ScenarioName::Soak, smoke) => {
                let (brokers, loads, rate, minutes) = if smoke {
                    (4, 40, 50, None)
                } else {
                    (5, 3_000, SOAK_EVENTS_PER_SEC, Some(SOAK_MINUTES))
                };
                let retention = if smoke {
                    SoakRetention {
                        delivered: secs(5),
                        dead: secs(5),
                        rejected: secs(5),
                        interval: secs(3),
                        sample_every: secs(2),
                        // The smoke's ledger is a few hundred rows: nothing to settle.
                        settle: Duration::ZERO,
                    }
                } else {
                    SoakRetention {
                        delivered: secs(120),
                        dead: secs(60),
                        rejected: secs(60),
                        interval: secs(20),
                        sample_every: secs(30),
                        // The warm-up ends 25 minutes in. The heaps settle within five
                        // autovacuum cycles of the first removals (first run), the indexes take
                        // longer: in the fifth run every index stopped growing 20 to 29 minutes
                        // in (docs/performance.md, "Soak"). Written before the sixth run.
                        settle: secs(25 * 60) - secs(120) - 2 * secs(20),
                    }
                };
                let scenario = Scenario {
                    name,
                    brokers: vec![Behaviour::healthy(); brokers],
                    loads,
                    subscribers_per_load: 2,
                    workload: Workload::Rate(vec![Phase {
                        events_per_sec: rate,
                        duration: secs(20),
                    }]),
                    deadline: secs(20) + SOAK_DRAIN,
                    systems: vec![System::Service],
                    settings: SettingsProfile::Bench,
                    history_rows: 0,
                    retention: Some(retention),
                };
                match minutes {
                    Some(minutes) => scenario.lasting(Duration::from_secs(60 * minutes)),
                    None => scenario,
                }
            }
            // Smoke: a few hundred events; the baseline only where it finishes quickly.
            (ScenarioName::Healthy, true) => Scenario {
                name,
                brokers: vec![Behaviour::healthy(); 4],
                loads: 40,
                subscribers_per_load: 3,
                workload: Workload::Rate(vec![Phase {
                    events_per_sec: 200,
                    duration: secs(2),
                }]),
                deadline: secs(20),
                systems: both.clone(),
                settings: SettingsProfile::Bench,
                history_rows: 0,
                retention: None,
            },
            (ScenarioName::Incident, true) => Scenario {
                name,
                brokers: incident_brokers(6, 0.1),
                loads: 40,
                subscribers_per_load: 3,
                workload: Workload::Rate(vec![
                    Phase {
                        events_per_sec: 100,
                        duration: secs(1),
                    },
                    Phase {
                        events_per_sec: 300,
                        duration: secs(1),
                    },
                    Phase {
                        events_per_sec: 100,
                        duration: secs(1),
                    },
                ]),
                // Retries back off 1, 2, 4, 8 s: an unlucky delivery to a 5xx broker needs ~15 s.
                deadline: secs(60),
                systems: vec![System::Service],
                settings: SettingsProfile::Bench,
                history_rows: 0,
                retention: None,
            },
            (ScenarioName::Backlog, true) => Scenario {
                name,
                brokers: vec![Behaviour::healthy(); 4],
                loads: 40,
                subscribers_per_load: 3,
                workload: Workload::Backlog { events: 400 },
                deadline: secs(20),
                systems: vec![System::Service],
                settings: SettingsProfile::Bench,
                history_rows: 0,
                retention: None,
            },
            (ScenarioName::Memory, true) => Scenario {
                name,
                brokers: vec![Behaviour::healthy(); 4],
                loads: 40,
                subscribers_per_load: 3,
                workload: Workload::Backlog { events: 600 },
                deadline: secs(20),
                systems: vec![System::Service],
                settings: SettingsProfile::Bench,
                history_rows: 0,
                retention: None,
            },
        }
    }

    /// The same steady rate for `production` instead (`--soak-minutes`), the deadline moved
    /// with it. Only a single-phase rate workload has one rate to keep.
    pub fn lasting(mut self, production: Duration) -> Scenario {
        if let Workload::Rate(phases) = &mut self.workload {
            if let [phase] = &mut phases[..] {
                phase.duration = production;
                self.deadline = production + SOAK_DRAIN;
            }
        }
        self
    }

    /// The same single-phase rate workload at `events_per_sec` instead (`--healthy-events-per-sec`).
    pub fn at_rate(mut self, events_per_sec: u32) -> Scenario {
        if let Workload::Rate(phases) = &mut self.workload {
            if let [phase] = &mut phases[..] {
                phase.events_per_sec = events_per_sec;
            }
        }
        self
    }

    /// How many brokers follow each load (`subscribers_per_load`, at most every broker).
    pub fn per_load(&self) -> u32 {
        self.subscribers_per_load.min(self.brokers.len() as u32)
    }

    /// Load `l`'s k-th subscriber is broker `(l + k * stride) % brokers`.
    pub fn subscriber_stride(&self) -> u32 {
        (self.brokers.len() as u32 / self.per_load().max(1)).max(1)
    }

    /// The brokers subscribed to `load`: `subscribers_per_load` distinct ones, spread evenly.
    pub fn subscribers(&self, load: u32) -> Vec<u16> {
        let brokers = self.brokers.len() as u32;
        let stride = self.subscriber_stride();
        (0..self.per_load())
            .map(|k| ((load + k * stride) % brokers) as u16)
            .collect()
    }

    pub fn classes(&self) -> Vec<BrokerClass> {
        self.brokers.iter().map(Behaviour::class).collect()
    }

    pub fn describe_brokers(&self) -> String {
        let count = |class| self.classes().iter().filter(|&&c| c == class).count();
        let (healthy, flaky, hanging, unavailable) = (
            count(BrokerClass::Healthy),
            count(BrokerClass::Flaky),
            count(BrokerClass::Hanging),
            count(BrokerClass::Unavailable),
        );
        let latencies: std::collections::BTreeSet<u128> =
            self.brokers.iter().map(|b| b.latency.as_millis()).collect();
        let answering = match latencies.iter().collect::<Vec<_>>()[..] {
            [&0] | [] => String::new(),
            [&ms] => format!(", answering in {ms} ms"),
            _ => ", answering with different latencies".into(),
        };
        let mut text = format!(
            "{} broker{} ({healthy} healthy{answering}",
            self.brokers.len(),
            if self.brokers.len() == 1 { "" } else { "s" }
        );
        if flaky > 0 {
            text.push_str(&format!(", {flaky} answering some 5xx/429"));
        }
        if hanging > 0 {
            text.push_str(&format!(", {hanging} timing out"));
        }
        if unavailable > 0 {
            text.push_str(&format!(
                ", {unavailable} answering 503 to everything, so its breaker opens and its deliveries pile up"
            ));
        }
        text.push_str(&format!(
            "), {} loads x {} subscribers",
            self.loads, self.subscribers_per_load
        ));
        text
    }
}

/// 10 % of brokers time out, two answer `error_rate` 5xx, one answers half that share 429
/// (Retry-After: 1); the rest are healthy. The smoke uses a lower rate: at 20 %, a 5xx broker's
/// breaker sometimes trips and its open period doubles after failed probes (5, 10, 20 s...),
/// which is realistic but makes a correctness check slow.
fn incident_brokers(count: usize, error_rate: f64) -> Vec<Behaviour> {
    let hanging = (count / 10).max(1);
    (0..count)
        .map(|index| match index {
            i if i < hanging => Behaviour::hanging(),
            i if i < hanging + 2 => Behaviour::failing(error_rate),
            i if i == hanging + 2 => Behaviour::throttling(error_rate / 2.0, 1),
            _ => Behaviour::healthy(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_load_has_distinct_subscribers() {
        for name in ScenarioName::ALL {
            for smoke in [false, true] {
                let scenario = Scenario::new(name, smoke);
                for load in 0..scenario.loads {
                    let mut subscribers = scenario.subscribers(load);
                    subscribers.sort_unstable();
                    subscribers.dedup();
                    let expected = match name {
                        ScenarioName::OneBroker => 1,
                        ScenarioName::Soak => 2,
                        _ => 3,
                    };
                    assert_eq!(
                        subscribers.len(),
                        expected,
                        "{name:?} smoke={smoke} load {load}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_incident_has_ten_percent_hanging_brokers_and_a_three_fold_surge() {
        let scenario = Scenario::new(ScenarioName::Incident, false);
        let hanging = scenario
            .classes()
            .iter()
            .filter(|&&c| c == BrokerClass::Hanging)
            .count();
        assert_eq!(hanging, 2);
        let Workload::Rate(phases) = &scenario.workload else {
            panic!("rate workload")
        };
        assert_eq!(phases[1].events_per_sec, 3 * phases[0].events_per_sec);
        assert_eq!(scenario.workload.events(), 50_000);
    }

    #[test]
    fn the_backlog_is_42_000_events() {
        assert_eq!(
            Scenario::new(ScenarioName::Backlog, false)
                .workload
                .events(),
            42_000
        );
    }

    #[test]
    fn every_broker_of_manybrokers_follows_a_few_loads() {
        let scenario = Scenario::new(ScenarioName::ManyBrokers, false);
        assert_eq!(scenario.brokers.len(), 10_000);
        let mut loads_per_broker = vec![0u32; scenario.brokers.len()];
        for load in 0..scenario.loads {
            for broker in scenario.subscribers(load) {
                loads_per_broker[broker as usize] += 1;
            }
        }
        assert!(loads_per_broker.iter().all(|&n| n == 3));
    }

    #[test]
    fn hotload_has_deep_loads_and_one_unavailable_broker_that_follows_some() {
        let scenario = Scenario::new(ScenarioName::HotLoad, false);
        let backlog = Scenario::new(ScenarioName::Backlog, false);
        assert_eq!(scenario.workload.events(), backlog.workload.events());
        assert!(scenario.workload.events() / u64::from(scenario.loads) >= 2_000);
        let unavailable: Vec<usize> = (0..scenario.brokers.len())
            .filter(|&b| scenario.brokers[b].class() == BrokerClass::Unavailable)
            .collect();
        assert_eq!(unavailable, vec![0]);
        assert!((0..scenario.loads).any(|load| scenario.subscribers(load).contains(&0)));
        assert!(!BrokerClass::Unavailable.expects_deliveries());
    }

    #[test]
    fn growth_is_backlog_on_a_ledger_with_history() {
        for smoke in [false, true] {
            let growth = Scenario::new(ScenarioName::Growth, smoke);
            let backlog = Scenario::new(ScenarioName::Backlog, smoke);
            assert_eq!(growth.workload, backlog.workload);
            assert_eq!(growth.brokers, backlog.brokers);
            assert_eq!(growth.loads, backlog.loads);
            assert_eq!(backlog.history_rows, 0);
            assert!(growth.history_rows > 0);
        }
        assert_eq!(
            Scenario::new(ScenarioName::Growth, false).history_rows,
            10_000_000
        );
        assert_eq!(
            ScenarioName::Growth.reference(),
            Some(ScenarioName::Backlog)
        );
    }

    #[test]
    fn the_soak_offers_2_000_deliveries_a_second_for_30_minutes_with_retention_in_minutes() {
        let soak = Scenario::new(ScenarioName::Soak, false);
        let Workload::Rate(phases) = &soak.workload else {
            panic!("rate workload")
        };
        let [phase] = &phases[..] else {
            panic!("one steady phase")
        };
        assert_eq!(phase.events_per_sec * soak.per_load(), 2_000);
        assert_eq!(phase.duration, Duration::from_secs(55 * 60));
        assert!(soak.classes().iter().all(|&c| c == BrokerClass::Healthy));
        assert!((3..=10).contains(&soak.brokers.len()));
        assert!(soak.loads >= 1_000);
        assert_eq!(soak.systems, vec![System::Service]);
        let retention = soak.retention.unwrap();
        assert_eq!(retention.delivered, Duration::from_secs(120));
        assert!(retention.dead <= retention.delivered && retention.rejected <= retention.delivered);
        assert!((20..=30).contains(&retention.interval.as_secs()));
        assert_eq!(retention.sample_every, Duration::from_secs(30));
        assert_eq!(retention.warm_up(), Duration::from_secs(25 * 60));
        // More than a warm-up is judged after it (a shorter run gets no verdict).
        assert!(phase.duration >= 2 * retention.warm_up() + Duration::from_secs(5 * 60));
        for name in ScenarioName::ALL {
            if name != ScenarioName::Soak {
                assert_eq!(Scenario::new(name, false).retention, None, "{name:?}");
            }
        }
    }

    #[test]
    fn the_soak_smoke_is_short_and_a_soak_can_be_shortened() {
        let smoke = Scenario::new(ScenarioName::Soak, true);
        assert!(smoke.workload.events() <= 1_000);
        assert!(smoke.retention.unwrap().warm_up() < Duration::from_secs(20));
        let short = Scenario::new(ScenarioName::Soak, false).lasting(Duration::from_secs(360));
        assert_eq!(short.workload.events(), 360_000);
        assert_eq!(short.deadline, Duration::from_secs(420));
        // A backlog has no rate to stretch.
        let backlog = Scenario::new(ScenarioName::Backlog, false);
        let stretched = backlog.clone().lasting(Duration::from_secs(360));
        assert_eq!(stretched.workload, backlog.workload);
        assert_eq!(stretched.deadline, backlog.deadline);
    }

    #[test]
    fn healthy_can_offer_issue_12s_15_000_deliveries_a_second() {
        let healthy = Scenario::new(ScenarioName::Healthy, false);
        assert_eq!(healthy.workload.peak_rate(), Some(3_500));
        let faster = healthy.clone().at_rate(5_000);
        assert_eq!(faster.workload.peak_rate(), Some(5_000));
        assert_eq!(faster.workload.events(), 100_000);
        assert_eq!(faster.deadline, healthy.deadline);
        // A backlog has no rate to change.
        let backlog = Scenario::new(ScenarioName::Backlog, false);
        assert_eq!(backlog.clone().at_rate(5_000).workload, backlog.workload);
    }

    #[test]
    fn onebroker_runs_on_the_shipped_defaults() {
        let scenario = Scenario::new(ScenarioName::OneBroker, false);
        assert_eq!(scenario.settings, SettingsProfile::ShippedDefaults);
        assert_eq!(scenario.brokers.len(), 1);
        assert_eq!(scenario.brokers[0].latency, Duration::from_millis(1));
        assert_eq!(scenario.loads, 3_000);
    }

    #[test]
    fn deepload_is_issue_12s_report_on_the_shipped_defaults() {
        let scenario = Scenario::new(ScenarioName::DeepLoad, false);
        assert_eq!(scenario.settings, SettingsProfile::ShippedDefaults);
        assert_eq!(scenario.brokers.len(), 3);
        assert_eq!(scenario.classes(), vec![BrokerClass::Healthy; 3]);
        assert_eq!(scenario.loads, 50);
        assert_eq!(scenario.workload.events(), 100_000);
        for load in 0..scenario.loads {
            let mut subscribers = scenario.subscribers(load);
            subscribers.sort_unstable();
            assert_eq!(subscribers, [0, 1, 2], "every broker follows load {load}");
        }
    }
}
