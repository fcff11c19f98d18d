//! `xl-snap image` end to end, with the real qemu-img / qemu-io as the peers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn xl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_xl-snap"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "a command panicked: {err}");
    out
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(!out.status.success(), "{cmd:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let _ = self.child.wait();
    }
}

fn serve(img: &Path, sock: &Path) -> Server {
    let child = xl()
        .args(["image", "serve"])
        .arg(img)
        .arg("--socket")
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn serve");
    let ctl = PathBuf::from(format!("{}.xensnap.sock", img.display()));
    let t = Instant::now();
    while !(sock.exists() && ctl.exists()) {
        assert!(t.elapsed() < Duration::from_secs(10), "server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Server { child }
}

fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        if x.starts_with('-') {
            c.arg(x);
        } else {
            c.args(["-c", x]);
        }
    }
    let out = c.output().expect("qemu-io");
    let s = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && !s.contains("verification failed"), "qemu-io {cmds:?}: {s}");
    s
}

#[test]
fn create_info_check_checkpoint_roundtrip_with_qemu() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    ok(xl().args(["image", "create"]).arg(&img).args(["--size", "64M"]));
    let info: serde_json::Value = serde_json::from_str(&ok(xl().args(["image", "info", "--json"]).arg(&img))).unwrap();
    assert_eq!(info["virtual_size"], 64 << 20);
    // qemu-io writes directly, we checkpoint, qemu-io writes more, qemu-img reads both states.
    let w = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x61 0 1M"]).arg(&img).output().unwrap();
    assert!(w.status.success());
    ok(xl().args(["image", "checkpoint", "create"]).arg(&img).arg("one"));
    let w = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x62 4k 8k"]).arg(&img).output().unwrap();
    assert!(w.status.success());
    let list = ok(Command::new("qemu-img").args(["snapshot", "-l"]).arg(&img));
    assert!(list.contains("one"), "qemu-img snapshot -l: {list}");
    let ours: serde_json::Value =
        serde_json::from_str(&ok(xl().args(["image", "checkpoint", "list", "--json"]).arg(&img))).unwrap();
    assert_eq!(ours[0]["name"], "one");
    ok(Command::new("qemu-img").args(["check"]).arg(&img));
    ok(xl().args(["image", "check"]).arg(&img));
    let raw = d.path().join("one.raw");
    ok(Command::new("qemu-img").args(["convert", "-l", "snapshot.name=one", "-O", "raw"]).arg(&img).arg(&raw));
    let bytes = std::fs::read(&raw).unwrap();
    assert!(bytes[..1 << 20].iter().all(|&b| b == 0x61) && bytes[1 << 20..].iter().all(|&b| b == 0));
    ok(xl().args(["image", "checkpoint", "revert"]).arg(&img).arg("one"));
    let r = Command::new("qemu-io").args(["-f", "qcow2", "-r", "-c", "read -P 0x61 0 1M"]).arg(&img).output().unwrap();
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success() && !text.contains("verification failed"), "after revert: {text}");
    let map: serde_json::Value = serde_json::from_str(&ok(xl().args(["image", "map", "--json"]).arg(&img))).unwrap();
    assert!(map.as_array().is_some_and(|m| !m.is_empty()));
    ok(xl().args(["image", "checkpoint", "delete"]).arg(&img).arg("one"));
    ok(Command::new("qemu-img").args(["check"]).arg(&img));
    let list = ok(Command::new("qemu-img").args(["snapshot", "-l"]).arg(&img));
    assert!(!list.contains("one"), "deleted checkpoint still listed: {list}");
}

