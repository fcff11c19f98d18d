//! Consistent memory+disk checkpoints of a running PV domain (issue 6).
//!
//! `xl-snap checkpoint DOM [NAME]`, `list DOM`, `delete DOM NAME`, `revert DOM NAME`,
//! `save DOM FILE`, `restore FILE`.
//!
//! # Mechanism (no libxenguest)
//! Plain `xl save -c` (checkpoint) or `xl save -p` (save) does the suspend and the memory
//! copy. The driver runs it as a child and watches the domain's state with
//! `xc_domain_getinfo` (looked at on every @releaseDomain watch event and at least every
//! 200 ms until the suspend is seen; after the barrier it just waits for xl's exit). The
//! barrier's requests go over control connections opened before xl starts. When Xen reports the
//! domain **shut down with reason `suspend`** (the guest's vCPUs have stopped for good, the
//! guest ran its whole suspend path), the driver sends every backend of the domain one
//! `checkpoint-barrier` request: the backend quiesces (drains admitted requests, admits no
//! more), takes the disk checkpoint and resumes. Then it checks that the domain is *still*
//! suspended: a domain does not suspend twice within one `xl save`, so every quiesce and take
//! happened while the guest's vCPUs were stopped (nothing the guest issued after its stop can
//! be in the disk). The backends hold all background checkpoint work (walks, flushes) back
//! from before xl starts (`durable-hold`, so an earlier checkpoint's or deletion's work that
//! is still running stops too) until the driver sends `durable-release` after xl's exit, so
//! their CPU and disk I/O stay out of the suspend and the memory copy (they start it by
//! themselves after [`DEFER_DURABLE_MS`]). With a
//! backend that lacks `checkpoint-barrier` the driver sends the steps one by one: quiesce
//! every disk, check the domain is still suspended, take on every disk, resume every disk.
//!
//! Then it waits for xl: `save -c` resumes the guest itself; for `save -p` the driver
//! destroys the domain after the file is complete (or unpauses it if anything failed).
//! `xl-snap checkpoint` returns once the checkpoint is taken (listed as `taken` until the
//! background work made it `durable`), as before.
//!
//! Why this point and not the `control/shutdown = "suspend"` write (the design note's
//! first idea): between that write and the stop, Linux's `do_suspend` freezes user tasks.
//! A task blocked in an O_DIRECT write that a quiesced backend holds cannot freeze, the
//! freezer gives up after 20 s and the suspend fails. After the stop nothing in the guest
//! waits for anything.
//!
//! Why it is exact, whatever the memory copy is doing meanwhile: the memory image's
//! notion of "completed I/O" is the set of responses the guest *consumed* before its vCPUs
//! stopped. Each of those was answered before the stop, so before the drain ended, so it
//! is in the disk checkpoint. Every request not consumed before the stop (unanswered, or
//! answered but not yet seen) is still in blkfront's shadow ring in the memory image and
//! is re-issued after a restore (blkfront_resume → blkif recover); writes among them are
//! idempotent re-writes of the same buffers (the issuing task is frozen), reads are served
//! from the reverted disk. What the backend writes into guest pages after the stop (read
//! data, responses) is therefore irrelevant whether or not the memory copy has already
//! passed those pages. So the only deadline is "before the guest runs again", i.e. before
//! xl's `xc_domain_resume` — after the whole memory copy for a non-live save. Step 2 turns
//! a missed deadline (driver starved for the whole copy) into a clean failure instead of a
//! silent inconsistency. libxl's PV sequence (libxl_dom_suspend.c): write
//! control/shutdown=suspend → wait for the guest's ack (node emptied) → wait for
//! @releaseDomain / shutdown(suspend) → return to xc_domain_save, which copies all memory
//! (non-live: one pass) → xl resumes (`-c`, `-p`) or destroys.
//!
//! Failure paths (each error names the step; the domain is left running, or paused only
//! while the driver still owns it):
//! - disks not all served by blkback-snap → refused before anything;
//! - quiesce/take fails, or the suspend window was missed → backends resumed, disk
//!   checkpoints already taken deleted, xl lets the domain run again (`-c` resumes;
//!   `-p`: the driver unpauses), the memory image is deleted;
//! - `xl save` fails → the disk checkpoints deleted, the domain resumed by xl (and
//!   unpaused if still paused), half-written memory file deleted;
//! - xl finished but no suspend was seen → treated as a failed disk checkpoint.

use crate::image::CliError;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[cfg(test)]
#[path = "domain_tests.rs"]
mod tests;

#[derive(Subcommand, Debug)]
pub enum DomainCmd {
    /// Checkpoint memory and disks of a running domain at one instant; it keeps running.
    Checkpoint(CheckpointArgs),
    /// List a domain's checkpoints.
    List { dom: String },
    /// Delete a checkpoint (memory image and disk checkpoints).
    Delete { dom: String, name: String },
    /// Go back to a checkpoint: the running domain is destroyed, its disks reverted, the
    /// memory restored.
    Revert {
        dom: String,
        name: String,
        /// Leave the restored domain paused.
        #[arg(short = 'p')]
        paused: bool,
    },
    /// Like `xl save`: memory to FILE and a disk checkpoint at the same instant (named in
    /// FILE); the domain is destroyed afterwards.
    Save { dom: String, file: PathBuf },
    /// Like `xl restore`: revert the disks to the checkpoint named in FILE, then restore.
    Restore {
        file: PathBuf,
        #[arg(short = 'p')]
        paused: bool,
    },
}

#[derive(Args, Debug)]
pub struct CheckpointArgs {
    dom: String,
    name: Option<String>,
    /// TEST ONLY (negative control): take the disk checkpoint at least N ms *before* the
    /// memory checkpoint, outside the suspended window. The result is inconsistent on purpose:
    /// the memory checkpoint is only started once the guest has provably written after the
    /// disk checkpoint (see `--unsafe-min-written-sectors`).
    #[arg(long, hide = true)]
    unsafe_disk_before_ms: Option<u64>,
    /// TEST ONLY: with `--unsafe-disk-before-ms`, wait until the backends report at least this
    /// many sectors written by the guest after the disk checkpoint before starting the memory
    /// checkpoint (the guest checker writes one sector per request, one request at a time, so
    /// 2 or more prove that a completed write after the take is in memory).
    #[arg(long, hide = true, default_value_t = 3)]
    unsafe_min_written_sectors: u64,
    /// TEST ONLY: how long to wait for those writes; if the guest writes less, the command
    /// fails (and deletes the disk checkpoint) instead of producing a control that proves
    /// nothing.
    #[arg(long, hide = true, default_value_t = 10_000)]
    unsafe_write_wait_ms: u64,
}

/// One virtual disk of a domain, served by blkback-snap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub vdev: String,
    pub backend: String,
    pub socket: PathBuf,
    pub image: PathBuf,
    pub pid: Option<u32>,
    /// The backend serves `checkpoint-barrier` (its `status` says so): the whole barrier in
    /// one request, the checkpoint's background work deferred until `durable-release`.
    #[serde(default, skip_serializing)]
    pub barrier_op: bool,
    /// The backend serves `durable-hold`: all its background checkpoint work (an earlier
    /// checkpoint's or deletion's included) is held from before `xl save` starts until
    /// `durable-release`.
    #[serde(default, skip_serializing)]
    pub hold_op: bool,
}

/// The domain as the hypervisor reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomState {
    Running,
    Paused,
    Suspended,
    ShutDown,
    Gone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `xl save -c`: the domain keeps running.
    Checkpoint,
    /// `xl save -p`: the domain is left paused by xl; the driver destroys it on success.
    Save,
}

/// A running `xl save`.
pub trait SaveJob {
    /// `None` while running; then the exit status (Err carries xl's message).
    fn poll(&mut self) -> Option<Result<(), String>>;
    /// Block until xl exits.
    fn wait(&mut self) -> Result<(), String>;
}

