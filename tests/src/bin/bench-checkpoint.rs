//! bench-checkpoint: two-phase checkpoint costs next to `qemu-img snapshot`, from one run.
//!
//! Part 1, for images of 64 GiB virtual size with 0, 1, 16 and 64 GiB allocated (made by
//! `qemu-img create -o preallocation=full` + `qemu-img resize`: real L2 tables, refcount
//! blocks and data written as zeroes, like a served disk's; above `--full-max-gib` (16) with
//! `preallocation=metadata`, sparse data, as the disk would not hold 64 GB of data plus the
//! copy-on-write growth of the IOPS windows), at the engine's default cluster size and at 64 KiB:
//! - *taken*: the critical-path time of `checkpoint_take` (the guest would be paused),
//! - *durable*: `wait_durable` after it (background, unloaded),
//! - *revert switch*: `checkpoint_revert_switch` (guest-visible), and its durable time,
//! - the blocking `checkpoint_create` for reference,
//! - `qemu-img snapshot -c` / `-a` on the same image (process time, the anchor),
//! - guest IOPS while a checkpoint becomes durable (sizes of `--iops-sizes`, default 1 and
//!   16 GiB): a guest thread does 4 KiB random
//!   writes into the allocated data through `SharedImage` (the `BlockDevice` a backend
//!   serves), with no flushes, then again with a flush every `--flush-every` writes; a
//!   durability thread paced like blkback-snap's and `xl-snap image serve`'s makes a taken
//!   checkpoint durable with `SharedImage::durable_work(1)` (a bounded step under the image
//!   lock, every commit barrier run without it), paced by a `Pacer` (sleeping `--pace` times
//!   the time it held the lock, at least 50 µs, while the guest is busy — with
//!   `--wait-share S` (default 0.05 = DURABLE_WAIT_SHARE, as in the engine; 0 turns it off) longer when the guest waited for the
//!   lock more than S of the time, up to `MAX_PACE` times — and `--idle-pace` times while
//!   it is idle), checking first that
//!   work is pending, like
//!   `SharedImage::drive_durability`. Steady state: the same writes right after a blocking
//!   checkpoint. Control: the same writes right after a take with no durability thread (the
//!   cost of the durable phase's write path alone, hand-overs included). Every window starts
//!   with the guest's writes flushed; steady and control windows last as long as the
//!   durable windows (their median so far; an uncounted durable window first), so that
//!   page-cache writeback and the share of first-touch writes are alike. Rounds run one
//!   window of each kind in rotating order, in whole rotations, until the durable windows
//!   add up to 3 s and at least 3 rounds ran; the ratio is total durable-window IOPS /
//!   total steady IOPS, the per-round ratios' min and max show the spread.
//!
//! Part 2, the cluster-size trade-off on 1 GiB of data (virtual 1 GiB): sequential 1 MiB
//! writes into a fresh image, 4 KiB write/read IOPS, 4 KiB write IOPS right after a
//! checkpoint, and the file growth per byte written by 16384 4 KiB writes after a
//! checkpoint (random offsets, and `qemu-img bench`'s scattered pattern where every write
//! is a first touch), with `qemu-img bench` on 64 KiB clusters as the anchor.
//!
//! Usage: bench-checkpoint [--sizes 0,1,16,64] [--dir DIR] [--reps 5] [--clusters 4k,8k,16k,32k,64k]
//!        [--pace 6] [--wait-share 0.05] [--idle-pace 1] [--budget 1] [--walk-chunk 256] [--flush-every 256] [--flushing-only] [--locked-driver] [--no-handoff] [--no-table]
//!        [--rounds 6] [--part1-clusters 16k,64k] [--iops-sizes 1,16] [--prealloc full|metadata] [--full-max-gib 16]

use clap::Parser;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use xensnap_blockdev::BlockDevice;
use xensnap_qcow2::{CreateOptions, DurableProgress, OpenOptions, Pacer, Qcow2, SharedImage, GUEST_BUSY_WINDOW};
use xensnap_tests::bench::{median, median_mean, ms, q, sh, us, R};

const GIB: u64 = 1 << 30;
const IO: usize = 4096;
const SCATTER_STEP: u64 = 4096 * 40503;

