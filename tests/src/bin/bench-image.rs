//! bench-image: disk-checkpoint and 4 KiB I/O numbers, xensnap next to QEMU, from one run.
//!
//! For each allocated size (default 1 and 16 GiB) it fills an image (64 KiB clusters), then
//! times checkpoint create / revert / delete three ways — the engine in-process, the
//! `xl-snap` command (process start included) and `qemu-img snapshot -c/-a/-d` — and
//! measures 4 KiB read/write IOPS before and right after a checkpoint with `qemu-img bench`'s
//! access patterns: strided (one request per cluster, so every write after the checkpoint is
//! a first touch and takes the copy-on-write path) and scattered (a large odd step modulo the
//! disk size, which `qemu-img bench` wraps, visiting 4 KiB blocks all over the disk in a
//! non-sequential order). Three columns: the engine in-process, `qemu-img bench` against
//! `xl-snap image serve` (the same client as the anchor, our engine behind NBD), and
//! `qemu-img bench` on the file (QEMU's engine). Last, the space cost: file growth per byte
//! written by 4 KiB random writes after a checkpoint, on two fresh copies.
//!
//! Usage: bench-image [--sizes 1,16] [--dir DIR] [--xl-snap PATH] [--reps 3]

use clap::Parser;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use xensnap_qcow2::{CreateOptions, OpenOptions, Qcow2};
use xensnap_tests::bench::{median, ms, q, sh, R};

const GIB: u64 = 1 << 30;
const CLUSTER: u64 = 64 << 10;
const IO: usize = 4096;
/// 4 KiB × an odd number: modulo a power-of-two disk size it visits every 4 KiB block once.
const SCATTER_STEP: u64 = 4096 * 40503;

#[derive(Parser)]
struct Args {
    /// Allocated sizes in GiB, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    sizes: Vec<u64>,
    /// Work directory (needs about 2.2 × the largest size free).
    #[arg(long, default_value = "/var/tmp/xensnap-bench")]
    dir: PathBuf,
    /// The xl-snap binary to time as a process.
    #[arg(long, default_value = "target/release/xl-snap")]
    xl_snap: PathBuf,
    /// Repetitions of each checkpoint operation (the median is printed).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// 4 KiB requests per IOPS measurement.
    #[arg(long, default_value_t = 16384)]
    ops: u64,
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("bench-image: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> R<()> {
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    println!("# bench-image: xensnap vs qemu-img, {}", qemu_version());
    println!("# cluster 64 KiB, page cache warm, no flush inside IOPS runs (qemu-img bench default cache=writeback)");
    for &s in &a.sizes {
        bench_size(a, s)?;
    }
    space(a)?;
    Ok(())
}

fn qemu_version() -> String {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "qemu-img (version unknown)".into())
}

/// Make an image of `virt` bytes with the first `alloc` bytes written (nonzero pattern).
fn fill(path: &Path, virt: u64, alloc: u64) -> R<Duration> {
    let _ = std::fs::remove_file(path);
    let t = Instant::now();
    let mut img = Qcow2::create_file(
        path,
        &CreateOptions { size: virt, cluster_bits: CLUSTER.trailing_zeros(), ..Default::default() },
    )
    .map_err(q("create"))?;
    let mut buf = vec![0u8; 2 << 20];
    let mut off = 0;
    while off < alloc {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((off >> 20) as u8).wrapping_add(i as u8) | 1;
        }
        img.write(off, &buf).map_err(q("fill write"))?;
        off += buf.len() as u64;
    }
    img.close().map_err(q("close"))?;
    Ok(t.elapsed())
}

fn qemu_check_clean(path: &Path) -> R<()> {
    let p = path.to_str().ok_or("path")?;
    sh("qemu-img", &["check", p]).map(|_| ()).map_err(|e| format!("qemu-img check not clean: {e}"))
}

