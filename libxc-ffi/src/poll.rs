//! `poll(2)` on one fd, for waiting on xenstore watches and event channels.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use crate::error::{Error, Result, EINTR};
use crate::sys;

/// Waits until `fd` is readable. `timeout = None` waits forever. Returns false on timeout.
pub(crate) fn wait_readable(fd: RawFd, timeout: Option<Duration>, what: &'static str) -> Result<bool> {
    if fd < 0 {
        return Err(Error::InvalidArgument { call: what, reason: format!("invalid fd {fd}") });
    }
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
        let mut p = sys::PollFd { fd, events: sys::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd structure for the duration of the call.
        let r = unsafe { sys::poll(&mut p, 1, ms) };
        if r < 0 {
            let e = Error::last_os(what, format!("fd {fd}"));
            if e.errno() == Some(EINTR) {
                continue;
            }
            return Err(e);
        }
        return Ok(r > 0);
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
}
