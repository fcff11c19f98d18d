//! The disk part of a memory+disk checkpoint on this machine, without Xen: what
//! `xl-snap checkpoint` asks of a backend inside the suspended window, timed natively.
//!
//!     cargo run --release -p blkback-snap --example barrier_bench -- [--rounds 200] [--virtual-gib 64] [--alloc-mib 1024] [--gap-ms 5] [--dir /var/tmp]
//!
//! The daemon's serving loop (`device::serve`, the same code as on Xen) serves a qcow2 image
//! to blkif's in-process sim frontend, which keeps 8 random 4 KiB writes in flight. Each round:
//! the "guest" stops issuing (its vCPUs stop at the suspend; what it already queued stays in
//! flight), the driver sends `checkpoint-barrier {defer_durable_ms}` over a control connection
//! opened beforehand (as xl-snap does) and waits for the reply — the backend drains the
//! requests in flight, takes the checkpoint and resumes the ring — then the guest goes on,
//! the driver sends `durable-release` (xl-snap sends it after xl's exit) and the checkpoint
//! becomes durable in the background while the guest writes. Printed: the round trip of
//! `checkpoint-barrier` (what the disk part adds to the window when the machine is not shared
//! with the memory copy) and the CPU the whole process used during it, median / p90 / max;
//! the anchor is `qemu-img snapshot -c` on a copy of the same image (what QEMU's own
//! internal snapshot costs a paused VM), measured in the same run. Not included: xl-snap's
//! two `xc_domain_getinfo` hypercalls around the request (Xen only).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blkback_snap::device::{self, ServeOptions};
use serde_json::{json, Value};
use xensnap_blkif::abi::*;
use xensnap_blkif::sim::*;
use xensnap_blkif::xenbus::*;
use xensnap_blkif::{EventChannel, Features};
use xensnap_control::{process_cpu_ns, Conns};
use xensnap_qcow2::{CreateOptions, Qcow2};

const DOMID: u16 = 7;
const BE: &str = "/local/domain/0/backend/vbd/7/51712";
const FE: &str = "/local/domain/7/device/vbd/51712";
const PORT: u32 = 21;
const QD: usize = 8;

type R<T> = Result<T, String>;

struct Binder(Mutex<Option<Arc<LocalEvtchn>>>);
impl EvtchnBinder for Binder {
    fn bind(&self, domid: u16, port: u32) -> Result<Arc<dyn EventChannel>, String> {
        if domid != DOMID || port != PORT {
            return Err(format!("no event channel {port} in domain {domid}"));
        }
        let e = self.0.lock().map_err(|_| "poisoned")?.take().ok_or("no more channels")?;
        Ok(e)
    }
}

struct Args {
    rounds: usize,
    virtual_gib: u64,
    alloc_mib: u64,
    /// The guest runs this long between checkpoints.
    gap_ms: u64,
    dir: PathBuf,
}