#[derive(Parser)]
struct Args {
    /// Allocated sizes in GiB (virtual size 64 GiB), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1,16,64")]
    sizes: Vec<u64>,
    #[arg(long, default_value = "/var/tmp/xensnap-bench")]
    dir: PathBuf,
    /// Repetitions of each checkpoint operation (median printed).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Cluster sizes of the trade-off table.
    #[arg(long, value_delimiter = ',', default_value = "4k,8k,16k,32k,64k")]
    clusters: Vec<String>,
    /// Skip part 2.
    #[arg(long)]
    no_table: bool,
    /// Cluster sizes of part 1 (default: the engine's default and 64 KiB).
    #[arg(long, value_delimiter = ',')]
    part1_clusters: Vec<String>,
    /// Drive the background work with `lock().durable_step(1)` (every flush under the lock)
    /// instead of `durable_work(1)`, for comparison.
    #[arg(long)]
    locked_driver: bool,
    /// Pacing of the durability thread while the guest is busy: sleep this many times the
    /// time it held the lock.
    #[arg(long, default_value_t = xensnap_qcow2::DURABLE_PACE)]
    pace: u32,
    /// The same while the guest is idle (no request for GUEST_BUSY_WINDOW).
    #[arg(long, default_value_t = xensnap_qcow2::DURABLE_PACE_IDLE)]
    idle_pace: u32,
    /// The Pacer's bound on the busy guest's lock waits (share of the time, e.g. 0.05 =
    /// DURABLE_WAIT_SHARE, the engine's default; 0: the busy pace alone).
    #[arg(long, default_value_t = xensnap_qcow2::DURABLE_WAIT_SHARE, value_parser = parse_share)]
    wait_share: f64,
    /// Budget of each durability step (chunks of L2 tables per lock hold).
    #[arg(long, default_value_t = xensnap_qcow2::DURABLE_BUDGET)]
    budget: usize,
    /// L2 entries per chunk of the background walks (0: the engine's default, 256; a whole
    /// table, e.g. 2048 at 16 KiB clusters, walks a table per lock hold as before chunks).
    #[arg(long, default_value_t = 0)]
    walk_chunk: u64,
    /// The durability thread waits for the image lock without asking guest requests to hand
    /// it over (as before the hand-over), for comparison.
    #[arg(long)]
    no_handoff: bool,
    /// Rounds of the durable-phase IOPS measurement at least (whole rotations of 3; more
    /// while the durable windows add up to less than 3 s).
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// The flushing guest's variant: a flush after every this many writes (0: no variant).
    #[arg(long, default_value_t = 256)]
    flush_every: u64,
    /// Preallocation of part 1's images (`qemu-img create -o preallocation=`): `full` (the
    /// data written as zeroes, as a served disk's data is real) or `metadata` (real L2
    /// tables and refcounts, sparse data: a guest write into a hole allocates file blocks and
    /// a copy-on-write of a never-written cluster reads a hole, which a served disk does not).
    #[arg(long, default_value = "full", value_parser = ["full", "metadata"])]
    prealloc: String,
    /// Allocated sizes (of `--sizes`) that also get the guest-IOPS windows. Not 64 by
    /// default: with a wait bound its windows take over half an hour and their
    /// copies-on-write grew the scratch image to ~63 GB (ask for it with `--iops-sizes 1,16,64`).
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    iops_sizes: Vec<u64>,
    /// Sizes above this many GiB get `preallocation=metadata` whatever `--prealloc` says
    /// (disk space: a 64 GiB image with its data written, plus what the IOPS windows'
    /// copies-on-write add, needs more than 100 GB).
    #[arg(long, default_value_t = 16)]
    full_max_gib: u64,
    /// Measure only the flushing guest's variant (skips the never-flushing one).
    #[arg(long)]
    flushing_only: bool,
}

/// A share of the time: a number from 0 to 1.
fn parse_share(s: &str) -> R<f64> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("{s}: expected a share of the time from 0 to 1 (e.g. 0.05)")),
    }
}

fn parse_size(s: &str) -> R<u64> {
    let s = s.trim().to_ascii_lowercase();
    let (n, m) = match s.strip_suffix('k') {
        Some(n) => (n, 1024),
        None => match s.strip_suffix('m') {
            Some(n) => (n, 1 << 20),
            None => (s.as_str(), 1),
        },
    };
    n.parse::<u64>().map(|v| v * m).map_err(|e| format!("size {s}: {e}"))
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("bench-checkpoint: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> R<()> {
    std::fs::create_dir_all(&a.dir).map_err(|e| format!("{}: {e}", a.dir.display()))?;
    let qv = sh("qemu-img", &["--version"]).map(|o| o.1.lines().next().unwrap_or("").to_string()).unwrap_or_default();
    let def = 1u64 << CreateOptions::default().cluster_bits;
    println!("# bench-checkpoint: two-phase checkpoints vs {qv}; page cache warm; median of {} reps", a.reps);
    let mut clusters = vec![def];
    if def != 64 << 10 {
        clusters.push(64 << 10);
    }
    if !a.part1_clusters.is_empty() {
        clusters = a.part1_clusters.iter().map(|c| parse_size(c)).collect::<R<Vec<u64>>>()?;
    }
    for cs in clusters {
        part1(a, cs)?;
    }
    if !a.no_table {
        part2(a)?;
    }
    Ok(())
}

/// 64 GiB virtual, `alloc` GiB of real metadata with sparse data (`prealloc` "metadata") or
/// with the data written too ("full").
fn make_image(path: &Path, alloc_gib: u64, cs: u64, prealloc: &str) -> R<()> {
    let _ = std::fs::remove_file(path);
    let p = path.to_str().ok_or("path")?;
    let o = format!(
        "cluster_size={cs}{}",
        if alloc_gib > 0 { format!(",preallocation={prealloc}") } else { String::new() }
    );
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, p, &format!("{}G", alloc_gib.max(1))])?;
    sh("qemu-img", &["resize", "-q", p, "64G"])?;
    Ok(())
}

