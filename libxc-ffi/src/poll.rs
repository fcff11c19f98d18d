//! `poll(2)`, for waiting on xenstore watches and event channels (and, with [`wait_any`], on
//! several fds at once, e.g. an event channel plus a pipe used to interrupt the wait).

use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::time::{Duration, Instant};

use crate::error::{Error, Result, EINTR};
use crate::sys;

/// Waits until `fd` is readable. `timeout = None` waits forever. Returns false on timeout.
pub(crate) fn wait_readable(fd: RawFd, timeout: Option<Duration>, what: &'static str) -> Result<bool> {
    if fd < 0 {
        return Err(Error::InvalidArgument { call: what, reason: format!("invalid fd {fd}") });
    }
    let mut p = [pollfd(fd)];
    poll_until(&mut p, timeout, what, || format!("fd {fd}"))?;
    Ok(p[0].revents != 0)
}

/// Waits until at least one of `fds` is readable (or has hung up / errored), for at most
/// `timeout` (forever if `None`). Returns, per fd, whether it is ready; all `false` on
/// timeout. Retries on EINTR.
pub fn wait_any(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> Result<Vec<bool>> {
    let mut p: Vec<sys::PollFd> = fds.iter().map(|f| pollfd(f.as_raw_fd())).collect();
    poll_until(&mut p, timeout, "poll", || format!("{} fds", fds.len()))?;
    Ok(p.iter().map(|e| e.revents != 0).collect())
}

fn pollfd(fd: RawFd) -> sys::PollFd {
    sys::PollFd { fd, events: sys::POLLIN, revents: 0 }
}

/// `poll(2)` on `p` until something is ready or `timeout` has passed (retrying on EINTR
/// with the time left); the `revents` fields say what is ready (all 0 on timeout).
fn poll_until(
    p: &mut [sys::PollFd],
    timeout: Option<Duration>,
    what: &'static str,
    describe: impl Fn() -> String,
) -> Result<()> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms: i32 = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // round up so that a sub-millisecond timeout still waits
                i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
            }
        };
        for e in p.iter_mut() {
            e.revents = 0;
        }
        // SAFETY: `p` holds `p.len()` pollfd structures, valid for the call; the callers'
        // fds are open for its duration (checked non-negative or borrowed).
        let r = unsafe { sys::poll(p.as_mut_ptr(), p.len() as std::ffi::c_ulong, ms) };
        if r < 0 {
            let e = Error::last_os(what, describe());
            if e.errno() == Some(EINTR) {
                continue;
            }
            return Err(e);
        }
        return Ok(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn times_out_then_sees_data() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let t0 = Instant::now();
        assert!(!wait_readable(b.as_raw_fd(), Some(Duration::from_millis(20)), "t").unwrap());
        assert!(t0.elapsed() >= Duration::from_millis(19));
        a.write_all(b"x").unwrap();
        assert!(wait_readable(b.as_raw_fd(), None, "t").unwrap());
        assert!(wait_readable(-1, None, "t").is_err());
    }

    #[test]
    fn wait_any_reports_which() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let (mut c, d) = UnixStream::pair().unwrap();
        use std::os::fd::AsFd;
        let r = wait_any(&[b.as_fd(), d.as_fd()], Some(Duration::from_millis(10))).unwrap();
        assert_eq!(r, vec![false, false]);
        c.write_all(b"x").unwrap();
        let r = wait_any(&[b.as_fd(), d.as_fd()], None).unwrap();
        assert_eq!(r, vec![false, true]);
        a.write_all(b"x").unwrap();
        let r = wait_any(&[b.as_fd(), d.as_fd()], Some(Duration::ZERO)).unwrap();
        assert_eq!(r, vec![true, true]);
        assert_eq!(wait_any(&[], Some(Duration::ZERO)).unwrap(), Vec::<bool>::new());
    }
}
