//! bench-checkpoint refuses bad pacing and image arguments before it touches anything.

use std::process::Command;

#[test]
fn bad_prealloc_and_wait_share_fail_before_any_work() {
    let dir = std::env::temp_dir().join(format!("xensnap-bench-args-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for (args, want) in [
        (&["--prealloc", "sparse"][..], "possible values: full, metadata"),
        (&["--wait-share", "2"][..], "expected a share of the time from 0 to 1"),
        (&["--wait-share", "nan"][..], "expected a share of the time from 0 to 1"),
        (&["--wait-share=-0.1"][..], "expected a share of the time from 0 to 1"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_bench-checkpoint"))
            .args(args)
            .arg("--dir")
            .arg(&dir)
            .output()
            .expect("run bench-checkpoint");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!dir.exists(), "{args:?} created {}", dir.display());
    }
}