/// The preallocation part 1 uses for `gib` GiB allocated: `--prealloc`, or `metadata` above
/// `--full-max-gib`.
fn prealloc_for(a: &Args, gib: u64) -> &str {
    if gib > a.full_max_gib {
        "metadata"
    } else {
        &a.prealloc
    }
}

fn open(path: &Path) -> R<Qcow2> {
    Qcow2::open_file(path, &OpenOptions { read_only: false }).map_err(q("open"))
}

/// [`open`] with the walk chunk of `--walk-chunk`.
fn open_chunked(path: &Path, a: &Args) -> R<Qcow2> {
    let mut img = open(path)?;
    if a.walk_chunk > 0 {
        img.set_walk_chunk(a.walk_chunk);
    }
    Ok(img)
}

/// Deletes a scratch image when dropped (also when a step fails).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn part1(a: &Args, cs: u64) -> R<()> {
    println!("\n## checkpoint critical path and durability, 64 GiB virtual, {} KiB clusters", cs >> 10);
    println!(
        "{:>6} {:>10} {:>11} {:>10} {:>11} {:>10} {:>12} {:>12} {:>12} {:>13}",
        "alloc",
        "taken µs",
        "durable ms",
        "switch µs",
        "revert ms",
        "create ms",
        "qemu -c ms",
        "qemu -a ms",
        "qemu-c/taken",
        "durable/qemu"
    );
    let mut iops_rows = Vec::new();
    for &gib in &a.sizes {
        let path = a.dir.join(format!("ckpt-{gib}g-{}k.qcow2", cs >> 10));
        // removed however this size ends: the IOPS windows can grow a 64 GiB image to tens of GB
        let _scratch = RemoveOnDrop(path.clone());
        make_image(&path, gib, cs, prealloc_for(a, gib))?;
        let p = path.to_str().ok_or("path")?.to_owned();
        let (mut take, mut dur, mut sw, mut rev, mut cre) = (vec![], vec![], vec![], vec![], vec![]);
        for r in 0..a.reps {
            let mut img = open_chunked(&path, a)?;
            // warm the metadata the walk reads (a served image has it cached)
            img.checkpoint_create("warm").map_err(q("create"))?;
            img.checkpoint_delete("warm").map_err(q("delete"))?;
            let t = Instant::now();
            img.checkpoint_take(&format!("t{r}")).map_err(q("take"))?;
            take.push(t.elapsed());
            let t = Instant::now();
            img.wait_durable().map_err(q("durable"))?;
            dur.push(t.elapsed());
            let t = Instant::now();
            img.checkpoint_revert_switch(&format!("t{r}")).map_err(q("revert switch"))?;
            sw.push(t.elapsed());
            let t = Instant::now();
            img.wait_durable().map_err(q("revert durable"))?;
            rev.push(t.elapsed());
            img.checkpoint_delete(&format!("t{r}")).map_err(q("delete"))?;
            let t = Instant::now();
            img.checkpoint_create(&format!("c{r}")).map_err(q("create"))?;
            cre.push(t.elapsed());
            img.checkpoint_delete(&format!("c{r}")).map_err(q("delete"))?;
            img.close().map_err(q("close"))?;
        }
        sh("qemu-img", &["check", &p]).map_err(|e| format!("qemu-img check not clean after our operations: {e}"))?;
        let (mut qc, mut qa) = (vec![], vec![]);
        for _ in 0..a.reps {
            qc.push(sh("qemu-img", &["snapshot", "-c", "q", &p])?.0);
            qa.push(sh("qemu-img", &["snapshot", "-a", "q", &p])?.0);
            sh("qemu-img", &["snapshot", "-d", "q", &p])?;
        }
        if gib > 0 && a.iops_sizes.contains(&gib) {
            let variants = match (a.flush_every, a.flushing_only) {
                (0, _) => vec![0],
                (f, true) => vec![f],
                (f, false) => vec![0, f],
            };
            for fe in variants {
                iops_rows.push((gib, fe, iops_during(&path, gib * GIB, a, fe)?));
            }
        }
        sh("qemu-img", &["check", &p]).map_err(|e| format!("qemu-img check not clean: {e}"))?;
        let (take, dur, sw, rev, cre, qc, qa) =
            (median(take), median(dur), median(sw), median(rev), median(cre), median(qc), median(qa));
        println!(
            "{:>4} G {:>10.1} {:>11.2} {:>10.1} {:>11.2} {:>10.2} {:>12.2} {:>12.2} {:>11.0}x {:>12.2}x",
            gib,
            us(take),
            ms(dur),
            us(sw),
            ms(rev),
            ms(cre),
            ms(qc),
            ms(qa),
            qc.as_secs_f64() / take.as_secs_f64(),
            dur.as_secs_f64() / qc.as_secs_f64(),
        );
    }
    println!(
        "(taken/switch: in-process critical path, no I/O; durable/revert: background work run to completion, unloaded;"
    );
    println!(" create: the blocking checkpoint_create; qemu: whole `qemu-img snapshot` process incl. ~6 ms start)");
    let driver = if a.locked_driver {
        format!("lock().durable_step({}), every barrier under the lock", a.budget)
    } else {
        format!(
            "SharedImage::durable_work_handed({}), barriers outside the lock, {}",
            a.budget,
            if a.no_handoff { "no hand-over by guest requests" } else { "guest requests hand the lock over" }
        )
    };
    let pacing = format!(
        "Pacer: pause {}x its lock time (>= 50 µs) while the guest is busy{}, {}x while idle; walk chunk {}",
        a.pace,
        if a.wait_share > 0.0 {
            format!(
                ", longer if the guest waited for the lock more than {:.0}% of the time (up to {}x)",
                a.wait_share * 100.0,
                xensnap_qcow2::MAX_PACE
            )
        } else {
            String::new()
        },
        a.idle_pace,
        if a.walk_chunk > 0 { format!("{} L2 entries", a.walk_chunk) } else { "default (256 L2 entries)".into() }
    );
    println!(
        "\n### guest 4 KiB random-write IOPS while a checkpoint becomes durable vs steady state ({} KiB clusters)",
        cs >> 10
    );
    println!("(guest thread through SharedImage; durability thread: {driver}; {pacing})");
    println!(
        "{:>6} {:>7} {:>12} {:>12} {:>12} {:>7} {:>7} {:>11} {:>9} {:>7} {:>9} {:>10} {:>9} {:>8} {:>8} {:>9} {:>9} {:>14} {:>6} {:>14}",
        "alloc",
        "data",
        "guest flush",
        "IOPS steady",
        "IOPS durab.",
        "ratio",
        "median",
        "round min",
        "max",
        "rounds",
        "ctl ratio",
        "durable ms",
        "lock max",
        "lock %",
        "sync %",
        "1st sync",
        "guest max",
        "flush % s/d/c",
        "busy %",
        "host busy s/d/c"
    );
    for (gib, fe, r) in &iops_rows {
        println!(
            "{:>4} G {:>7} {:>12} {:>12.0} {:>12.0} {:>7.2} {:>7.2} {:>11.2} {:>9.2} {:>7} {:>9.2} {:>10.1} {:>9.2} {:>7.1}% {:>7.1}% {:>9.2} {:>9.2} {:>6.0}/{:.0}/{:.0} {:>5.0}% {:>6.2}/{:.2}/{:.2}",
            gib,
            if prealloc_for(a, *gib) == "full" { "written" } else { "sparse" },
            if *fe == 0 { "none".to_string() } else { format!("every {fe}") },
            r.steady,
            r.during,
            r.during / r.steady,
            r.round_median,
            r.round_min,
            r.round_max,
            r.rounds,
            r.control / r.steady,
            r.window_ms,
            r.max_hold.as_secs_f64() * 1e3,
            r.lock_share * 100.0,
            r.sync_share * 100.0,
            r.first_sync.as_secs_f64() * 1e3,
            r.guest_max.as_secs_f64() * 1e3,
            r.flush_share[0] * 100.0,
            r.flush_share[1] * 100.0,
            r.flush_share[2] * 100.0,
            r.busy_share * 100.0,
            r.host_busy[0],
            r.host_busy[1],
            r.host_busy[2],
        );
    }
    println!(
        "(data = the image's data written as zeroes before the windows (preallocation=full) or sparse (metadata);"
    );
    println!(" ratio = IOPS during durable windows / steady IOPS, totals over all rounds; median, round min/max: the");
    println!(" same per round; each round runs one window of each kind, in rotating order, each starting after a guest flush;");
    println!(
        " steady and ctl windows last as long as the durable ones (median so far); ctl ratio = IOPS right after a"
    );
    println!(
        " take with no durability thread / steady (the cost of the durable phase's write path alone); durable ms ="
    );
    println!(
        " median time from take to durable under load; lock max (ms) / lock % = the durability thread's lock hold"
    );
    println!(" per call and its share of the durable windows; sync % = share spent in its fdatasyncs (no lock); 1st");
    println!(" sync = median ms of a window's first barrier (whole file); guest max = slowest guest request, ms;");
    println!(" flush % s/d/c = share of the steady / durable / ctl windows the guest spent in its own flushes;");
    println!(" busy % = share of the durability thread's steps paced as 'guest busy' (--pace) rather than idle;");
    println!(
        " host busy s/d/c = CPUs busy on the whole machine outside this process in steady / durable / ctl windows,"
    );
    println!(" from /proc/stat: other load competing with the guest and driver threads on its cores)");
    Ok(())
}