/// Everything the driver needs from Xen, xl and the backends (a fake in tests).
pub trait Env {
    fn domain_state(&self, domid: u32) -> DomState;
    fn backend(&self, disk: &Disk, req: &Value) -> Result<Value, String>;
    fn start_save(&self, domid: u32, file: &Path, mode: Mode) -> Result<Box<dyn SaveJob>, String>;
    fn unpause(&self, domid: u32) -> Result<(), String>;
    fn destroy(&self, domid: u32) -> Result<(), String>;
    fn remove_file(&self, p: &Path);
    fn sleep(&self, d: Duration);
    /// Wait until a domain may have changed state (Xen's shutdown notification, which also
    /// reports a suspend), at most `max`.
    fn wait_change(&self, max: Duration) {
        self.sleep(max)
    }
    /// Set up what [`Env::wait_change`] needs, before xl starts (its CPU would otherwise compete
    /// with xl and the guest's suspend path).
    fn watch_changes(&self) {}
    fn now(&self) -> Instant;
    /// CPU time (ns, all threads) consumed so far by process `pid`, or by this process.
    fn cpu_ns(&self, _pid: Option<u32>) -> Option<u64> {
        None
    }
    /// A file's last modification time.
    fn mtime(&self, _p: &Path) -> Option<SystemTime> {
        None
    }
    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// Timings of one barrier (all in µs) and what the disk part cost inside the suspended
/// window.
///
/// On a 1-vCPU dom0 the disk part can delay xl's memory copy (and so the guest's resume) by
/// at most the CPU time it used while the domain was suspended (counted up to xl's exit, a
/// little after the resume), plus the time the barrier went on after the copy ended: `added_bound_us = cpu_own_window_us +
/// cpu_backend_window_us + barrier_after_copy_us`. `added_bound_all_us` adds xl-snap's CPU
/// between starting xl and seeing the suspend (it may slow the guest's suspend path).
/// The CPU of xenstored (the @releaseDomain watch) and of interrupt handling is not counted.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BarrierReport {
    /// From starting `xl save` to seeing the domain suspended (t0 of the fields below).
    pub suspend_seen_after_us: u64,
    pub quiesce_us: u64,
    pub take_us: u64,
    /// Suspend seen → the disk checkpoint taken on every backend.
    pub take_done_us: u64,
    /// Suspend seen → backends resumed: the disk part of the critical path.
    pub barrier_us: u64,
    pub drained: u64,
    /// `xl save` total (start → exit).
    pub xl_save_us: u64,
    /// The guest was still suspended when the disk checkpoint was complete.
    pub inside_window: bool,
    /// Suspend seen → xl's last write of the memory image (the file's mtime: the kernel's
    /// coarse clock, up to one tick early).
    pub copy_end_us: Option<i64>,
    /// Suspend seen → xl exited (xl resumed the domain shortly before).
    pub xl_exit_us: u64,
    /// max(0, barrier end − copy end).
    pub barrier_after_copy_us: Option<u64>,
    /// CPU of xl-snap itself: xl start → suspend seen.
    pub cpu_own_pre_us: Option<u64>,
    /// CPU of xl-snap: suspend seen → barrier end.
    pub cpu_own_barrier_us: Option<u64>,
    /// CPU of xl-snap: suspend seen → xl exit.
    pub cpu_own_window_us: Option<u64>,
    /// CPU of the blkback-snap processes serving the disks: suspend seen → xl exit (so it
    /// also counts their idle work, and the resumed guest's I/O between xl's resume and its
    /// exit, which the backend serves without a checkpoint too). Backends serving
    /// `checkpoint-barrier` report it themselves: from their receipt of it to their receipt
    /// of `durable-release` (sent right after xl's exit).
    pub cpu_backend_window_us: Option<u64>,
    /// cpu_own_window + cpu_backend_window + barrier_after_copy.
    pub added_bound_us: Option<u64>,
    /// added_bound + cpu_own_pre.
    pub added_bound_all_us: Option<u64>,
    /// Control requests sent inside the window (one `checkpoint-barrier` per disk, or
    /// quiesce + take + resume per disk with an older backend).
    pub window_requests: u32,
    /// The disk checkpoints' background work was held back until xl's exit.
    pub durable_deferred: bool,
    /// Wall clock (µs since the epoch) when xl was started and when the suspend was seen:
    /// to line the report up with the guest's own clock.
    pub xl_start_wall_us: u64,
    pub suspend_seen_wall_us: u64,
    /// Sum of the backends' process CPU (ns) when each received its `checkpoint-barrier`
    /// (as they report it): the start of their window account without reading /proc there.
    #[serde(skip)]
    backend_cpu_at_barrier_ns: Option<u64>,
}

/// CPU time (ns) of this process and of the disks' serving processes, at one instant.
#[derive(Debug, Clone, Copy)]
struct CpuMark {
    at: Instant,
    own: Option<u64>,
    backends: Option<u64>,
}

fn cpu_mark(env: &dyn Env, disks: &[Disk]) -> CpuMark {
    let mut pids: Vec<u32> = Vec::new();
    let mut known = !disks.is_empty();
    for d in disks {
        match d.pid {
            Some(p) if !pids.contains(&p) => pids.push(p),
            Some(_) => {}
            None => known = false,
        }
    }
    let backends =
        if known { pids.iter().try_fold(0u64, |acc, p| env.cpu_ns(Some(*p)).map(|n| acc + n)) } else { None };
    // own last: the cost of reading the backends' /proc entries counts as our own
    CpuMark { at: env.now(), own: env.cpu_ns(None), backends }
}

fn cpu_us(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(b?.saturating_sub(a?) / 1000)
}

/// A failed checkpoint; the message says which step failed and what was cleaned up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepError {
    pub step: &'static str,
    pub msg: String,
    pub cleanup: Vec<String>,
}

impl std::fmt::Display for StepError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "step '{}' failed: {}", self.step, self.msg)?;
        if !self.cleanup.is_empty() {
            write!(f, " [cleanup: {}]", self.cleanup.join("; "))?;
        }
        Ok(())
    }
}

pub struct Opts {
    pub quiesce_timeout_ms: u64,
    pub poll: Duration,
}

