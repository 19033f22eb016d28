//! `webhook-delivery-bench run`: every chosen scenario, the service then the baseline, then the
//! table, the lag CSV and chart, and (with `--smoke`) the correctness verdict.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{describe, BenchError};
use crate::report::{
    correctness_failures, lag_csv, lag_series, lag_svg, markdown, parse_lag_csv, soak_csv,
    soak_svg, verdicts, LagSeries, RunResult,
};
use crate::run::{run_one, BenchContext};
use crate::scenario::{Scenario, ScenarioName, SettingsProfile, System};
use crate::settings::SHIPPED_DEFAULTS_CHANGES;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A tiny version of each scenario that checks correctness only (0 lost, 0 duplicates for
    /// the service) and fails otherwise.
    #[arg(long)]
    pub smoke: bool,
    /// Scenarios to run (repeatable); all of them by default.
    #[arg(long, value_enum)]
    pub scenario: Vec<ScenarioName>,
    /// Only this system (default: each scenario's systems, service first).
    #[arg(long, value_enum)]
    pub system: Option<System>,
    /// Where latest.md, lag.csv and lag.svg go (`--smoke` writes into its `smoke/` folder).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results"))]
    pub results_dir: PathBuf,
    /// Delivered rows in `growth`'s ledger history, instead of the scenario's (10 million at
    /// full size, 20,000 with --smoke): e.g. 1000000 for a shorter run on a busy machine.
    #[arg(long)]
    pub growth_rows: Option<u64>,
    /// Minutes of production in `soak`, instead of the scenario's (55 at full size, 20 s with
    /// --smoke): e.g. 6 to try it by hand (the verdict needs at least 50: twice the warm-up).
    #[arg(long)]
    pub soak_minutes: Option<u64>,
    /// Events per second produced in `healthy`, instead of the scenario's 3,500 (10,500
    /// deliveries/s offered with 3 subscribers per load): e.g. 5000 offers issue 12's 15,000.
    #[arg(long)]
    pub healthy_events_per_sec: Option<u32>,
    /// The Postgres server, host:port (trust auth for user postgres, with a database `test`).
    /// The soak's recorded run used a second server with autovacuum on, since the one
    /// scripts/services.sh configures runs without it (docs/performance.md, "Soak").
    #[arg(long, default_value = crate::world::POSTGRES)]
    pub postgres: String,
    /// The service's config directory (config/base.toml).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../config"))]
    pub config_dir: PathBuf,
}

