//! CPU time of a process (all its threads) from /proc, for the checkpoint driver's
//! accounting of what the disk part costs inside the suspended window.
//!
//! `/proc/PID/task/TID/schedstat`'s first field is the thread's run time in ns (user +
//! system, including hypercalls made from the thread); without schedstat, `utime + stime`
//! of `/proc/PID/task/TID/stat` in clock ticks (USER_HZ = 100 on Linux, 10 ms resolution).
//! Threads that exited are not counted.

use std::path::Path;

/// USER_HZ of Linux's /proc (fixed ABI value on every architecture Xen runs on).
const USER_HZ: u64 = 100;

/// Run time in ns from a schedstat line ("runtime_ns wait_ns timeslices").
pub fn parse_schedstat(s: &str) -> Option<u64> {
    s.split_whitespace().next()?.parse().ok()
}

/// utime + stime in ns from a stat line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after the last ')': state is field 3, utime 14, stime 15.
pub fn parse_stat(s: &str) -> Option<u64> {
    let rest = &s[s.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let ut: u64 = f.next()?.parse().ok()?;
    let st: u64 = f.next()?.parse().ok()?;
    Some((ut + st) * (1_000_000_000 / USER_HZ))
}

/// CPU time in ns consumed so far by all live threads of `pid`.
pub fn process_cpu_ns(pid: u32) -> Option<u64> {
    let dir = format!("/proc/{pid}/task");
    let mut total = 0u64;
    let mut any = false;
    for e in std::fs::read_dir(&dir).ok()?.flatten() {
        let t = e.path();
        let ns = read_ns(&t.join("schedstat"), parse_schedstat).or_else(|| read_ns(&t.join("stat"), parse_stat));
        if let Some(ns) = ns {
            total += ns;
            any = true;
        }
    }
    any.then_some(total)
}

fn read_ns(p: &Path, parse: fn(&str) -> Option<u64>) -> Option<u64> {
    std::fs::read_to_string(p).ok().as_deref().and_then(parse)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedstat_first_field() {
        assert_eq!(parse_schedstat("123456789 2000 17\n"), Some(123_456_789));
        assert_eq!(parse_schedstat(""), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn stat_after_the_command_name() {
        // pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
        let l = "4242 (a) b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 999";
        assert_eq!(parse_stat(l), Some(12 * 10_000_000));
        assert_eq!(parse_stat("4242 (x) S 1"), None);
        assert_eq!(parse_stat("no paren"), None);
    }

    #[test]
    fn this_process_uses_some_cpu() {
        let a = process_cpu_ns(std::process::id()).expect("own /proc entry");
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let b = process_cpu_ns(std::process::id()).expect("own /proc entry");
        assert!(b >= a, "{a} -> {b}");
        assert_eq!(process_cpu_ns(u32::MAX), None);
        // the process clock agrees with /proc (schedstat counts the same run time)
        let (p, o) = (process_cpu_ns(std::process::id()).unwrap(), xensnap_control::process_cpu_ns());
        assert!(o >= b && o.abs_diff(p) < 50_000_000, "/proc {p} vs clock {o}");
    }
}