impl Default for Opts {
    fn default() -> Self {
        // Until the suspend is seen the driver sleeps on Xen's shutdown notification
        // (@releaseDomain), looking at the domain at least every 200 ms (in case a watch event
        // is lost; the barrier ends > 1 s before xl's copy under TCG). A timed poll (200 µs,
        // then 1 ms, then 10 ms) cost a hypercall and a wake-up each time, taken on a 1-vCPU
        // dom0 from xl and the guest's own suspend path, which are part of the guest's
        // downtime (xl-snap used ~35 ms of CPU between starting xl and the suspend with 10 ms).
        Opts { quiesce_timeout_ms: 2000, poll: Duration::from_millis(200) }
    }
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// The take phase on one backend: `checkpoint-take` (O(L1)) when the daemon has it, else
/// `checkpoint-create` (works while quiesced: the daemon does not quiesce again).
pub fn take_on(env: &dyn Env, disk: &Disk, name: &str) -> Result<Value, String> {
    match env.backend(disk, &json!({"op": "checkpoint-take", "name": name})) {
        Err(e) if e.starts_with("bad request") => env.backend(disk, &json!({"op": "checkpoint-create", "name": name})),
        r => r,
    }
}

fn delete_on(env: &dyn Env, disks: &[Disk], name: &str, cleanup: &mut Vec<String>) {
    for d in disks {
        match env.backend(d, &json!({"op": "checkpoint-delete", "checkpoint": name})) {
            Ok(_) => cleanup.push(format!("disk checkpoint '{name}' deleted on {}", d.vdev)),
            Err(e) => cleanup.push(format!(
                "could NOT delete disk checkpoint '{name}' on {} ({e}); delete it with \
                 `xl-snap image checkpoint delete {} {name}`",
                d.vdev,
                d.image.display()
            )),
        }
    }
}

fn resume_all(env: &dyn Env, disks: &[Disk], cleanup: &mut Vec<String>) {
    for d in disks {
        if let Err(e) = env.backend(d, &json!({"op": "resume"})) {
            cleanup.push(format!("resume of backend {} failed: {e}", d.vdev));
        }
    }
}

/// How long a backend holds a checkpoint's background work back at most when xl-snap does
/// not send `durable-release` (xl-snap died): then the work just runs.
pub const DEFER_DURABLE_MS: u64 = 60_000;

/// The disk barrier at the suspended instant: one `checkpoint-barrier` request per disk when
/// Every backend serves `checkpoint-barrier` (and reports its CPU in its replies).
fn all_one_request(disks: &[Disk]) -> bool {
    !disks.is_empty() && disks.iter().all(|d| d.barrier_op)
}

/// every backend serves it, else [`barrier_steps`]. On error everything it did is undone.
fn barrier(
    env: &dyn Env,
    domid: u32,
    disks: &[Disk],
    name: &str,
    opts: &Opts,
    rep: &mut BarrierReport,
    t0: Instant,
) -> Result<(), StepError> {
    if all_one_request(disks) {
        barrier_one_request(env, domid, disks, name, opts, rep, t0)
    } else {
        barrier_steps(env, domid, disks, name, opts, rep, t0)
    }
}

/// `durable-hold` to every disk that serves it, before `xl save` starts: no background
/// checkpoint work (an earlier checkpoint's or deletion's, still running or queued) competes
/// with the suspend and the memory copy for dom0's CPU and disk. The backends start it again
/// at `durable-release` or by themselves after [`DEFER_DURABLE_MS`]. True if any disk holds.
/// A failure only costs that protection, so it is logged, not fatal.
fn hold_durable(env: &dyn Env, disks: &[Disk]) -> bool {
    let mut any = false;
    for d in disks.iter().filter(|d| d.hold_op) {
        match env.backend(d, &json!({"op": "durable-hold", "max_ms": DEFER_DURABLE_MS})) {
            Ok(v) => any |= v.get("held").and_then(Value::as_bool) == Some(true),
            Err(e) => tracing::warn!("durable-hold on {}: {e}", d.vdev),
        }
    }
    any
}

/// `durable-release` to every disk: their deferred background work may start (xl is done).
/// Returns the sum of the process CPU (ns) the backends report, if every one did.
fn release_durable(env: &dyn Env, disks: &[Disk]) -> Option<u64> {
    let mut cpu = BackendCpu::default();
    for d in disks {
        match env.backend(d, &json!({"op": "durable-release"})) {
            Ok(v) => cpu.add(d, Some(&v)),
            Err(e) => {
                // the backend starts the work by itself after DEFER_DURABLE_MS
                tracing::warn!("durable-release on {}: {e}", d.vdev);
                cpu.add(d, None);
            }
        }
    }
    cpu.total()
}

/// The process CPU the backends report in their replies (`cpu_ns`, `pid`), each process
/// counted once (one process may serve several disks).
#[derive(Default)]
struct BackendCpu {
    total: u64,
    pids: Vec<u32>,
    missing: bool,
}

impl BackendCpu {
    fn add(&mut self, d: &Disk, reply: Option<&Value>) {
        let cpu = reply.and_then(|v| v.get("cpu_ns")).and_then(Value::as_u64);
        let pid =
            reply.and_then(|v| v.get("pid")).and_then(Value::as_u64).and_then(|p| u32::try_from(p).ok()).or(d.pid);
        match (cpu, pid) {
            (Some(_), Some(p)) if self.pids.contains(&p) => {}
            (Some(c), p) => {
                self.total += c;
                self.pids.extend(p);
            }
            (None, _) => self.missing = true,
        }
    }

