//! The results as people read them: a markdown table, the verdict on each target, the lag
//! series as CSV and a hand-drawn SVG chart. Pure string building.

use std::fmt::Write;

use crate::analysis::Figures;
use crate::cpu::CpuShare;
use crate::scenario::{ScenarioName, System};
use crate::soak::{SoakSample, TABLES};

/// One system's run of one scenario.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub scenario: ScenarioName,
    pub system: System,
    pub figures: Figures,
    /// Every expected pair arrived before the deadline.
    pub completed: bool,
    /// Cores busy per component while the system worked.
    pub cpu: CpuShare,
    pub deadline_secs: u64,
    /// Highest produce rate of the scenario (events/s), for rate workloads.
    pub peak_rate: Option<u32>,
    /// (seconds since the run's clock start, total lag)
    pub lag_series: Vec<(f64, i64)>,
    /// Facts about the run that the tables cannot show (a ledger history, a broker's depth).
    pub notes: Vec<String>,
    /// The database over time, for a scenario with retention windows (`soak`).
    pub soak: Option<SoakSeries>,
}

/// A soak's samples and when its warm-up ended (seconds since the clock start).
#[derive(Debug, Clone, PartialEq)]
pub struct SoakSeries {
    pub warm_up_secs: f64,
    pub samples: Vec<SoakSample>,
}

impl RunResult {
    fn label(&self) -> String {
        format!("{} / {}", self.scenario.as_str(), self.system.as_str())
    }

    /// Postgres CPU time per delivered pair, in microseconds: its backends for this run's
    /// database plus the shared background processes, over the run's CPU window.
    pub fn postgres_micros_per_delivery(&self) -> Option<f64> {
        self.cpu
            .micros_per(self.cpu.postgres, self.figures.delivered)
    }

    fn system_micros_per_delivery(&self) -> Option<f64> {
        self.cpu.micros_per(self.cpu.system, self.figures.delivered)
    }
}

/// A throughput that must stay within this share of its reference scenario's.
const REFERENCE_TOLERANCE: f64 = 0.20;
/// `onebroker`: one broker answering in 1 ms, with the shipped defaults.
const ONE_BROKER_TARGET: f64 = 5_000.0;
/// `soak`: the database may end at most this share above its size when the warm-up ended.
/// Postgres reuses freed space only after a vacuum and autovacuum runs when a table's dead rows
/// pass a fifth of it, so a flat ledger still swings by tens of percent between vacuums; an
/// unbounded one grows by a warm-up's worth every warm-up (2 minutes: about 15 % more every
/// 2 minutes at 2,000 deliveries/s, over 100 % in the run), far outside this.
pub const SOAK_TOLERANCE: f64 = 0.25;
/// `soak`: and its least-squares growth from the reference on may be at most this share of
/// the reference size per 10 minutes. A swing between vacuums averages out over a run; a
/// ledger still growing does not (9.4 MB/10 min on 412 MB, 2.3 %, in the first run's last
/// 20 minutes; +811 MB/10 min on 332 MB with autovacuum off).
pub const SOAK_SLOPE_TOLERANCE: f64 = 0.05;

const MB: f64 = 1_000_000.0;

/// The soak's verdict: the size at the end against the size when the warm-up ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Flatness {
    /// The first sample at or after the warm-up's end.
    pub reference: SoakSample,
    /// The last sample.
    pub end: SoakSample,
    /// end / reference database size.
    pub growth: f64,
    /// Least-squares slope of the database size over the samples from the reference on.
    pub mb_per_10_min: f64,
    pub flat: bool,
}

/// `None` while the run is too short to say: no sample after the warm-up, or less than a
/// warm-up's time between the reference and the end (the ledger must have turned over once).
pub fn flatness(series: &SoakSeries) -> Option<Flatness> {
    let after: Vec<&SoakSample> = series
        .samples
        .iter()
        .filter(|s| s.secs >= series.warm_up_secs)
        .collect();
    let (reference, end) = (*after.first()?, *after.last()?);
    if end.secs - reference.secs < series.warm_up_secs || reference.database_bytes <= 0 {
        return None;
    }
    let n = after.len() as f64;
    let mean_x = after.iter().map(|s| s.secs).sum::<f64>() / n;
    let mean_y = after.iter().map(|s| s.database_bytes as f64).sum::<f64>() / n;
    let (covariance, variance) = after.iter().fold((0.0, 0.0), |(c, v), s| {
        let dx = s.secs - mean_x;
        (c + dx * (s.database_bytes as f64 - mean_y), v + dx * dx)
    });
    let slope_bytes_per_sec = if variance > 0.0 {
        covariance / variance
    } else {
        0.0
    };
    let growth = end.database_bytes as f64 / reference.database_bytes as f64;
    let slope_share_per_10_min = slope_bytes_per_sec * 600.0 / reference.database_bytes as f64;
    Some(Flatness {
        reference: reference.clone(),
        end: end.clone(),
        growth,
        mb_per_10_min: slope_bytes_per_sec * 600.0 / MB,
        flat: growth <= 1.0 + SOAK_TOLERANCE && slope_share_per_10_min <= SOAK_SLOPE_TOLERANCE,
    })
}

fn minutes(secs: f64) -> String {
    format!(
        "{}:{:02}",
        (secs / 60.0).floor() as u64,
        (secs % 60.0).floor() as u64
    )
}