#[test]
fn served_image_checkpoints_while_writing() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("s.qcow2");
    let sock = d.path().join("nbd.sock");
    ok(xl().args(["image", "create"]).arg(&img).args(["--size", "128M"]));
    let srv = serve(&img, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_io(&uri, &["write -P 0x11 0 2M", "flush"]);
    ok(xl().args(["image", "checkpoint", "create"]).arg(&img).arg("a"));
    qemu_io(&uri, &["write -P 0x22 64k 64k", "flush"]);
    // The checkpoint export still has the old data while the active disk has the new.
    let ck = format!("nbd+unix:///checkpoint/a?socket={}", sock.display());
    qemu_io(&ck, &["-r", "read -P 0x11 0 2M"]);
    // qemu-io exits non-zero on a pattern mismatch: the helper fails on it. Make sure it does.
    let bad = Command::new("qemu-io").args(["-f", "raw", "-r", &ck, "-c", "read -P 0x22 64k 64k"]).output().unwrap();
    assert!(!bad.status.success(), "the checkpoint export shows a write made after the checkpoint");
    qemu_io(&uri, &["read -P 0x22 64k 64k", "read -P 0x11 0 64k"]);
    // A checkpoint export refuses writes.
    let out = Command::new("qemu-io").args(["-f", "raw", &ck, "-c", "write 0 4k"]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("wrote 4096/4096"), "write to a checkpoint export succeeded: {text}");
    // Another writer is kept off the served file.
    let err = fails(
        Command::new(env!("CARGO_BIN_EXE_xl-snap"))
            .args(["image", "serve"])
            .arg(&img)
            .args(["--listen", "127.0.0.1:0"]),
    );
    assert!(err.contains("in use"), "{err}");
    ok(xl().args(["image", "checkpoint", "revert"]).arg(&img).arg("a"));
    qemu_io(&uri, &["read -P 0x11 0 2M"]);
    let listed = ok(xl().args(["image", "checkpoint", "list"]).arg(&img));
    assert!(listed.contains(" a "), "{listed}");
    drop(srv);
    ok(Command::new("qemu-img").args(["check"]).arg(&img));
}

#[test]
fn wrong_arguments_get_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("e.qcow2");
    let e = fails(xl().args(["image", "create"]).arg(&img).args(["--size", "12x"]));
    assert!(e.contains("unknown size unit"), "{e}");
    let e = fails(xl().args(["image", "create"]).arg(&img).args(["--size", "1G", "--cluster-size", "3000"]));
    assert!(e.contains("power of two"), "{e}");
    let e = fails(xl().args(["image", "info"]).arg(d.path().join("missing.qcow2")));
    assert!(e.contains("missing.qcow2"), "{e}");
    ok(xl().args(["image", "create"]).arg(&img).args(["--size", "1M"]));
    let e = fails(xl().args(["image", "create"]).arg(&img).args(["--size", "1M"]));
    assert!(e.contains("e.qcow2"), "{e}");
    let e = fails(xl().args(["image", "checkpoint", "revert"]).arg(&img).arg("nope"));
    assert!(e.contains("nope"), "{e}");
    let e = fails(xl().args(["image", "checkpoint", "delete"]).arg(&img).arg("nope"));
    assert!(e.contains("nope"), "{e}");
    // Not an image at all: refused, and the file is untouched.
    let junk = d.path().join("junk");
    std::fs::write(&junk, b"this is not a qcow2 image").unwrap();
    let e = fails(xl().args(["image", "check", "--repair"]).arg(&junk));
    assert!(e.contains("junk"), "{e}");
    assert_eq!(std::fs::read(&junk).unwrap(), b"this is not a qcow2 image");
    fails(xl().args(["image", "frobnicate"]));
}

#[test]
fn served_checkpoint_no_wait_becomes_durable_in_background() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("bg.qcow2");
    let sock = d.path().join("nbd.sock");
    ok(xl().args(["image", "create"]).arg(&img).args(["--size", "256M"]));
    let srv = serve(&img, &sock);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    qemu_io(&uri, &["write -P 0x31 0 32M", "flush"]);
    let taken: serde_json::Value = serde_json::from_str(&ok(xl()
        .args(["image", "checkpoint", "create", "--no-wait", "--json"])
        .arg(&img)
        .arg("fast")))
    .unwrap();
    assert_eq!(taken["name"], "fast");
    // Writes continue at once; the checkpoint keeps the old data.
    qemu_io(&uri, &["write -P 0x32 0 1M", "flush"]);
    let ck = format!("nbd+unix:///checkpoint/fast?socket={}", sock.display());
    qemu_io(&ck, &["-r", "read -P 0x31 0 32M"]);
    // The server makes it durable on its own.
    let t = Instant::now();
    loop {
        let list: serde_json::Value =
            serde_json::from_str(&ok(xl().args(["image", "checkpoint", "list", "--json"]).arg(&img))).unwrap();
        if list[0]["state"] == "durable" {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "still not durable: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = ok(xl().args(["image", "checkpoint", "list"]).arg(&img));
    assert!(text.contains("STATE") && text.contains("durable"), "{text}");
    drop(srv);
    ok(Command::new("qemu-img").args(["check"]).arg(&img));
    let raw = d.path().join("fast.raw");
    ok(Command::new("qemu-img").args(["convert", "-l", "snapshot.name=fast", "-O", "raw"]).arg(&img).arg(&raw));
    let bytes = std::fs::read(&raw).unwrap();
    assert!(bytes[..32 << 20].iter().all(|&b| b == 0x31), "checkpoint content as qemu-img sees it");
}