    fn total(&self) -> Option<u64> {
        (!self.missing).then_some(self.total)
    }
}

/// Error prefixes of a failed `checkpoint-barrier` (the backend resumed its ring and took
/// nothing); any other failure leaves the outcome on that disk unknown.
const BARRIER_QUIESCE_FAILED: &str = "quiesce failed: ";
const BARRIER_TAKE_FAILED: &str = "take failed: ";

/// Each backend quiesces, takes and resumes in one request. The domain is suspended when the
/// first request is sent (just seen) and must still be suspended after the last reply: a
/// domain does not suspend twice within one `xl save`, so every quiesce and take happened
/// while the guest's vCPUs were stopped. (If xl resumed the guest before, a request the
/// guest issued after its resume could be in the disk checkpoint: a clean failure.)
fn barrier_one_request(
    env: &dyn Env,
    domid: u32,
    disks: &[Disk],
    name: &str,
    opts: &Opts,
    rep: &mut BarrierReport,
    t0: Instant,
) -> Result<(), StepError> {
    let t1 = env.now();
    let mut taken: Vec<Disk> = Vec::new();
    let mut cpu = BackendCpu::default();
    let req = json!({
        "op": "checkpoint-barrier",
        "name": name,
        "timeout_ms": opts.quiesce_timeout_ms,
        "defer_durable_ms": DEFER_DURABLE_MS,
    });
    rep.durable_deferred = true;
    for d in disks {
        rep.window_requests += 1;
        match env.backend(d, &req) {
            Ok(v) => {
                let n = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
                rep.drained += n("drained");
                rep.quiesce_us += n("quiesce_micros");
                rep.durable_deferred &= v.get("durable_deferred").and_then(Value::as_bool) == Some(true);
                cpu.add(d, Some(&v));
                taken.push(d.clone());
            }
            Err(e) => {
                let mut cleanup = Vec::new();
                let step = if e.starts_with(BARRIER_QUIESCE_FAILED) {
                    "quiesce"
                } else {
                    if !e.starts_with(BARRIER_TAKE_FAILED) {
                        // unknown outcome (e.g. the connection broke): make sure the ring runs
                        // and no checkpoint of this name stays there
                        resume_all(env, std::slice::from_ref(d), &mut cleanup);
                        taken.push(d.clone());
                    }
                    "disk-checkpoint"
                };
                delete_on(env, &taken, name, &mut cleanup);
                cleanup.push("backends resumed".into());
                return Err(StepError { step, msg: format!("{}: {e}", d.vdev), cleanup });
            }
        }
    }
    rep.backend_cpu_at_barrier_ns = cpu.total();
    rep.take_us = us(env.now() - t1).saturating_sub(rep.quiesce_us);
    rep.take_done_us = us(env.now() - t0);
    rep.inside_window = env.domain_state(domid) == DomState::Suspended;
    rep.barrier_us = us(env.now() - t0);
    if !rep.inside_window {
        let mut cleanup = Vec::new();
        delete_on(env, &taken, name, &mut cleanup);
        return Err(StepError {
            step: "suspend-window",
            msg: "the domain was no longer suspended when the disk checkpoint was complete (xl \
                  resumed it first); the disk checkpoint could hold writes the memory image lacks"
                .into(),
            cleanup,
        });
    }
    Ok(())
}

/// Quiesce + verify the window + take on every disk + resume (backends without
/// `checkpoint-barrier`). On error everything this barrier did is undone (backends resumed,
/// checkpoints taken so far deleted).
fn barrier_steps(
    env: &dyn Env,
    domid: u32,
    disks: &[Disk],
    name: &str,
    opts: &Opts,
    rep: &mut BarrierReport,
    t0: Instant,
) -> Result<(), StepError> {
    let tq = env.now();
    let mut cleanup = Vec::new();
    let mut quiesced: Vec<Disk> = Vec::new();
    let fail = |step, msg: String, env: &dyn Env, q: &[Disk], taken: &[Disk], mut cleanup: Vec<String>| {
        delete_on(env, taken, name, &mut cleanup);
        resume_all(env, q, &mut cleanup);
        if !q.is_empty() {
            cleanup.push("backends resumed".into());
        }
        StepError { step, msg, cleanup }
    };
    for d in disks {
        // Resume is sent even if quiesce failed (a timed-out quiesce stays in force).
        quiesced.push(d.clone());
        rep.window_requests += 3;
        match env.backend(d, &json!({"op": "quiesce", "timeout_ms": opts.quiesce_timeout_ms})) {
            Ok(v) => rep.drained += v.get("drained").and_then(Value::as_u64).unwrap_or(0),
            Err(e) => return Err(fail("quiesce", format!("{}: {e}", d.vdev), env, &quiesced, &[], cleanup)),
        }
    }
    rep.quiesce_us = us(env.now() - tq);
    if env.domain_state(domid) != DomState::Suspended {
        return Err(fail(
            "suspend-window",
            "the domain was no longer suspended when the backends were quiesced (xl resumed \
             it first); the disk checkpoint would not match the memory image"
                .into(),
            env,
            &quiesced,
            &[],
            cleanup,
        ));
    }
    let t1 = env.now();
    let mut taken: Vec<Disk> = Vec::new();
    for d in disks {
        if let Err(e) = take_on(env, d, name) {
            return Err(fail("disk-checkpoint", format!("{}: {e}", d.vdev), env, &quiesced, &taken, cleanup));
        }
        taken.push(d.clone());
    }
    rep.take_us = us(env.now() - t1);
    rep.take_done_us = us(env.now() - t0);
    rep.inside_window = env.domain_state(domid) == DomState::Suspended;
    resume_all(env, &quiesced, &mut cleanup);
    if !cleanup.is_empty() {
        // A backend that will not resume keeps the guest's disk stalled: say so, but the
        // checkpoint itself is good.
        tracing::warn!("after the disk checkpoint: {}", cleanup.join("; "));
        eprintln!("xl-snap: warning: {}", cleanup.join("; "));
    }
    rep.barrier_us = us(env.now() - t0);
    Ok(())
}

/// Negative control: poll interval for xl's exit once the suspend was seen.
const AFTER_BARRIER_POLL: Duration = Duration::from_millis(20);

/// The core: memory via `xl save`, disk via the barrier at the suspended instant.
/// On success (Checkpoint) the domain runs; (Save) the domain is left paused by xl and
/// the caller finishes (embeds metadata, then destroys) or calls [`abort_save`].
pub fn snapshot(
    env: &dyn Env,
    domid: u32,
    disks: &[Disk],
    mem: &Path,
    name: &str,
    mode: Mode,
    opts: &Opts,
) -> Result<BarrierReport, StepError> {
    let mut rep = BarrierReport::default();
    env.watch_changes();
    let own0 = env.cpu_ns(None);
    let t0 = env.now();
    let held = hold_durable(env, disks);
    rep.xl_start_wall_us = epoch_us(env.wall());
    let mut job = match env.start_save(domid, mem, mode) {
        Ok(j) => j,
        Err(e) => {
            if held {
                release_durable(env, disks);
            }
            return Err(StepError { step: "start-xl-save", msg: e, cleanup: vec![] });
        }
    };
    let mut outcome: Option<Result<(), StepError>> = None;
    // CPU marks at the suspend seen and the barrier's end. Inside the window only our own
    // process clock is read (one system call); backends that serve `checkpoint-barrier`
    // report theirs in its reply and in `durable-release`'s (after xl's exit). Only for
    // older backends are their /proc entries read at the suspend (reading them cost ~10 ms of
    // CPU inside the window under nested TCG Xen).
    let one_request = all_one_request(disks);
    let mut marks: Option<(CpuMark, CpuMark, SystemTime)> = None;
    let xl = loop {
        if let Some(r) = job.poll() {
            break r;
        }
        if env.domain_state(domid) == DomState::Suspended {
            let seen = env.now();
            let wall = env.wall();
            rep.suspend_seen_after_us = us(seen - t0);
            rep.suspend_seen_wall_us = epoch_us(wall);
            let mut m0 = if one_request {
                CpuMark { at: seen, own: env.cpu_ns(None), backends: None }
            } else {
                cpu_mark(env, disks)
            };
            outcome = Some(barrier(env, domid, disks, name, opts, &mut rep, seen));
            let m1 = CpuMark { at: env.now(), own: env.cpu_ns(None), backends: None };
            if one_request {
                m0.backends = rep.backend_cpu_at_barrier_ns;
            }
            marks = Some((CpuMark { at: seen, ..m0 }, m1, wall));
            // xl resumes (-c) or pauses (-p) the domain by itself after the copy. Any
            // wake-up until then is CPU taken from xl's memory copy on a 1-vCPU dom0 (a
            // 200 µs poll lengthened the guest's downtime ~2.5x under nested TCG Xen; a
            // 20 ms look at the domain cost ~25 ms of CPU per checkpoint): just wait.
            break job.wait();
        }
        env.wait_change(opts.poll);
    };
    let end = env.now();
    rep.xl_save_us = us(end - t0);
    let mut released = false;
    if let Some((m0, m1, wall0)) = marks {
        let mut m2 =
            if one_request { CpuMark { at: end, own: env.cpu_ns(None), backends: None } } else { cpu_mark(env, disks) };
        if one_request {
            // xl copied the memory and let the guest run: the backends may now make the
            // checkpoint durable (after a failure there is nothing left, or a deletion to
            // finish)
            m2.backends = release_durable(env, disks);
            released = true;
        }
        account(&mut rep, own0, m0, m1, m2, env.mtime(mem).map(|m| signed_us(m, wall0)), end);
    }
    if held && !released {
        // no barrier request (never suspended, or older backends) but held: let it go
        release_durable(env, disks);
    }
    let after_xl = |cleanup: &mut Vec<String>| {
        env.remove_file(mem);
        cleanup.push(format!("memory image {} deleted", mem.display()));
        if mode == Mode::Save || env.domain_state(domid) == DomState::Paused {
            match env.unpause(domid) {
                Ok(()) => cleanup.push("domain unpaused".into()),
                Err(e) => cleanup.push(format!("could NOT unpause the domain: {e}")),
            }
        } else {
            cleanup.push("domain resumed by xl".into());
        }
    };
    match (xl, outcome) {
        (Ok(()), Some(Ok(()))) => Ok(rep),
        (Err(e), Some(Ok(()))) => {
            let mut cleanup = Vec::new();
            delete_on(env, disks, name, &mut cleanup);
            after_xl(&mut cleanup);
            Err(StepError { step: "memory-save", msg: format!("xl save failed: {e}"), cleanup })
        }
        (xl, Some(Err(mut se))) => {
            after_xl(&mut se.cleanup);
            if let Err(e) = xl {
                se.cleanup.push(format!("(xl save also failed: {e})"));
            } else {
                se.cleanup.push("memory save discarded".into());
            }
            Err(se)
        }
        (xl, None) => {
            let mut cleanup = Vec::new();
            after_xl(&mut cleanup);
            Err(match xl {
                Err(e) => StepError { step: "memory-save", msg: format!("xl save failed: {e}"), cleanup },
                Ok(()) => StepError {
                    step: "suspend-window",
                    msg: "xl save finished but the domain was never seen suspended; no disk \
                          checkpoint was taken"
                        .into(),
                    cleanup,
                },
            })
        }
    }
}

fn epoch_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map(us).unwrap_or(0)
}

/// µs from `base` to `t` (negative if `t` is earlier).
fn signed_us(t: SystemTime, base: SystemTime) -> i64 {
    match t.duration_since(base) {
        Ok(d) => us(d) as i64,
        Err(e) => -(us(e.duration()) as i64),
    }
}

/// Fill the window/CPU fields of `rep` from the marks at the suspend seen (`m0`), the
/// barrier's end (`m1`) and xl's exit (`m2`); `copy_end_us` from the suspend seen.
fn account(
    rep: &mut BarrierReport,
    own0: Option<u64>,
    m0: CpuMark,
    m1: CpuMark,
    m2: CpuMark,
    copy_end_us: Option<i64>,
    end: Instant,
) {
    rep.copy_end_us = copy_end_us;
    rep.xl_exit_us = us(end - m0.at);
    rep.barrier_after_copy_us = copy_end_us.map(|c| (rep.barrier_us as i64 - c).max(0) as u64);
    rep.cpu_own_pre_us = cpu_us(own0, m0.own);
    rep.cpu_own_barrier_us = cpu_us(m0.own, m1.own);
    rep.cpu_own_window_us = cpu_us(m0.own, m2.own);
    rep.cpu_backend_window_us = cpu_us(m0.backends, m2.backends);
    rep.added_bound_us = (|| Some(rep.cpu_own_window_us? + rep.cpu_backend_window_us? + rep.barrier_after_copy_us?))();
    rep.added_bound_all_us = (|| Some(rep.added_bound_us? + rep.cpu_own_pre_us?))();
}

