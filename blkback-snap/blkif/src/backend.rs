//! The per-ring backend: consume requests, do the I/O, produce responses.
//!
//! [`BlkifRing`] owns one shared ring of one frontend. It can be driven by a dedicated
//! thread ([`BlkifRing::run`] / [`BlkifRing::spawn`]) or by any poll loop that calls
//! [`BlkifRing::poll`] whenever the event channel fires (and after `resume()`).
//!
//! Two ways to execute requests:
//! - **inline** ([`BlkifRing::poll`], and [`BlkifRing::run`] with `Features::workers == 0`):
//!   one at a time in ring order, in the calling thread;
//! - **worker pool** ([`BlkifRing::run`] / [`BlkifRing::spawn`] with `workers = N > 0`): the
//!   thread in `run` consumes and checks requests and hands the valid ones to N I/O threads,
//!   which do the grant copies and the disk I/O concurrently and publish each response as they
//!   complete (out of order: responses carry the request's id). blkif orders nothing between
//!   requests in flight, except FLUSH_DISKCACHE and WRITE_BARRIER: such a request is started
//!   only after every request consumed before it has completed and been answered, and no
//!   request after it is started until it completed. So a flush covers every write completed
//!   before it, and a barrier is a full barrier, as blkif.h describes them.
//!
//! "In flight" = consumed, response not yet published; `quiesce()` waits until none is.
//!
//! Requests run in the ring's own thread are *merged* when the frontend queued several at
//! once: a read (or a write without flushes) looks at the requests right behind it, and a
//! run of same-direction requests whose sectors follow each other, every segment mapped
//! persistently, goes to the device as one `read_into`/`write_from` (a 1 MiB guest I/O that
//! blkfront splits into 8 requests of 128 KiB: one vectored system call instead of 8). Each
//! request still gets its own response; a failed merged call is repeated request by request.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use xensnap_blockdev::{BlockDevice, BlockError};

use crate::abi::*;
use crate::guestbuf::GuestPages;
use crate::mem::{EventChannel, GrantError, GrantMemory, GrantPage, GrantSeg, SharedRing};
use crate::request::*;

/// What this backend offers to frontends (published in xenstore by [`crate::xenbus`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    /// "feature-flush-cache".
    pub flush: bool,
    /// "feature-barrier". A barrier waits for every earlier request, then runs as
    /// flush + write + flush before any later request starts.
    pub barrier: bool,
    /// "feature-discard".
    pub discard: bool,
    /// "discard-secure" (implemented as write-zeroes with unmap).
    pub discard_secure: bool,
    /// "discard-granularity" in bytes.
    pub discard_granularity: u32,
    /// "feature-max-indirect-segments" (0 = no indirect descriptors; capped at 4096).
    pub max_indirect_segments: u32,
    /// "max-ring-page-order" (0 = single-page rings only; capped at 4).
    pub max_ring_page_order: u32,
    /// I/O threads per ring used by [`BlkifRing::run`] (0 = execute inline, one request at a
    /// time; capped at [`MAX_WORKERS`]). Not published to the frontend.
    pub workers: u32,
    /// With a pool: hand a request to an I/O thread only while that is cheaper than running it
    /// in the ring's thread, judged by moving averages of the execution time of requests run
    /// in the ring's thread and of the hand-off latency (submit to start on an I/O thread);
    /// one eligible request in [`OFFLOAD_PROBE`] is handed off anyway to keep the latter
    /// measured. Off: every request but the last visible one is handed off.
    pub adaptive_offload: bool,
    /// "feature-persistent": offer persistent grants. Used on a ring only when the frontend
    /// also sets "feature-persistent" ([`RingParams::persistent`]).
    pub persistent: bool,
    /// Most grants kept mapped per ring when persistent grants are in use (Linux blkback's
    /// `max_persistent_grants`, 1056 = 32 requests x (32 segments + 1 indirect page)).
    /// Segments beyond go by grant copy.
    pub max_persistent_grants: u32,
}

/// Default of [`Features::max_persistent_grants`].
pub const MAX_PERSISTENT_GRANTS: u32 = 1056;

/// See [`Features::adaptive_offload`].
pub const OFFLOAD_PROBE: u64 = 16;

/// Upper bound of [`Features::workers`].
pub const MAX_WORKERS: u32 = 64;

/// At most this many requests of one burst go to the device as one call
/// (see [`BlkifRing::poll`]).
pub const MERGE_MAX: usize = 32;

/// At most this many segments in one merged call (1 MiB of 4 KiB segments).
pub const MERGE_SEGS: usize = 256;

impl Default for Features {
    fn default() -> Self {
        Features {
            flush: true,
            barrier: true,
            discard: true,
            discard_secure: false,
            discard_granularity: PAGE_SIZE as u32,
            max_indirect_segments: 256,
            max_ring_page_order: MAX_RING_PAGE_ORDER,
            workers: 4,
            adaptive_offload: true,
            persistent: true,
            max_persistent_grants: MAX_PERSISTENT_GRANTS,
        }
    }
}

impl Features {
    /// Validation limits for a device.
    pub fn limits(&self, device: &dyn BlockDevice) -> Limits {
        Limits {
            sectors: device.size() / SECTOR_SIZE,
            read_only: device.read_only(),
            flush: self.flush,
            barrier: self.barrier,
            discard: self.discard,
            discard_secure: self.discard_secure,
            max_indirect_segments: self.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS_LIMIT),
        }
    }
}

/// Everything needed to serve one ring.
pub struct RingParams {
    /// The frontend's domain (owner of the grants).
    pub domid: u16,
    pub abi: Abi,
    /// The mapped ring pages (`nr_pages * PAGE_SIZE` bytes).
    pub ring: Arc<dyn SharedRing>,
    pub grants: Arc<dyn GrantMemory>,
    pub evtchn: Arc<dyn EventChannel>,
    pub device: Arc<dyn BlockDevice>,
    pub features: Features,
    /// Persistent grants negotiated: we offered them (`features.persistent`) and the frontend
    /// wrote "feature-persistent" = 1. Data and indirect pages are then mapped once and kept
    /// (up to `features.max_persistent_grants`) until the ring is stopped.
    pub persistent: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RingError {
    #[error("shared ring of {0} bytes holds no entry")]
    TooSmall(usize),
}

/// Outcome of one [`BlkifRing::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Poll {
    /// No work left; `req_event` is armed, the frontend will send an event for new requests.
    Idle,
    /// The work budget ran out with requests still pending; call `poll` again.
    Busy,
    /// The ring is quiesced; pending requests stay on the ring until `resume()`.
    Quiesced,
    /// The ring was stopped with [`BlkifRing::stop`].
    Stopped,
    /// The frontend broke the protocol; the ring is no longer served.
    Broken,
}