fn micros(value: Option<f64>) -> String {
    match value {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => "n/a".into(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub target: String,
    pub measured: String,
    /// `None` when it could not be judged (a scenario not run).
    pub met: Option<bool>,
}

fn find(results: &[RunResult], scenario: ScenarioName, system: System) -> Option<&RunResult> {
    results
        .iter()
        .find(|r| r.scenario == scenario && r.system == system)
}

fn int(value: u64) -> String {
    let digits = value.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn signed(value: Option<i64>) -> String {
    match value {
        Some(v) if v < 0 => format!("-{}", int(v.unsigned_abs())),
        Some(v) => int(v as u64),
        None => "n/a".into(),
    }
}

fn ms(value: Option<f64>) -> String {
    match value {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => "n/a".into(),
    }
}

/// The service's targets, judged on the service's runs.
pub fn verdicts(results: &[RunResult]) -> Vec<Verdict> {
    let service = |scenario| find(results, scenario, System::Service);
    let not_run = |target: &str| Verdict {
        target: target.into(),
        measured: "scenario not run".into(),
        met: None,
    };
    let mut verdicts = Vec::new();
    let healthy_p99 = service(ScenarioName::Healthy)
        .and_then(|r| r.figures.latency)
        .map(|l| l.p99_ms);
    match service(ScenarioName::Healthy) {
        Some(run) => {
            let f = &run.figures;
            verdicts.push(Verdict {
                target: "healthy: >= 10,000 deliveries/s sustained".into(),
                measured: format!("{} deliveries/s", int(f.deliveries_per_sec as u64)),
                met: Some(f.deliveries_per_sec >= 10_000.0 && run.completed),
            });
            verdicts.push(Verdict {
                target: "healthy: p99 < 250 ms".into(),
                measured: format!("p99 {} ms", ms(healthy_p99)),
                met: Some(healthy_p99.is_some_and(|p99| p99 < 250.0)),
            });
        }
        None => {
            verdicts.push(not_run("healthy: >= 10,000 deliveries/s sustained"));
            verdicts.push(not_run("healthy: p99 < 250 ms"));
        }
    }
    match service(ScenarioName::Incident) {
        Some(run) => {
            let f = &run.figures;
            let p99 = f.latency.map(|l| l.p99_ms);
            verdicts.push(Verdict {
                target: "incident: healthy brokers' p99 within 1.5x of healthy".into(),
                measured: match (p99, healthy_p99) {
                    (Some(p99), Some(healthy)) => {
                        format!(
                            "p99 {} ms = {:.2}x healthy's {} ms",
                            ms(Some(p99)),
                            p99 / healthy,
                            ms(Some(healthy))
                        )
                    }
                    _ => format!("p99 {} ms (healthy not run)", ms(p99)),
                },
                met: match (p99, healthy_p99) {
                    (Some(p99), Some(healthy)) => Some(p99 <= 1.5 * healthy),
                    _ => None,
                },
            });
            // Bounded: never more than 3 s of peak production behind, and back to 0 at the end.
            let bound = run.peak_rate.map(|rate| 3 * i64::from(rate));
            verdicts.push(Verdict {
                target: "incident: lag bounded (max <= 3 s of peak production, 0 at the end)"
                    .into(),
                measured: format!(
                    "max {} (bound {}), end {}",
                    signed(f.max_lag),
                    signed(bound),
                    signed(f.end_lag)
                ),
                met: Some(
                    f.max_lag
                        .zip(bound)
                        .is_some_and(|(max, bound)| max <= bound)
                        && f.end_lag == Some(0),
                ),
            });
            verdicts.push(Verdict {
                target: "incident: 0 duplicates".into(),
                measured: int(f.duplicates),
                met: Some(f.duplicates == 0),
            });
            verdicts.push(Verdict {
                target: "incident: 0 lost".into(),
                measured: int(f.lost),
                met: Some(f.lost == 0),
            });
        }
        None => {
            for target in [
                "incident: healthy brokers' p99 within 1.5x of healthy",
                "incident: lag bounded",
                "incident: 0 duplicates",
                "incident: 0 lost",
            ] {
                verdicts.push(not_run(target));
            }
        }
    }
    match service(ScenarioName::Backlog) {
        Some(run) => verdicts.push(Verdict {
            target: format!(
                "backlog: {} events x 3 brokers delivered in < 15 s",
                int(run.figures.events as u64)
            ),
            measured: match run.figures.drain_secs {
                Some(secs) => format!("{secs:.1} s"),
                None => format!("not drained within {} s", run.deadline_secs),
            },
            met: Some(run.figures.drain_secs.is_some_and(|secs| secs < 15.0)),
        }),
        None => verdicts.push(not_run(
            "backlog: 42,000 events x 3 brokers delivered in < 15 s",
        )),
    }
    match service(ScenarioName::OneBroker) {
        Some(run) => verdicts.push(Verdict {
            target:
                "onebroker: >= 5,000 deliveries/s, one broker answering in 1 ms, shipped defaults"
                    .into(),
            measured: format!(
                "{} deliveries/s{}",
                int(run.figures.deliveries_per_sec as u64),
                if run.completed {
                    ""
                } else {
                    " (deadline reached)"
                }
            ),
            met: Some(run.figures.deliveries_per_sec >= ONE_BROKER_TARGET && run.completed),
        }),
        None => verdicts.push(not_run(
            "onebroker: >= 5,000 deliveries/s, one broker answering in 1 ms, shipped defaults",
        )),
    }
    for scenario in [ScenarioName::HotLoad, ScenarioName::Growth] {
        let Some(reference) = scenario.reference() else {
            continue;
        };
        let target = format!(
            "{}: deliveries/s within {:.0} % of {}",
            scenario.as_str(),
            REFERENCE_TOLERANCE * 100.0,
            reference.as_str()
        );
        match (service(scenario), service(reference)) {
            (Some(run), Some(base)) => {
                let (dps, base_dps) = (
                    run.figures.deliveries_per_sec,
                    base.figures.deliveries_per_sec,
                );
                verdicts.push(Verdict {
                    target,
                    measured: format!(
                        "{} vs {} deliveries/s = {}",
                        int(dps as u64),
                        int(base_dps as u64),
                        ratio(Some(dps), Some(base_dps))
                    ),
                    met: Some(
                        run.completed
                            && base_dps > 0.0
                            && dps >= (1.0 - REFERENCE_TOLERANCE) * base_dps,
                    ),
                });
            }
            _ => verdicts.push(not_run(&target)),
        }
    }
    let soak_target = format!(
        "soak: database size flat after the warm-up (end <= {:.2}x its size when the warm-up ended, and growing by at most {:.0} % of it per 10 min)",
        1.0 + SOAK_TOLERANCE,
        SOAK_SLOPE_TOLERANCE * 100.0
    );
    match service(ScenarioName::Soak).and_then(|run| run.soak.as_ref()) {
        Some(series) => verdicts.push(match flatness(series) {
            Some(f) => Verdict {
                target: soak_target,
                measured: format!(
                    "{:.0} MB at {} -> {:.0} MB at {} = {:.2}x; slope {:+.1} MB/10 min",
                    f.reference.database_bytes as f64 / MB,
                    minutes(f.reference.secs),
                    f.end.database_bytes as f64 / MB,
                    minutes(f.end.secs),
                    f.growth,
                    f.mb_per_10_min
                ),
                met: Some(f.flat),
            },
            None => Verdict {
                target: soak_target,
                measured: format!(
                    "run too short: needs twice the warm-up ({:.0} s) of samples",
                    2.0 * series.warm_up_secs
                ),
                met: None,
            },
        }),
        None => verdicts.push(not_run(&soak_target)),
    }
    match service(ScenarioName::Memory) {
        Some(run) => verdicts.push(Verdict {
            target: format!(
                "memory: peak RSS < 256 MB with a {}-event backlog",
                int(run.figures.events as u64)
            ),
            measured: match run.figures.peak_rss_mib {
                Some(mib) => format!("{:.0} MB", mib * 1.048_576),
                None => "n/a".into(),
            },
            met: run.figures.peak_rss_mib.map(|mib| mib * 1.048_576 < 256.0),
        }),
        None => verdicts.push(not_run(
            "memory: peak RSS < 256 MB with a 100,000-event backlog",
        )),
    }
    verdicts
}

/// Correctness only (smoke): every service run delivered everything exactly once.
pub fn correctness_failures(results: &[RunResult]) -> Vec<String> {
    results
        .iter()
        .filter(|r| r.system == System::Service)
        .filter_map(|r| {
            let f = &r.figures;
            let mut problems = Vec::new();
            if f.lost > 0 {
                problems.push(format!("{} lost", f.lost));
            }
            if f.duplicates > 0 {
                problems.push(format!("{} duplicates", f.duplicates));
            }
            if f.expected == 0 {
                problems.push("nothing was expected (no event produced?)".into());
            }
            (!problems.is_empty()).then(|| format!("{}: {}", r.label(), problems.join(", ")))
        })
        .collect()
}

pub fn markdown(results: &[RunResult], verdicts: &[Verdict], heading: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{heading}\n");
    md.push_str(
        "| scenario | system | events | deliveries expected | delivered | deliveries/s | p50 ms | p99 ms | max ms | max lag | lag at end | drain s | duplicates | lost | peak RSS MB |\n",
    );
    md.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    for run in results {
        let f = &run.figures;
        let lost = if f.lost > 0 && f.lost_unconsumed > 0 {
            format!(
                "{} ({} never consumed)",
                int(f.lost),
                int(f.lost_unconsumed)
            )
        } else {
            int(f.lost)
        };
        let drain = match f.drain_secs {
            Some(secs) => format!("{secs:.1}"),
            None => format!("not in {} s", run.deadline_secs),
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            run.scenario.as_str(),
            run.system.as_str(),
            int(f.events as u64),
            int(f.expected),
            int(f.delivered),
            int(f.deliveries_per_sec as u64),
            ms(f.latency.map(|l| l.p50_ms)),
            ms(f.latency.map(|l| l.p99_ms)),
            ms(f.latency.map(|l| l.max_ms)),
            signed(f.max_lag),
            signed(f.end_lag),
            drain,
            int(f.duplicates),
            lost,
            f.peak_rss_mib
                .map(|mib| format!("{:.0}", mib * 1.048_576))
                .unwrap_or_else(|| "n/a".into()),
        );
    }
    if !results.is_empty() {
        md.push_str("\nWhere the cores went while the system worked (average cores busy, from the clock start until the last delivery or the deadline; Tansu is shared with anything else running). CPU per delivery is that component's CPU time over the same window divided by the pairs delivered:\n\n");
        md.push_str("| scenario | system | system under test | postgres (its backends + shared) | tansu | receivers + producer + sampler | total | postgres CPU µs/delivery | system CPU µs/delivery |\n");
        md.push_str("|---|---|--:|--:|--:|--:|--:|--:|--:|\n");
        for run in results {
            let c = &run.cpu;
            let _ = writeln!(
                md,
                "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
                run.scenario.as_str(),
                run.system.as_str(),
                c.system,
                c.postgres,
                c.tansu,
                c.harness,
                c.system + c.postgres + c.tansu + c.harness,
                micros(run.postgres_micros_per_delivery()),
                micros(run.system_micros_per_delivery()),
            );
        }
    }
    let references = reference_rows(results);
    if !references.is_empty() {
        md.push_str("\nAgainst the reference scenario of the same run (service; `hotload`: backlog's events on few deep loads with one broker down; `growth`: backlog on a ledger with history, so backlog is its empty ledger):\n\n");
        md.push_str("| scenario | reference | deliveries/s | reference deliveries/s | ratio | postgres CPU µs/delivery | reference postgres CPU µs/delivery | ratio |\n");
        md.push_str("|---|---|--:|--:|--:|--:|--:|--:|\n");
        md.push_str(&references);
    }
    for run in results {
        if let Some(series) = &run.soak {
            md.push_str(&soak_table(run, series));
        }
    }
    let notes: Vec<String> = results
        .iter()
        .flat_map(|run| {
            run.notes
                .iter()
                .map(move |note| format!("- {}: {note}", run.label()))
        })
        .collect();
    if !notes.is_empty() {
        md.push_str("\nNotes:\n\n");
        md.push_str(&notes.join("\n"));
        md.push('\n');
    }
    md.push_str(concat!(
        "\nLost: expected (event, broker) pairs not received by a broker that does not time out by the end of the run ",
        "(all delivered, or the deadline). Never consumed: the event's offset was not yet committed when the run ended. ",
        "Still in the ledger: the service still holds the delivery (pending or dead), so it is late, not forgotten.\n",
    ));
    let ratios = ratio_rows(results);
    if !ratios.is_empty() {
        md.push_str(
            "\nService / baseline (below 1 is better for p99, max lag, drain and RSS):\n\n",
        );
        md.push_str("| scenario | deliveries/s | p99 | max lag | drain | peak RSS | duplicates (service vs baseline) | lost (service vs baseline) |\n");
        md.push_str("|---|--:|--:|--:|--:|--:|--:|--:|\n");
        md.push_str(&ratios);
    }
    if !verdicts.is_empty() {
        md.push_str("\nTargets (service):\n\n| target | measured | verdict |\n|---|---|---|\n");
        for v in verdicts {
            let verdict = match v.met {
                Some(true) => "met",
                Some(false) => "**MISSED**",
                None => "not judged",
            };
            let _ = writeln!(md, "| {} | {} | {} |", v.target, v.measured, verdict);
        }
    }
    md
}

/// The database over a soak, one row per minute (the first sample of each) and the last:
/// sizes in MB (10^6 bytes) with indexes and TOAST, live rows as Postgres estimates them.
fn soak_table(run: &RunResult, series: &SoakSeries) -> String {
    let mut md = format!(
        "\nThe database over the {} run (warm-up ends at {}; soak.csv has every sample, soak.svg the chart):\n\n",
        run.label(),
        minutes(series.warm_up_secs)
    );
    md.push_str("| minute | database MB | deliveries MB | delivery_attempts MB | events MB | deliveries rows | delivery_attempts rows | events rows | dead rows (3 tables) | autovacuums (3 tables) | deliveries/s |\n");
    md.push_str("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|\n");
    let mut last_minute = None;
    for (index, sample) in series.samples.iter().enumerate() {
        let minute = (sample.secs / 60.0).floor() as u64;
        let is_last = index + 1 == series.samples.len();
        if last_minute == Some(minute) && !is_last {
            continue;
        }
        last_minute = Some(minute);
        let t = &sample.tables;
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} |",
            minutes(sample.secs),
            sample.database_bytes as f64 / MB,
            t[0].bytes as f64 / MB,
            t[1].bytes as f64 / MB,
            t[2].bytes as f64 / MB,
            int(t[0].live_rows.max(0) as u64),
            int(t[1].live_rows.max(0) as u64),
            int(t[2].live_rows.max(0) as u64),
            int(t.iter().map(|t| t.dead_rows.max(0) as u64).sum()),
            t.iter().map(|t| t.autovacuums).sum::<i64>(),
            int(sample.deliveries_per_sec as u64),
        );
    }
    md
}

/// Every soak sample of every run, one line each.
pub fn soak_csv(results: &[RunResult]) -> String {
    let mut csv = String::from("scenario,system,seconds,database_bytes");
    for field in ["bytes", "live_rows", "dead_rows", "autovacuums"] {
        for table in TABLES {
            let _ = write!(csv, ",{table}_{field}");
        }
    }
    csv.push_str(",deliveries_per_sec\n");
    for run in results {
        let Some(series) = &run.soak else { continue };
        for s in &series.samples {
            let _ = write!(
                csv,
                "{},{},{:.3},{}",
                run.scenario.as_str(),
                run.system.as_str(),
                s.secs,
                s.database_bytes
            );
            let columns: [fn(&crate::soak::TableSample) -> i64; 4] = [
                |t| t.bytes,
                |t| t.live_rows,
                |t| t.dead_rows,
                |t| t.autovacuums,
            ];
            for column in columns {
                for table in &s.tables {
                    let _ = write!(csv, ",{}", column(table));
                }
            }
            let _ = writeln!(csv, ",{:.1}", s.deliveries_per_sec);
        }
    }
    csv
}

/// One line of a soak panel: its legend, colour and (minutes, value) points.
struct Line {
    name: &'static str,
    colour: &'static str,
    points: Vec<(f64, f64)>,
}

/// Two panels per soak run, drawn like lag.svg: sizes in MB (the database and each table), and
/// the delivery rate achieved, against minutes since production started; a dashed line where
/// the warm-up ends.
pub fn soak_svg(results: &[RunResult]) -> String {
    let soaks: Vec<(&RunResult, &SoakSeries)> = results
        .iter()
        .filter_map(|r| r.soak.as_ref().map(|s| (r, s)))
        .collect();
    let width = MARGIN_LEFT + PANEL_WIDTH + 40.0;
    let height = MARGIN_TOP + 2.0 * soaks.len() as f64 * (PANEL_HEIGHT + PANEL_GAP);
    let mut svg = svg_start(
        width,
        height,
        "Soak: database size (MB, with indexes) and deliveries/s over the run",
    );
    let mut panel = 0;
    for (run, series) in soaks {
        let at = |s: &SoakSample| s.secs / 60.0;
        let mb = |bytes: i64| bytes as f64 / MB;
        let size = |name, colour, f: &dyn Fn(&SoakSample) -> f64| Line {
            name,
            colour,
            points: series.samples.iter().map(|s| (at(s), f(s))).collect(),
        };
        let sizes = vec![
            size(
                "database",
                "#000000",
                &|s: &SoakSample| mb(s.database_bytes),
            ),
            size("deliveries", "#1f77b4", &|s: &SoakSample| {
                mb(s.tables[0].bytes)
            }),
            size("delivery_attempts", "#2ca02c", &|s: &SoakSample| {
                mb(s.tables[1].bytes)
            }),
            size("events", "#ff7f0e", &|s: &SoakSample| mb(s.tables[2].bytes)),
        ];
        let rate = vec![size("deliveries/s", "#1f77b4", &|s: &SoakSample| {
            s.deliveries_per_sec
        })];
        let warm_up = series.warm_up_secs / 60.0;
        for (title, lines) in [
            (format!("{}: size (MB)", run.label()), sizes),
            (format!("{}: deliveries/s", run.label()), rate),
        ] {
            soak_panel(&mut svg, panel, &title, &lines, warm_up);
            panel += 1;
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn soak_panel(svg: &mut String, panel: usize, title: &str, lines: &[Line], warm_up_min: f64) {
    let top = MARGIN_TOP + panel as f64 * (PANEL_HEIGHT + PANEL_GAP) + 20.0;
    let bottom = top + PANEL_HEIGHT;
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let max_x = nice_ceiling(all().map(|p| p.0).fold(0.0, f64::max));
    let max_y = nice_ceiling(all().map(|p| p.1).fold(0.0, f64::max));
    let x = |v: f64| MARGIN_LEFT + v / max_x * PANEL_WIDTH;
    let y = |v: f64| bottom - v / max_y * PANEL_HEIGHT;
    panel_frame(svg, title, (top, bottom), (max_x, max_y), "min");
    let wx = x(warm_up_min);
    let _ = writeln!(
        svg,
        r##"<line x1="{wx:.1}" y1="{top:.1}" x2="{wx:.1}" y2="{bottom:.1}" stroke="#888" stroke-dasharray="4 4"/><text x="{:.1}" y="{:.1}" fill="#888">warm-up ends</text>"##,
        wx + 4.0,
        top + 12.0
    );
    for (index, line) in lines.iter().enumerate() {
        let points: Vec<String> = line
            .points
            .iter()
            .map(|&(px, py)| format!("{:.1},{:.1}", x(px), y(py)))
            .collect();
        plot_line(svg, &points, line.colour, (top, index), line.name);
    }
}

fn ratio(service: Option<f64>, baseline: Option<f64>) -> String {
    match (service, baseline) {
        (Some(s), Some(b)) if b > 0.0 => {
            let r = s / b;
            if r >= 10.0 {
                format!("{r:.0}x")
            } else if r >= 0.1 {
                format!("{r:.2}x")
            } else {
                format!("{r:.3}x")
            }
        }
        _ => "n/a".into(),
    }
}

fn ratio_rows(results: &[RunResult]) -> String {
    let mut rows = String::new();
    for scenario in ScenarioName::ALL {
        let (Some(s), Some(b)) = (
            find(results, scenario, System::Service),
            find(results, scenario, System::Baseline),
        ) else {
            continue;
        };
        let (fs, fb) = (&s.figures, &b.figures);
        let drain = match (fs.drain_secs, fb.drain_secs) {
            (Some(_), None) => format!("baseline not drained in {} s", b.deadline_secs),
            (service, baseline) => ratio(service, baseline),
        };
        let _ = writeln!(
            rows,
            "| {} | {} | {} | {} | {} | {} | {} vs {} | {} vs {} |",
            scenario.as_str(),
            ratio(Some(fs.deliveries_per_sec), Some(fb.deliveries_per_sec)),
            ratio(fs.latency.map(|l| l.p99_ms), fb.latency.map(|l| l.p99_ms)),
            ratio(fs.max_lag.map(|l| l as f64), fb.max_lag.map(|l| l as f64)),
            drain,
            ratio(fs.peak_rss_mib, fb.peak_rss_mib),
            int(fs.duplicates),
            int(fb.duplicates),
            int(fs.lost),
            int(fb.lost),
        );
    }
    rows
}

/// Each service run whose scenario has a reference, against the reference's service run.
fn reference_rows(results: &[RunResult]) -> String {
    let mut rows = String::new();
    for run in results.iter().filter(|r| r.system == System::Service) {
        let Some(reference) = run.scenario.reference() else {
            continue;
        };
        let Some(base) = find(results, reference, System::Service) else {
            continue;
        };
        let (pg, base_pg) = (
            run.postgres_micros_per_delivery(),
            base.postgres_micros_per_delivery(),
        );
        let _ = writeln!(
            rows,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            run.scenario.as_str(),
            reference.as_str(),
            int(run.figures.deliveries_per_sec as u64),
            int(base.figures.deliveries_per_sec as u64),
            ratio(
                Some(run.figures.deliveries_per_sec),
                Some(base.figures.deliveries_per_sec)
            ),
            micros(pg),
            micros(base_pg),
            ratio(pg, base_pg),
        );
    }
    rows
}

pub fn lag_csv(results: &[RunResult]) -> String {
    let mut csv = String::from("scenario,system,seconds,lag\n");
    for run in results {
        for (secs, lag) in &run.lag_series {
            let _ = writeln!(
                csv,
                "{},{},{secs:.3},{lag}",
                run.scenario.as_str(),
                run.system.as_str()
            );
        }
    }
    csv
}

const PANEL_WIDTH: f64 = 880.0;
const PANEL_HEIGHT: f64 = 200.0;
const MARGIN_LEFT: f64 = 80.0;
const MARGIN_TOP: f64 = 40.0;
const PANEL_GAP: f64 = 70.0;

fn colour(system: System) -> &'static str {
    match system {
        System::Service => "#1f77b4",
        System::Baseline => "#d62728",
    }
}

/// A round axis maximum at or above `value` (1, 2 or 5 times a power of ten).
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * power)
        .find(|&c| c >= value)
        .unwrap_or(10.0 * power)
}

/// One system's lag over one scenario: (seconds since the run's clock start, total lag).
pub struct LagSeries<'a> {
    pub scenario: ScenarioName,
    pub system: System,
    pub points: &'a [(f64, i64)],
}

