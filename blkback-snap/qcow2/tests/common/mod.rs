#![allow(dead_code)]
//! Helpers for tests that run the real qemu-img / qemu-io.

use std::path::Path;
use std::process::Command;

pub fn have_qemu() -> bool {
    Command::new("qemu-img").arg("--version").output().map(|o| o.status.success()).unwrap_or(false)
}

/// Run `qemu-img check`; returns (exit code, json).
pub fn qemu_check(path: &Path) -> (i32, serde_json::Value) {
    let out = Command::new("qemu-img")
        .args(["check", "--output=json", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("run qemu-img check");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), v)
}

pub fn assert_qemu_clean(path: &Path) {
    let (code, v) = qemu_check(path);
    let human = Command::new("qemu-img").args(["check", "-f", "qcow2"]).arg(path).output().unwrap();
    assert_eq!(
        code,
        0,
        "qemu-img check not clean (code {code}): {v}\n{}{}",
        String::from_utf8_lossy(&human.stdout),
        String::from_utf8_lossy(&human.stderr)
    );
}

pub fn qemu_raw(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("out.raw");
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "qcow2", "-O", "raw"]);
    if let Some(s) = snapshot {
        c.arg("-l").arg(format!("snapshot.name={s}"));
    }
    let out = c.arg(path).arg(&raw).output().unwrap();
    assert!(out.status.success(), "qemu-img convert failed: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::read(&raw).unwrap()
}

pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Tiny deterministic PRNG.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for x in b.iter_mut() {
            *x = self.next() as u8;
        }
    }
}
