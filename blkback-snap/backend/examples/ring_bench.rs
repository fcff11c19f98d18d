//! In-process benchmark of one blkif ring (no Xen): blkif's sim frontend keeps QD requests in
//! flight against a `BlkifRing` serving a qcow2 image (and a raw file for comparison), with the
//! requests executed inline (`--workers 0`, one at a time) or on a pool of I/O threads.
//!
//!     cargo run --release -p blkback-snap --example ring_bench -- [--secs 2] [--reps 3] [--dir /var/tmp] [--workers 4] [--cold] [--persistent]
//!         [--only WORKLOAD] [--qd N] [--image qcow2|raw] [--cluster-kib 64]
//!
//! Prints IOPS / MiB/s per workload and queue depth for inline execution, the pool with the
//! default adaptive hand-off, and the pool handing off everything it can, and their ratios.
//! The image is filled first (every cluster allocated), page cache warm; the sim's grant copy
//! is a memcpy, so this measures the backend's own overheads and overlap, not Xen's. The
//! `--cold` adds rows that first drop the image file's pages from the page cache (GNU dd
//! `iflag=nocache`), so reads wait for the disk. `--persistent` negotiates persistent grants
//! (the frontend reuses its buffers, granted writable as Linux blkfront does): data then moves
//! by memcpy through the mapped pages instead of the sim's grant copy.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkback_snap::image::Image;
use xensnap_blkif::abi::*;
use xensnap_blkif::sim::{evtchn_pair, simple_layout, IoBuf, TestFront, TestGuest};
use xensnap_blkif::{BlkifRing, Features, GrantMemory, Poll, RingParams};
use xensnap_blockdev::BlockDevice;

type BlockDeviceArc = Arc<dyn BlockDevice>;

const DOMID: u16 = 3;
const DISK: u64 = 256 << 20;

#[derive(Clone, Copy)]
struct Load {
    name: &'static str,
    op: u8,
    bs: usize,
    random: bool,
    qd: usize,
    /// Drop the image's pages from the page cache before the run (reads wait for the disk).
    cold: bool,
}

/// Write back and drop the page cache of one file (GNU dd: `iflag=nocache count=0` drops the
/// whole file's cached pages); false if that failed.
fn drop_cache_of(path: &Path) -> bool {
    let _ = std::process::Command::new("sync").arg(path).status();
    std::process::Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status()
        .is_ok_and(|s| s.success())
}