fn args() -> R<Args> {
    let mut a = Args { rounds: 200, virtual_gib: 64, alloc_mib: 1024, gap_ms: 5, dir: PathBuf::from("/var/tmp") };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().ok_or(format!("{k} needs a value"));
        match k.as_str() {
            "--rounds" => a.rounds = v()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--virtual-gib" => a.virtual_gib = v()?.parse().map_err(|e| format!("--virtual-gib: {e}"))?,
            "--alloc-mib" => a.alloc_mib = v()?.parse().map_err(|e| format!("--alloc-mib: {e}"))?,
            "--gap-ms" => a.gap_ms = v()?.parse().map_err(|e| format!("--gap-ms: {e}"))?,
            "--dir" => a.dir = PathBuf::from(v()?),
            _ => {
                return Err(format!(
                    "unknown argument {k} (--rounds N, --virtual-gib N, --alloc-mib N, --gap-ms N, --dir DIR)"
                ))
            }
        }
    }
    if a.rounds == 0 || a.virtual_gib == 0 || a.alloc_mib == 0 {
        return Err("--rounds, --virtual-gib and --alloc-mib must be at least 1".into());
    }
    if a.alloc_mib > a.virtual_gib << 10 {
        return Err("--alloc-mib exceeds the virtual size".into());
    }
    Ok(a)
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) -> R<()> {
    let t = Instant::now();
    while !f() {
        if t.elapsed() > Duration::from_secs(20) {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// An image of `gib` GiB virtual size with `mib` MiB of data in 1 MiB pieces spread evenly
/// over it (the L1/L2 tables and refcounts of a sparse disk in use).
fn make_image(p: &Path, gib: u64, mib: u64) -> R<()> {
    let mut q =
        Qcow2::create_file(p, &CreateOptions { size: gib << 30, ..Default::default() }).map_err(|e| e.to_string())?;
    let buf = vec![0x6bu8; 1 << 20];
    let step = (gib << 10) / mib;
    for i in 0..mib {
        q.write((i * step) << 20, &buf).map_err(|e| e.to_string())?;
    }
    q.close().map_err(|e| e.to_string())
}

fn qemu_snapshot_c(copy: &Path, name: &str) -> R<f64> {
    let t = Instant::now();
    let out = std::process::Command::new("qemu-img")
        .args(["snapshot", "-c", name])
        .arg(copy)
        .output()
        .map_err(|e| format!("qemu-img: {e}"))?;
    let el = t.elapsed().as_secs_f64() * 1e6;
    if !out.status.success() {
        return Err(format!("qemu-img snapshot -c: {}", String::from_utf8_lossy(&out.stderr)));
    }
    Ok(el)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("barrier_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> R<()> {
    let a = args()?;
    let dir = tempfile::Builder::new().prefix("barrier-bench").tempdir_in(&a.dir).map_err(|e| e.to_string())?;
    let img = dir.path().join("guest.qcow2");
    make_image(&img, a.virtual_gib, a.alloc_mib)?;
    let virt = a.virtual_gib << 30;

    // the daemon's serving loop over the sim
    let xs = MemXenStore::new();
    let w = |p: String, v: &str| xs.write(&p, v).map_err(|e| e.to_string());
    w(format!("{BE}/frontend"), FE)?;
    w(format!("{BE}/frontend-id"), "7")?;
    w(format!("{BE}/params"), img.to_str().ok_or("path")?)?;
    w(format!("{BE}/mode"), "w")?;
    w(format!("{BE}/dev"), "xvda")?;
    w(format!("{BE}/online"), "1")?;
    w(format!("{BE}/state"), "1")?;
    w(format!("{FE}/backend"), BE)?;
    w(format!("{FE}/state"), "1")?;
    let guest = TestGuest::new(DOMID);
    let (be, fe) = evtchn_pair();
    let binder = Arc::new(Binder(Mutex::new(Some(be))));
    let stop = Arc::new(AtomicBool::new(false));
    let opts = ServeOptions {
        socket_dir: dir.path().join("run"),
        features: Features { max_indirect_segments: 256, ..Features::default() },
        ..ServeOptions::default()
    };
    let (xs2, g2, st2) = (xs.clone(), guest.clone(), stop.clone());
    let daemon = std::thread::spawn(move || {
        device::serve(xs2, g2, binder, BE, &opts, &st2, &mut |_| {}).map_err(|e| e.to_string())
    });
    let rd = |k: &str| xs.read(&format!("{BE}/{k}")).ok().flatten();
    wait_for("InitWait", || rd("state").as_deref() == Some("2"))?;
    let sock = PathBuf::from(rd("xensnap-socket").ok_or("no xensnap-socket")?);
    let mut front = TestFront::new(guest.clone(), Abi::X86_64, 0, fe.clone());
    let fw = |k: &str, v: &str| xs.write(&format!("{FE}/{k}"), v).map_err(|e| e.to_string());
    fw("ring-ref", &front.ring_refs[0].to_string())?;
    fw("event-channel", &PORT.to_string())?;
    fw("protocol", "x86_64-abi")?;
    fw("state", "3")?;
    wait_for("Connected", || rd("state").as_deref() == Some("4"))?;
    fw("state", "4")?;
    // one control connection, opened before the first checkpoint and kept (as xl-snap does)
    let conns = Conns::new(Duration::from_secs(30));
    let call = |req: Value| conns.call(&sock, &req).map_err(|e| e.to_string());
    call(json!({"op": "status"}))?;

    // the guest: QD 4 KiB random writes, stopping (with its requests in flight) while
    // `suspended` is set
    let suspended = Arc::new(AtomicBool::new(false));
    let stopped = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let (su, sp, dn, wr) = (suspended.clone(), stopped.clone(), done.clone(), writes.clone());
    let (mib, step) = (a.alloc_mib, (a.virtual_gib << 10) / a.alloc_mib);
    let g = std::thread::spawn(move || -> R<()> {
        // writes go into the allocated pieces (the first 64 KiB of each MiB written), the
        // way a guest rewrites its data: copy-on-write after each checkpoint
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut inflight = std::collections::HashMap::new();
        let data = vec![0x3cu8; 4096];
        while !dn.load(Ordering::SeqCst) {
            if su.load(Ordering::SeqCst) {
                sp.store(true, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(20));
                continue;
            }
            sp.store(false, Ordering::SeqCst);
            while inflight.len() < QD {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let piece = rng % mib;
                let sector = (((piece * step) << 20) + ((rng >> 32) % 16) * 4096) / 512;
                let mut b = front.make_buf(&simple_layout(8, 0), Some(&data), true);
                let id = front.queue_io(BLKIF_OP_WRITE, sector, &mut b, false);
                inflight.insert(id, b);
            }
            front.push();
            for r in front.wait_responses(1, Duration::from_secs(30)) {
                if r.status != BLKIF_RSP_OKAY {
                    return Err(format!("write failed: status {}", r.status));
                }
                let b = inflight.remove(&r.id).ok_or("unknown response id")?;
                front.release(&b);
                wr.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    });

    let (mut rtt, mut cpu, mut drained) = (Vec::new(), Vec::new(), 0u64);
    for i in 0..a.rounds {
        // the guest runs a while, then stops (as at a suspend)
        std::thread::sleep(Duration::from_millis(a.gap_ms));
        suspended.store(true, Ordering::SeqCst);
        wait_for("the guest to stop", || stopped.load(Ordering::SeqCst))?;
        let c0 = process_cpu_ns();
        let t = Instant::now();
        let v = call(
            json!({"op": "checkpoint-barrier", "name": format!("b{i}"), "timeout_ms": 5000, "defer_durable_ms": 60000}),
        )?;
        rtt.push(t.elapsed().as_secs_f64() * 1e6);
        cpu.push((process_cpu_ns() - c0) as f64 / 1e3);
        drained += v["drained"].as_u64().unwrap_or(0);
        suspended.store(false, Ordering::SeqCst);
        call(json!({"op": "durable-release"}))?;
        if i >= 8 {
            // keep the image small: the checkpoint of 8 rounds ago goes
            call(json!({"op": "checkpoint-delete", "checkpoint": format!("b{}", i - 8)}))?;
        }
    }
    done.store(true, Ordering::SeqCst);
    g.join().map_err(|_| "guest thread panicked")??;
    let n = writes.load(Ordering::Relaxed);
    stop.store(true, Ordering::SeqCst);
    daemon.join().map_err(|_| "daemon panicked")??;

    // five snapshots of one copy of the image as the guest left it (each costs QEMU a walk
    // of every L2 table and refcount block, like the first)
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).map_err(|e| format!("copy: {e}"))?;
    let mut q = Vec::new();
    for i in 0..5 {
        q.push(qemu_snapshot_c(&copy, &format!("q{i}"))?);
    }
    let (m, p90, mx) = (pct(&mut rtt, 0.5), pct(&mut rtt, 0.9), pct(&mut rtt, 1.0));
    let (cm, c90, cmx) = (pct(&mut cpu, 0.5), pct(&mut cpu, 0.9), pct(&mut cpu, 1.0));
    let qm = pct(&mut q, 0.5);
    println!(
        "disk part of a checkpoint, native, {} rounds {} ms apart, image {} GiB virtual / {} MiB allocated, guest QD{QD} 4 KiB random writes ({n} writes, {drained} requests drained by the barriers):",
        a.rounds, a.gap_ms, virt >> 30, a.alloc_mib
    );
    println!("  checkpoint-barrier round trip (quiesce + drain + take + resume + reply): median {m:.0} µs, p90 {p90:.0} µs, max {mx:.0} µs");
    println!(
        "  CPU of the process (backend + driver side) during it: median {cm:.0} µs, p90 {c90:.0} µs, max {cmx:.0} µs"
    );
    println!("  anchor: qemu-img snapshot -c on a copy of the image, median of 5 snapshots: {qm:.0} µs (ratio barrier/qemu-img {:.4})", m / qm);
    println!("BARRIER-BENCH median_us={m:.0} p90_us={p90:.0} max_us={mx:.0} cpu_median_us={cm:.0} qemu_snapshot_c_us={qm:.0} goal_us=1000 met={}", p90 <= 1000.0);
    Ok(())
}