/// Counters (monotonic).
#[derive(Debug, Default)]
pub struct RingStats {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub errors: AtomicU64,
    pub unsupported: AtomicU64,
    pub notifications: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Passes over the ring by the serving thread (wake-ups that found or did work).
    pub polls: AtomicU64,
    /// Requests handed to the I/O threads (the rest ran in the ring's own thread).
    pub offloaded: AtomicU64,
    /// Requests served together with adjacent ones of the same burst by one device call.
    pub merged: AtomicU64,
    /// Most requests in flight at once.
    pub peak_in_flight: AtomicU64,
    /// Persistent grants: segment (or indirect page) found mapped in the cache.
    pub persistent_hits: AtomicU64,
    /// Persistent grants: grant newly mapped into the cache.
    pub persistent_misses: AtomicU64,
    /// Persistent grants negotiated, but the segment went by grant copy (cache full, or the
    /// grant could not be mapped read-write).
    pub persistent_fallbacks: AtomicU64,
}

/// A copy of [`RingStats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub requests: u64,
    pub ok: u64,
    pub errors: u64,
    pub unsupported: u64,
    pub notifications: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub polls: u64,
    pub offloaded: u64,
    pub merged: u64,
    pub peak_in_flight: u64,
    /// Whether the ring uses persistent grants (1) or not (0); summed over rings by callers.
    pub persistent_rings: u64,
    /// Grants mapped in the persistent cache now.
    pub persistent_grants: u64,
    pub persistent_hits: u64,
    pub persistent_misses: u64,
    pub persistent_fallbacks: u64,
}

/// Scratch buffers of one executing thread.
#[derive(Default)]
struct Scratch {
    buf: Vec<u8>,
    seg_buf: Vec<u8>,
    /// Bytes of the segments that go by grant copy when others are mapped persistently.
    copy_buf: Vec<u8>,
}

impl Scratch {
    /// The data buffer for a request of `len` bytes. Not cleared: every byte of it is
    /// overwritten by the disk read or the grant copy before it is used, and on a failure of
    /// either it is not used at all. (Zeroing up to 16 MiB per request costs a full pass over
    /// the memory.) Scratch buffers belong to one ring's threads, so even a device that broke
    /// its `read_at` contract could only hand back bytes of the same frontend's requests.
    fn buffer(&mut self, len: usize) -> &mut [u8] {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        &mut self.buf[..len]
    }
}

/// The consumer side (the thread that reads requests off the ring).
struct Consumer {
    req_cons: u32,
    /// Requests that could have been handed off (for the adaptive probe).
    eligible: u64,
    /// Requests executed in this thread (1 in 8 is timed for the adaptive policy).
    ran: u64,
    broken: Option<String>,
    scratch: Scratch,
}

/// The producer side of responses (any thread that completes a request).
struct Producer {
    rsp_prod_pvt: u32,
    /// `rsp_prod` as last published.
    rsp_pushed: u32,
}

struct Gate {
    quiesced: bool,
    stopped: bool,
    /// Requests consumed whose response is not yet published.
    in_flight: usize,
    /// Threads waiting on `gate_cv` (quiesce, a flush/barrier waiting alone).
    waiters: usize,
}

/// A checked request handed to the worker pool.
struct Job {
    queued: Instant,
    req: Checked,
    sectors: u64,
}

#[derive(Default)]
struct JobQueue {
    q: VecDeque<Job>,
    closed: bool,
    /// I/O threads waiting for a job (a notify costs a system call; only when one waits).
    idle: usize,
}

/// The job queue of [`BlkifRing::run`]'s worker pool (lives on `run`'s stack).
#[derive(Default)]
struct Pool {
    jobs: Mutex<JobQueue>,
    cv: Condvar,
}

impl Pool {
    fn submit(&self, job: Job) {
        let mut g = lock(&self.jobs);
        g.q.push_back(job);
        if g.idle > 0 {
            self.cv.notify_one();
        }
    }
    /// Next job; `None` once the queue is closed and empty.
    fn next(&self) -> Option<Job> {
        let mut g = lock(&self.jobs);
        loop {
            if let Some(j) = g.q.pop_front() {
                return Some(j);
            }
            if g.closed {
                return None;
            }
            g.idle += 1;
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            g.idle -= 1;
        }
    }
    fn close(&self) {
        lock(&self.jobs).closed = true;
        self.cv.notify_all();
    }
}

/// A consumed request: checked and ready to execute, or already answered by its rejection.
enum Admitted {
    Io(Checked),
    Rejected { id: u64, op: u8, status: i16 },
}

/// The backend of one blkif ring.
pub struct BlkifRing {
    domid: u16,
    geom: RingGeometry,
    ring: Arc<dyn SharedRing>,
    grants: Arc<dyn GrantMemory>,
    evtchn: Arc<dyn EventChannel>,
    device: Arc<dyn BlockDevice>,
    features: Features,
    /// Responses the ring's thread writes before a push (and a possible notification).
    batch: u32,
    /// Requests consumed per `poll` before it returns `Busy`.
    budget: u32,
    cons: Mutex<Consumer>,
    prod: Mutex<Producer>,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    stats: RingStats,
    /// Moving averages (ns): execution in the ring's thread; hand-off latency to the pool.
    exec_ns: AtomicU64,
    handoff_ns: AtomicU64,
    /// Persistent grants (if negotiated): gref -> page mapped read-write, at most
    /// `features.max_persistent_grants` entries; emptied (unmapped) when `run` returns and by
    /// [`BlkifRing::unmap_persistent`].
    pcache: Option<Mutex<HashMap<u32, Arc<dyn GrantPage>>>>,
}

/// Guest pages of a request's segments: the mapped page of each, or `None` (grant copy).
type Pages = Vec<Option<Arc<dyn GrantPage>>>;