fn lock(i: &SharedImage) -> std::sync::MutexGuard<'_, Qcow2> {
    i.0.lock().unwrap_or_else(|e| e.into_inner())
}

struct Iops {
    steady: f64,
    during: f64,
    /// Take with no durability thread, windows as long as the durable ones.
    control: f64,
    /// Per round: durable / steady IOPS (median, min, max).
    round_median: f64,
    round_min: f64,
    round_max: f64,
    rounds: usize,
    window_ms: f64,
    max_hold: Duration,
    lock_share: f64,
    sync_share: f64,
    /// Median time of a durable window's first barrier (the whole-file fdatasync).
    first_sync: Duration,
    guest_max: Duration,
    /// Share of each window kind (steady, durable, control) the guest spent in its flushes.
    flush_share: [f64; 3],
    /// Share of the driver's steps after which its pacer saw the guest busy.
    busy_share: f64,
    /// CPUs busy outside this process during each window kind (steady, durable, control).
    host_busy: [f64; 3],
}

/// Busy clock ticks of the whole machine (all CPUs: everything but idle and iowait) and of
/// this process (user + system), from /proc/stat and /proc/self/stat.
fn busy_ticks() -> (u64, u64) {
    let st = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<u64> =
        st.lines().next().unwrap_or("").split_whitespace().skip(1).map(|x| x.parse().unwrap_or(0)).collect();
    let all: u64 = f.iter().take(8).sum::<u64>() - f.get(3).copied().unwrap_or(0) - f.get(4).copied().unwrap_or(0);
    let (u, s) = proc_cpu("/proc/self/stat");
    (all, u + s)
}

