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

pub fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}
pub fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
pub fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_be_bytes());
}
pub fn put32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}

/// Raw view of a (16-bit refcount) image for hand-made corruptions.
pub struct Raw {
    pub b: Vec<u8>,
}
impl Raw {
    pub fn cs(&self) -> usize {
        1 << be32(&self.b, 20)
    }
    pub fn l1_off(&self) -> usize {
        be64(&self.b, 40) as usize
    }
    pub fn reftable_off(&self) -> usize {
        be64(&self.b, 48) as usize
    }
    /// Offset of the 16-bit refcount entry of the cluster at `off`.
    pub fn rc_entry(&self, off: usize) -> usize {
        let cs = self.cs();
        let per = cs / 2;
        let c = off / cs;
        let rb = be64(&self.b, self.reftable_off() + (c / per) * 8) as usize;
        assert!(rb != 0);
        rb + (c % per) * 2
    }
    pub fn refcount(&self, off: usize) -> u16 {
        let e = self.rc_entry(off);
        u16::from_be_bytes([self.b[e], self.b[e + 1]])
    }
    pub fn set_refcount(&mut self, off: usize, v: u16) {
        let e = self.rc_entry(off);
        self.b[e..e + 2].copy_from_slice(&v.to_be_bytes());
    }
    /// First L2 table offset and its first data cluster (entry offset, descriptor).
    pub fn first_l2(&self) -> usize {
        (be64(&self.b, self.l1_off()) & 0x00ff_ffff_ffff_fe00) as usize
    }
}

/// Make every taken checkpoint durable: inline (`wait_durable`), or staged, running each
/// barrier handed out at once (`durable_step_staged` / `sync` / `durable_barrier_done`).
pub fn make_durable(img: &mut xensnap_qcow2::Qcow2, staged: bool) {
    use xensnap_qcow2::DurableStep;
    if !staged {
        img.wait_durable().unwrap();
        return;
    }
    loop {
        match img.durable_step_staged(1).unwrap() {
            DurableStep::Done(true) => break,
            DurableStep::Done(false) => {}
            DurableStep::Barrier(b) => {
                let s = b.sync().unwrap();
                img.durable_barrier_done(s);
            }
        }
    }
}
