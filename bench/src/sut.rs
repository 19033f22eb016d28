//! The system under test runs in its own process (this binary re-run as `sut`), so its peak
//! RSS (VmHWM) is its own, not the receivers' or the producer's. The parent stops it by closing
//! its stdin; a child whose parent died therefore stops too.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use webhook_delivery::config::Settings;
use webhook_delivery::startup::Application;
use webhook_delivery::telemetry::{get_subscriber, init_subscriber};

use crate::error::BenchError;
use crate::scenario::System;

/// Extra time the service gets to stop after being asked (its drain timeout is 3 s).
const STOP_GRACE: Duration = Duration::from_secs(20);

/// Parent side: a running system under test.
pub struct SutProcess {
    child: Child,
    pub started: Instant,
    /// The same moment on the receivers' clock (unix microseconds).
    pub started_micros: u64,
}

pub struct SutLaunch<'a> {
    pub system: System,
    pub settings_file: &'a Path,
    pub config_dir: &'a Path,
    pub log_file: &'a Path,
    /// The child stops by itself after this long, whatever happens to the parent.
    pub max_lifetime: Duration,
}

impl SutProcess {
    pub fn spawn(launch: SutLaunch<'_>) -> Result<SutProcess, BenchError> {
        let exe = std::env::current_exe()
            .map_err(|e| BenchError::io("finding the bench executable", e))?;
        let log = std::fs::File::create(launch.log_file)
            .map_err(|e| BenchError::io(format!("creating {}", launch.log_file.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| BenchError::io("duplicating the log file", e))?;
        let child = Command::new(exe)
            .arg("sut")
            .arg("--system")
            .arg(launch.system.as_str())
            .arg("--settings")
            .arg(launch.settings_file)
            .arg("--config-dir")
            .arg(launch.config_dir)
            .arg("--max-seconds")
            .arg(launch.max_lifetime.as_secs().to_string())
            .stdin(Stdio::piped())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| BenchError::io("starting the system under test", e))?;
        Ok(SutProcess {
            child,
            started: Instant::now(),
            started_micros: crate::event::now_micros(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Peak resident set size so far, from the kernel (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        parse_vm_hwm(&status)
    }

    /// `Some(description)` if the process has already exited.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(error) => Some(error.to_string()),
        }
    }

    /// Asks the process to stop (closes its stdin) and waits; kills it after `STOP_GRACE`.
    pub async fn stop(mut self) -> String {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        "killed after not stopping in time".into()
    }
}

pub fn parse_vm_hwm(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Child side: the arguments of `webhook-delivery-bench sut`.
#[derive(Debug, clap::Args)]
pub struct SutArgs {
    #[arg(long, value_enum)]
    pub system: System,
    /// The run's overrides of config/base.toml.
    #[arg(long)]
    pub settings: PathBuf,
    #[arg(long)]
    pub config_dir: PathBuf,
    #[arg(long)]
    pub max_seconds: u64,
}

/// Runs the system until stdin closes or `max_seconds` pass.
pub fn run_child(args: SutArgs) -> Result<(), BenchError> {
    let settings = Settings::load(&args.config_dir, Some(&args.settings))?;
    let max_lifetime = Duration::from_secs(args.max_seconds);
    let shutdown = shutdown_when_stdin_closes(max_lifetime);
    match args.system {
        System::Service => run_service(settings, shutdown, max_lifetime),
        System::Baseline => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| BenchError::io("starting the baseline's runtime", e))?;
            runtime.block_on(crate::baseline::run(settings, shutdown))
        }
    }
}

/// Resolves when stdin reaches EOF (the parent asked us to stop, or died) or after `limit`.
fn shutdown_when_stdin_closes(limit: Duration) -> tokio::sync::oneshot::Receiver<()> {
    let (closed_tx, closed_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buffer), Ok(n) if n > 0) {}
        let _ = closed_tx.send(());
    });
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = closed_rx.recv_timeout(limit);
        let _ = shutdown_tx.send(());
    });
    shutdown_rx
}

/// The real service, built from its `Settings` and run by its `Application` on its own thread
/// with its own actix System, as the integration tests' `spawn_app` does.
fn run_service(
    settings: Settings,
    shutdown: tokio::sync::oneshot::Receiver<()>,
    max_lifetime: Duration,
) -> Result<(), BenchError> {
    init_subscriber(get_subscriber(
        "webhook-delivery",
        &settings.log.level,
        std::io::stderr,
    ));
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("webhook-delivery".into())
        .spawn(move || {
            let result = actix_rt::System::new().block_on(async move {
                let app = Application::build(settings).await?;
                app.run_until_stopped(async {
                    let _ = shutdown.await;
                })
                .await
            });
            let _ = done_tx.send(result.map_err(|e| crate::error::describe(&e)));
        })
        .map_err(|e| BenchError::io("starting the service thread", e))?;
    match done_rx.recv_timeout(max_lifetime + STOP_GRACE) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(BenchError::Service(error)),
        Err(_) => Err(BenchError::Timeout("the service did not stop".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_vm_hwm;

    #[test]
    fn reads_vm_hwm_in_kib() {
        let status = "Name:\tx\nVmPeak:\t  900 kB\nVmHWM:\t   123456 kB\nVmRSS:\t 1000 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(123_456));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
    }
}
