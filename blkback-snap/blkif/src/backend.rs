//! The per-ring backend: consume requests, do the I/O, produce responses.
//!
//! [`BlkifRing`] owns one shared ring of one frontend. It can be driven by a dedicated
//! thread ([`BlkifRing::run`] / [`BlkifRing::spawn`]) or by any poll loop that calls
//! [`BlkifRing::poll`] whenever the event channel fires (and after `resume()`).
//!
//! Requests are processed synchronously, one at a time, in ring order: this trivially gives
//! write-barrier semantics and makes "in flight" = "consumed but response not yet published".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use xensnap_blockdev::{BlockDevice, BlockError};

use crate::abi::*;
use crate::mem::{EventChannel, GrantMemory, GrantSeg, SharedRing};
use crate::request::*;

/// What this backend offers to frontends (published in xenstore by [`crate::xenbus`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Features {
    /// "feature-flush-cache".
    pub flush: bool,
    /// "feature-barrier". Cheap for us: requests are executed in ring order, so a barrier is
    /// flush + write + flush.
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
}

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
}

struct Consumer {
    req_cons: u32,
    rsp_prod_pvt: u32,
    /// `rsp_prod` as last published.
    rsp_pushed: u32,
    broken: Option<String>,
    buf: Vec<u8>,
    seg_buf: Vec<u8>,
}

