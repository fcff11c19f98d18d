//! Interop with NBD clients no one here wrote: qemu-io, qemu-img (qemu-utils) and, when
//! installed, nbdinfo / nbdcopy (libnbd-bin). Tests skip loudly when a tool is missing.

mod common;

use std::process::{Command, Output};
use std::sync::Arc;

use common::*;
use xensnap_blockdev::{BlockDevice, MemDisk};
use xensnap_nbd::StaticExports;

const MIB: usize = 1 << 20;

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("spawn");
    eprintln!(
        "$ {cmd:?}\nstatus: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_io(url: &str, extra: &[&str], cmds: &[&str]) -> Output {
    let mut c = Command::new("timeout");
    c.args(["60", "qemu-io", "-f", "raw"]).args(extra).arg(url);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(&mut c)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// qemu-io exits 0 even when a pattern check fails; it prints "Pattern verification failed".
fn assert_qemu_io_ok(o: &Output) {
    let t = text(o);
    assert!(o.status.success(), "qemu-io failed: {t}");
    assert!(!t.contains("failed") && !t.contains("error"), "qemu-io reported a failure: {t}");
}

#[test]
fn qemu_io_write_read_tcp() {
    if !have("qemu-io") {
        return;
    }
    let disk = Arc::new(MemDisk::new(4 * MIB));
    let ts = TestServer::tcp(single("name", disk.clone()));
    let o = qemu_io(
        &ts.url("name"),
        &[],
        &[
            "write -P 0x5a 0 64k",
            "read -P 0x5a 0 64k",
            "write -P 0xa5 1m 3m",
            "read -P 0xa5 1m 3m",
            "read -P 0 64k 960k",
            // unaligned, odd sizes
            "write -P 0x11 12345 777",
            "read -P 0x11 12345 777",
        ],
    );
    assert_qemu_io_ok(&o);
    let snap = disk.snapshot();
    assert!(snap[..12345].iter().all(|&b| b == 0x5a));
    assert!(snap[12345..12345 + 777].iter().all(|&b| b == 0x11));
    assert!(snap[12345 + 777..64 * 1024].iter().all(|&b| b == 0x5a));
    assert!(snap[64 * 1024..MIB].iter().all(|&b| b == 0));
    assert!(snap[MIB..].iter().all(|&b| b == 0xa5));
    ts.shutdown().unwrap();
}

#[test]
fn qemu_io_zeroes_discard_flush_fua() {
    if !have("qemu-io") {
        return;
    }
    let disk = Arc::new(RecordingDisk::from_vec(vec![0xff; 2 * MIB], false));
    let ts = TestServer::tcp(single("d", disk.clone()));
    let o = qemu_io(
        &ts.url("d"),
        &[],
        &[
            "write -z 4096 8192",
            "read -P 0 4096 8192",
            "write -z -u 65536 65536",
            "read -P 0 65536 65536",
            "discard 131072 4096",
            "read -P 0 131072 4096",
            "flush",
            "write -f -P 0x33 1m 4096",
            "read -P 0xff 0 4096",
        ],
    );
    assert_qemu_io_ok(&o);
    let ops = disk.ops();
    eprintln!("device ops: {ops:?}");
    // `write -z` without -u: NBD_CMD_FLAG_NO_HOLE => may_unmap = false.
    assert!(ops.contains(&Op::WriteZeroes { offset: 4096, len: 8192, may_unmap: false }));
    // `write -z -u`: may unmap.
    assert!(ops.contains(&Op::WriteZeroes { offset: 65536, len: 65536, may_unmap: true }));
    assert!(ops.contains(&Op::Discard(131072, 4096)));
    // FUA write is followed by a flush before the reply.
    let w = ops.iter().position(|o| *o == Op::Write(MIB as u64, 4096)).expect("FUA write");
    assert_eq!(ops.get(w + 1), Some(&Op::Flush), "FUA write must flush");
    assert!(ops[..w].contains(&Op::Flush), "explicit flush reached the device");
    let snap = disk.inner.snapshot();
    assert!(snap[4096..4096 + 8192].iter().all(|&b| b == 0));
    assert!(snap[131072..131072 + 4096].iter().all(|&b| b == 0));
    assert!(snap[MIB..MIB + 4096].iter().all(|&b| b == 0x33));
    assert_eq!(snap[0], 0xff);
    assert_eq!(snap[4096 + 8192], 0xff);
}

#[test]
fn qemu_img_convert_over_unix_socket() {
    if !have("qemu-img") {
        return;
    }
    let size = 3 * MIB + 4096;
    let data: Vec<u8> = (0..size).map(|i| ((i * 7 + i / 4096) % 251) as u8).collect();
    let disk = Arc::new(MemDisk::from_vec(data.clone(), false));
    let ts = TestServer::unix(single("name", disk.clone()));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.raw");

    // export -> file
    let o = run(Command::new("timeout")
        .args(["60", "qemu-img", "convert", "-f", "raw", "-O", "raw"])
        .arg(ts.url("name"))
        .arg(&out));
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(std::fs::read(&out).unwrap(), data);

    // file -> export (-n: the target exists)
    let src: Vec<u8> = (0..size).map(|i| (i % 13) as u8 ^ 0x80).collect();
    let inp = dir.path().join("in.raw");
    std::fs::write(&inp, &src).unwrap();
    let o = run(Command::new("timeout")
        .args(["60", "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&inp)
        .arg(ts.url("name")));
    assert!(o.status.success(), "{}", text(&o));
    assert!(disk.snapshot() == src, "export contents differ after qemu-img convert into it");

    // qemu-img compare agrees too
    let o = run(Command::new("timeout")
        .args(["60", "qemu-img", "compare", "-f", "raw", "-F", "raw"])
        .arg(&inp)
        .arg(ts.url("name")));
    assert!(o.status.success(), "{}", text(&o));
    ts.shutdown().unwrap();
}

#[test]
fn qemu_img_info_reports_size() {
    if !have("qemu-img") {
        return;
    }
    let size = 5 * MIB + 512;
    let ts = TestServer::tcp(single("info", Arc::new(MemDisk::new(size))));
    let o = run(Command::new("timeout").args(["60", "qemu-img", "info", "--output=json"]).arg(ts.url("info")));
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains(&format!("\"virtual-size\": {size}")), "{t}");
}

#[test]
fn read_only_export_reads_and_refuses_writes() {
    if !have("qemu-io") {
        return;
    }
    let data: Vec<u8> = vec![0x42; MIB];
    let disk = Arc::new(MemDisk::from_vec(data.clone(), true));
    let ts = TestServer::tcp(single("ro", disk.clone()));
    // Read-only client: reads work, a write is refused.
    let o = qemu_io(&ts.url("ro"), &["-r"], &["read -P 0x42 0 1m", "write -P 1 0 4k"]);
    let t = text(&o);
    assert!(t.contains("read 1048576/1048576 bytes"), "{t}");
    assert!(!t.contains("Pattern verification failed"), "{t}");
    assert!(t.contains("read-only"), "write should fail as read-only: {t}");
    assert!(!t.contains("wrote"), "{t}");
    // Read-write client: qemu sees NBD_FLAG_READ_ONLY and refuses to open.
    let o = qemu_io(&ts.url("ro"), &[], &["write -P 1 0 4k"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("Permission denied"), "{}", text(&o));
    assert_eq!(disk.snapshot(), data);
}

#[test]
fn qemu_unknown_export_is_reported() {
    if !have("qemu-io") {
        return;
    }
    let ts = TestServer::tcp(single("here", Arc::new(MemDisk::new(MIB))));
    let o = qemu_io(&ts.url("elsewhere"), &["-r"], &["read 0 512"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("export not available") || t.contains("elsewhere"), "{t}");
    // The server is still fine.
    let o = qemu_io(&ts.url("here"), &["-r"], &["read -P 0 0 512"]);
    assert_qemu_io_ok(&o);
}

#[test]
fn default_export_and_several_exports() {
    if !have("qemu-io") {
        return;
    }
    let a = Arc::new(MemDisk::from_vec(vec![0xaa; MIB], false));
    let b = Arc::new(MemDisk::from_vec(vec![0xbb; 2 * MIB], true));
    let mut ex = StaticExports::new();
    ex.insert("", a.clone(), "the default");
    ex.insert("b", b.clone(), "second");
    let ts = TestServer::tcp(Arc::new(ex));
    assert_qemu_io_ok(&qemu_io(&format!("nbd://127.0.0.1:{}", ts.port), &["-r"], &["read -P 0xaa 0 1m"]));
    assert_qemu_io_ok(&qemu_io(&ts.url("b"), &["-r"], &["read -P 0xbb 1m 1m"]));
}

#[test]
fn nbdinfo_list_and_nbdcopy() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let data: Vec<u8> = (0..4 * MIB).map(|i| (i % 241) as u8).collect();
    let mut ex = StaticExports::new();
    ex.insert("alpha", Arc::new(MemDisk::from_vec(data.clone(), false)), "first disk");
    ex.insert("beta", Arc::new(MemDisk::new(MIB)), "");
    let ts = TestServer::unix(Arc::new(ex));
    let sock = ts.socket.clone().unwrap();

    let o = run(Command::new("timeout")
        .args(["60", "nbdinfo", "--list", "--json"])
        .arg(format!("nbd+unix://?socket={}", sock.display())));
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("\"alpha\"") && t.contains("\"beta\""), "{t}");
    assert!(t.contains("first disk"), "{t}");
    assert!(t.contains("4194304"), "{t}");

    let o = run(Command::new("timeout").args(["60", "nbdinfo", "--json"]).arg(ts.url("alpha")));
    assert!(o.status.success(), "{}", text(&o));
    let t = String::from_utf8_lossy(&o.stdout);
    assert!(t.contains("\"can_multi_conn\": true"), "{t}");
    assert!(t.contains("\"block_size_maximum\": 33554432"), "{t}");

    // nbdcopy uses several connections (multi-conn) and parallel requests.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("copy.raw");
    std::fs::write(&out, b"").unwrap();
    let o = run(Command::new("timeout").args(["60", "nbdcopy"]).arg(ts.url("alpha")).arg(&out));
    assert!(o.status.success(), "{}", text(&o));
    assert!(std::fs::read(&out).unwrap() == data, "nbdcopy output differs");
}

#[test]
fn qemu_img_bench_smoke() {
    // A few thousand small requests from qemu's queue-depth client: exercises pipelining.
    if !have("qemu-img") {
        return;
    }
    let disk = Arc::new(MemDisk::new(8 * MIB));
    let ts = TestServer::tcp(single("bench", disk.clone()));
    for w in [false, true] {
        let mut c = Command::new("timeout");
        c.args(["60", "qemu-img", "bench", "-f", "raw", "-c", "2000", "-d", "8", "-s", "4k"]);
        if w {
            c.args(["-w", "--pattern", "0x77"]);
        }
        let o = run(c.arg(ts.url("bench")));
        assert!(o.status.success(), "{}", text(&o));
    }
    assert!(disk.snapshot()[..4096].iter().all(|&b| b == 0x77));
    assert_eq!(disk.size(), 8 * MIB as u64);
}