/// With XENSNAP_BENCH_MARK set, a line on stderr with the CLOCK_MONOTONIC time (to cut a
/// `perf record -k CLOCK_MONOTONIC` profile into windows).
fn mark(s: &str) {
    if std::env::var_os("XENSNAP_BENCH_MARK").is_some() {
        eprintln!("MARK {s} {:?}", Instant::now());
    }
}

/// This thread's user and system CPU time so far (clock ticks of /proc/thread-self/stat,
/// 10 ms each).
/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;

fn thread_cpu() -> (u64, u64) {
    proc_cpu("/proc/thread-self/stat")
}

/// User and system CPU ticks (utime, stime) from a process or thread `stat` file.
fn proc_cpu(path: &str) -> (u64, u64) {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let rest = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    (f.get(11).copied().unwrap_or(0), f.get(12).copied().unwrap_or(0))
}

/// What one run of guest writes did.
struct GuestRun {
    writes: u64,
    /// The slowest request (a write, or a write and the flush after it).
    worst: Duration,
    /// Time in the guest's own flushes.
    flushing: Duration,
    /// The guest thread's user and system CPU time, in clock ticks.
    cpu: (u64, u64),
}

/// Guest writes (a flush every `flush_every`, 0 = none) until `stop` says so.
fn guest(
    img: &SharedImage,
    off: &mut impl FnMut() -> u64,
    buf: &[u8],
    flush_every: u64,
    stop: &dyn Fn() -> bool,
) -> R<GuestRun> {
    let c0 = thread_cpu();
    mark("xsg begin");
    let mut n = 0u64;
    let mut worst = Duration::ZERO;
    let mut flushing = Duration::ZERO;
    while !stop() {
        let t = Instant::now();
        img.write_at(off(), buf).map_err(q("write"))?;
        n += 1;
        if flush_every > 0 && n.is_multiple_of(flush_every) {
            let f = Instant::now();
            img.flush().map_err(q("flush"))?;
            flushing += f.elapsed();
        }
        worst = worst.max(t.elapsed());
    }
    mark("xsg end");
    let c1 = thread_cpu();
    Ok(GuestRun { writes: n, worst, flushing, cpu: (c1.0 - c0.0, c1.1 - c0.1) })
}

/// The kinds of measurement window (see the module docs).
#[derive(Clone, Copy, PartialEq)]
enum Win {
    /// Right after a blocking checkpoint, for as long as the durable windows last.
    Steady,
    /// Right after a take, while the paced driver makes it durable (until it is).
    Durable,
    /// Right after a take with no durability thread, as long as the durable windows.
    Control,
}

/// What a durable window's driver thread saw.
#[derive(Default)]
struct DriverStats {
    max: Duration,
    held: Duration,
    synced: Duration,
    first_sync: Duration,
    steps: u64,
    /// Steps after which the pacer saw the guest busy.
    busy_steps: u64,
    /// Lock holds by length: counts and total time per bucket of [`HOLD_BUCKETS`].
    hist: [(u64, Duration); 5],
}

/// Upper bounds (µs) of the lock-hold histogram's buckets (the last is open).
const HOLD_BUCKETS: [u64; 4] = [25, 100, 400, 1600];

fn hold_bucket(d: Duration) -> usize {
    let us = d.as_micros() as u64;
    HOLD_BUCKETS.iter().position(|&b| us < b).unwrap_or(HOLD_BUCKETS.len())
}

/// The durability driver of blkback-snap ([`SharedImage::drive_durability`]'s loop and
/// pacing), with its lock and sync times recorded; `locked`: every barrier under the lock.
fn drive(
    img: &SharedImage,
    locked: bool,
    handoff: bool,
    pacer: &mut Pacer,
    budget: usize,
    done: &AtomicBool,
) -> R<DriverStats> {
    let mut s = DriverStats::default();
    let waiting = handoff.then(|| img.handoff_flag());
    loop {
        let p = if locked {
            let mut g = lock(img);
            let t = Instant::now();
            let done = g.durable_step(budget).map_err(q("durable step"))?;
            DurableProgress {
                done,
                locked: t.elapsed(),
                synced: Duration::ZERO,
                guest_ops: g.guest_ops(),
                guest_wait_ns: g.guest_wait_ns(),
            }
        } else {
            img.durable_work_handed(budget, waiting.as_deref()).map_err(q("durable step"))?
        };
        if p.done {
            done.store(true, Ordering::SeqCst);
            return Ok(s);
        }
        s.max = s.max.max(p.locked);
        s.held += p.locked;
        let b = &mut s.hist[hold_bucket(p.locked)];
        b.0 += 1;
        b.1 += p.locked;
        if s.first_sync.is_zero() {
            s.first_sync = p.synced;
        }
        s.synced += p.synced;
        let pause = pacer.pause(&p);
        if pacer.guest_busy() {
            s.busy_steps += 1;
        }
        s.steps += 1;
        std::thread::sleep(pause);
    }
}