fn bench_size(a: &Args, gib: u64) -> R<()> {
    let alloc = gib * GIB;
    let virt = alloc; // fully allocated, so scattered requests (which wrap) all hit data
    let path = a.dir.join(format!("bench-{gib}g.qcow2"));
    let p = path.to_str().ok_or("path")?.to_owned();
    let xl = a.xl_snap.to_str().ok_or("xl-snap path")?.to_owned();
    println!("\n## {gib} GiB allocated (virtual {} GiB)", virt / GIB);
    let tf = fill(&path, virt, alloc)?;
    println!(
        "fill: {:.1} s ({:.0} MiB/s, xensnap engine)",
        tf.as_secs_f64(),
        alloc as f64 / (1 << 20) as f64 / tf.as_secs_f64()
    );

    // Checkpoint operations.
    let (mut ic, mut ir, mut id) = (vec![], vec![], vec![]);
    let (mut pc, mut pr, mut pd) = (vec![], vec![], vec![]);
    let (mut qc, mut qr, mut qd) = (vec![], vec![], vec![]);
    for _ in 0..a.reps {
        let mut img = Qcow2::open_file(&path, &OpenOptions { read_only: false }).map_err(q("open"))?;
        let t = Instant::now();
        img.checkpoint_create("bench").map_err(q("checkpoint create"))?;
        ic.push(t.elapsed());
        let t = Instant::now();
        img.checkpoint_revert("bench").map_err(q("checkpoint revert"))?;
        ir.push(t.elapsed());
        let t = Instant::now();
        img.checkpoint_delete("bench").map_err(q("checkpoint delete"))?;
        id.push(t.elapsed());
        img.close().map_err(q("close"))?;

        pc.push(sh(&xl, &["image", "checkpoint", "create", &p, "bench"])?.0);
        pr.push(sh(&xl, &["image", "checkpoint", "revert", &p, "bench"])?.0);
        pd.push(sh(&xl, &["image", "checkpoint", "delete", &p, "bench"])?.0);

        qc.push(sh("qemu-img", &["snapshot", "-c", "bench", &p])?.0);
        qr.push(sh("qemu-img", &["snapshot", "-a", "bench", &p])?.0);
        qd.push(sh("qemu-img", &["snapshot", "-d", "bench", &p])?.0);
    }
    qemu_check_clean(&path)?;
    println!(
        "{:<28} {:>14} {:>16} {:>14} {:>22}",
        "checkpoint op (median ms)", "xensnap engine", "xl-snap process", "qemu-img", "qemu-img / xl-snap"
    );
    for (name, i, pp, qq) in [("create", ic, pc, qc), ("revert", ir, pr, qr), ("delete", id, pd, qd)] {
        let (i, pp, qq) = (median(i), median(pp), median(qq));
        println!("{name:<28} {:>14.2} {:>16.2} {:>14.2} {:>21.2}x", ms(i), ms(pp), ms(qq), ms(qq) / ms(pp));
    }

    // IOPS: qemu-img bench's strided pattern and a scattered one (odd step, wrapping).
    let n = a.ops.min(alloc / CLUSTER);
    let strided: Vec<u64> = (0..n).map(|i| i * CLUSTER).collect();
    let scattered: Vec<u64> = (0..n).map(|i| (i * SCATTER_STEP) % alloc).collect();
    let ours = engine_iops(&path, &strided, &scattered)?;
    let via_nbd = nbd_iops(&xl, &path, &a.dir, n)?;
    let theirs = qemu_iops(&p, n)?;
    println!(
        "{:<40} {:>10} {:>14} {:>10} {:>12} {:>12}",
        "4 KiB IOPS (QD1)", "xensnap", "xensnap/NBD", "qemu", "xensnap/qemu", "NBD/qemu"
    );
    let labels = [
        "strided read, before checkpoint",
        "strided write, before checkpoint",
        "strided write, right after checkpoint",
        "strided read, after checkpoint",
        "scattered read, before checkpoint",
        "scattered write, before checkpoint",
        "scattered write, right after checkpoint",
        "scattered read, after checkpoint",
    ];
    for (i, l) in labels.iter().enumerate() {
        println!(
            "{l:<40} {:>10.0} {:>14.0} {:>10.0} {:>11.2}x {:>11.2}x",
            ours[i],
            via_nbd[i],
            theirs[i],
            ours[i] / theirs[i],
            via_nbd[i] / theirs[i]
        );
    }
    println!("(qemu-img bench -d 1 -s 4k, step 64k (strided) or {SCATTER_STEP} (scattered); {n} requests per row)");
    qemu_check_clean(&path)?;
    let _ = std::fs::remove_file(&path);
    Ok(())
}

/// In-process engine IOPS in the order: strided r, w, checkpoint, w, r, delete; scattered the same.
fn engine_iops(path: &Path, strided: &[u64], scattered: &[u64]) -> R<Vec<f64>> {
    let mut out = vec![];
    let mut img = Qcow2::open_file(path, &OpenOptions { read_only: false }).map_err(q("open"))?;
    let mut buf = vec![0x5au8; IO];
    for offs in [strided, scattered] {
        let rate = |img: &mut Qcow2, buf: &mut Vec<u8>, write: bool| -> R<f64> {
            let t = Instant::now();
            for &o in offs {
                if write {
                    img.write(o, buf).map_err(q("write"))?;
                } else {
                    img.read(o, buf).map_err(q("read"))?;
                }
            }
            Ok(offs.len() as f64 / t.elapsed().as_secs_f64())
        };
        out.push(rate(&mut img, &mut buf, false)?);
        out.push(rate(&mut img, &mut buf, true)?);
        img.checkpoint_create("iops").map_err(q("checkpoint"))?;
        out.push(rate(&mut img, &mut buf, true)?);
        out.push(rate(&mut img, &mut buf, false)?);
        img.checkpoint_delete("iops").map_err(q("delete"))?;
    }
    img.close().map_err(q("close"))?;
    Ok(out)
}

fn bench_run(p: &str, fmt: &str, n: u64, step: &str, write: bool) -> R<f64> {
    let n_s = n.to_string();
    let mut args = vec!["bench", "-f", fmt, "-c", &n_s, "-d", "1", "-s", "4k", "-S", step];
    if write {
        args.push("-w");
    }
    args.push(p);
    let (_, out) = sh("qemu-img", &args)?;
    let secs: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("Run completed in ")?.strip_suffix(" seconds.")?.parse().ok())
        .ok_or_else(|| format!("qemu-img bench: unexpected output: {out}"))?;
    Ok(n as f64 / secs)
}