pub fn lag_series(results: &[RunResult]) -> Vec<LagSeries<'_>> {
    results
        .iter()
        .map(|r| LagSeries {
            scenario: r.scenario,
            system: r.system,
            points: &r.lag_series,
        })
        .collect()
}

/// One series read back from a CSV: (scenario, system, points).
pub type OwnedLagSeries = (ScenarioName, System, Vec<(f64, i64)>);

/// Reads back what `lag_csv` wrote, in file order.
pub fn parse_lag_csv(csv: &str) -> Vec<OwnedLagSeries> {
    use clap::ValueEnum;
    let mut series: Vec<OwnedLagSeries> = Vec::new();
    for line in csv.lines().skip(1) {
        let fields: Vec<&str> = line.split(',').collect();
        let [scenario, system, secs, lag] = fields[..] else {
            continue;
        };
        let (Ok(scenario), Ok(system), Ok(secs), Ok(lag)) = (
            ScenarioName::from_str(scenario, true),
            System::from_str(system, true),
            secs.parse::<f64>(),
            lag.parse::<i64>(),
        ) else {
            continue;
        };
        match series.last_mut() {
            Some(last) if last.0 == scenario && last.1 == system => last.2.push((secs, lag)),
            _ => series.push((scenario, system, vec![(secs, lag)])),
        }
    }
    series
}