/// 4 KiB random-write IOPS right after a blocking checkpoint, while a taken checkpoint is
/// made durable in the background, and after a take with nothing made durable (see the
/// module docs).
fn iops_during(path: &Path, region: u64, a: &Args, flush_every: u64) -> R<Iops> {
    let img = SharedImage::new(open_chunked(path, a)?);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3 + flush_every);
    let buf = vec![0x5au8; IO];
    let mut off = move || rng.gen_range(0..region / IO as u64) * IO as u64;
    let mut n = [0u64; 3];
    let mut t = [Duration::ZERO; 3];
    let mut fl = [Duration::ZERO; 3];
    let (mut cu, mut cs) = ([0u64; 3], [0u64; 3]);
    let (mut steps, mut busy_steps) = (0u64, 0u64);
    let mut hist = [(0u64, Duration::ZERO); 5];
    // nanoseconds the guest waited for the image lock in the counted durable windows
    let mut waited = 0u64;
    let mut rounds: Vec<[f64; 3]> = vec![];
    let mut other = [0u64; 3];
    let mut other_wall = [Duration::ZERO; 3];
    let (mut wins, mut firsts, mut max_hold, mut held, mut synced, mut guest_max) =
        (vec![], vec![], Duration::ZERO, Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut seq = 0u64;
    // one window of a kind: what the guest did, and the window's time; a durable one also
    // records its length
    let mut window = |kind: Win, len: Duration, count: bool, wins: &mut Vec<Duration>| -> R<(GuestRun, Duration)> {
        seq += 1;
        let name = format!("w{seq}");
        // every window starts with the guest's writes so far flushed (nothing dirty)
        img.flush().map_err(q("flush"))?;
        let r = match kind {
            Win::Steady => {
                lock(&img).checkpoint_create(&name).map_err(q("create"))?;
                let t = Instant::now();
                let g = guest(&img, &mut off, &buf, flush_every, &|| t.elapsed() >= len)?;
                (g, t.elapsed())
            }
            Win::Control => {
                lock(&img).checkpoint_take(&name).map_err(q("take"))?;
                let t = Instant::now();
                let g = guest(&img, &mut off, &buf, flush_every, &|| t.elapsed() >= len)?;
                let el = t.elapsed();
                lock(&img).wait_durable().map_err(q("durable"))?;
                (g, el)
            }
            Win::Durable => {
                let w0 = lock(&img).guest_wait_ns();
                lock(&img).checkpoint_take(&name).map_err(q("take"))?;
                let t = Instant::now();
                let done = Arc::new(AtomicBool::new(false));
                let (d2, i2, locked, budget) = (done.clone(), img.clone(), a.locked_driver, a.budget);
                let handoff = !a.no_handoff;
                let mut pacer = Pacer::new(a.pace, a.idle_pace, GUEST_BUSY_WINDOW).with_wait_share(a.wait_share);
                let driver = std::thread::spawn(move || drive(&i2, locked, handoff, &mut pacer, budget, &d2));
                let g = guest(&img, &mut off, &buf, flush_every, &|| done.load(Ordering::SeqCst))?;
                let el = t.elapsed();
                let s = driver.join().map_err(|_| "driver panicked".to_string())??;
                if count {
                    waited = waited.wrapping_add(lock(&img).guest_wait_ns().wrapping_sub(w0));
                    wins.push(el);
                    firsts.push(s.first_sync);
                    max_hold = max_hold.max(s.max);
                    held += s.held;
                    synced += s.synced;
                    steps += s.steps;
                    busy_steps += s.busy_steps;
                    for (h, x) in hist.iter_mut().zip(s.hist) {
                        h.0 += x.0;
                        h.1 += x.1;
                    }
                    guest_max = guest_max.max(g.worst);
                }
                (g, el)
            }
        };
        lock(&img).checkpoint_delete(&name).map_err(q("delete"))?;
        Ok(r)
    };
    // a durable window not counted: warms the caches and gives the first window length
    let (_, first) = window(Win::Durable, Duration::ZERO, false, &mut wins)?;
    let mut lens = vec![first];
    let order = [Win::Durable, Win::Steady, Win::Control];
    let min = Duration::from_millis(3000);
    let mut k = 0;
    // whole rotations of the order (each kind first, second and third equally often)
    while (k < a.rounds.max(3) || t[1] < min || k % 3 != 0) && k < 60 {
        let mut round = [0f64; 3];
        for j in 0..3 {
            let kind = order[(k + j) % 3];
            // steady and control windows last as long as the durable ones so far (median)
            let len = median(lens.clone()).max(Duration::from_millis(20));
            mark(&format!("xsw begin {}", kind as usize));
            let (b0, w0) = (busy_ticks(), Instant::now());
            let (g, wt) = window(kind, len, true, &mut wins)?;
            let b1 = busy_ticks();
            other_wall[kind as usize] += w0.elapsed();
            mark(&format!("xsw end {}", kind as usize));
            let i = kind as usize;
            // (the window's flush, checkpoint and delete around the guest's writes included)
            other[i] += (b1.0 - b0.0).saturating_sub(b1.1 - b0.1);
            if kind == Win::Durable {
                lens.push(wt);
            }
            n[i] += g.writes;
            t[i] += wt;
            fl[i] += g.flushing;
            cu[i] += g.cpu.0;
            cs[i] += g.cpu.1;
            round[i] = g.writes as f64 / wt.as_secs_f64();
        }
        rounds.push(round);
        k += 1;
    }
    let mut g = lock(&img);
    g.flush().map_err(q("flush"))?;
    let per: Vec<f64> = rounds.iter().map(|r| r[1] / r[0]).collect();
    let rate = |i: usize| n[i] as f64 / t[i].as_secs_f64();
    for (i, k) in ["steady", "durable", "control"].iter().enumerate() {
        let w = n[i].max(1) as f64;
        println!(
            "  guest CPU per write ({} GiB, flush every {flush_every}), {k} windows: user {:.2} µs, sys {:.2} µs, wall {:.2} µs",
            region / GIB,
            cu[i] as f64 * 1e6 / USER_HZ / w,
            cs[i] as f64 * 1e6 / USER_HZ / w,
            t[i].as_secs_f64() * 1e6 / w
        );
    }
    let mut line = format!(
        "  driver lock holds ({} GiB, flush every {flush_every}), durable windows (median {:.0} ms from take to durable): guest waited for the lock {:.1}% of the time; {steps} steps, {:.1} µs mean, by length",
        region / GIB,
        ms(median(wins.clone())),
        waited as f64 / 1e9 * 100.0 / t[1].as_secs_f64().max(1e-9),
        held.as_secs_f64() * 1e6 / steps.max(1) as f64
    );
    let mut lo = 0;
    for (i, (c, d)) in hist.iter().enumerate() {
        let hi = HOLD_BUCKETS.get(i).map_or("".to_string(), |b| b.to_string());
        line += &format!(
            " | {lo}-{hi} µs: {c} steps, {:.1}% of the time held",
            d.as_secs_f64() * 100.0 / held.as_secs_f64().max(1e-9)
        );
        lo = HOLD_BUCKETS.get(i).copied().unwrap_or(0);
    }
    println!("{line}");
    Ok(Iops {
        steady: rate(0),
        during: rate(1),
        control: rate(2),
        round_median: median_mean(per.clone()),
        round_min: per.iter().cloned().fold(f64::INFINITY, f64::min),
        round_max: per.iter().cloned().fold(0.0, f64::max),
        rounds: k,
        window_ms: ms(median(wins)),
        max_hold,
        lock_share: held.as_secs_f64() / t[1].as_secs_f64(),
        sync_share: synced.as_secs_f64() / t[1].as_secs_f64(),
        first_sync: median(firsts),
        guest_max,
        busy_share: busy_steps as f64 / steps.max(1) as f64,
        flush_share: [0, 1, 2].map(|i| fl[i].as_secs_f64() / t[i].as_secs_f64()),
        host_busy: [0, 1, 2].map(|i| other[i] as f64 / USER_HZ / other_wall[i].as_secs_f64().max(1e-9)),
    })
}