/// After a successful `snapshot(Mode::Save)` whose finishing step failed: undo.
pub fn abort_save(
    env: &dyn Env,
    domid: u32,
    disks: &[Disk],
    mem: &Path,
    name: &str,
    step: &'static str,
    msg: String,
) -> StepError {
    let mut cleanup = Vec::new();
    delete_on(env, disks, name, &mut cleanup);
    env.remove_file(mem);
    cleanup.push(format!("memory image {} deleted", mem.display()));
    match env.unpause(domid) {
        Ok(()) => cleanup.push("domain unpaused".into()),
        Err(e) => cleanup.push(format!("could NOT unpause the domain: {e}")),
    }
    StepError { step, msg, cleanup }
}

/// What the negative control's driver saw (sectors written by the guest after its
/// deliberately early disk checkpoint; times in µs from the take).
#[derive(Debug, Clone, Default, Serialize)]
pub struct UnsafeReport {
    /// Sectors the backends had written when the disk checkpoint was taken (their counter).
    pub sectors_at_take: u64,
    /// Sectors written after the take when the memory checkpoint (`xl save -c`) started.
    pub written_after_take_at_xl_start: u64,
    /// Sectors written after the take when the domain was first seen suspended (None if
    /// the suspend was not seen: xl was quicker than the poll).
    pub written_after_take_at_suspend: Option<u64>,
    /// Time from the take to the first of those writes being seen.
    pub first_writes_seen_us: u64,
    pub xl_started_us: u64,
    pub suspend_seen_us: Option<u64>,
    pub xl_save_us: u64,
}

/// Sum of `bytes_written` / 512 over the disks' backends (`stats`).
fn sectors_written(env: &dyn Env, disks: &[Disk]) -> Result<u64, String> {
    let mut n = 0;
    for d in disks {
        let v = env.backend(d, &json!({"op": "stats"}))?;
        n += v
            .get("bytes_written")
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("{}: stats without bytes_written: {v}", d.vdev))?
            / 512;
    }
    Ok(n)
}

/// Settings of the negative control.
#[derive(Debug, Clone, Copy)]
pub struct UnsafeOpts {
    /// At least this long between the disk checkpoint and the start of `xl save -c`.
    pub before: Duration,
    /// Guest writes (sectors) after the take that must be seen before `xl save -c` starts.
    pub min_written_sectors: u64,
    /// Bound on waiting for them.
    pub write_wait: Duration,
    pub poll: Duration,
}

/// Negative control: disk checkpoint while the guest runs, then the memory checkpoint only
/// once the backends have completed `min_written_sectors` guest writes after the take — so
/// the memory image provably holds I/O that the disk checkpoint lacks, whatever the timing.
/// A guest that does not write within `write_wait` fails the command (the disk checkpoint
/// is deleted): a control that cannot detect anything must not pass silently.
pub fn unsafe_disk_first(
    env: &dyn Env,
    domid: u32,
    disks: &[Disk],
    mem: &Path,
    name: &str,
    o: &UnsafeOpts,
) -> Result<UnsafeReport, StepError> {
    let mut rep = UnsafeReport::default();
    let mut taken: Vec<Disk> = Vec::new();
    let fail = |step, msg: String, taken: &[Disk]| {
        let mut cleanup = Vec::new();
        delete_on(env, taken, name, &mut cleanup);
        StepError { step, msg, cleanup }
    };
    for d in disks {
        if let Err(e) = take_on(env, d, name) {
            return Err(fail("disk-checkpoint", format!("{}: {e}", d.vdev), &taken));
        }
        taken.push(d.clone());
    }
    let t0 = env.now();
    // Read after the take returned: every write counted later was admitted after the take
    // (the take drained the ring first).
    rep.sectors_at_take = sectors_written(env, disks).map_err(|e| fail("unsafe-stats", e, &taken))?;
    let mut seen = false;
    loop {
        let n = sectors_written(env, disks)
            .map_err(|e| fail("unsafe-stats", e, &taken))?
            .saturating_sub(rep.sectors_at_take);
        let el = env.now() - t0;
        if n >= o.min_written_sectors && !seen {
            seen = true;
            rep.first_writes_seen_us = us(el);
        }
        if seen && el >= o.before {
            rep.written_after_take_at_xl_start = n;
            break;
        }
        if !seen && el >= o.write_wait {
            return Err(fail(
                "unsafe-guest-writes",
                format!(
                    "the guest wrote {n} sector(s) in the {} ms after the disk checkpoint \
                     (needed {}): the backend or the guest stalled after a live take, and the \
                     negative control would prove nothing",
                    el.as_millis(),
                    o.min_written_sectors
                ),
                &taken,
            ));
        }
        env.sleep(o.poll);
    }
    rep.xl_started_us = us(env.now() - t0);
    let mut job = env.start_save(domid, mem, Mode::Checkpoint).map_err(|e| fail("start-xl-save", e, &taken))?;
    loop {
        if let Some(r) = job.poll() {
            rep.xl_save_us = us(env.now() - t0).saturating_sub(rep.xl_started_us);
            return match r {
                Ok(()) => Ok(rep),
                Err(e) => {
                    env.remove_file(mem);
                    Err(fail("memory-save", e, &taken))
                }
            };
        }
        if rep.suspend_seen_us.is_none() && env.domain_state(domid) == DomState::Suspended {
            rep.suspend_seen_us = Some(us(env.now() - t0));
            rep.written_after_take_at_suspend =
                sectors_written(env, disks).ok().map(|n| n.saturating_sub(rep.sectors_at_take));
        }
        env.sleep(if rep.suspend_seen_us.is_some() { AFTER_BARRIER_POLL } else { o.poll });
    }
}

// ---------------------------------------------------------------------------------------
// Metadata: a checkpoint directory holds memory.xl (a plain xl save file) and meta.json;
// a `save` FILE carries the same JSON inside the xl header's optional data, after the
// domain config (xl's restore reads the config and ignores the rest of the optional data,
// so plain `xl restore FILE` accepts the file).

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    pub version: u32,
    pub domain: String,
    pub domid: u32,
    /// Name of the disk checkpoint in every image.
    pub disk_checkpoint: String,
    pub disks: Vec<Disk>,
    pub created: u64,
}

pub const XL_MAGIC: &[u8; 32] = b"Xen saved domain, xl format\n \0 \r";
pub const XENSNAP_TAG: &[u8; 8] = b"XENSNAP1";

/// Rewrite an xl save stream from `src` to `dst` with `meta` appended to the header's
/// optional data.
pub fn embed_meta(src: &mut dyn Read, dst: &mut dyn Write, meta: &Meta) -> Result<(), String> {
    let mut hdr = [0u8; 48];
    src.read_exact(&mut hdr).map_err(|e| format!("reading the xl header: {e}"))?;
    if &hdr[..32] != XL_MAGIC {
        return Err("not an xl save file (bad magic)".into());
    }
    if u32::from_ne_bytes(hdr[32..36].try_into().unwrap()) != 0x0102_0304 {
        return Err("xl save file of another byte order".into());
    }
    let olen = u32::from_ne_bytes(hdr[44..48].try_into().unwrap()) as usize;
    let mut opt = vec![0u8; olen];
    src.read_exact(&mut opt).map_err(|e| format!("reading the xl optional data: {e}"))?;
    if olen == 0 {
        // xl reads the first optional chunk as the config: give it an empty one.
        opt.extend_from_slice(&0u32.to_ne_bytes());
    }
    let j = serde_json::to_vec(meta).map_err(|e| e.to_string())?;
    opt.extend_from_slice(XENSNAP_TAG);
    opt.extend_from_slice(&(j.len() as u32).to_ne_bytes());
    opt.extend_from_slice(&j);
    hdr[44..48].copy_from_slice(&(opt.len() as u32).to_ne_bytes());
    dst.write_all(&hdr).and_then(|_| dst.write_all(&opt)).map_err(|e| e.to_string())?;
    std::io::copy(src, dst).map_err(|e| format!("copying the memory stream: {e}"))?;
    Ok(())
}

