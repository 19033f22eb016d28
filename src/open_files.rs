//! The process's open-file limit. Every broker with requests in flight holds up to
//! `delivery.max_in_flight_per_broker` sockets, on top of Kafka's and Postgres's, so the default
//! soft limit of many systems (1,024) runs out long before 10,000 brokers do. At start-up the
//! soft limit is raised to the hard limit (which only the platform can raise).

/// Raises the soft RLIMIT_NOFILE to the hard limit and logs both, once.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        let error = std::io::Error::last_os_error();
        tracing::warn!(error.message = %error, "could not read the open files limit");
        return;
    }
    let soft_before = limit.rlim_cur;
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given, which lives for the call.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        } else {
            let error = std::io::Error::last_os_error();
            tracing::warn!(error.message = %error, soft = soft_before, hard = limit.rlim_max,
                "could not raise the open files limit to the hard limit");
        }
    }
    tracing::info!(
        soft_before,
        soft = limit.rlim_cur,
        hard = limit.rlim_max,
        "open files limit"
    );
}

/// The soft RLIMIT_NOFILE now (after `raise_open_files_limit`), if it can be read and is
/// finite: what the outbound connection budget is derived from.
pub fn soft_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(limit.rlim_cur)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_limit() {
        super::raise_open_files_limit();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given, which lives for the call.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