// ---------------------------------------------------------------------------------- part 2

fn fill(path: &Path, size: u64, cs: u64) -> R<f64> {
    let _ = std::fs::remove_file(path);
    let mut img =
        Qcow2::create_file(path, &CreateOptions { size, cluster_bits: cs.trailing_zeros(), ..Default::default() })
            .map_err(q("create"))?;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut off = 0;
    while off < size {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = ((off >> 20) as u8).wrapping_add(i as u8) | 1;
        }
        img.write(off, &buf).map_err(q("fill"))?;
        off += buf.len() as u64;
    }
    let el = t.elapsed();
    img.close().map_err(q("close"))?;
    Ok(size as f64 / (1 << 20) as f64 / el.as_secs_f64())
}

fn engine_rate(img: &mut Qcow2, offs: &[u64], write: bool) -> R<f64> {
    let mut buf = vec![0x77u8; IO];
    let t = Instant::now();
    for &o in offs {
        if write {
            img.write(o, &buf).map_err(q("write"))?;
        } else {
            img.read(o, &mut buf).map_err(q("read"))?;
        }
    }
    Ok(offs.len() as f64 / t.elapsed().as_secs_f64())
}

fn qemu_bench(p: &str, fmt_args: &[&str]) -> R<f64> {
    let mut args = vec!["bench", "-f", "qcow2", "-d", "1"];
    args.extend_from_slice(fmt_args);
    args.push(p);
    let (_, out) = sh("qemu-img", &args)?;
    out.lines()
        .find_map(|l| l.strip_prefix("Run completed in ")?.strip_suffix(" seconds.")?.parse::<f64>().ok())
        .ok_or_else(|| format!("qemu-img bench: unexpected output: {out}"))
}