fn qemu_io_script(p: &str, offs: &[u64], write: bool, dir: &Path) -> R<f64> {
    let script = dir.join("qemu-io-script.txt");
    let mut s = String::new();
    for o in offs {
        s.push_str(&format!("{} -q {o} 4k\n", if write { "write -P 0x5a" } else { "read" }));
    }
    std::fs::write(&script, s).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", p])
        .stdin(std::fs::File::open(&script).map_err(|e| e.to_string())?)
        .output()
        .map_err(|e| format!("qemu-io: {e}"))?;
    let d = t.elapsed();
    if !out.status.success() {
        return Err(format!("qemu-io failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(offs.len() as f64 / d.as_secs_f64())
}

fn qemu_iops(p: &str, n: u64) -> R<Vec<f64>> {
    bench_sequence(p, "qcow2", n, &mut |op| {
        sh("qemu-img", &["snapshot", if op == "create" { "-c" } else { "-d" }, "iops", p]).map(|_| ())
    })
}

/// The same `qemu-img bench` sequence against `xl-snap image serve`; checkpoints go through
/// the server's control socket.
fn nbd_iops(xl: &str, path: &Path, dir: &Path, n: u64) -> R<Vec<f64>> {
    let sock = dir.join("bench-nbd.sock");
    let mut child = Command::new(xl)
        .args(["image", "serve"])
        .arg(path)
        .arg("--socket")
        .arg(&sock)
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("{xl}: {e}"))?;
    let ctl = PathBuf::from(format!("{}.xensnap.sock", path.display()));
    let t = Instant::now();
    while !(sock.exists() && ctl.exists()) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let p = path.to_str().ok_or("path")?;
    let r = bench_sequence(&uri, "raw", n, &mut |op| sh(xl, &["image", "checkpoint", op, p, "iops"]).map(|_| ()));
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
    let _ = child.wait();
    r
}

/// strided r, w, checkpoint, w, r, delete; scattered the same.
fn bench_sequence(target: &str, fmt: &str, n: u64, ck: &mut dyn FnMut(&str) -> R<()>) -> R<Vec<f64>> {
    let scatter = SCATTER_STEP.to_string();
    let mut out = vec![];
    for step in ["64k", scatter.as_str()] {
        out.push(bench_run(target, fmt, n, step, false)?);
        out.push(bench_run(target, fmt, n, step, true)?);
        ck("create")?;
        out.push(bench_run(target, fmt, n, step, true)?);
        out.push(bench_run(target, fmt, n, step, false)?);
        ck("delete")?;
    }
    Ok(out)
}

/// File growth per byte written by 4 KiB random writes after a checkpoint, on fresh copies.
fn space(a: &Args) -> R<()> {
    let region = GIB;
    let writes = 16384u64; // 64 MiB
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let offs: Vec<u64> = (0..writes).map(|_| rng.gen_range(0..region / IO as u64) * IO as u64).collect();
    let written = (writes * IO as u64) as f64;
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(|e| e.to_string());

    let ours = a.dir.join("space-ours.qcow2");
    fill(&ours, 2 * GIB, region)?;
    let before = len(&ours)?;
    let mut img = Qcow2::open_file(&ours, &OpenOptions { read_only: false }).map_err(q("open"))?;
    img.checkpoint_create("space").map_err(q("checkpoint"))?;
    let after_ck = img.info().file_length;
    let buf = vec![0x77u8; IO];
    for &o in &offs {
        img.write(o, &buf).map_err(q("write"))?;
    }
    img.close().map_err(q("close"))?;
    let ours_growth = (len(&ours)? - before) as f64;
    let _ = after_ck;
    qemu_check_clean(&ours)?;

    let theirs = a.dir.join("space-qemu.qcow2");
    fill(&theirs, 2 * GIB, region)?;
    let tp = theirs.to_str().ok_or("path")?;
    let before = len(&theirs)?;
    sh("qemu-img", &["snapshot", "-c", "space", tp])?;
    qemu_io_script(tp, &offs, true, &a.dir)?;
    let qemu_growth = (len(&theirs)? - before) as f64;
    println!("\n## space: 64 MiB of 4 KiB random writes into 1 GiB of data right after a checkpoint (64 KiB clusters)");
    println!("{:<24} {:>14} {:>14}", "", "xensnap", "qemu");
    println!(
        "{:<24} {:>14.1} {:>14.1}",
        "file growth (MiB)",
        ours_growth / (1 << 20) as f64,
        qemu_growth / (1 << 20) as f64
    );
    println!("{:<24} {:>13.1}x {:>13.1}x", "growth / bytes written", ours_growth / written, qemu_growth / written);
    let _ = std::fs::remove_file(&ours);
    let _ = std::fs::remove_file(&theirs);
    Ok(())
}