/// The metadata embedded by [`embed_meta`], if any.
pub fn read_embedded_meta(src: &mut dyn Read) -> Result<Option<Meta>, String> {
    let mut hdr = [0u8; 48];
    src.read_exact(&mut hdr).map_err(|e| format!("reading the xl header: {e}"))?;
    if &hdr[..32] != XL_MAGIC {
        return Err("not an xl save file (bad magic)".into());
    }
    let olen = u32::from_ne_bytes(hdr[44..48].try_into().unwrap()) as usize;
    let mut opt = vec![0u8; olen];
    src.read_exact(&mut opt).map_err(|e| format!("reading the xl optional data: {e}"))?;
    if olen < 4 {
        return Ok(None);
    }
    let clen = u32::from_ne_bytes(opt[..4].try_into().unwrap()) as usize;
    let rest = opt.get(4 + clen..).unwrap_or(&[]);
    if rest.len() < 12 || &rest[..8] != XENSNAP_TAG {
        return Ok(None);
    }
    let jlen = u32::from_ne_bytes(rest[8..12].try_into().unwrap()) as usize;
    let j = rest.get(12..12 + jlen).ok_or("xensnap metadata truncated")?;
    serde_json::from_slice(j).map(Some).map_err(|e| format!("xensnap metadata: {e}"))
}

/// Checkpoint names become directory and qcow2 snapshot names.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        && !n.starts_with('.')
}

// ---------------------------------------------------------------------------------------
// The real environment: libxc-ffi + xl + the backends' control sockets.

mod real {
    use super::*;
    use libxc_ffi::{ShutdownReason, XenCtrl, XenStore};
    use std::process::{Child, Command, Stdio};

    pub struct RealEnv {
        pub xs: XenStore,
        pub xc: XenCtrl,
        pub xl: String,
        /// The @releaseDomain watch: None = not tried yet, Some(false) = unavailable.
        watching: std::cell::Cell<Option<bool>>,
        /// One control connection per backend socket, opened by the first request (the
        /// `status` of [`RealEnv::disks`], before xl starts) and kept: the barrier's requests
        /// need no connect, and the backend no new connection thread, inside the window.
        conns: Conns,
    }

    // Kept control connections, one per socket path (a request that could not be sent is
    // retried once on a new connection; after it was sent a failure is final).
    use xensnap_control::Conns;

    fn e2s<E: std::fmt::Display>(e: E) -> String {
        e.to_string()
    }

    impl RealEnv {
        pub fn open() -> Result<RealEnv, String> {
            Ok(RealEnv {
                xs: XenStore::open().map_err(|e| format!("xenstore: {e}"))?,
                xc: XenCtrl::open().map_err(|e| format!("xenctrl: {e}"))?,
                xl: std::env::var("XENSNAP_XL").unwrap_or_else(|_| "xl".into()),
                watching: std::cell::Cell::new(None),
                conns: Conns::new(BACKEND_TIMEOUT),
            })
        }

        /// DOM (name or id) → (domid, name).
        pub fn resolve(&self, dom: &str) -> Result<(u32, String), String> {
            if let Ok(id) = dom.parse::<u32>() {
                let name = self
                    .xs
                    .read_string(&format!("/local/domain/{id}/name"))
                    .map_err(|e| format!("domain {id}: {e}"))?;
                return Ok((id, name));
            }
            for id in self.xs.directory("/local/domain").map_err(e2s)? {
                if let Ok(n) = self.xs.read_string(&format!("/local/domain/{id}/name")) {
                    if n == dom {
                        if let Ok(i) = id.parse() {
                            return Ok((i, n));
                        }
                    }
                }
            }
            Err(format!("no running domain named '{dom}'"))
        }

        /// The domain's vbds; all must be served by blkback-snap.
        pub fn disks(&self, domid: u32) -> Result<Vec<Disk>, String> {
            let base = format!("/local/domain/{domid}/device/vbd");
            let devs = self.xs.directory(&base).unwrap_or_default();
            let mut out = Vec::new();
            for d in devs {
                let be = self.xs.read_string(&format!("{base}/{d}/backend")).map_err(e2s)?;
                let vdev = self.xs.read_string(&format!("{be}/dev")).unwrap_or_else(|_| d.clone());
                let sock = self.xs.read_string(&format!("{be}/xensnap-socket")).map_err(|_| {
                    format!(
                        "disk {vdev} ({be}) is not served by blkback-snap (no xensnap-socket): \
                         a consistent disk checkpoint is impossible"
                    )
                })?;
                let pid = self.xs.read_string(&format!("{be}/xensnap-pid")).ok().and_then(|p| p.parse().ok());
                let mut disk = Disk {
                    vdev: vdev.clone(),
                    backend: be,
                    socket: PathBuf::from(sock),
                    image: PathBuf::new(),
                    pid,
                    barrier_op: false,
                    hold_op: false,
                };
                let st = self.backend(&disk, &json!({"op": "status"}))?;
                disk.image = PathBuf::from(st["image"].as_str().unwrap_or_default());
                let has = |op: &str| st["ops"].as_array().is_some_and(|o| o.iter().any(|x| x == op));
                disk.barrier_op = has("checkpoint-barrier");
                disk.hold_op = has("durable-hold");
                if st["format"].as_str() != Some("qcow2") {
                    return Err(format!("disk {vdev}: image {} is not qcow2", disk.image.display()));
                }
                out.push(disk);
            }
            if out.is_empty() {
                return Err(format!("domain {domid} has no virtual disks"));
            }
            Ok(out)
        }
    }

    /// Start `xl ARGS... FILE` (the memory image last) with its stderr kept for the error
    /// message.
    pub(super) fn spawn_xl(xl: &str, args: &[&str], file: &Path) -> Result<XlJob, String> {
        // xl's messages go to an unlinked file next to the memory image, read after its
        // exit: a pipe would wake a reader thread for every progress line xl prints
        // while it copies memory, CPU taken from the copy inside the suspended window.
        let (stderr, err) = match stderr_file(file) {
            Ok(f) => match f.try_clone() {
                Ok(c) => (Stdio::from(c), XlErr::File(f)),
                Err(_) => (Stdio::piped(), XlErr::None),
            },
            Err(_) => (Stdio::piped(), XlErr::None),
        };
        let mut child = Command::new(xl)
            .args(args)
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{xl}: {e}"))?;
        let err = match (err, child.stderr.take()) {
            (XlErr::File(f), _) => XlErr::File(f),
            (_, Some(mut se)) => XlErr::Thread(std::thread::spawn(move || {
                let mut s = String::new();
                let _ = se.read_to_string(&mut s);
                s
            })),
            (_, None) => XlErr::None,
        };
        Ok(XlJob { child, err })
    }

    pub(super) struct XlJob {
        child: Child,
        err: XlErr,
    }

    /// Where xl's stderr goes.
    enum XlErr {
        /// An unlinked file, read after xl's exit.
        File(std::fs::File),
        /// A pipe and its reader thread (if no file could be made).
        Thread(std::thread::JoinHandle<String>),
        None,
    }

    impl XlErr {
        /// Everything xl wrote (call once xl has exited).
        fn take(&mut self) -> String {
            use std::io::{Seek, SeekFrom};
            match std::mem::replace(self, XlErr::None) {
                XlErr::File(mut f) => {
                    let mut s = String::new();
                    if f.seek(SeekFrom::Start(0)).is_ok() {
                        let _ = f.take(1 << 20).read_to_string(&mut s);
                    }
                    s
                }
                XlErr::Thread(h) => h.join().unwrap_or_default(),
                XlErr::None => String::new(),
            }
        }
    }