fn part2(a: &Args) -> R<()> {
    let size = GIB;
    let n = 16384u64;
    let written = (n * IO as u64) as f64;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let random: Vec<u64> = (0..n).map(|_| rng.gen_range(0..size / IO as u64) * IO as u64).collect();
    let scattered: Vec<u64> = (0..n).map(|i| (i * SCATTER_STEP) % size).collect();
    let len = |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(|e| e.to_string());
    println!("\n## cluster size trade-off: 1 GiB of data, 16384 x 4 KiB requests per row (QD1, page cache, no flush)");
    println!(
        "| cluster | seq write MiB/s | 4K write IOPS | 4K read IOPS | 4K write IOPS after ckpt | growth/written random | growth/written scattered | take µs (64G) | durable ms (1G) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for c in &a.clusters {
        let cs = parse_size(c)?;
        let path = a.dir.join(format!("cs-{cs}.qcow2"));
        let seq = fill(&path, size, cs)?;
        let mut img = open(&path)?;
        let w = engine_rate(&mut img, &random, true)?;
        let r = engine_rate(&mut img, &random, false)?;
        img.flush().map_err(q("flush"))?;
        img.checkpoint_take("x").map_err(q("take"))?;
        let t = Instant::now();
        img.wait_durable().map_err(q("durable"))?;
        let dur = t.elapsed();
        // space = allocated clusters (the file length hides reuse of free holes)
        let after_ckpt = img.info().allocated_clusters;
        let cw = engine_rate(&mut img, &random, true)?;
        img.flush().map_err(q("flush"))?;
        let grow_r = ((img.info().allocated_clusters - after_ckpt) * cs) as f64 / written;
        img.close().map_err(q("close"))?;
        // scattered pattern on a fresh copy
        fill(&path, size, cs)?;
        let mut img = open(&path)?;
        img.checkpoint_create("x").map_err(q("create"))?;
        let base = img.info().allocated_clusters;
        engine_rate(&mut img, &scattered, true)?;
        img.flush().map_err(q("flush"))?;
        let grow_s = ((img.info().allocated_clusters - base) * cs) as f64 / written;
        img.close().map_err(q("close"))?;
        sh("qemu-img", &["check", path.to_str().ok_or("path")?])?;
        // take on a 64 GiB virtual image of this cluster size (L1 copy cost)
        let big = a.dir.join(format!("cs-{cs}-64g.qcow2"));
        make_image(&big, 1, cs, "metadata")?;
        let mut bi = open(&big)?;
        let mut takes = vec![];
        for i in 0..a.reps {
            let t = Instant::now();
            bi.checkpoint_take(&format!("t{i}")).map_err(q("take"))?;
            takes.push(t.elapsed());
            bi.wait_durable().map_err(q("durable"))?;
        }
        drop(bi);
        let _ = std::fs::remove_file(&big);
        println!(
            "| {} KiB (xensnap) | {seq:.0} | {w:.0} | {r:.0} | {cw:.0} | {grow_r:.1}x | {grow_s:.1}x | {:.1} | {:.1} |",
            cs >> 10,
            us(median(takes)),
            ms(dur)
        );
        let _ = std::fs::remove_file(&path);
    }
    // QEMU anchor: 64 KiB clusters
    let qp = a.dir.join("cs-qemu.qcow2");
    let _ = std::fs::remove_file(&qp);
    let p = qp.to_str().ok_or("path")?.to_owned();
    sh("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", &p, "1G"])?;
    let secs = qemu_bench(&p, &["-w", "-c", "1024", "-s", "1M", "-S", "1M"])?;
    let seq = 1024.0 / secs;
    let step = SCATTER_STEP.to_string();
    let nn = n.to_string();
    let w = n as f64 / qemu_bench(&p, &["-w", "-c", &nn, "-s", "4k", "-S", &step])?;
    let r = n as f64 / qemu_bench(&p, &["-c", &nn, "-s", "4k", "-S", &step])?;
    sh("qemu-img", &["snapshot", "-c", "x", &p])?;
    let base = len(&qp)?;
    let cw = n as f64 / qemu_bench(&p, &["-w", "-c", &nn, "-s", "4k", "-S", &step])?;
    let grow_s = (len(&qp)? - base) as f64 / written;
    let (qc, _) = sh("qemu-img", &["snapshot", "-c", "y", &p])?;
    println!(
        "| 64 KiB (qemu-img bench) | {seq:.0} | {w:.0} | {r:.0} | {cw:.0} | 10.2x (bench-image) | {grow_s:.1}x | — | {:.1} (snapshot -c) |",
        ms(qc)
    );
    let _ = std::fs::remove_file(&qp);
    println!("(xensnap rows: the engine in-process, random offsets for the IOPS columns; qemu row: qemu-img bench's");
    println!(
        " scattered step {SCATTER_STEP} (every request a different 4 KiB block), its own process; growth = allocated"
    );
    println!(" clusters (xensnap) or file length (qemu) grown / 64 MiB written after a checkpoint)");
    Ok(())
}
