//! Helpers shared by the integration tests and the benchmark binaries.

pub mod bench {
    //! Small pieces both benchmarks use: running a tool and timing it, medians, units.

    use std::process::Command;
    use std::time::{Duration, Instant};

    pub type R<T> = Result<T, String>;

    /// `map_err` adapter: "what: error".
    pub fn q<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
        move |e| format!("{what}: {e}")
    }

    /// Run a command to completion; its wall time and stdout, or an error with its output.
    pub fn sh(cmd: &str, args: &[&str]) -> R<(Duration, String)> {
        let t = Instant::now();
        let out = Command::new(cmd).args(args).output().map_err(|e| format!("{cmd}: {e}"))?;
        let d = t.elapsed();
        if !out.status.success() {
            return Err(format!(
                "{cmd} {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok((d, String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// The median of a non-empty list (the upper one of an even count).
    pub fn median(mut v: Vec<Duration>) -> Duration {
        v.sort();
        v.get(v.len() / 2).copied().unwrap_or_default()
    }

    /// The median of a list of numbers (the mean of the two middle ones of an even count;
    /// 0 for none).
    pub fn median_mean(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }

    pub fn ms(d: Duration) -> f64 {
        d.as_secs_f64() * 1e3
    }

    pub fn us(d: Duration) -> f64 {
        d.as_secs_f64() * 1e6
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn median_and_sh() {
            let d = |n| Duration::from_millis(n);
            assert_eq!(median(vec![d(3), d(1), d(2)]), d(2));
            assert_eq!(median(vec![]), Duration::ZERO);
            assert_eq!(median_mean(vec![3.0, 1.0, 2.0]), 2.0);
            assert_eq!(median_mean(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
            assert_eq!(median_mean(vec![]), 0.0);
            assert!(sh("true", &[]).is_ok());
            let e = sh("false", &[]).unwrap_err();
            assert!(e.starts_with("false"), "{e}");
        }
    }
}
