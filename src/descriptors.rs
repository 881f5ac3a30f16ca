//! File descriptors: every client and origin connection takes one, so the process's open-file
//! limit bounds both. At start the soft limit is raised to the hard limit (the usual soft limit
//! of 1,024 would let a few hundred idle sockets lock every client out), and the defaults of
//! `[limits] max_connections` (client connections per listener) and `[upstream]
//! max_connections` (requests in flight per origin) split it: half the descriptors left after
//! [`RESERVED`] for clients, half for origins.

/// Descriptors kept aside from the connection budgets (store, JWKS, files, the admin listener).
pub const RESERVED: u64 = 128;

/// Raises the soft open-file limit to the hard limit; returns the limit in force.
pub fn raise_open_file_limit() -> u64 {
    let Some(limit) = limits() else {
        return 1024;
    };
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct passed to it.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return limit.rlim_max;
        }
    }
    limit.rlim_cur
}

/// The open-file limit in force now.
pub fn open_file_limit() -> u64 {
    limits().map_or(1024, |limit| limit.rlim_cur)
}

/// The soft and hard open-file limits.
fn limits() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct passed to it.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

/// One of `sharers`' part of half the budget (`open_files` less [`RESERVED`]), at least 16.
pub fn half_share(open_files: u64, sharers: usize) -> usize {
    let share = open_files.saturating_sub(RESERVED) / 2 / sharers.max(1) as u64;
    share.clamp(16, 1 << 20) as usize
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_budget_is_split_in_halves() {
        assert_eq!(super::half_share(1024, 1), 448);
        assert_eq!(super::half_share(1024, 2), 224);
        assert_eq!(super::half_share(100, 1), 16);
    }
}
