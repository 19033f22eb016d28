use std::process::ExitCode;

use clap::Parser;
use webhook_delivery::cli::{self, Cli, Command};
use webhook_delivery::config::{default_config_dir, Settings};
use webhook_delivery::kafka_properties;
use webhook_delivery::ledger::Ledger;
use webhook_delivery::startup::Application;
use webhook_delivery::telemetry::{get_subscriber, init_subscriber, install_panic_hook};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let settings = match Settings::load(&default_config_dir(), cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(error) => return fail("invalid configuration", &error),
    };
    // The service logs to stdout; one-shot commands keep stdout for their output (JSON, CSV).
    if matches!(cli.command, Command::Serve) {
        init_subscriber(get_subscriber(
            "webhook-delivery",
            &settings.log.level,
            std::io::stdout,
        ));
    } else {
        init_subscriber(get_subscriber(
            "webhook-delivery",
            &settings.log.level,
            std::io::stderr,
        ));
    }
    install_panic_hook();
    let result: Result<(), Box<dyn std::error::Error>> =
        actix_rt::System::new().block_on(async move {
            match cli.command {
                Command::Serve => {
                    webhook_delivery::open_files::raise_open_files_limit();
                    let served = async {
                        let app = Application::build(settings).await?;
                        app.run_until_stopped(shutdown_signal()).await
                    }
                    .await;
                    // The service's log is where a failed start must show up, as one ERROR line.
                    if let Err(error) = &served {
                        tracing::error!(error.message = %chain(error, ": "), "webhook-delivery stopped on an error");
                    }
                    served?;
                }
                Command::Migrate(args) => {
                    let applied = connect(&settings)?.migrate_scope(args.scope()).await?;
                    println!("migrations applied: {applied:?}");
                }
                Command::DeadLetters(command) => {
                    cli::dead_letters(&connect(&settings)?, &settings.retention, command).await?;
                }
                Command::Backfill(args) => {
                    cli::backfill(&connect(&settings)?, &settings.retention, args).await?;
                }
                Command::Status(args) => {
                    kafka_properties::check(&settings.kafka)?;
                    cli::status(&settings, &connect(&settings)?, args).await?;
                }
                Command::Report(command) => {
                    cli::report(&connect(&settings)?, &settings.retention, command).await?;
                }
                Command::Offsets(command) => {
                    cli::offsets(&settings, command).await?;
                }
            }
            Ok(())
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail("webhook-delivery failed", error.as_ref()),
    }
}

/// Every command that reads or writes the ledger connects here, so all of them get the same TLS
/// settings (`sslmode` in postgres.url, postgres.ca_file).
fn connect(settings: &Settings) -> Result<Ledger, webhook_delivery::ledger::LedgerError> {
    Ledger::connect(&settings.postgres)
}

/// Prints the error with its whole `source` chain: the 2am reader needs the root cause.
fn fail(context: &str, error: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {context}: {}", chain(error, "\n  caused by: "));
    ExitCode::FAILURE
}

/// The error and its `source` chain, joined by `separator`.
fn chain(error: &dyn std::error::Error, separator: &str) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(separator);
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}