/// An axis label: whole numbers without decimals, others with one.
/// A chart's opening: the svg element, a white background and the chart's title.
fn svg_start(width: f64, height: f64, title: &str) -> String {
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN_LEFT}" y="22" font-size="16">{title}</text>"#
    );
    svg
}

/// One data line of a panel (`points` as "x,y" pairs), with its legend entry: the
/// `index`th line of the panel starting at `top`.
fn plot_line(
    svg: &mut String,
    points: &[String],
    colour: &str,
    (top, index): (f64, usize),
    name: &str,
) {
    let _ = writeln!(
        svg,
        r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
        points.join(" ")
    );
    let legend_x = MARGIN_LEFT + PANEL_WIDTH - 160.0;
    let legend_y = top + 14.0 + index as f64 * 16.0;
    let _ = writeln!(
        svg,
        r#"<line x1="{legend_x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{legend_y:.1}">{name}</text>"#,
        legend_y - 4.0,
        legend_x + 20.0,
        legend_y - 4.0,
        legend_x + 26.0,
    );
}

/// A chart panel's frame: its title, four grid lines with their y labels, x labels in `x_unit`,
/// and the axes. Values run from 0 to `max` on each axis.
fn panel_frame(
    svg: &mut String,
    title: &str,
    (top, bottom): (f64, f64),
    (max_x, max_y): (f64, f64),
    x_unit: &str,
) {
    let x = |v: f64| MARGIN_LEFT + v / max_x * PANEL_WIDTH;
    let y = |v: f64| bottom - v / max_y * PANEL_HEIGHT;
    let _ = writeln!(
        svg,
        r#"<text x="{MARGIN_LEFT}" y="{:.0}" font-size="14" font-weight="bold">{title}</text>"#,
        top - 8.0
    );
    for tick in 0..=4 {
        let fraction = f64::from(tick) / 4.0;
        let (tx, ty) = (x(fraction * max_x), y(fraction * max_y));
        let _ = writeln!(
            svg,
            r##"<line x1="{MARGIN_LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            MARGIN_LEFT + PANEL_WIDTH,
            MARGIN_LEFT - 6.0,
            ty + 4.0,
            int((fraction * max_y) as u64)
        );
        let _ = writeln!(
            svg,
            r#"<text x="{tx:.1}" y="{:.1}" text-anchor="middle">{} {x_unit}</text>"#,
            bottom + 16.0,
            axis_label(fraction * max_x)
        );
    }
    let _ = writeln!(
        svg,
        r#"<polyline points="{MARGIN_LEFT},{top:.1} {MARGIN_LEFT},{bottom:.1} {:.1},{bottom:.1}" fill="none" stroke="black"/>"#,
        MARGIN_LEFT + PANEL_WIDTH
    );
}

