//! The open-files limit of a node process.
//!
//! A node holds a file open per segment of every log it hosts (plus each group's
//! committed-index hint, its sockets and the ack ledger), so a node with a thousand
//! partitions needs a few thousand descriptors; the usual soft limit is 1,024 while the
//! hard limit is far higher. `keel serve` raises the soft limit to the hard one at start,
//! as the Go runtime and most servers do; running out later fails segment rolls and
//! group opens with `EMFILE`, reported as storage errors.

/// Linux's default `fs.nr_open`: a soft limit above it is refused, even under an
/// unlimited hard limit.
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// The soft limit aimed for under the hard limit `hard`.
fn target(hard: libc::rlim_t) -> libc::rlim_t {
    if hard == libc::RLIM_INFINITY {
        NR_OPEN_DEFAULT
    } else {
        hard
    }
}

/// Raises the soft open-files limit to the hard limit (or `NR_OPEN_DEFAULT` under an
/// unlimited one); returns the limit now in force
/// (`None` if it could not be read). A refused raise is logged and keeps the old limit.
pub fn raise_limit() -> Option<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit fills the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    let target = target(lim.rlim_max);
    if lim.rlim_cur < target {
        let raised = libc::rlimit { rlim_cur: target, rlim_max: lim.rlim_max };
        // SAFETY: setrlimit reads the struct it is given; raising the soft limit up to the
        // hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return Some(raised.rlim_cur);
        }
        tracing::warn!(
            soft = lim.rlim_cur,
            hard = lim.rlim_max,
            "could not raise the open-files limit; a node with many partitions may run out of descriptors"
        );
    }
    Some(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let limit = super::raise_limit().expect("the limit can be read");
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit fills the struct it is given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, super::target(lim.rlim_max), "soft limit raised to the hard one");
        assert_eq!(limit, lim.rlim_cur);
    }
}