/// `avg += (sample - avg) / 8`, racy by design (a lost update only delays the average).
fn ewma(a: &AtomicU64, sample: Duration) {
    let s = sample.as_nanos().min(u128::from(u64::MAX / 2)) as u64;
    let old = a.load(Ordering::Relaxed);
    a.store(old - old / 8 + s / 8, Ordering::Relaxed);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The protected state is kept consistent at every unlock point; a panic elsewhere must not
    // take the ring down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn block_status(e: &BlockError) -> i16 {
    match e {
        BlockError::Unsupported(_) => BLKIF_RSP_EOPNOTSUPP,
        _ => BLKIF_RSP_ERROR,
    }
}

/// Requests that order against everything else in flight (see the module docs).
fn is_barrier(req: &Checked) -> bool {
    match req {
        Checked::Flush { .. } => true,
        Checked::Write { flush_before, flush_after, .. } => *flush_before || *flush_after,
        Checked::Read { .. } | Checked::Discard { .. } => false,
    }
}

impl BlkifRing {
    /// Attach to a ring the frontend initialised. Like `BACK_RING_ATTACH`, consumption starts
    /// at the ring's current `rsp_prod` (0 for a fresh ring), so a backend can re-attach to a
    /// live ring whose earlier requests were all answered.
    pub fn new(p: RingParams) -> Result<BlkifRing, RingError> {
        let nr_pages = p.ring.len() / PAGE_SIZE;
        let geom = RingGeometry::new(p.abi, nr_pages).ok_or(RingError::TooSmall(p.ring.len()))?;
        let start = p.ring.load_u32_acquire(SRING_RSP_PROD);
        let persistent = p.persistent && p.features.persistent && p.features.max_persistent_grants > 0;
        Ok(BlkifRing {
            domid: p.domid,
            geom,
            ring: p.ring,
            grants: p.grants,
            evtchn: p.evtchn,
            device: p.device,
            features: p.features,
            batch: 16.min(geom.size),
            budget: 4 * geom.size,
            cons: Mutex::new(Consumer {
                req_cons: start,
                eligible: 0,
                ran: 0,
                broken: None,
                scratch: Scratch::default(),
            }),
            prod: Mutex::new(Producer { rsp_prod_pvt: start, rsp_pushed: start }),
            gate: Mutex::new(Gate { quiesced: false, stopped: false, in_flight: 0, waiters: 0 }),
            gate_cv: Condvar::new(),
            stats: RingStats::default(),
            exec_ns: AtomicU64::new(0),
            handoff_ns: AtomicU64::new(0),
            pcache: persistent.then(|| Mutex::new(HashMap::new())),
        })
    }

    pub fn geometry(&self) -> RingGeometry {
        self.geom
    }

    pub fn features(&self) -> &Features {
        &self.features
    }