/// (minor faults, user ticks, system ticks) of this process from /proc/self/stat (Linux), for
/// the cost lines; None where that file is missing or unreadable.
fn proc_self() -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    // fields after "(comm)": state is field 3; minflt 10, utime 14, stime 15
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i - 3).and_then(|v| v.parse::<u64>().ok());
    Some((n(10)?, n(14)?, n(15)?))
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn run_one(
    dev: &BlockDeviceArc,
    path: &Path,
    workers: u32,
    adaptive: bool,
    persistent: bool,
    l: Load,
    secs: f64,
) -> f64 {
    if l.cold && !drop_cache_of(path) {
        return f64::NAN;
    }
    let guest = TestGuest::new(DOMID);
    let (be, fe) = evtchn_pair();
    let mut front = TestFront::new(guest.clone(), Abi::X86_64, 0, fe);
    let ring = Arc::new(
        BlkifRing::new(RingParams {
            domid: DOMID,
            abi: Abi::X86_64,
            ring: guest.map_ring(DOMID, &front.ring_refs).expect("ring"),
            grants: guest.clone(),
            evtchn: be,
            device: dev.clone(),
            features: Features {
                workers,
                adaptive_offload: adaptive,
                max_indirect_segments: 256,
                ..Features::default()
            },
            persistent,
        })
        .expect("ring geometry"),
    );
    let worker = ring.spawn("bench".into()).expect("spawn");
    let sectors = (l.bs / 512) as u64;
    let layout = simple_layout(sectors, 0);
    let mut free: Vec<IoBuf> = (0..l.qd)
        .map(|_| front.make_buf(&layout, Some(&vec![0x5a; l.bs]), l.op == BLKIF_OP_WRITE && !persistent))
        .collect();
    let mut inflight: HashMap<u64, IoBuf> = HashMap::new();
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let mut seq = 0u64;
    let span = DISK / l.bs as u64;
    let (mut done, t0) = (0u64, Instant::now());
    let end = t0 + Duration::from_secs_f64(secs);
    loop {
        let now = Instant::now();
        let stopping = now >= end;
        if stopping && inflight.is_empty() {
            break;
        }
        while let Some(mut b) = if stopping { None } else { free.pop() } {
            let blk = if l.random {
                rng.next() % span
            } else {
                seq += 1;
                (seq - 1) % span
            };
            let id = front.queue_io(l.op, blk * sectors, &mut b, false);
            inflight.insert(id, b);
        }
        front.push();
        let got = front.wait_responses(1, Duration::from_secs(30));
        assert!(!got.is_empty(), "no response in 30 s: stalled");
        for r in got {
            assert_eq!(r.status, 0, "request failed");
            let mut b = inflight.remove(&r.id).expect("known id");
            for g in b.indirect.drain(..) {
                guest.revoke(g);
            }
            free.push(b);
            done += 1;
        }
    }
    let el = t0.elapsed().as_secs_f64();
    ring.stop();
    assert_eq!(worker.join().expect("worker"), Poll::Stopped);
    done as f64 / el
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| args.iter().position(|a| a == k).and_then(|i| args.get(i + 1)).cloned();
    let secs: f64 = arg("--secs").and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let dir = arg("--dir").unwrap_or_else(|| "/var/tmp".into());
    let pool: u32 = arg("--workers").and_then(|s| s.parse().ok()).unwrap_or(4);
    let cold = args.iter().any(|a| a == "--cold");
    let persistent = args.iter().any(|a| a == "--persistent");
    let reps: usize = arg("--reps").and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    // run one workload / queue depth / image kind only (e.g. under a profiler)
    let only = arg("--only");
    let only_qd: Option<usize> = arg("--qd").and_then(|s| s.parse().ok());
    let only_image = arg("--image");
    let cluster_kib: u64 = arg("--cluster-kib").and_then(|s| s.parse().ok()).unwrap_or(64);
    if !cluster_kib.is_power_of_two() || !(1..=2048).contains(&cluster_kib) {
        eprintln!("ring_bench: --cluster-kib must be a power of two from 1 to 2048");
        std::process::exit(2);
    }
    let tmp = tempfile::tempdir_in(&dir).expect("temp dir");
    let qpath = tmp.path().join("bench.qcow2");
    xensnap_qcow2::Qcow2::create_file(
        &qpath,
        &xensnap_qcow2::CreateOptions {
            size: DISK,
            cluster_bits: (cluster_kib << 10).trailing_zeros(),
            ..Default::default()
        },
    )
    .expect("create qcow2")
    .close()
    .expect("close");
    let rpath = tmp.path().join("bench.raw");
    std::fs::write(&rpath, vec![0u8; DISK as usize]).expect("raw file");
    let loads = [
        Load { name: "randread 4K", op: BLKIF_OP_READ, bs: 4096, random: true, qd: 1, cold: false },
        Load { name: "randread 4K", op: BLKIF_OP_READ, bs: 4096, random: true, qd: 8, cold: false },
        Load { name: "randread 4K", op: BLKIF_OP_READ, bs: 4096, random: true, qd: 32, cold: false },
        Load { name: "randwrite 4K", op: BLKIF_OP_WRITE, bs: 4096, random: true, qd: 1, cold: false },
        Load { name: "randwrite 4K", op: BLKIF_OP_WRITE, bs: 4096, random: true, qd: 8, cold: false },
        Load { name: "randwrite 4K", op: BLKIF_OP_WRITE, bs: 4096, random: true, qd: 32, cold: false },
        Load { name: "seqread 1M", op: BLKIF_OP_READ, bs: 1 << 20, random: false, qd: 1, cold: false },
        Load { name: "seqread 1M", op: BLKIF_OP_READ, bs: 1 << 20, random: false, qd: 8, cold: false },
        Load { name: "seqwrite 1M", op: BLKIF_OP_WRITE, bs: 1 << 20, random: false, qd: 1, cold: false },
        Load { name: "seqwrite 1M", op: BLKIF_OP_WRITE, bs: 1 << 20, random: false, qd: 8, cold: false },
        Load { name: "randread 4K cold", op: BLKIF_OP_READ, bs: 4096, random: true, qd: 1, cold: true },
        Load { name: "randread 4K cold", op: BLKIF_OP_READ, bs: 4096, random: true, qd: 8, cold: true },
        Load { name: "randread 4K cold", op: BLKIF_OP_READ, bs: 4096, random: true, qd: 32, cold: true },
    ];
    println!("ring_bench: {secs} s per run, median of {reps} alternating runs per mode, 256 MiB disk (filled, qcow2 clusters {cluster_kib} KiB), ring of 32 slots, pool = {pool} I/O threads, persistent grants {}, {} CPUs", if persistent { "on" } else { "off" }, std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    println!(
        "{:<6} {:<17} {:>3} {:>11} {:>11} {:>11} {:>9} {:>9}   {:>8} {:>8} {:>8}",
        "image", "workload", "QD", "inline", "adaptive", "always", "adapt/in", "alws/in", "MiB/s in", "adapt", "always"
    );
    println!("(IOPS; adaptive = pool with the default adaptive hand-off, always = every request but the last visible one handed off)");
    for (kind, path) in [("qcow2", &qpath), ("raw", &rpath)] {
        if only_image.as_deref().is_some_and(|k| k != kind) {
            continue;
        }
        let img = Image::open(Path::new(path), None, false, Duration::from_secs(1)).expect("open image");
        let dev: BlockDeviceArc = img.device.clone();
        // Fill: every cluster allocated, page cache warm.
        let chunk = vec![0xa5u8; 1 << 20];
        for off in (0..DISK).step_by(1 << 20) {
            dev.write_at(off, &chunk).expect("fill");
        }
        let picked = |l: &Load| {
            (cold || !l.cold) && only.as_deref().is_none_or(|o| l.name == o) && only_qd.is_none_or(|q| l.qd == q)
        };
        for l in loads.into_iter().filter(picked) {
            // Inline and pool alternate `reps` times; the medians are compared (the machine
            // is shared, so single runs drift).
            let (mut av, mut bv, mut cv) = (Vec::new(), Vec::new(), Vec::new());
            // the inline runs' own cost: minor faults, user and system time per request
            let (mut cost, mut reqs) = ((0u64, 0u64, 0u64), 0.0);
            for _ in 0..reps {
                let p0 = proc_self();
                let t = Instant::now();
                av.push(run_one(&dev, path, 0, false, persistent, l, secs));
                if let (Some(p0), Some(p1)) = (p0, proc_self()) {
                    cost = (cost.0 + p1.0 - p0.0, cost.1 + p1.1 - p0.1, cost.2 + p1.2 - p0.2);
                    reqs += av[av.len() - 1] * t.elapsed().as_secs_f64();
                }
                bv.push(run_one(&dev, path, pool, true, persistent, l, secs));
                cv.push(run_one(&dev, path, pool, false, persistent, l, secs));
            }
            let (a, b, c) = (median(&mut av), median(&mut bv), median(&mut cv));
            let mib = |iops: f64| iops * l.bs as f64 / (1 << 20) as f64;
            println!(
                "{:<6} {:<17} {:>3} {:>11.0} {:>11.0} {:>11.0} {:>8.2}x {:>8.2}x   {:>8.1} {:>8.1} {:>8.1}",
                kind,
                l.name,
                l.qd,
                a,
                b,
                c,
                b / a,
                c / a,
                mib(a),
                mib(b),
                mib(c)
            );
            if reqs > 0.0 {
                // /proc ticks are 1/100 s (USER_HZ) on Linux
                let per = |v: u64| v as f64 * 10_000.0 / reqs;
                println!(
                    "       inline cost per request: user {:.1} us, system {:.1} us, minor faults {:.3}",
                    per(cost.1),
                    per(cost.2),
                    cost.0 as f64 / reqs
                );
            }
        }
    }
}