/// Runs everything; `Ok(false)` when `--smoke` found a correctness violation or a run failed.
pub async fn run(args: RunArgs) -> Result<bool, BenchError> {
    let mut names = if args.scenario.is_empty() {
        ScenarioName::ALL.to_vec()
    } else {
        args.scenario.clone()
    };
    // A scenario judged against another (hotload, growth -> backlog) needs that one's service
    // run from the same invocation, on the same machine state.
    let references: Vec<ScenarioName> = names
        .iter()
        .filter_map(|name| name.reference())
        .filter(|reference| !names.contains(reference))
        .collect();
    names.extend(references.iter().copied());
    names.sort_unstable();
    names.dedup();
    let out_dir = if args.smoke {
        args.results_dir.join("smoke")
    } else {
        args.results_dir.clone()
    };
    let logs_dir = out_dir.join("logs");
    std::fs::create_dir_all(&logs_dir)
        .map_err(|e| BenchError::io(format!("creating {}", logs_dir.display()), e))?;
    let context = BenchContext {
        run_id: crate::event::now_micros().to_string()[4..12].to_owned(),
        config_dir: args.config_dir.clone(),
        logs_dir,
        settle: Duration::from_secs(if args.smoke { 1 } else { 3 }),
        postgres: args.postgres.clone(),
    };

    let mut results: Vec<RunResult> = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut descriptions = Vec::new();
    for name in names {
        let mut scenario = Scenario::new(name, args.smoke);
        if let (ScenarioName::Growth, Some(rows)) = (name, args.growth_rows) {
            scenario.history_rows = rows;
        }
        if let (ScenarioName::Soak, Some(minutes)) = (name, args.soak_minutes) {
            scenario = scenario.lasting(Duration::from_secs(60 * minutes));
        }
        if let (ScenarioName::Healthy, Some(rate)) = (name, args.healthy_events_per_sec) {
            scenario = scenario.at_rate(rate);
        }
        let mut description = format!(
            "- **{}**: {}; {}",
            name.as_str(),
            scenario.describe_brokers(),
            scenario.workload.describe(),
        );
        if scenario.history_rows > 0 {
            description.push_str(&format!(
                " on a ledger already holding {} delivered deliveries",
                scenario.history_rows
            ));
        }
        description.push_str(&format!("; deadline {} s", scenario.deadline.as_secs()));
        if let Some(retention) = &scenario.retention {
            use webhook_delivery::retention::human;
            description.push_str(&format!(
                "; retention: delivered deliveries kept {}, dead {}, rejected {}, a pass every {} \
                 (batch size and pause as shipped); the database sampled every {}, judged after a \
                 warm-up of {}",
                human(retention.delivered),
                human(retention.dead),
                human(retention.rejected),
                human(retention.interval),
                human(retention.sample_every),
                human(retention.warm_up()),
            ));
        }
        description.push_str(match scenario.settings {
            SettingsProfile::Bench => ".",
            SettingsProfile::ShippedDefaults => {
                "; settings: the SHIPPED DEFAULTS (config/base.toml), not the bench's tuning. Changed: "
            }
        });
        if scenario.settings == SettingsProfile::ShippedDefaults {
            description.push_str(SHIPPED_DEFAULTS_CHANGES);
            description.push('.');
        }
        if references.contains(&name) {
            description.push_str(" (run as the reference of another scenario: service only.)");
        }
        descriptions.push(description);
        let reference_only = references.contains(&name);
        let systems = scenario
            .systems
            .iter()
            .copied()
            .filter(|s| args.system.is_none_or(|only| only == *s))
            .filter(|s| !reference_only || *s == System::Service);
        for system in systems {
            eprintln!("bench: {} / {}", name.as_str(), system.as_str());
            match run_one(&context, &scenario, system).await {
                Ok(result) => {
                    let f = &result.figures;
                    eprintln!(
                        "bench:   delivered {}/{} ({:.0}/s), {} duplicates, {} lost{}",
                        f.delivered,
                        f.expected,
                        f.deliveries_per_sec,
                        f.duplicates,
                        f.lost,
                        if result.completed {
                            ""
                        } else {
                            ", deadline reached"
                        }
                    );
                    results.push(result);
                }
                Err(error) => {
                    let message = format!(
                        "{} / {}: {}",
                        name.as_str(),
                        system.as_str(),
                        describe(&error)
                    );
                    eprintln!("bench:   FAILED {message}");
                    failures.push(message);
                }
            }
        }
    }

    let verdicts = if args.smoke {
        Vec::new()
    } else {
        verdicts(&results)
    };
    let heading = format!(
        "## webhook-delivery benchmark ({}), run {}\n\n{} cores, shared by the system under test, Postgres, Tansu, the receivers and the producer.\n\n{}",
        if args.smoke { "smoke" } else { "full" },
        context.run_id,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        descriptions.join("\n")
    );
    let mut md = markdown(&results, &verdicts, &heading);
    let correctness = correctness_failures(&results);
    if args.smoke {
        md.push_str(&format!(
            "\nSmoke correctness (service: 0 lost, 0 duplicates): {}\n",
            if correctness.is_empty() && failures.is_empty() {
                "passed"
            } else {
                "FAILED"
            }
        ));
    }
    for message in correctness.iter().chain(&failures) {
        md.push_str(&format!("\n- FAILED: {message}"));
    }
    let missed: Vec<&str> = verdicts
        .iter()
        .filter(|v| v.met == Some(false))
        .map(|v| v.target.as_str())
        .collect();
    if !missed.is_empty() {
        md.push_str(&format!("\nTargets MISSED: {}.\n", missed.join("; ")));
    }
    write(&out_dir.join("latest.md"), &md)?;
    write(&out_dir.join("lag.csv"), &lag_csv(&results))?;
    write(&out_dir.join("lag.svg"), &lag_svg(&lag_series(&results)))?;
    // Only a run with a soak replaces the last soak's curve.
    let soaked = results.iter().any(|r| r.soak.is_some());
    if soaked {
        write(&out_dir.join("soak.csv"), &soak_csv(&results))?;
        write(&out_dir.join("soak.svg"), &soak_svg(&results))?;
    }
    println!("{md}");
    eprintln!(
        "bench: wrote {} (table), lag.csv and lag.svg{}",
        out_dir.join("latest.md").display(),
        if soaked {
            ", soak.csv and soak.svg"
        } else {
            ""
        }
    );
    Ok(failures.is_empty() && (!args.smoke || correctness.is_empty()))
}

fn write(path: &Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|e| BenchError::io(format!("writing {}", path.display()), e))
}

#[derive(Debug, clap::Args)]
pub struct ChartArgs {
    /// A lag.csv written by `run`.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results/lag.csv"))]
    pub csv: PathBuf,
    /// Where to draw the chart.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/results/lag.svg"))]
    pub svg: PathBuf,
}

/// Redraws the lag chart from a run's CSV (after a change to the drawing, without re-running).
pub fn chart(args: &ChartArgs) -> Result<(), BenchError> {
    let csv = std::fs::read_to_string(&args.csv)
        .map_err(|e| BenchError::io(format!("reading {}", args.csv.display()), e))?;
    let parsed = parse_lag_csv(&csv);
    let series: Vec<LagSeries<'_>> = parsed
        .iter()
        .map(|(scenario, system, points)| LagSeries {
            scenario: *scenario,
            system: *system,
            points,
        })
        .collect();
    write(&args.svg, &lag_svg(&series))
}