    /// Why the ring was marked broken, if it was.
    pub fn broken(&self) -> Option<String> {
        lock(&self.cons).broken.clone()
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.stats;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            requests: l(&s.requests),
            ok: l(&s.ok),
            errors: l(&s.errors),
            unsupported: l(&s.unsupported),
            notifications: l(&s.notifications),
            bytes_read: l(&s.bytes_read),
            bytes_written: l(&s.bytes_written),
            polls: l(&s.polls),
            offloaded: l(&s.offloaded),
            merged: l(&s.merged),
            peak_in_flight: l(&s.peak_in_flight),
            persistent_rings: u64::from(self.pcache.is_some()),
            persistent_grants: self.pcache.as_ref().map_or(0, |c| lock(c).len() as u64),
            persistent_hits: l(&s.persistent_hits),
            persistent_misses: l(&s.persistent_misses),
            persistent_fallbacks: l(&s.persistent_fallbacks),
        }
    }

    /// Whether this ring uses persistent grants.
    pub fn persistent(&self) -> bool {
        self.pcache.is_some()
    }

    /// Unmap every persistent grant (the ring is going away; [`BlkifRing::run`] does this when
    /// it returns). Pages still used by a request in progress are unmapped when it finishes.
    /// Returns how many were in the cache.
    pub fn unmap_persistent(&self) -> usize {
        match &self.pcache {
            None => 0,
            Some(c) => {
                let old = std::mem::take(&mut *lock(c));
                let n = old.len();
                drop(old);
                if n > 0 {
                    tracing::debug!(domid = self.domid, grants = n, "persistent grants unmapped");
                }
                n
            }
        }
    }

    /// Private indices `(req_cons, rsp_prod_pvt)`.
    pub fn indices(&self) -> (u32, u32) {
        let c = lock(&self.cons);
        let p = lock(&self.prod);
        (c.req_cons, p.rsp_prod_pvt)
    }

    /// Requests consumed whose response is not yet published.
    pub fn in_flight(&self) -> usize {
        lock(&self.gate).in_flight
    }

    // ---- checkpoint barrier -------------------------------------------------------------

    /// Stop admitting requests and wait until every admitted one has completed and its
    /// response is published on the ring. Returns how many were drained. Requests the
    /// frontend queues meanwhile stay on the ring until [`BlkifRing::resume`].
    pub fn quiesce(&self) -> usize {
        let mut g = lock(&self.gate);
        g.quiesced = true;
        let drained = g.in_flight;
        g.waiters += 1;
        while g.in_flight > 0 {
            g = self.gate_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.waiters -= 1;
        drained
    }

    /// Like [`BlkifRing::quiesce`], but gives up after `timeout` (the ring stays quiesced;
    /// `Err` carries the number still in flight).
    pub fn quiesce_timeout(&self, timeout: Duration) -> Result<usize, usize> {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.gate);
        g.quiesced = true;
        let drained = g.in_flight;
        g.waiters += 1;
        while g.in_flight > 0 {
            let now = Instant::now();
            if now >= deadline {
                g.waiters -= 1;
                return Err(g.in_flight);
            }
            g = self.gate_cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        g.waiters -= 1;
        Ok(drained)
    }

    /// Re-open the ring after [`BlkifRing::quiesce`] and wake the worker so requests queued
    /// meanwhile are served.
    pub fn resume(&self) {
        lock(&self.gate).quiesced = false;
        self.evtchn.interrupt();
    }

    pub fn is_quiesced(&self) -> bool {
        lock(&self.gate).quiesced
    }

    /// Make the worker ([`BlkifRing::run`]) return; `poll` returns `Stopped` from now on.
    /// Requests in flight complete first (`run` returns after its I/O threads finished).
    pub fn stop(&self) {
        lock(&self.gate).stopped = true;
        self.gate_cv.notify_all();
        self.evtchn.interrupt();
    }

    // ---- driving -------------------------------------------------------------------------

    /// Serve the ring until [`BlkifRing::stop`] or until the frontend breaks it. With
    /// `Features::workers > 0` requests run on that many I/O threads (scoped to this call:
    /// they finish every request already handed to them before `run` returns).
    pub fn run(&self) -> Poll {
        let end = self.run_inner();
        // Every request consumed has completed: nothing uses the mappings any more.
        self.unmap_persistent();
        end
    }

    fn run_inner(&self) -> Poll {
        let want = self.features.workers.min(MAX_WORKERS) as usize;
        if want == 0 {
            return self.drive(None);
        }
        let pool = Pool::default();
        let base = std::thread::current().name().unwrap_or("blkif").to_string();
        std::thread::scope(|s| {
            let mut started = 0;
            for i in 0..want {
                let pool = &pool;
                match std::thread::Builder::new().name(format!("{base}-io{i}")).spawn_scoped(s, move || self.work(pool))
                {
                    Ok(_) => started += 1,
                    Err(e) => {
                        tracing::warn!(domid = self.domid, "starting I/O thread {i}: {e}");
                        break;
                    }
                }
            }
            let end = self.drive(if started > 0 { Some(&pool) } else { None });
            pool.close();
            end
        })
    }

    /// [`BlkifRing::run`] on a new thread.
    pub fn spawn(self: &Arc<Self>, name: String) -> std::io::Result<std::thread::JoinHandle<Poll>> {
        let me = Arc::clone(self);
        std::thread::Builder::new().name(name).spawn(move || me.run())
    }

    fn drive(&self, pool: Option<&Pool>) -> Poll {
        loop {
            match self.poll_with(pool) {
                Poll::Busy => continue,
                Poll::Idle | Poll::Quiesced => {
                    self.evtchn.wait(None);
                }
                end @ (Poll::Stopped | Poll::Broken) => return end,
            }
        }
    }

    /// One I/O thread of the pool.
    fn work(&self, pool: &Pool) {
        let mut scratch = Scratch::default();
        while let Some(job) = pool.next() {
            ewma(&self.handoff_ns, job.queued.elapsed());
            let status = self.execute(&mut scratch, &job.req, job.sectors);
            self.complete(job.req.id(), job.req.op(), status);
        }
    }

    /// Process what the frontend queued, inline: consume, execute, respond, publish and notify
    /// as `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` says, then `RING_FINAL_CHECK_FOR_REQUESTS`.
    /// Every request consumed by this call is answered when it returns.
    pub fn poll(&self) -> Poll {
        self.poll_with(None)
    }

    fn poll_with(&self, pool: Option<&Pool>) -> Poll {
        let mut c = lock(&self.cons);
        if c.broken.is_some() {
            return Poll::Broken;
        }
        self.stats.polls.fetch_add(1, Ordering::Relaxed);
        let limits = self.features.limits(&*self.device);
        let mut budget = self.budget;
        loop {
            let rp = self.ring.load_u32_acquire(SRING_REQ_PROD);
            if self.producer_overflow(&mut c, rp) {
                return Poll::Broken;
            }
            // Responses this thread wrote but has not pushed yet (the I/O threads push their
            // own at once; a push of either publishes everything written before it).
            let mut unpushed = 0u32;
            let mut stop: Option<Poll> = None;
            // a request admitted while gathering a merged batch that did not fit in it: it
            // is in flight already and runs next, whatever the gate says meanwhile
            let mut carry: Option<Admitted> = None;
            while c.req_cons != rp || carry.is_some() {
                let admitted = match carry.take() {
                    Some(a) => a,
                    None => {
                        if budget == 0 {
                            stop = Some(Poll::Busy);
                            break;
                        }
                        match self.admit_next(&mut c, &limits) {
                            Ok(a) => {
                                budget -= 1;
                                a
                            }
                            Err(s) => {
                                stop = Some(s);
                                break;
                            }
                        }
                    }
                };
                let (id, op, status) = match admitted {
                    Admitted::Rejected { id, op, status } => (id, op, status),
                    Admitted::Io(req) => match pool {
                        // The last request visible on the ring runs in this thread (no hand-off:
                        // at queue depth 1 the pool is never involved); earlier ones go to the
                        // I/O threads and overlap with it.
                        Some(p) if !is_barrier(&req) && c.req_cons != rp && self.offload(&mut c) => {
                            self.stats.offloaded.fetch_add(1, Ordering::Relaxed);
                            p.submit(Job { queued: Instant::now(), req, sectors: limits.sectors });
                            continue;
                        }
                        _ if mergeable(&req) && self.can_merge() && c.req_cons != rp && budget > 0 => {
                            let batch = self.gather_burst(&mut c, rp, &mut budget, &limits, req, &mut carry);
                            let sts = self.execute_batch(&mut c.scratch, &batch, limits.sectors);
                            for (r, st) in batch.iter().zip(sts) {
                                self.write_response(&mut lock(&self.prod), r.id(), r.op(), st);
                                unpushed += 1;
                                if unpushed >= self.batch {
                                    self.push_and_release(unpushed);
                                    unpushed = 0;
                                }
                            }
                            continue;
                        }
                        _ => {
                            let barrier = is_barrier(&req);
                            if pool.is_some() && barrier {
                                // Our own unpublished responses count as in flight.
                                self.push_and_release(unpushed);
                                unpushed = 0;
                                self.wait_alone();
                            }
                            // Timed 1 in 8 (a clock read can be a system call, e.g. in a PV dom0
                            // without a stable TSC).
                            c.ran = c.ran.wrapping_add(1);
                            let timed = pool.is_some() && !barrier && c.ran.is_multiple_of(8);
                            let t0 = timed.then(Instant::now);
                            let st = self.execute(&mut c.scratch, &req, limits.sectors);
                            if let Some(t0) = t0 {
                                ewma(&self.exec_ns, t0.elapsed());
                            }
                            (req.id(), req.op(), st)
                        }
                    },
                };
                self.write_response(&mut lock(&self.prod), id, op, status);
                unpushed += 1;
                if unpushed >= self.batch {
                    self.push_and_release(unpushed);
                    unpushed = 0;
                }
            }
            self.push_and_release(unpushed);
            if let Some(s) = stop {
                return s;
            }
            // RING_FINAL_CHECK_FOR_REQUESTS.
            match self.unconsumed(&mut c) {
                None => return Poll::Broken,
                Some(true) => continue,
                Some(false) => {}
            }
            self.ring.store_u32_release(SRING_REQ_EVENT, c.req_cons.wrapping_add(1));
            self.ring.fence();
            match self.unconsumed(&mut c) {
                None => return Poll::Broken,
                Some(true) => continue,
                Some(false) => {
                    let g = lock(&self.gate);
                    return if g.stopped {
                        Poll::Stopped
                    } else if g.quiesced {
                        Poll::Quiesced
                    } else {
                        Poll::Idle
                    };
                }
            }
        }
    }

    /// Whether requests can share a device call at all: their pages are mapped persistently
    /// and the device moves data itself ([`BlockDevice::direct_io`]).
    fn can_merge(&self) -> bool {
        self.pcache.is_some() && self.device.direct_io()
    }

    /// Admit the next request on the ring (the gate counts it in flight), or say why not.
    fn admit_next(&self, c: &mut Consumer, limits: &Limits) -> Result<Admitted, Poll> {
        {
            let mut g = lock(&self.gate);
            if g.stopped {
                return Err(Poll::Stopped);
            }
            if g.quiesced {
                return Err(Poll::Quiesced);
            }
            g.in_flight += 1;
            self.stats.peak_in_flight.fetch_max(g.in_flight as u64, Ordering::Relaxed);
        }
        let idx = c.req_cons;
        c.req_cons = idx.wrapping_add(1);
        Ok(self.admit(idx, limits))
    }

    /// `first` and the requests right behind it on the ring that can share its device call
    /// ([`mergeable`], same direction), up to [`MERGE_MAX`]; the first one that cannot is
    /// left in `carry` (admitted: it runs next).
    fn gather_burst(
        &self,
        c: &mut Consumer,
        rp: u32,
        budget: &mut u32,
        limits: &Limits,
        first: Checked,
        carry: &mut Option<Admitted>,
    ) -> Vec<Checked> {
        let mut batch = vec![first];
        while batch.len() < MERGE_MAX && c.req_cons != rp && *budget > 0 {
            let Ok(a) = self.admit_next(c, limits) else { break };
            *budget -= 1;
            match a {
                Admitted::Io(r) if mergeable(&r) && same_direction(&batch[0], &r) => batch.push(r),
                other => {
                    *carry = Some(other);
                    break;
                }
            }
        }
        batch
    }

    /// Run a gathered batch (in ring order): each run of requests whose sectors follow each
    /// other, all of whose segments are mapped persistently, goes to the device as one
    /// `read_into`/`write_from` (one system call for the run instead of one per request);
    /// the rest, and a run whose call fails, go one request at a time as usual (a failed
    /// run is repeated request by request, so each gets its own status: reads and writes
    /// of the same bytes can be repeated). Statuses in batch order.
    fn execute_batch(&self, s: &mut Scratch, batch: &[Checked], sectors: u64) -> Vec<i16> {
        let mut st = vec![BLKIF_RSP_OKAY; batch.len()];
        // (first sector, segments, bytes) of each request whose segment list resolved
        let mut items: Vec<Option<(u64, Vec<GrantSeg>, usize)>> = Vec::with_capacity(batch.len());
        for (k, r) in batch.iter().enumerate() {
            let (Checked::Read { sector, segs, .. } | Checked::Write { sector, segs, .. }) = r else {
                st[k] = self.execute(s, r, sectors);
                items.push(None);
                continue;
            };
            match self.resolve(s, segs, *sector, sectors) {
                Ok(v) => {
                    let (gs, total) = grant_segs(&v);
                    items.push(Some((*sector, gs, total)));
                }
                Err(e) => {
                    st[k] = e;
                    items.push(None);
                }
            }
        }
        let mut i = 0;
        while i < batch.len() {
            let Some((sector, gs, total)) = &items[i] else {
                i += 1;
                continue;
            };
            let (mut next, mut nsegs) = (sector + (*total as u64) / SECTOR_SIZE, gs.len());
            let mut j = i + 1;
            while let Some(Some((s2, g2, t2))) = items.get(j) {
                if *s2 != next || nsegs + g2.len() > MERGE_SEGS {
                    break;
                }
                next += (*t2 as u64) / SECTOR_SIZE;
                nsegs += g2.len();
                j += 1;
            }
            if j - i < 2 || !self.run_merged(&batch[i], &items[i..j]) {
                // one by one, with the segments resolved above
                for k in i..j {
                    if let Some((sector, gs, total)) = &items[k] {
                        let r = match batch[k] {
                            Checked::Read { .. } => self.read_segs(s, *sector, gs, *total),
                            _ => self.write_segs(s, *sector, gs, *total),
                        };
                        st[k] = r.err().unwrap_or(BLKIF_RSP_OKAY);
                    }
                }
            }
            i = j;
        }
        st
    }

    /// One device call for a run of adjacent requests like `first` (see
    /// [`BlkifRing::execute_batch`]); false if it could not be made or failed.
    fn run_merged(&self, first: &Checked, items: &[Option<(u64, Vec<GrantSeg>, usize)>]) -> bool {
        let mut all: Vec<GrantSeg> = Vec::new();
        let mut total = 0usize;
        let mut start = None;
        for (sector, gs, t) in items.iter().flatten() {
            start.get_or_insert(*sector);
            all.extend_from_slice(gs);
            total += t;
        }
        let Some(start) = start else { return false };
        let mapped = self.persistent_pages(&all);
        let Some(mut pages) = self.direct_pages(&all, &mapped) else { return false };
        let off = start * SECTOR_SIZE;
        let (r, bytes) = match first {
            Checked::Read { .. } => (self.device.read_into(off, &mut pages), &self.stats.bytes_read),
            _ => (self.device.write_from(off, &pages), &self.stats.bytes_written),
        };
        match r {
            Ok(()) => {
                bytes.fetch_add(total as u64, Ordering::Relaxed);
                self.stats.merged.fetch_add(items.len() as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::debug!(domid = self.domid, "merged I/O of {} requests: {e}; one by one", items.len());
                false
            }
        }
    }

    /// Whether to hand an eligible request to the pool (see [`Features::adaptive_offload`]).
    fn offload(&self, c: &mut Consumer) -> bool {
        if !self.features.adaptive_offload {
            return true;
        }
        c.eligible = c.eligible.wrapping_add(1);
        c.eligible.is_multiple_of(OFFLOAD_PROBE)
            || self.exec_ns.load(Ordering::Relaxed) >= self.handoff_ns.load(Ordering::Relaxed)
    }

    /// Wait until the request being admitted is the only one in flight (every earlier one
    /// completed and answered): the start of a flush or barrier.
    fn wait_alone(&self) {
        let mut g = lock(&self.gate);
        g.waiters += 1;
        while g.in_flight > 1 {
            g = self.gate_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.waiters -= 1;
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS`; `None` if the producer index is bogus.
    fn unconsumed(&self, c: &mut Consumer) -> Option<bool> {
        let rp = self.ring.load_u32_acquire(SRING_REQ_PROD);
        if self.producer_overflow(c, rp) {
            return None;
        }
        Some(rp != c.req_cons)
    }

    /// `RING_REQUEST_PROD_OVERFLOW`: a frontend that claims more requests than the ring holds
    /// is hostile or corrupt; stop serving this ring. `rp` must be read before this call: our
    /// `rsp_prod_pvt` only grows, and a frontend's `req_prod` never passes what it saw of
    /// `rsp_prod` by more than the ring size.
    fn producer_overflow(&self, c: &mut Consumer, rp: u32) -> bool {
        let pvt = lock(&self.prod).rsp_prod_pvt;
        // Requests published but not answered, and requests consumed: both at most a ring.
        if rp.wrapping_sub(pvt) > self.geom.size || rp.wrapping_sub(c.req_cons) > self.geom.size {
            let msg = format!(
                "frontend req_prod {rp} is more than {} ahead of rsp_prod {pvt} (req_cons {})",
                self.geom.size, c.req_cons
            );
            tracing::warn!(domid = self.domid, "blkif ring broken: {msg}");
            c.broken = Some(msg);
            true
        } else {
            false
        }
    }

    /// Write one response into the next response slot (not yet published).
    fn write_response(&self, p: &mut Producer, id: u64, op: u8, status: i16) {
        match status {
            BLKIF_RSP_OKAY => &self.stats.ok,
            BLKIF_RSP_EOPNOTSUPP => &self.stats.unsupported,
            _ => &self.stats.errors,
        }
        .fetch_add(1, Ordering::Relaxed);
        let abi = self.geom.abi;
        let mut rsp = [0u8; 16];
        let rsp = &mut rsp[..abi.response_size()];
        encode_response(abi, id, op, status, rsp);
        self.ring.write(self.geom.slot_offset(p.rsp_prod_pvt), rsp);
        p.rsp_prod_pvt = p.rsp_prod_pvt.wrapping_add(1);
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publish what was written; true if the frontend
    /// asked to be notified.
    fn push(&self, p: &mut Producer) -> bool {
        let old = p.rsp_pushed;
        let new = p.rsp_prod_pvt;
        if old == new {
            return false;
        }
        self.ring.store_u32_release(SRING_RSP_PROD, new);
        self.ring.fence();
        let ev = self.ring.load_u32_acquire(SRING_RSP_EVENT);
        p.rsp_pushed = new;
        new.wrapping_sub(ev) < new.wrapping_sub(old)
    }

    /// `n` responses are published: they are no longer in flight.
    fn release(&self, n: usize) {
        let mut g = lock(&self.gate);
        g.in_flight -= n;
        // quiesce() waits for 0, a flush/barrier for 1 (itself). (A notify is a futex
        // system call even with nobody waiting: only when someone does.)
        if g.in_flight <= 1 && g.waiters > 0 {
            self.gate_cv.notify_all();
        }
    }

    fn notify(&self) {
        self.stats.notifications.fetch_add(1, Ordering::Relaxed);
        self.evtchn.notify();
    }

    /// Publish the `n` responses written by the inline path.
    fn push_and_release(&self, n: u32) {
        if n == 0 {
            return;
        }
        let notify = self.push(&mut lock(&self.prod));
        self.release(n as usize);
        if notify {
            self.notify();
        }
    }

    /// Answer one request from any thread: write, publish, release, notify.
    fn complete(&self, id: u64, op: u8, status: i16) {
        let notify = {
            let mut p = lock(&self.prod);
            self.write_response(&mut p, id, op, status);
            self.push(&mut p)
        };
        self.release(1);
        if notify {
            self.notify();
        }
    }

    /// Copy ring entry `idx` out of shared memory (once), decode and check it.
    fn admit(&self, idx: u32, limits: &Limits) -> Admitted {
        let abi = self.geom.abi;
        let mut entry = [0u8; 112];
        let entry = &mut entry[..abi.entry_size()];
        self.ring.read(self.geom.slot_offset(idx), entry);
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let Some(raw) = parse_request(abi, entry) else {
            // Cannot happen (the entry has the ABI's size); answer rather than panic.
            return Admitted::Rejected { id: 0, op: 0, status: BLKIF_RSP_ERROR };
        };
        match check_request(&raw, limits) {
            Err(rej) => {
                tracing::debug!(domid = self.domid, id = rej.id, op = raw.operation(), "rejected: {}", rej.reason);
                Admitted::Rejected { id: rej.id, op: rej.operation, status: rej.status }
            }
            Ok(req) => Admitted::Io(req),
        }
    }

    /// Fetch and check the segment list of a checked request.
    fn resolve(&self, s: &mut Scratch, segs: &SegList, sector: u64, sectors: u64) -> Result<Vec<Segment>, i16> {
        match segs {
            SegList::Direct(v) => Ok(v.clone()),
            SegList::Indirect { nr_segments, pages } => {
                let n = usize::from(*nr_segments);
                let mut left = n * SEGMENT_SIZE;
                let mut gs = Vec::with_capacity(pages.len());
                for &gref in pages {
                    let len = left.min(PAGE_SIZE);
                    gs.push(GrantSeg { gref, offset: 0, len: len as u16 });
                    left -= len;
                }
                s.seg_buf.clear();
                s.seg_buf.resize(n * SEGMENT_SIZE, 0);
                // Linux blkfront grants indirect pages like data pages: persistent too.
                let mapped = self.persistent_pages(&gs);
                if let Err(e) = self.gather(&gs, &mapped, &mut s.seg_buf, &mut s.copy_buf) {
                    tracing::debug!(domid = self.domid, "indirect page: {e}");
                    return Err(BLKIF_RSP_ERROR);
                }
                let v = parse_segment_array(&s.seg_buf, n);
                if let Err(reason) = check_segments(&v, sector, sectors) {
                    tracing::debug!(domid = self.domid, "rejected indirect request: {reason}");
                    return Err(BLKIF_RSP_ERROR);
                }
                Ok(v)
            }
        }
    }

    fn execute(&self, s: &mut Scratch, req: &Checked, sectors: u64) -> i16 {
        match self.try_execute(s, req, sectors) {
            Ok(()) => BLKIF_RSP_OKAY,
            Err(st) => st,
        }
    }

    fn try_execute(&self, s: &mut Scratch, req: &Checked, sectors: u64) -> Result<(), i16> {
        let dev_err = |e| self.dev_err(e);
        match *req {
            Checked::Flush { .. } => self.device.flush().map_err(dev_err),
            Checked::Discard { sector, nr_sectors, secure, .. } => {
                if nr_sectors == 0 {
                    return Ok(());
                }
                // sector + nr_sectors <= device sectors, so the byte values cannot overflow.
                let (off, len) = (sector * SECTOR_SIZE, nr_sectors * SECTOR_SIZE);
                if secure {
                    self.device.write_zeroes(off, len, true).map_err(dev_err)
                } else {
                    self.device.discard(off, len).map_err(dev_err)
                }
            }
            Checked::Read { sector, ref segs, .. } => {
                let segs = self.resolve(s, segs, sector, sectors)?;
                let (gs, total) = grant_segs(&segs);
                self.read_segs(s, sector, &gs, total)
            }
            Checked::Write { sector, ref segs, flush_before, flush_after, .. } => {
                let segs = self.resolve(s, segs, sector, sectors)?;
                let (gs, total) = grant_segs(&segs);
                if flush_before {
                    self.device.flush().map_err(dev_err)?;
                }
                self.write_segs(s, sector, &gs, total)?;
                if flush_after {
                    self.device.flush().map_err(dev_err)?;
                }
                Ok(())
            }
        }
    }

    fn dev_err(&self, e: BlockError) -> i16 {
        tracing::debug!(domid = self.domid, "device error: {e}");
        block_status(&e)
    }

    fn grant_err(&self, e: GrantError) -> i16 {
        tracing::debug!(domid = self.domid, "grant copy: {e}");
        BLKIF_RSP_ERROR
    }

    /// Read into the resolved segments `gs` (`total` bytes) at `sector`.
    fn read_segs(&self, s: &mut Scratch, sector: u64, gs: &[GrantSeg], total: usize) -> Result<(), i16> {
        let mapped = self.persistent_pages(gs);
        let r = if let Some(mut pages) = self.direct_pages(gs, &mapped) {
            // every segment mapped: the device fills the guest pages itself
            self.device.read_into(sector * SECTOR_SIZE, &mut pages).map_err(|e| self.dev_err(e))
        } else {
            s.buffer(total);
            let Scratch { buf, copy_buf, .. } = s;
            let buf = &mut buf[..total];
            self.device
                .read_at(sector * SECTOR_SIZE, buf)
                .map_err(|e| self.dev_err(e))
                .and_then(|()| self.scatter(gs, &mapped, buf, copy_buf).map_err(|e| self.grant_err(e)))
        };
        if r.is_ok() {
            self.stats.bytes_read.fetch_add(total as u64, Ordering::Relaxed);
        }
        r
    }

    /// Write the resolved segments `gs` (`total` bytes) at `sector` (no flushes).
    fn write_segs(&self, s: &mut Scratch, sector: u64, gs: &[GrantSeg], total: usize) -> Result<(), i16> {
        let mapped = self.persistent_pages(gs);
        if let Some(pages) = self.direct_pages(gs, &mapped) {
            // every segment mapped (no grant can fail): the device drains the pages
            self.device.write_from(sector * SECTOR_SIZE, &pages).map_err(|e| self.dev_err(e))?;
        } else {
            s.buffer(total);
            let Scratch { buf, copy_buf, .. } = s;
            let buf = &mut buf[..total];
            // Gather everything first: a bad grant fails the request before the disk is touched.
            self.gather(gs, &mapped, buf, copy_buf)
                .map_err(|e| self.grant_err(e))
                .and_then(|()| self.device.write_at(sector * SECTOR_SIZE, buf).map_err(|e| self.dev_err(e)))?;
        }
        self.stats.bytes_written.fetch_add(total as u64, Ordering::Relaxed);
        Ok(())
    }
}

impl BlkifRing {
    // ---- persistent grants ------------------------------------------------------------------

    /// The persistently mapped page for each of `segs` (`None`: grant copy). Grants not yet in
    /// the cache are mapped (read-write, one batched call) while the cache has room; the rest,
    /// and grants that cannot be mapped read-write, go by grant copy.
    fn persistent_pages(&self, segs: &[GrantSeg]) -> Pages {
        let Some(cache) = &self.pcache else {
            return vec![None; segs.len()];
        };
        let max = self.features.max_persistent_grants as usize;
        let mut out: Pages = Vec::with_capacity(segs.len());
        let mut want: Vec<u32> = Vec::new();
        {
            let c = lock(cache);
            for sg in segs {
                let page = c.get(&sg.gref).cloned();
                if page.is_none() && !want.contains(&sg.gref) {
                    want.push(sg.gref);
                }
                out.push(page);
            }
            want.truncate(max.saturating_sub(c.len()));
        }
        let hits = out.iter().filter(|p| p.is_some()).count() as u64;
        self.stats.persistent_hits.fetch_add(hits, Ordering::Relaxed);
        if !want.is_empty() {
            // Mapped outside the lock (a system call); another thread may map the same grant
            // meanwhile: the first insert wins, the other mapping is dropped (unmapped).
            let mapped = self.map_grants(&want);
            let mut c = lock(cache);
            let mut added = 0u64;
            for page in mapped {
                let g = page.gref();
                if c.len() < max && !c.contains_key(&g) {
                    c.insert(g, page);
                    added += 1;
                }
            }
            for (sg, slot) in segs.iter().zip(out.iter_mut()) {
                if slot.is_none() {
                    *slot = c.get(&sg.gref).cloned();
                }
            }
            self.stats.persistent_misses.fetch_add(added, Ordering::Relaxed);
        }
        let fallbacks = out.iter().filter(|p| p.is_none()).count() as u64;
        if fallbacks > 0 {
            self.stats.persistent_fallbacks.fetch_add(fallbacks, Ordering::Relaxed);
        }
        out
    }

    /// The request's pages as one buffer for [`BlockDevice::read_into`] /
    /// [`BlockDevice::write_from`], when the device moves data without a bounce buffer of its
    /// own and every segment is mapped persistently; `None`: the copy path.
    fn direct_pages<'a>(&self, segs: &[GrantSeg], mapped: &'a [Option<Arc<dyn GrantPage>>]) -> Option<GuestPages<'a>> {
        if !self.device.direct_io() {
            return None;
        }
        GuestPages::new(segs, mapped).ok().flatten()
    }

    /// Map `grefs` read-write: one batch, or (when the batch fails, e.g. one bad or read-only
    /// grant) one at a time, leaving out those that fail.
    fn map_grants(&self, grefs: &[u32]) -> Vec<Arc<dyn GrantPage>> {
        match self.grants.map_pages(self.domid, grefs) {
            Ok(v) if v.len() == grefs.len() && v.iter().zip(grefs).all(|(p, &g)| p.gref() == g) => return v,
            Ok(v) => {
                tracing::warn!(domid = self.domid, "map_pages returned {} pages for {} refs", v.len(), grefs.len());
                return Vec::new();
            }
            Err(e) if grefs.len() == 1 => {
                tracing::debug!(domid = self.domid, gref = grefs[0], "persistent map: {e}");
                return Vec::new();
            }
            Err(e) => tracing::debug!(domid = self.domid, n = grefs.len(), "persistent map of a batch: {e}"),
        }
        grefs
            .iter()
            .filter_map(|&g| match self.grants.map_pages(self.domid, &[g]) {
                Ok(mut v) if v.len() == 1 && v[0].gref() == g => v.pop(),
                Ok(_) => None,
                Err(e) => {
                    tracing::debug!(domid = self.domid, gref = g, "persistent map: {e}");
                    None
                }
            })
            .collect()
    }

    /// Gather guest memory into `buf` (segments in order): mapped pages by memcpy, the others
    /// with one grant copy (through `copy_buf` if only some of them go that way).
    fn gather(
        &self,
        segs: &[GrantSeg],
        mapped: &[Option<Arc<dyn GrantPage>>],
        buf: &mut [u8],
        copy_buf: &mut Vec<u8>,
    ) -> Result<(), GrantError> {
        if mapped.iter().all(Option::is_none) {
            return self.grants.copy_from_guest(self.domid, segs, buf);
        }
        check_total(segs, buf.len())?;
        let mut copied: Vec<GrantSeg> = Vec::new();
        let mut pos = 0;
        for (sg, page) in segs.iter().zip(mapped) {
            let n = usize::from(sg.len);
            match page {
                Some(p) => p.read(usize::from(sg.offset), &mut buf[pos..pos + n])?,
                None => copied.push(*sg),
            }
            pos += n;
        }
        if copied.is_empty() {
            return Ok(());
        }
        let len = copied.iter().map(|g| usize::from(g.len)).sum();
        copy_buf.clear();
        copy_buf.resize(len, 0);
        self.grants.copy_from_guest(self.domid, &copied, copy_buf)?;
        let (mut pos, mut from) = (0, 0);
        for (sg, page) in segs.iter().zip(mapped) {
            let n = usize::from(sg.len);
            if page.is_none() {
                buf[pos..pos + n].copy_from_slice(&copy_buf[from..from + n]);
                from += n;
            }
            pos += n;
        }
        Ok(())
    }

    /// Scatter `buf` into guest memory (segments in order): mapped pages by memcpy, the others
    /// with one grant copy.
    fn scatter(
        &self,
        segs: &[GrantSeg],
        mapped: &[Option<Arc<dyn GrantPage>>],
        buf: &[u8],
        copy_buf: &mut Vec<u8>,
    ) -> Result<(), GrantError> {
        if mapped.iter().all(Option::is_none) {
            return self.grants.copy_to_guest(self.domid, segs, buf);
        }
        check_total(segs, buf.len())?;
        let mut copied: Vec<GrantSeg> = Vec::new();
        copy_buf.clear();
        let mut pos = 0;
        for (sg, page) in segs.iter().zip(mapped) {
            let n = usize::from(sg.len);
            match page {
                Some(p) => p.write(usize::from(sg.offset), &buf[pos..pos + n])?,
                None => {
                    copied.push(*sg);
                    copy_buf.extend_from_slice(&buf[pos..pos + n]);
                }
            }
            pos += n;
        }
        if copied.is_empty() {
            return Ok(());
        }
        self.grants.copy_to_guest(self.domid, &copied, copy_buf)
    }
}

/// The segments cover exactly `len` bytes and each lies inside one page.
fn check_total(segs: &[GrantSeg], len: usize) -> Result<(), GrantError> {
    let mut total = 0usize;
    for sg in segs {
        if usize::from(sg.offset) + usize::from(sg.len) > PAGE_SIZE {
            return Err(GrantError::BadRange { offset: sg.offset.into(), len: sg.len.into() });
        }
        total += usize::from(sg.len);
    }
    if total != len {
        return Err(GrantError::BadRange { offset: 0, len });
    }
    Ok(())
}

/// A read, or a write without flushes, may share a device call with adjacent ones.
fn mergeable(req: &Checked) -> bool {
    matches!(req, Checked::Read { .. } | Checked::Write { flush_before: false, flush_after: false, .. })
}

fn same_direction(a: &Checked, b: &Checked) -> bool {
    matches!((a, b), (Checked::Read { .. }, Checked::Read { .. }) | (Checked::Write { .. }, Checked::Write { .. }))
}

fn grant_segs(segs: &[Segment]) -> (Vec<GrantSeg>, usize) {
    let mut total = 0;
    let gs = segs
        .iter()
        .map(|s| {
            total += s.len();
            GrantSeg { gref: s.gref, offset: s.offset() as u16, len: s.len() as u16 }
        })
        .collect();
    (gs, total)
}
