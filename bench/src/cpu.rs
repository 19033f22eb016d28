//! Where the machine's cores went during a run: CPU time of the system under test, of Postgres
//! (this run's backends plus its shared background processes), of Tansu and of the harness
//! itself (receivers, producer, lag sampler), read from /proc before and after.

use std::time::Instant;

/// Linux reports CPU time in clock ticks of USER_HZ, which is 100 on every mainstream arch.
const TICKS_PER_SEC: f64 = 100.0;

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuTicks {
    pub system: u64,
    pub postgres: u64,
    pub tansu: u64,
    pub harness: u64,
}

/// Average cores busy per component over a stretch of wall time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CpuShare {
    pub system: f64,
    pub postgres: f64,
    pub tansu: f64,
    pub harness: f64,
    /// The stretch of wall time, in seconds.
    pub window_secs: f64,
}

impl CpuShare {
    /// CPU time per item of work in microseconds, e.g. Postgres's per delivery:
    /// `cores` busy over the window, divided by the items done in it.
    pub fn micros_per(&self, cores: f64, items: u64) -> Option<f64> {
        (items > 0).then(|| cores * self.window_secs * 1e6 / items as f64)
    }
}

pub struct CpuSnapshot {
    at: Instant,
    ticks: CpuTicks,
}

impl CpuSnapshot {
    pub fn take(system_pid: u32, db_name: &str) -> CpuSnapshot {
        CpuSnapshot {
            at: Instant::now(),
            ticks: read_ticks(system_pid, db_name),
        }
    }

    pub fn share_until(&self, later: &CpuSnapshot) -> CpuShare {
        let secs = later.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let cores =
            |before: u64, after: u64| after.saturating_sub(before) as f64 / TICKS_PER_SEC / secs;
        CpuShare {
            system: cores(self.ticks.system, later.ticks.system),
            postgres: cores(self.ticks.postgres, later.ticks.postgres),
            tansu: cores(self.ticks.tansu, later.ticks.tansu),
            harness: cores(self.ticks.harness, later.ticks.harness),
            window_secs: secs,
        }
    }
}

fn read_ticks(system_pid: u32, db_name: &str) -> CpuTicks {
    let mut ticks = CpuTicks::default();
    let own_pid = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return ticks;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((comm, used)) = parse_stat(&stat) else {
            continue;
        };
        if pid == system_pid {
            ticks.system += used;
        } else if pid == own_pid {
            ticks.harness += used;
        } else if comm == "tansu" {
            ticks.tansu += used;
        } else if comm == "postgres" {
            let title = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if counts_for_run(&title, db_name) {
                ticks.postgres += used;
            }
        }
    }
    ticks
}

/// A client backend (`postgres: [cluster:] <user> <db> <host(port)> <activity>`) or an
/// autovacuum worker (`autovacuum worker <db>`) counts only if it serves this run's database
/// (others' tests share the server); the postmaster and background processes (WAL writer,
/// checkpointer...) work for everyone and count whole.
fn counts_for_run(title: &str, db_name: &str) -> bool {
    let title = title.replace('\0', " ");
    let Some(rest) = title.strip_prefix("postgres: ") else {
        return true;
    };
    let mut words: Vec<&str> = rest.split_whitespace().collect();
    if words.first().is_some_and(|w| w.ends_with(':')) {
        words.remove(0);
    }
    if let ["autovacuum", "worker", db, ..] = words[..] {
        return db == db_name;
    }
    let is_client = words
        .get(2)
        .is_some_and(|host| host.contains('(') || host.starts_with("[local]"));
    !is_client || words.get(1) == Some(&db_name)
}

/// (comm, utime + stime in ticks) from the text of /proc/<pid>/stat.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = &stat[open + 1..close];
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the comm: state is field 0, utime field 11, stime field 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cpu_ticks_even_with_spaces_in_the_name() {
        let stat = "4242 (tokio runtime) S 1 2 3 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 1 2 3";
        assert_eq!(parse_stat(stat), Some(("tokio runtime", 300)));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn only_this_runs_backends_and_shared_processes_count() {
        assert!(counts_for_run(
            "postgres: postgres wd_bench_1_healthy_service 127.0.0.1(5555) idle",
            "wd_bench_1_healthy_service"
        ));
        assert!(!counts_for_run(
            "postgres: postgres wd_test_abc 127.0.0.1(5555) idle",
            "wd_bench_1_healthy_service"
        ));
        assert!(counts_for_run(
            "postgres: 15/main: postgres wd_bench_1 127.0.0.1(5555) INSERT",
            "wd_bench_1"
        ));
        assert!(!counts_for_run(
            "postgres: 15/main: postgres wd_test_2 127.0.0.1(5555) idle",
            "wd_bench_1"
        ));
        assert!(counts_for_run(
            "postgres: 15/main: walwriter ",
            "wd_bench_1"
        ));
        assert!(counts_for_run(
            "postgres: 15/main: autovacuum worker wd_bench_1",
            "wd_bench_1"
        ));
        assert!(!counts_for_run(
            "postgres: 15/main: autovacuum worker wd_test_2",
            "wd_bench_1"
        ));
        assert!(counts_for_run(
            "postgres: 15/main: autovacuum launcher ",
            "wd_bench_1"
        ));
        assert!(counts_for_run(
            "/usr/lib/postgresql/15/bin/postgres\0-D\0/var/lib",
            "wd_bench_1"
        ));
    }

    #[test]
    fn shares_are_cores_busy_over_wall_time() {
        let start = Instant::now();
        let before = CpuSnapshot {
            at: start,
            ticks: CpuTicks::default(),
        };
        let after = CpuSnapshot {
            at: start + std::time::Duration::from_secs(2),
            ticks: CpuTicks {
                system: 200,
                postgres: 100,
                tansu: 40,
                harness: 20,
            },
        };
        let share = before.share_until(&after);
        assert_eq!(
            (share.system, share.postgres, share.tansu, share.harness),
            (1.0, 0.5, 0.2, 0.1)
        );
        // 1 core-second of Postgres over 10,000 deliveries: 100 µs each.
        assert_eq!(share.micros_per(share.postgres, 10_000), Some(100.0));
        assert_eq!(share.micros_per(share.postgres, 0), None);
    }
}