fn axis_label(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// One panel per scenario: total consumer lag against seconds since the run's clock start,
/// one polyline per system.
pub fn lag_svg(results: &[LagSeries<'_>]) -> String {
    let scenarios: Vec<ScenarioName> = ScenarioName::ALL
        .into_iter()
        .filter(|s| results.iter().any(|r| r.scenario == *s))
        .collect();
    let width = MARGIN_LEFT + PANEL_WIDTH + 40.0;
    let height = MARGIN_TOP + scenarios.len() as f64 * (PANEL_HEIGHT + PANEL_GAP);
    let mut svg = svg_start(
        width,
        height,
        "Consumer lag (messages behind, all partitions), sampled every 500 ms",
    );
    for (panel, scenario) in scenarios.iter().enumerate() {
        let runs: Vec<&LagSeries<'_>> =
            results.iter().filter(|r| r.scenario == *scenario).collect();
        let top = MARGIN_TOP + panel as f64 * (PANEL_HEIGHT + PANEL_GAP) + 20.0;
        let bottom = top + PANEL_HEIGHT;
        let max_secs = nice_ceiling(
            runs.iter()
                .flat_map(|r| r.points.iter().map(|p| p.0))
                .fold(0.0, f64::max),
        );
        let max_lag = nice_ceiling(
            runs.iter()
                .flat_map(|r| r.points.iter().map(|p| p.1 as f64))
                .fold(0.0, f64::max),
        );
        let x = |secs: f64| MARGIN_LEFT + secs / max_secs * PANEL_WIDTH;
        let y = |lag: f64| bottom - lag / max_lag * PANEL_HEIGHT;
        panel_frame(
            &mut svg,
            scenario.as_str(),
            (top, bottom),
            (max_secs, max_lag),
            "s",
        );
        for (line, run) in runs.iter().enumerate() {
            let points: Vec<String> = run
                .points
                .iter()
                .map(|&(secs, lag)| format!("{:.1},{:.1}", x(secs), y(lag as f64)))
                .collect();
            plot_line(
                &mut svg,
                &points,
                colour(run.system),
                (top, line),
                run.system.as_str(),
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the target whose text starts with `prefix` was met.
    fn verdict_met(verdicts: &[Verdict], prefix: &str) -> Option<bool> {
        verdicts
            .iter()
            .find(|v| v.target.starts_with(prefix))
            .unwrap()
            .met
    }
    use crate::analysis::Latency;

    fn run(scenario: ScenarioName, system: System, dps: f64, p99: f64) -> RunResult {
        RunResult {
            scenario,
            system,
            figures: Figures {
                events: 42_000,
                expected: 126_000,
                delivered: 126_000,
                deliveries_per_sec: dps,
                latency: Some(Latency {
                    p50_ms: p99 / 4.0,
                    p99_ms: p99,
                    max_ms: p99 * 2.0,
                }),
                max_lag: Some(900),
                end_lag: Some(0),
                drain_secs: Some(12.5),
                duplicates: 0,
                lost: 0,
                lost_unconsumed: 0,
                undelivered_in_ledger: None,
                requests: 126_000,
                peak_rss_mib: Some(100.0),
            },
            completed: true,
            cpu: CpuShare::default(),
            deadline_secs: 60,
            peak_rate: Some(3_000),
            lag_series: vec![(0.0, 0), (0.5, 900), (1.0, 0)],
            notes: Vec::new(),
            soak: None,
        }
    }

    /// A soak whose database is `mb(minute)` MB, sampled every 30 s for `minutes`.
    fn soak(minutes: u32, mb: impl Fn(f64) -> f64) -> SoakSeries {
        let samples = (0..=2 * minutes)
            .map(|half| {
                let secs = f64::from(half) * 30.0;
                let bytes = (mb(secs / 60.0) * MB) as i64;
                let table = crate::soak::TableSample {
                    bytes: bytes / 4,
                    live_rows: 240_000,
                    dead_rows: 1_000,
                    autovacuums: i64::from(half / 4),
                };
                SoakSample {
                    secs,
                    database_bytes: bytes,
                    tables: [table; 3],
                    deliveries_per_sec: 2_000.0,
                }
            })
            .collect();
        SoakSeries {
            warm_up_secs: 160.0,
            samples,
        }
    }

    #[test]
    fn a_ledger_that_stops_growing_after_the_warm_up_is_flat() {
        // Fills for 2 minutes, then swings +-10 % between vacuums.
        let series = soak(30, |minute| {
            if minute < 2.0 {
                100.0 * minute
            } else {
                200.0
                    + if (minute as u32).is_multiple_of(2) {
                        20.0
                    } else {
                        -20.0
                    }
            }
        });
        let f = flatness(&series).unwrap();
        assert_eq!(f.reference.secs, 180.0);
        assert_eq!(f.end.secs, 1_800.0);
        assert!(f.flat, "{f:?}");
        assert!(f.mb_per_10_min.abs() < 5.0, "{f:?}");
    }

    #[test]
    fn a_ledger_that_keeps_growing_is_not_flat() {
        // Retention not keeping up: 10 MB a minute for the whole run.
        let f = flatness(&soak(30, |minute| 100.0 + 10.0 * minute)).unwrap();
        assert!(!f.flat, "{f:?}");
        assert!((f.mb_per_10_min - 100.0).abs() < 1.0, "{f:?}");
        // Under 1.25x at the end, but a steady climb: 24 MB in 27 minutes is 8.9 % per 10 min.
        let climbing = |minute: f64| 100.0 + 24.0 * (minute - 3.0).max(0.0) / 27.0;
        let f = flatness(&soak(30, climbing)).unwrap();
        assert!(f.growth <= 1.0 + SOAK_TOLERANCE && !f.flat, "{f:?}");
        // 1.25x exactly is still flat; a little more is not.
        let at_warm_up = |minute: f64| if minute < 3.5 { 100.0 } else { 125.0 };
        assert!(flatness(&soak(30, at_warm_up)).unwrap().flat);
        let above = |minute: f64| if minute < 3.5 { 100.0 } else { 126.0 };
        assert!(!flatness(&soak(30, above)).unwrap().flat);
    }

    #[test]
    fn a_soak_shorter_than_two_warm_ups_is_not_judged() {
        assert_eq!(flatness(&soak(2, |_| 100.0)), None);
        assert_eq!(flatness(&soak(4, |_| 100.0)), None);
        assert!(flatness(&soak(6, |_| 100.0)).is_some());
        let mut short = run(ScenarioName::Soak, System::Service, 2_000.0, 50.0);
        short.soak = Some(soak(4, |_| 100.0));
        let verdicts = verdicts(&[short]);
        assert_eq!(verdict_met(&verdicts, "soak"), None);
    }

    #[test]
    fn the_soak_has_a_table_a_csv_and_a_chart() {
        let mut run = run(ScenarioName::Soak, System::Service, 2_000.0, 50.0);
        run.soak = Some(soak(30, |_| 200.0));
        let results = [run];
        let verdicts = verdicts(&results);
        assert_eq!(verdict_met(&verdicts, "soak"), Some(true));
        let md = markdown(&results, &verdicts, "## Results");
        // One row per minute: 0 to 30.
        assert_eq!(md.matches("| 200 | 50 | 50 | 50 |").count(), 31, "{md}");
        assert!(md.contains("| 2:00 | 200 |"), "{md}");
        let csv = soak_csv(&results);
        assert_eq!(csv.lines().count(), 1 + 61);
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        let row: Vec<&str> = csv.lines().nth(1).unwrap().split(',').collect();
        assert_eq!(header.len(), row.len());
        assert_eq!(header[4], "deliveries_bytes");
        let svg = soak_svg(&results);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Four sizes and the rate.
        assert_eq!(svg.matches(r#"stroke-width="2""#).count(), 5);
        assert_eq!(svg.matches("warm-up ends").count(), 2);
        assert!(soak_csv(&[]).lines().count() == 1);
    }

    #[test]
    fn thousands_are_separated() {
        assert_eq!(int(0), "0");
        assert_eq!(int(999), "999");
        assert_eq!(int(1_000), "1,000");
        assert_eq!(int(1_234_567), "1,234,567");
    }

    #[test]
    fn targets_are_judged_on_the_service() {
        let results = [
            run(ScenarioName::Healthy, System::Service, 10_500.0, 100.0),
            run(ScenarioName::Healthy, System::Baseline, 900.0, 30_000.0),
            run(ScenarioName::Incident, System::Service, 9_000.0, 160.0),
            run(ScenarioName::Backlog, System::Service, 10_080.0, 5_000.0),
        ];
        let verdicts = verdicts(&results);
        let met = |prefix: &str| verdict_met(&verdicts, prefix);
        assert_eq!(met("healthy: >="), Some(true));
        assert_eq!(met("healthy: p99"), Some(true));
        // 160 ms > 1.5 x 100 ms.
        assert_eq!(met("incident: healthy brokers"), Some(false));
        assert_eq!(met("incident: lag"), Some(true));
        assert_eq!(met("backlog"), Some(true));
        assert_eq!(met("memory"), None);
        let md = markdown(&results, &verdicts, "## Results");
        assert!(
            md.contains("| healthy | service | 42,000 | 126,000 | 126,000 | 10,500 |"),
            "{md}"
        );
        assert!(md.contains("| healthy | 12x | 0.003x |"), "{md}");
        assert!(md.contains("**MISSED**"));
    }

    #[test]
    fn smoke_flags_loss_and_duplicates_of_the_service_only() {
        let mut service = run(ScenarioName::Backlog, System::Service, 1.0, 1.0);
        let mut baseline = run(ScenarioName::Backlog, System::Baseline, 1.0, 1.0);
        baseline.figures.duplicates = 5;
        assert!(correctness_failures(&[service.clone(), baseline.clone()]).is_empty());
        service.figures.lost = 2;
        assert_eq!(
            correctness_failures(&[service, baseline]),
            vec!["backlog / service: 2 lost".to_owned()]
        );
    }

    #[test]
    fn the_chart_has_a_line_per_run_and_the_csv_a_row_per_point() {
        let results = [
            run(ScenarioName::Healthy, System::Service, 1.0, 1.0),
            run(ScenarioName::Healthy, System::Baseline, 1.0, 1.0),
        ];
        let svg = lag_svg(&lag_series(&results));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches(r#"stroke-width="2""#).count(), 2);
        let csv = lag_csv(&results);
        assert_eq!(csv.lines().count(), 1 + 6);
        let parsed = parse_lag_csv(&csv);
        assert_eq!(parsed.len(), 2);
        assert_eq!(
            parsed[1],
            (
                ScenarioName::Healthy,
                System::Baseline,
                vec![(0.0, 0), (0.5, 900), (1.0, 0)]
            )
        );
        assert_eq!(
            (axis_label(12.5), axis_label(25.0)),
            ("12.5".to_owned(), "25".to_owned())
        );
        assert_eq!(nice_ceiling(900.0), 1000.0);
        assert_eq!(nice_ceiling(1_100.0), 2000.0);
    }

    #[test]
    fn new_scenarios_are_judged_against_their_targets_and_references() {
        let mut backlog = run(ScenarioName::Backlog, System::Service, 10_000.0, 5_000.0);
        backlog.cpu = CpuShare {
            postgres: 1.0,
            window_secs: 12.6,
            ..CpuShare::default()
        };
        let mut hotload = run(ScenarioName::HotLoad, System::Service, 8_500.0, 5_000.0);
        hotload.cpu = CpuShare {
            postgres: 1.2,
            window_secs: 12.6,
            ..CpuShare::default()
        };
        hotload.notes = vec!["bench-broker-000 held 6,300 pending".into()];
        let growth = run(ScenarioName::Growth, System::Service, 7_000.0, 5_000.0);
        let onebroker = run(ScenarioName::OneBroker, System::Service, 1_300.0, 5_000.0);
        let results = [backlog, hotload, growth, onebroker];
        let verdicts = verdicts(&results);
        let met = |prefix: &str| verdict_met(&verdicts, prefix);
        assert_eq!(met("hotload"), Some(true));
        assert_eq!(met("growth"), Some(false));
        assert_eq!(met("onebroker"), Some(false));
        let md = markdown(&results, &verdicts, "## Results");
        // 1.0 core x 12.6 s / 126,000 deliveries = 100 µs.
        assert!(md.contains("| 1.00 | 100 | 0.0 |"), "{md}");
        assert!(
            md.contains("| hotload | backlog | 8,500 | 10,000 | 0.85x | 120 | 100 | 1.20x |"),
            "{md}"
        );
        assert!(
            md.contains("- hotload / service: bench-broker-000 held 6,300 pending"),
            "{md}"
        );
    }
}