    /// A new file for xl's stderr in the memory image's directory, already unlinked.
    fn stderr_file(mem: &Path) -> std::io::Result<std::fs::File> {
        let mut name = mem.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".xl-stderr.{}", std::process::id()));
        let p = mem.with_file_name(name);
        let f = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&p)?;
        std::fs::remove_file(&p)?;
        Ok(f)
    }

    impl SaveJob for XlJob {
        fn poll(&mut self) -> Option<Result<(), String>> {
            match self.child.try_wait() {
                Ok(None) => None,
                Ok(Some(st)) => {
                    let msg = self.err.take();
                    if st.success() {
                        Some(Ok(()))
                    } else {
                        Some(Err(format!("{st}: {}", msg.trim().replace('\n', " | "))))
                    }
                }
                Err(e) => Some(Err(e.to_string())),
            }
        }
        fn wait(&mut self) -> Result<(), String> {
            let st = self.child.wait().map_err(e2s)?;
            let msg = self.err.take();
            if st.success() {
                Ok(())
            } else {
                Err(format!("{st}: {}", msg.trim().replace('\n', " | ")))
            }
        }
    }

    pub fn run_xl(xl: &str, args: &[&str]) -> Result<String, String> {
        let out = Command::new(xl).args(args).stdin(Stdio::null()).output().map_err(|e| format!("{xl}: {e}"))?;
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{xl} {}: {}: {}", args.join(" "), out.status, text.trim().replace('\n', " | ")))
        }
    }

    impl Env for RealEnv {
        fn domain_state(&self, domid: u32) -> DomState {
            match self.xc.domain_info(domid) {
                Err(_) => DomState::Gone,
                Ok(i) if i.dying => DomState::Gone,
                Ok(i) => match i.shutdown {
                    Some(ShutdownReason::Suspend) => DomState::Suspended,
                    Some(_) => DomState::ShutDown,
                    None if i.paused => DomState::Paused,
                    None => DomState::Running,
                },
            }
        }
        fn backend(&self, disk: &Disk, req: &Value) -> Result<Value, String> {
            Ok(self.conns.call(&disk.socket, req)?)
        }
        fn start_save(&self, domid: u32, file: &Path, mode: Mode) -> Result<Box<dyn SaveJob>, String> {
            let flag = match mode {
                Mode::Checkpoint => "-c",
                Mode::Save => "-p",
            };
            Ok(Box::new(spawn_xl(&self.xl, &["save", flag, &domid.to_string()], file)?))
        }
        fn unpause(&self, domid: u32) -> Result<(), String> {
            self.xc.unpause(domid).map_err(e2s)
        }
        fn destroy(&self, domid: u32) -> Result<(), String> {
            run_xl(&self.xl, &["destroy", &domid.to_string()]).map(|_| ())
        }
        fn remove_file(&self, p: &Path) {
            let _ = std::fs::remove_file(p);
        }
        fn sleep(&self, d: Duration) {
            std::thread::sleep(d)
        }
        fn watch_changes(&self) {
            if self.watching.get().is_some() {
                return;
            }
            let ok = self.xs.watch("@releaseDomain", "xl-snap-suspend").is_ok();
            if !ok {
                tracing::warn!("no @releaseDomain watch; polling the domain instead");
            }
            self.watching.set(Some(ok));
            // xenstored fires a new watch once right away: take that event now, before xl
            // starts, rather than waking up for it while xl runs
            if ok {
                if let Ok(Some(_)) = self.xs.wait_watch(Some(Duration::from_millis(100))) {
                    while let Ok(Some(_)) = self.xs.check_watch() {}
                }
            }
        }
        fn wait_change(&self, max: Duration) {
            self.watch_changes();
            if self.watching.get() != Some(true) {
                return std::thread::sleep(max);
            }
            match self.xs.wait_watch(Some(max)) {
                // drain what else is queued: the caller looks at the domain anyway
                Ok(Some(_)) => while let Ok(Some(_)) = self.xs.check_watch() {},
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("@releaseDomain watch failed ({e}); polling instead");
                    self.watching.set(Some(false));
                    std::thread::sleep(max)
                }
            }
        }
        fn now(&self) -> Instant {
            Instant::now()
        }
        fn cpu_ns(&self, pid: Option<u32>) -> Option<u64> {
            match pid {
                None => Some(xensnap_control::process_cpu_ns()),
                Some(p) => crate::cpu::process_cpu_ns(p),
            }
        }
        fn mtime(&self, p: &Path) -> Option<SystemTime> {
            std::fs::metadata(p).and_then(|m| m.modified()).ok()
        }
    }

    const BACKEND_TIMEOUT: Duration = Duration::from_secs(30);
}

// ---------------------------------------------------------------------------------------
// Offline image work (the domain is gone, its serving process exited).

fn with_image<T>(
    image: &Path,
    f: impl FnOnce(&mut xensnap_qcow2::Qcow2) -> Result<T, xensnap_qcow2::Error>,
) -> Result<T, String> {
    let lock = std::fs::File::open(image).map_err(|e| format!("{}: {e}", image.display()))?;
    // The serving process may take a moment to exit after the domain is destroyed.
    let t0 = Instant::now();
    loop {
        match lock.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if t0.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(format!("{}: still in use by another process ({e:?})", image.display())),
        }
    }
    let mut img = xensnap_qcow2::Qcow2::open_file(image, &xensnap_qcow2::OpenOptions { read_only: false })
        .map_err(|e| format!("{}: {e}", image.display()))?;
    let r = f(&mut img).map_err(|e| format!("{}: {e}", image.display()))?;
    img.close().map_err(|e| format!("{}: {e}", image.display()))?;
    Ok(r)
}