struct Gate {
    quiesced: bool,
    stopped: bool,
    /// Requests consumed whose response is not yet published.
    in_flight: usize,
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
    /// Responses written before a push (and a possible notification).
    batch: u32,
    /// Requests handled per `poll` before it returns `Busy`.
    budget: u32,
    cons: Mutex<Consumer>,
    gate: Mutex<Gate>,
    gate_cv: Condvar,
    stats: RingStats,
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

impl BlkifRing {
    /// Attach to a ring the frontend initialised. Like `BACK_RING_ATTACH`, consumption starts
    /// at the ring's current `rsp_prod` (0 for a fresh ring), so a backend can re-attach to a
    /// live ring whose earlier requests were all answered.
    pub fn new(p: RingParams) -> Result<BlkifRing, RingError> {
        let nr_pages = p.ring.len() / PAGE_SIZE;
        let geom = RingGeometry::new(p.abi, nr_pages).ok_or(RingError::TooSmall(p.ring.len()))?;
        let start = p.ring.load_u32_acquire(SRING_RSP_PROD);
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
                rsp_prod_pvt: start,
                rsp_pushed: start,
                broken: None,
                buf: Vec::new(),
                seg_buf: Vec::new(),
            }),
            gate: Mutex::new(Gate { quiesced: false, stopped: false, in_flight: 0 }),
            gate_cv: Condvar::new(),
            stats: RingStats::default(),
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
        }
    }

    /// Private indices `(req_cons, rsp_prod_pvt)`.
    pub fn indices(&self) -> (u32, u32) {
        let c = lock(&self.cons);
        (c.req_cons, c.rsp_prod_pvt)
    }

    // ---- checkpoint barrier -------------------------------------------------------------

    /// Stop admitting requests and wait until every admitted one has completed and its
    /// response is published on the ring. Returns how many were drained. Requests the
    /// frontend queues meanwhile stay on the ring until [`BlkifRing::resume`].
    pub fn quiesce(&self) -> usize {
        let mut g = lock(&self.gate);
        g.quiesced = true;
        let drained = g.in_flight;
        while g.in_flight > 0 {
            g = self.gate_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        drained
    }

    /// Like [`BlkifRing::quiesce`], but gives up after `timeout` (the ring stays quiesced;
    /// `Err` carries the number still in flight).
    pub fn quiesce_timeout(&self, timeout: Duration) -> Result<usize, usize> {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.gate);
        g.quiesced = true;
        let drained = g.in_flight;
        while g.in_flight > 0 {
            let now = Instant::now();
            if now >= deadline {
                return Err(g.in_flight);
            }
            g = self.gate_cv.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
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
    /// Requests in flight complete first (the worker only checks between requests).
    pub fn stop(&self) {
        lock(&self.gate).stopped = true;
        self.gate_cv.notify_all();
        self.evtchn.interrupt();
    }

    // ---- driving -------------------------------------------------------------------------

    /// Serve the ring until [`BlkifRing::stop`] or until the frontend breaks it.
    pub fn run(&self) -> Poll {
        loop {
            match self.poll() {
                Poll::Busy => continue,
                Poll::Idle | Poll::Quiesced => {
                    self.evtchn.wait(None);
                }
                end @ (Poll::Stopped | Poll::Broken) => return end,
            }
        }
    }

    /// [`BlkifRing::run`] on a new thread.
    pub fn spawn(self: &Arc<Self>, name: String) -> std::io::Result<std::thread::JoinHandle<Poll>> {
        let me = Arc::clone(self);
        std::thread::Builder::new().name(name).spawn(move || me.run())
    }

    /// Process what the frontend queued: consume, execute, respond, publish and notify
    /// as `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY` says, then `RING_FINAL_CHECK_FOR_REQUESTS`.
    pub fn poll(&self) -> Poll {
        let mut c = lock(&self.cons);
        if c.broken.is_some() {
            return Poll::Broken;
        }
        let mut budget = self.budget;
        loop {
            let rp = self.ring.load_u32_acquire(SRING_REQ_PROD);
            if self.producer_overflow(&mut c, rp) {
                return Poll::Broken;
            }
            let mut unpushed = 0u32;
            let mut stop: Option<Poll> = None;
            while c.req_cons != rp {
                // RING_REQUEST_CONS_OVERFLOW: never more requests outstanding than slots for
                // their responses (cannot trigger while we answer synchronously; kept as a guard).
                if c.req_cons.wrapping_sub(c.rsp_prod_pvt) >= self.geom.size {
                    break;
                }
                if budget == 0 {
                    stop = Some(Poll::Busy);
                    break;
                }
                {
                    let mut g = lock(&self.gate);
                    if g.stopped {
                        stop = Some(Poll::Stopped);
                        break;
                    }
                    if g.quiesced {
                        stop = Some(Poll::Quiesced);
                        break;
                    }
                    g.in_flight += 1;
                }
                let idx = c.req_cons;
                c.req_cons = idx.wrapping_add(1);
                self.process(&mut c, idx);
                budget -= 1;
                unpushed += 1;
                if unpushed >= self.batch {
                    self.push_and_release(&mut c, unpushed);
                    unpushed = 0;
                }
            }
            self.push_and_release(&mut c, unpushed);
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

    /// `RING_HAS_UNCONSUMED_REQUESTS`; `None` if the producer index is bogus.
    fn unconsumed(&self, c: &mut Consumer) -> Option<bool> {
        let rp = self.ring.load_u32_acquire(SRING_REQ_PROD);
        if self.producer_overflow(c, rp) {
            return None;
        }
        let req = rp.wrapping_sub(c.req_cons);
        let rsp = self.geom.size.wrapping_sub(c.req_cons.wrapping_sub(c.rsp_prod_pvt));
        Some(req.min(rsp) > 0)
    }

    /// `RING_REQUEST_PROD_OVERFLOW`: a frontend that claims more requests than the ring holds
    /// is hostile or corrupt; stop serving this ring.
    fn producer_overflow(&self, c: &mut Consumer, rp: u32) -> bool {
        if rp.wrapping_sub(c.rsp_prod_pvt) > self.geom.size {
            let msg = format!(
                "frontend req_prod {rp} is more than {} ahead of rsp_prod {}",
                self.geom.size, c.rsp_prod_pvt
            );
            tracing::warn!(domid = self.domid, "blkif ring broken: {msg}");
            c.broken = Some(msg);
            true
        } else {
            false
        }
    }

    fn push_and_release(&self, c: &mut Consumer, n: u32) {
        if n == 0 {
            return;
        }
        // RING_PUSH_RESPONSES_AND_CHECK_NOTIFY.
        let old = c.rsp_pushed;
        let new = c.rsp_prod_pvt;
        self.ring.store_u32_release(SRING_RSP_PROD, new);
        self.ring.fence();
        let ev = self.ring.load_u32_acquire(SRING_RSP_EVENT);
        c.rsp_pushed = new;
        {
            let mut g = lock(&self.gate);
            g.in_flight -= n as usize;
            if g.in_flight == 0 {
                self.gate_cv.notify_all();
            }
        }
        if new.wrapping_sub(ev) < new.wrapping_sub(old) {
            self.stats.notifications.fetch_add(1, Ordering::Relaxed);
            self.evtchn.notify();
        }
    }

    fn process(&self, c: &mut Consumer, idx: u32) {
        let abi = self.geom.abi;
        let mut entry = [0u8; 112];
        let entry = &mut entry[..abi.entry_size()];
        // One copy out of shared memory; everything below works on the private copy.
        self.ring.read(self.geom.slot_offset(idx), entry);
        let raw = parse_request(abi, entry).expect("entry has the ABI's size");
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let limits = self.features.limits(&*self.device);
        let (id, op, status) = match check_request(&raw, &limits) {
            Err(rej) => {
                tracing::debug!(domid = self.domid, id = rej.id, op = raw.operation(), "rejected: {}", rej.reason);
                (rej.id, rej.operation, rej.status)
            }
            Ok(req) => (req.id(), req.op(), self.execute(c, &req, limits.sectors)),
        };
        match status {
            BLKIF_RSP_OKAY => &self.stats.ok,
            BLKIF_RSP_EOPNOTSUPP => &self.stats.unsupported,
            _ => &self.stats.errors,
        }
        .fetch_add(1, Ordering::Relaxed);
        let mut rsp = [0u8; 16];
        let rsp = &mut rsp[..abi.response_size()];
        encode_response(abi, id, op, status, rsp);
        self.ring.write(self.geom.slot_offset(c.rsp_prod_pvt), rsp);
        c.rsp_prod_pvt = c.rsp_prod_pvt.wrapping_add(1);
    }

    /// Fetch and check the segment list of a checked request.
    fn resolve(&self, c: &mut Consumer, segs: &SegList, sector: u64, sectors: u64) -> Result<Vec<Segment>, i16> {
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
                c.seg_buf.clear();
                c.seg_buf.resize(n * SEGMENT_SIZE, 0);
                if let Err(e) = self.grants.copy_from_guest(self.domid, &gs, &mut c.seg_buf) {
                    tracing::debug!(domid = self.domid, "indirect page: {e}");
                    return Err(BLKIF_RSP_ERROR);
                }
                let v = parse_segment_array(&c.seg_buf, n);
                if let Err(reason) = check_segments(&v, sector, sectors) {
                    tracing::debug!(domid = self.domid, "rejected indirect request: {reason}");
                    return Err(BLKIF_RSP_ERROR);
                }
                Ok(v)
            }
        }
    }

    fn execute(&self, c: &mut Consumer, req: &Checked, sectors: u64) -> i16 {
        match self.try_execute(c, req, sectors) {
            Ok(()) => BLKIF_RSP_OKAY,
            Err(s) => s,
        }
    }

    fn try_execute(&self, c: &mut Consumer, req: &Checked, sectors: u64) -> Result<(), i16> {
        let dev_err = |e: BlockError| {
            tracing::debug!(domid = self.domid, "device error: {e}");
            block_status(&e)
        };
        let grant_err = |e| {
            tracing::debug!(domid = self.domid, "grant copy: {e}");
            BLKIF_RSP_ERROR
        };
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
                let segs = self.resolve(c, segs, sector, sectors)?;
                let (gs, total) = grant_segs(&segs);
                let mut buf = std::mem::take(&mut c.buf);
                buf.clear();
                buf.resize(total, 0);
                let r = self
                    .device
                    .read_at(sector * SECTOR_SIZE, &mut buf)
                    .map_err(dev_err)
                    .and_then(|()| self.grants.copy_to_guest(self.domid, &gs, &buf).map_err(grant_err));
                c.buf = buf;
                if r.is_ok() {
                    self.stats.bytes_read.fetch_add(total as u64, Ordering::Relaxed);
                }
                r
            }
            Checked::Write { sector, ref segs, flush_before, flush_after, .. } => {
                let segs = self.resolve(c, segs, sector, sectors)?;
                let (gs, total) = grant_segs(&segs);
                if flush_before {
                    self.device.flush().map_err(dev_err)?;
                }
                let mut buf = std::mem::take(&mut c.buf);
                buf.clear();
                buf.resize(total, 0);
                // Gather everything first: a bad grant fails the request before the disk is touched.
                let r = self
                    .grants
                    .copy_from_guest(self.domid, &gs, &mut buf)
                    .map_err(grant_err)
                    .and_then(|()| self.device.write_at(sector * SECTOR_SIZE, &buf).map_err(dev_err));
                c.buf = buf;
                r?;
                self.stats.bytes_written.fetch_add(total as u64, Ordering::Relaxed);
                if flush_after {
                    self.device.flush().map_err(dev_err)?;
                }
                Ok(())
            }
        }
    }
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