fn wait_pids_gone(disks: &[Disk], limit: Duration) {
    let t0 = Instant::now();
    for d in disks {
        if let Some(p) = d.pid {
            while Path::new(&format!("/proc/{p}")).exists() && t0.elapsed() < limit {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn state_dir() -> PathBuf {
    PathBuf::from(std::env::var("XENSNAP_STATE_DIR").unwrap_or_else(|_| "/var/lib/xensnap/checkpoints".into()))
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn other(e: impl std::fmt::Display) -> CliError {
    CliError::Other(e.to_string())
}

fn report_line(what: &str, rep: &BarrierReport) {
    println!(
        "{what}: disk barrier {} us (quiesce {} us, take {} us, drained {}) inside the suspended window: {}; suspend seen {} ms after xl start; xl save {} ms",
        rep.barrier_us,
        rep.quiesce_us,
        rep.take_us,
        rep.drained,
        if rep.inside_window { "yes" } else { "NO" },
        rep.suspend_seen_after_us / 1000,
        rep.xl_save_us / 1000
    );
    if let Some(b) = rep.added_bound_us {
        let o = |v: Option<u64>| v.map_or("?".to_string(), |v| v.to_string());
        println!(
            "{what}: disk part's bound on the added downtime {b} us (CPU in the window: xl-snap {} us, blkback-snap {} us; barrier after the copy {} us; xl-snap before the suspend {} us); copy ended {} ms, xl exited {} ms after the suspend",
            o(rep.cpu_own_window_us),
            o(rep.cpu_backend_window_us),
            o(rep.barrier_after_copy_us),
            o(rep.cpu_own_pre_us),
            rep.copy_end_us.map_or("?".to_string(), |c| (c / 1000).to_string()),
            rep.xl_exit_us / 1000,
        );
    }
    println!("XENSNAP-BARRIER {}", serde_json::to_string(rep).unwrap_or_default());
}

fn restore_from(env: &real::RealEnv, meta: &Meta, file: &Path, paused: bool) -> Result<(), CliError> {
    if env.resolve(&meta.domain).is_ok() {
        return Err(other(format!(
            "step 'restore' refused: a domain named '{}' is running; destroy it first",
            meta.domain
        )));
    }
    wait_pids_gone(&meta.disks, Duration::from_secs(30));
    let mut seen = std::collections::BTreeSet::new();
    for d in &meta.disks {
        if !seen.insert(d.image.clone()) {
            continue;
        }
        let name = meta.disk_checkpoint.clone();
        with_image(&d.image, |img| img.checkpoint_revert(&name))
            .map_err(|e| other(format!("step 'disk-revert' failed on {}: {e} (memory not restored)", d.vdev)))?;
    }
    let f = file.to_string_lossy().to_string();
    let mut args = vec!["restore"];
    if paused {
        args.push("-p");
    }
    args.push(&f);
    real::run_xl(&env.xl, &args).map_err(|e| {
        other(format!("step 'memory-restore' failed (disks already reverted to '{}'): {e}", meta.disk_checkpoint))
    })?;
    Ok(())
}

pub fn run(cmd: DomainCmd) -> Result<(), CliError> {
    let opts = Opts::default();
    match cmd {
        DomainCmd::Checkpoint(a) => {
            let env = real::RealEnv::open().map_err(other)?;
            let (domid, dname) = env.resolve(&a.dom).map_err(other)?;
            let name = a.name.unwrap_or_else(|| format!("ck-{}", now_secs()));
            if !valid_name(&name) {
                return Err(other(format!("bad checkpoint name '{name}' (letters, digits, -_.:)")));
            }
            let dir = state_dir().join(&dname).join(&name);
            if dir.exists() {
                return Err(other(format!("checkpoint '{name}' of {dname} exists ({})", dir.display())));
            }
            let disks = env.disks(domid).map_err(|e| other(format!("step 'find-disks' failed: {e}")))?;
            std::fs::create_dir_all(&dir).map_err(|e| other(format!("{}: {e}", dir.display())))?;
            let mem = dir.join("memory.xl");
            let r = match a.unsafe_disk_before_ms {
                Some(ms) => {
                    let o = UnsafeOpts {
                        before: Duration::from_millis(ms),
                        min_written_sectors: a.unsafe_min_written_sectors,
                        write_wait: Duration::from_millis(a.unsafe_write_wait_ms),
                        poll: Duration::from_millis(5),
                    };
                    unsafe_disk_first(&env, domid, &disks, &mem, &name, &o).map(|u| {
                        println!("XENSNAP-UNSAFE {}", serde_json::to_string(&u).unwrap_or_default());
                        BarrierReport::default()
                    })
                }
                None => snapshot(&env, domid, &disks, &mem, &name, Mode::Checkpoint, &opts),
            };
            let rep = match r {
                Ok(rep) => rep,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(other(format!("checkpoint '{name}' of {dname}: {e}")));
                }
            };
            let meta = Meta {
                version: 1,
                domain: dname.clone(),
                domid,
                disk_checkpoint: name.clone(),
                disks,
                created: now_secs(),
            };
            std::fs::write(dir.join("meta.json"), serde_json::to_vec_pretty(&meta).unwrap())
                .map_err(|e| other(format!("step 'write-metadata' failed: {e}")))?;
            report_line(&format!("checkpoint '{name}' of {dname} (domid {domid})"), &rep);
            Ok(())
        }
        DomainCmd::List { dom } => {
            let dname = match real::RealEnv::open().and_then(|e| e.resolve(&dom)) {
                Ok((_, n)) => n,
                Err(_) => dom,
            };
            let dir = state_dir().join(&dname);
            let mut rows = Vec::new();
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let p = e.path().join("meta.json");
                if let Ok(m) = std::fs::read(&p)
                    .map_err(|e| e.to_string())
                    .and_then(|b| serde_json::from_slice::<Meta>(&b).map_err(|e| e.to_string()))
                {
                    let size = std::fs::metadata(e.path().join("memory.xl")).map(|m| m.len()).unwrap_or(0);
                    rows.push((m.created, e.file_name().to_string_lossy().to_string(), size, m.disks.len()));
                }
            }
            rows.sort();
            println!("{:<24} {:>12} {:>10} {:>6}", "NAME", "CREATED", "MEMORY", "DISKS");
            for (c, n, s, d) in rows {
                println!("{n:<24} {c:>12} {:>9}M {d:>6}", s >> 20);
            }
            Ok(())
        }
        DomainCmd::Delete { dom, name } => {
            let env = real::RealEnv::open().ok();
            let (domid, dname) = match env.as_ref().map(|e| e.resolve(&dom)) {
                Some(Ok((i, n))) => (Some(i), n),
                _ => (None, dom),
            };
            let dir = state_dir().join(&dname).join(&name);
            let meta: Meta = serde_json::from_slice(
                &std::fs::read(dir.join("meta.json"))
                    .map_err(|e| other(format!("checkpoint '{name}' of {dname}: {e}")))?,
            )
            .map_err(other)?;
            let live = match (&env, domid) {
                (Some(e), Some(id)) => e.disks(id).ok(),
                _ => None,
            };
            for d in &meta.disks {
                let served = live.as_ref().and_then(|l| l.iter().find(|x| x.image == d.image));
                let r = match (served, &env) {
                    (Some(s), Some(e)) => e
                        .backend(s, &json!({"op": "checkpoint-delete", "checkpoint": meta.disk_checkpoint}))
                        .map(|_| ()),
                    _ => with_image(&d.image, |img| img.checkpoint_delete(&meta.disk_checkpoint)),
                };
                if let Err(e) = r {
                    return Err(other(format!("step 'disk-delete' failed on {}: {e} (memory image kept)", d.vdev)));
                }
            }
            std::fs::remove_dir_all(&dir).map_err(other)?;
            println!("deleted checkpoint '{name}' of {dname}");
            Ok(())
        }
        DomainCmd::Revert { dom, name, paused } => {
            let env = real::RealEnv::open().map_err(other)?;
            let running = env.resolve(&dom).ok();
            let dname = running.as_ref().map(|r| r.1.clone()).unwrap_or(dom);
            let dir = state_dir().join(&dname).join(&name);
            let meta: Meta = serde_json::from_slice(
                &std::fs::read(dir.join("meta.json"))
                    .map_err(|e| other(format!("checkpoint '{name}' of {dname}: {e}")))?,
            )
            .map_err(other)?;
            if let Some((id, _)) = running {
                let live = env.disks(id).unwrap_or_default();
                env.destroy(id).map_err(|e| other(format!("step 'destroy-running-domain' failed: {e}")))?;
                wait_pids_gone(&live, Duration::from_secs(30));
            }
            restore_from(&env, &meta, &dir.join("memory.xl"), paused)?;
            println!("reverted {dname} to checkpoint '{name}'");
            Ok(())
        }
        DomainCmd::Save { dom, file } => {
            let env = real::RealEnv::open().map_err(other)?;
            let (domid, dname) = env.resolve(&dom).map_err(other)?;
            let disks = env.disks(domid).map_err(|e| other(format!("step 'find-disks' failed: {e}")))?;
            let name = format!("save-{dname}-{}", now_secs());
            let mut part = file.clone().into_os_string();
            part.push(".xl-partial");
            let part = PathBuf::from(part);
            let rep = snapshot(&env, domid, &disks, &part, &name, Mode::Save, &opts)
                .map_err(|e| other(format!("save of {dname}: {e}")))?;
            let meta = Meta {
                version: 1,
                domain: dname.clone(),
                domid,
                disk_checkpoint: name.clone(),
                disks: disks.clone(),
                created: now_secs(),
            };
            let fin = (|| -> Result<(), String> {
                let mut src = std::fs::File::open(&part).map_err(|e| e.to_string())?;
                let mut dst = std::io::BufWriter::new(
                    std::fs::File::create(&file).map_err(|e| format!("{}: {e}", file.display()))?,
                );
                embed_meta(&mut src, &mut dst, &meta)?;
                dst.into_inner().map_err(|e| e.to_string())?.sync_all().map_err(|e| e.to_string())
            })();
            if let Err(e) = fin {
                let _ = std::fs::remove_file(&file);
                return Err(other(abort_save(&env, domid, &disks, &part, &name, "write-save-file", e)));
            }
            let _ = std::fs::remove_file(&part);
            env.destroy(domid).map_err(|e| {
                other(format!("step 'destroy' failed (the save file {} is complete): {e}", file.display()))
            })?;
            report_line(&format!("saved {dname} to {} (disk checkpoint '{name}')", file.display()), &rep);
            Ok(())
        }
        DomainCmd::Restore { file, paused } => {
            let env = real::RealEnv::open().map_err(other)?;
            let mut f = std::fs::File::open(&file).map_err(|e| other(format!("{}: {e}", file.display())))?;
            let meta = match read_embedded_meta(&mut f).map_err(other)? {
                Some(m) => m,
                None => {
                    let mut side = file.clone().into_os_string();
                    side.push(".xensnap.json");
                    let b = std::fs::read(&side).map_err(|_| {
                        other(format!(
                            "{}: no xensnap metadata (not written by xl-snap save; use xl restore)",
                            file.display()
                        ))
                    })?;
                    serde_json::from_slice(&b).map_err(other)?
                }
            };
            restore_from(&env, &meta, &file, paused)?;
            println!("restored {} from {} (disks reverted to '{}')", meta.domain, file.display(), meta.disk_checkpoint);
            Ok(())
        }
    }
}
