//! In-process Xen stand-ins for tests: guest pages and a grant table ([`TestGuest`]), the
//! shared ring over those pages ([`MemRing`]), an event-channel pair ([`LocalEvtchn`]) and a
//! small blkfront ([`TestFront`]) that can submit every kind of request, hostile ones included.
//!
//! Pages are `libxc_ffi::LocalPages` (volatile copies and atomics, as on real shared
//! memory), so the "guest" and the backend can run on different threads with no `unsafe`
//! here, and ring.h's barriers map onto acquire/release.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use libxc_ffi::{IoRegion, LocalPages, SharedMem};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::abi::*;
use crate::mem::{EventChannel, GrantError, GrantMemory, GrantPage, GrantSeg, SharedRing};
use crate::request::*;

/// One 4 KiB guest page (page-aligned memory of this process, accessed by copies and
/// atomics only, as real shared memory is; a mapping of it can hand it to the kernel for
/// file I/O, [`Page::io_region`]).
pub struct Page {
    mem: LocalPages,
}

impl Default for Page {
    fn default() -> Self {
        Page { mem: LocalPages::new(1) }
    }
}

impl Page {
    pub fn new() -> Arc<Page> {
        Arc::new(Page::default())
    }

    /// Copy `buf.len()` bytes at `off` out of the page.
    pub fn read(&self, off: usize, buf: &mut [u8]) {
        assert!(off + buf.len() <= PAGE_SIZE, "page read out of bounds");
        self.mem.read_bytes(off, buf).expect("page read in bounds");
    }

    /// Copy `buf` into the page at `off`.
    pub fn write(&self, off: usize, buf: &[u8]) {
        assert!(off + buf.len() <= PAGE_SIZE, "page write out of bounds");
        self.mem.write_bytes(off, buf).expect("page write in bounds");
    }

    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; PAGE_SIZE];
        self.read(0, &mut v);
        v
    }

    /// Bytes `off..off+len` for file I/O straight into or out of the page.
    pub fn io_region(&self, off: usize, len: usize) -> Option<IoRegion<'_>> {
        self.mem.io_region(off, len).ok()
    }

    fn load_u32_acquire(&self, off: usize) -> u32 {
        assert!(off.is_multiple_of(4) && off < PAGE_SIZE);
        self.mem.load_u32_acquire(off).expect("aligned, in bounds")
    }

    fn store_u32_release(&self, off: usize, val: u32) {
        assert!(off.is_multiple_of(4) && off < PAGE_SIZE);
        self.mem.store_u32_release(off, val).expect("aligned, in bounds")
    }
}

/// A ring made of guest pages, as both ends see it.
pub struct MemRing {
    pages: Vec<Arc<Page>>,
}

impl MemRing {
    pub fn new(pages: Vec<Arc<Page>>) -> MemRing {
        MemRing { pages }
    }
    fn split(&self, off: usize, len: usize) -> impl Iterator<Item = (&Page, usize, std::ops::Range<usize>)> {
        assert!(off + len <= self.len(), "ring access out of bounds");
        let mut pos = off;
        let end = off + len;
        std::iter::from_fn(move || {
            if pos >= end {
                return None;
            }
            let (p, o) = (pos / PAGE_SIZE, pos % PAGE_SIZE);
            let n = (PAGE_SIZE - o).min(end - pos);
            let r = (pos - off)..(pos - off + n);
            pos += n;
            Some((&*self.pages[p], o, r))
        })
    }
}

impl SharedRing for MemRing {
    fn len(&self) -> usize {
        self.pages.len() * PAGE_SIZE
    }
    fn load_u32_acquire(&self, off: usize) -> u32 {
        self.pages[off / PAGE_SIZE].load_u32_acquire(off % PAGE_SIZE)
    }
    fn store_u32_release(&self, off: usize, val: u32) {
        self.pages[off / PAGE_SIZE].store_u32_release(off % PAGE_SIZE, val)
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        for (p, o, r) in self.split(off, buf.len()) {
            p.read(o, &mut buf[r]);
        }
    }
    fn write(&self, off: usize, buf: &[u8]) {
        for (p, o, r) in self.split(off, buf.len()) {
            p.write(o, &buf[r]);
        }
    }
}

struct GrantEntry {
    page: Arc<Page>,
    readonly: bool,
}

/// A guest domain: its grant table (ref -> page, read-only flag).
pub struct TestGuest {
    domid: u16,
    table: Mutex<(u32, HashMap<u32, GrantEntry>)>,
    copies: AtomicU64,
    /// `map_pages` calls, and data pages mapped by the backend now (shared with each
    /// [`SimMapping`], which decrements on drop).
    maps: AtomicU64,
    mapped: Arc<AtomicU64>,
    /// Whether `map_pages` works (a guest/host without persistent mapping support: false).
    mappable: AtomicBool,
    /// Whether mapped pages offer their memory for direct file I/O (`GrantPage::io_region`).
    direct: Arc<AtomicBool>,
}

/// A data page the backend mapped with [`GrantMemory::map_pages`]: the guest's own page
/// (shared memory, as a real mapping is), counted as mapped until dropped.
pub struct SimMapping {
    gref: u32,
    page: Arc<Page>,
    live: Arc<AtomicU64>,
    direct: Arc<AtomicBool>,
}

impl GrantPage for SimMapping {
    fn gref(&self) -> u32 {
        self.gref
    }
    fn read(&self, off: usize, buf: &mut [u8]) -> Result<(), GrantError> {
        if off.checked_add(buf.len()).is_none_or(|e| e > PAGE_SIZE) {
            return Err(GrantError::BadRange { offset: off, len: buf.len() });
        }
        self.page.read(off, buf);
        Ok(())
    }
    fn write(&self, off: usize, buf: &[u8]) -> Result<(), GrantError> {
        if off.checked_add(buf.len()).is_none_or(|e| e > PAGE_SIZE) {
            return Err(GrantError::BadRange { offset: off, len: buf.len() });
        }
        self.page.write(off, buf);
        Ok(())
    }
    fn io_region(&self, off: usize, len: usize) -> Option<IoRegion<'_>> {
        if !self.direct.load(Ordering::Relaxed) {
            return None;
        }
        self.page.io_region(off, len)
    }
}

impl Drop for SimMapping {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::Relaxed);
    }
}

impl TestGuest {
    pub fn new(domid: u16) -> Arc<TestGuest> {
        // Refs 0..8 are reserved in Xen; start after them.
        Arc::new(TestGuest {
            domid,
            table: Mutex::new((8, HashMap::new())),
            copies: AtomicU64::new(0),
            maps: AtomicU64::new(0),
            mapped: Arc::new(AtomicU64::new(0)),
            mappable: AtomicBool::new(true),
            direct: Arc::new(AtomicBool::new(true)),
        })
    }

    pub fn domid(&self) -> u16 {
        self.domid
    }

    /// Grant `page` to the backend.
    pub fn grant(&self, page: &Arc<Page>, readonly: bool) -> u32 {
        let mut t = self.table.lock().unwrap();
        let r = t.0;
        t.0 += 1;
        t.1.insert(r, GrantEntry { page: Arc::clone(page), readonly });
        r
    }

    /// End a grant (the ref becomes invalid).
    pub fn revoke(&self, gref: u32) {
        self.table.lock().unwrap().1.remove(&gref);
    }

    pub fn live_grants(&self) -> usize {
        self.table.lock().unwrap().1.len()
    }

    /// Number of grant-copy calls made by the backend.
    pub fn copy_calls(&self) -> u64 {
        self.copies.load(Ordering::Relaxed)
    }

    /// Number of `map_pages` calls made by the backend.
    pub fn map_calls(&self) -> u64 {
        self.maps.load(Ordering::Relaxed)
    }

    /// Data pages the backend holds mapped now.
    pub fn live_mappings(&self) -> u64 {
        self.mapped.load(Ordering::Relaxed)
    }

    /// Whether mapped pages offer direct file I/O (`GrantPage::io_region`); on by default.
    pub fn set_direct(&self, on: bool) {
        self.direct.store(on, Ordering::Relaxed);
    }

    /// Make `map_pages` fail (as on a host whose gntdev cannot map), or work again.
    pub fn set_mappable(&self, ok: bool) {
        self.mappable.store(ok, Ordering::Relaxed);
    }

    fn lookup(&self, domid: u16, segs: &[GrantSeg], buf_len: usize, write: bool) -> Result<Vec<Arc<Page>>, GrantError> {
        if domid != self.domid {
            return Err(GrantError::Failed(format!("no domain {domid}")));
        }
        let total: usize = segs.iter().map(|s| usize::from(s.len)).sum();
        if total != buf_len {
            return Err(GrantError::BadRange { offset: 0, len: buf_len });
        }
        let t = self.table.lock().unwrap();
        segs.iter()
            .map(|s| {
                if usize::from(s.offset) + usize::from(s.len) > PAGE_SIZE {
                    return Err(GrantError::BadRange { offset: s.offset.into(), len: s.len.into() });
                }
                let e = t.1.get(&s.gref).ok_or(GrantError::InvalidRef { domid, gref: s.gref })?;
                if write && e.readonly {
                    return Err(GrantError::ReadOnly { domid, gref: s.gref });
                }
                Ok(Arc::clone(&e.page))
            })
            .collect()
    }
}

impl TestGuest {
    /// The pages behind `grefs`, all or nothing, each granted writable to `domid`'s backend.
    fn writable_pages(&self, domid: u16, grefs: &[u32]) -> Result<Vec<(u32, Arc<Page>)>, GrantError> {
        let t = self.table.lock().unwrap();
        grefs
            .iter()
            .map(|&gref| match t.1.get(&gref) {
                None => Err(GrantError::InvalidRef { domid, gref }),
                Some(e) if e.readonly => Err(GrantError::ReadOnly { domid, gref }),
                Some(e) => Ok((gref, Arc::clone(&e.page))),
            })
            .collect()
    }
}

impl GrantMemory for TestGuest {
    fn copy_from_guest(&self, domid: u16, segs: &[GrantSeg], buf: &mut [u8]) -> Result<(), GrantError> {
        self.copies.fetch_add(1, Ordering::Relaxed);
        let pages = self.lookup(domid, segs, buf.len(), false)?;
        let mut pos = 0;
        for (s, p) in segs.iter().zip(pages) {
            let n = usize::from(s.len);
            p.read(s.offset.into(), &mut buf[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    fn copy_to_guest(&self, domid: u16, segs: &[GrantSeg], buf: &[u8]) -> Result<(), GrantError> {
        self.copies.fetch_add(1, Ordering::Relaxed);
        // Like a batched GNTTABOP_copy with all-or-nothing checking of the refs up front.
        let pages = self.lookup(domid, segs, buf.len(), true)?;
        let mut pos = 0;
        for (s, p) in segs.iter().zip(pages) {
            let n = usize::from(s.len);
            p.write(s.offset.into(), &buf[pos..pos + n]);
            pos += n;
        }
        Ok(())
    }

    fn map_ring(&self, domid: u16, grefs: &[u32]) -> Result<Arc<dyn SharedRing>, GrantError> {
        if domid != self.domid {
            return Err(GrantError::Failed(format!("no domain {domid}")));
        }
        let pages = self.writable_pages(domid, grefs)?;
        Ok(Arc::new(MemRing::new(pages.into_iter().map(|(_, p)| p).collect())))
    }

    fn map_pages(&self, domid: u16, grefs: &[u32]) -> Result<Vec<Arc<dyn GrantPage>>, GrantError> {
        self.maps.fetch_add(1, Ordering::Relaxed);
        if domid != self.domid {
            return Err(GrantError::Failed(format!("no domain {domid}")));
        }
        if !self.mappable.load(Ordering::Relaxed) {
            return Err(GrantError::Failed("mapping disabled".into()));
        }
        if grefs.is_empty() {
            return Err(GrantError::Failed("no grant references".into()));
        }
        // All or nothing, like one gntdev mapping of several refs; always read-write.
        let pages = self.writable_pages(domid, grefs)?;
        Ok(pages
            .into_iter()
            .map(|(gref, page)| {
                self.mapped.fetch_add(1, Ordering::Relaxed);
                Arc::new(SimMapping { gref, page, live: Arc::clone(&self.mapped), direct: Arc::clone(&self.direct) })
                    as Arc<dyn GrantPage>
            })
            .collect())
    }
}

#[derive(Default)]
struct Inbox {
    pending: bool,
}

struct EvtchnShared {
    inbox: Mutex<Inbox>,
    cv: Condvar,
    received: AtomicU64,
}

/// One end of an in-process event channel.
pub struct LocalEvtchn {
    me: Arc<EvtchnShared>,
    peer: Arc<EvtchnShared>,
    sent: AtomicU64,
}

/// A connected pair `(backend end, frontend end)`.
pub fn evtchn_pair() -> (Arc<LocalEvtchn>, Arc<LocalEvtchn>) {
    let mk = || Arc::new(EvtchnShared { inbox: Mutex::default(), cv: Condvar::new(), received: AtomicU64::new(0) });
    let (a, b) = (mk(), mk());
    (
        Arc::new(LocalEvtchn { me: Arc::clone(&a), peer: Arc::clone(&b), sent: AtomicU64::new(0) }),
        Arc::new(LocalEvtchn { me: b, peer: a, sent: AtomicU64::new(0) }),
    )
}

impl LocalEvtchn {
    /// Events this end sent.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    /// Events this end received from the peer.
    pub fn received(&self) -> u64 {
        self.me.received.load(Ordering::Relaxed)
    }
    fn raise(s: &EvtchnShared) {
        s.inbox.lock().unwrap().pending = true;
        s.cv.notify_all();
    }
}

impl EventChannel for LocalEvtchn {
    fn notify(&self) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.peer.received.fetch_add(1, Ordering::Relaxed);
        Self::raise(&self.peer);
    }
    fn wait(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut g = self.me.inbox.lock().unwrap();
        while !g.pending {
            match deadline {
                None => g = self.me.cv.wait(g).unwrap(),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    g = self.me.cv.wait_timeout(g, d - now).unwrap().0;
                }
            }
        }
        g.pending = false;
        true
    }
    fn interrupt(&self) {
        Self::raise(&self.me);
    }
}

/// A response as the frontend sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Response {
    pub id: u64,
    pub operation: u8,
    pub status: i16,
}

/// A data buffer of an I/O request: one granted page per segment.
pub struct IoBuf {
    pub segs: Vec<Segment>,
    pub pages: Vec<Arc<Page>>,
    /// Grants of indirect descriptor pages.
    pub indirect: Vec<u32>,
}

impl IoBuf {
    /// The bytes the segments cover, in order.
    pub fn gather(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (s, p) in self.segs.iter().zip(&self.pages) {
            let mut b = vec![0; s.len()];
            p.read(s.offset(), &mut b);
            out.extend_from_slice(&b);
        }
        out
    }
    pub fn bytes(&self) -> usize {
        self.segs.iter().map(Segment::len).sum()
    }
    /// Put `data` into the segments, in order (the frontend filling its buffer before a
    /// write). `data.len()` must equal [`IoBuf::bytes`].
    pub fn fill(&self, data: &[u8]) {
        assert_eq!(data.len(), self.bytes(), "fill: data does not match the segments");
        let mut pos = 0;
        for (s, p) in self.segs.iter().zip(&self.pages) {
            p.write(s.offset(), &data[pos..pos + s.len()]);
            pos += s.len();
        }
    }
}

/// A xorshift generator for tests: each call returns a number below `n` (`n > 0`).
pub fn rng(seed: u64) -> impl FnMut(u64) -> u64 {
    let mut x = seed;
    move |n| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % n
    }
}

/// `len` pseudo-random bytes determined by `seed` (xorshift), for test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A tiny blkfront over the in-process grant table.
pub struct TestFront {
    pub guest: Arc<TestGuest>,
    pub abi: Abi,
    pub geom: RingGeometry,
    pub ring: MemRing,
    pub ring_refs: Vec<u32>,
    pub evtchn: Arc<LocalEvtchn>,
    /// Grant indirect descriptor pages writable (what Linux blkfront does when persistent
    /// grants are negotiated: they are persistent grants like data pages). Default read-only.
    pub writable_indirect: bool,
    req_prod_pvt: u32,
    rsp_cons: u32,
    next_id: u64,
}

impl TestFront {
    /// Allocate, grant and initialise (`SHARED_RING_INIT`) a ring of `2^order` pages.
    pub fn new(guest: Arc<TestGuest>, abi: Abi, order: u32, evtchn: Arc<LocalEvtchn>) -> TestFront {
        let n = 1usize << order;
        let pages: Vec<_> = (0..n).map(|_| Page::new()).collect();
        let ring_refs = pages.iter().map(|p| guest.grant(p, false)).collect();
        let ring = MemRing::new(pages);
        ring.store_u32_release(SRING_REQ_PROD, 0);
        ring.store_u32_release(SRING_RSP_PROD, 0);
        ring.store_u32_release(SRING_REQ_EVENT, 1);
        ring.store_u32_release(SRING_RSP_EVENT, 1);
        let geom = RingGeometry::new(abi, n).expect("ring fits");
        TestFront {
            guest,
            abi,
            geom,
            ring,
            ring_refs,
            evtchn,
            writable_indirect: false,
            req_prod_pvt: 0,
            rsp_cons: 0,
            next_id: 1,
        }
    }

    /// Start a fresh id (ids are echoed; tests match responses by id).
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Requests queued but not yet answered (as the frontend counts them).
    pub fn outstanding(&self) -> u32 {
        self.req_prod_pvt.wrapping_sub(self.rsp_cons)
    }

    pub fn free_slots(&self) -> u32 {
        self.geom.size - self.outstanding()
    }

    /// Put one entry on the ring (not yet published). `bytes` is padded/cut to the entry size.
    pub fn put_raw(&mut self, bytes: &[u8]) {
        let mut e = vec![0u8; self.abi.entry_size()];
        let n = bytes.len().min(e.len());
        e[..n].copy_from_slice(&bytes[..n]);
        self.ring.write(self.geom.slot_offset(self.req_prod_pvt), &e);
        self.req_prod_pvt = self.req_prod_pvt.wrapping_add(1);
    }

    pub fn put(&mut self, req: &RawRequest) {
        let b = req.encode(self.abi);
        self.put_raw(&b);
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`, notifying when told to. Returns whether it did.
    pub fn push(&mut self) -> bool {
        let old = self.ring.load_u32_acquire(SRING_REQ_PROD);
        let new = self.req_prod_pvt;
        self.ring.store_u32_release(SRING_REQ_PROD, new);
        self.ring.fence();
        let ev = self.ring.load_u32_acquire(SRING_REQ_EVENT);
        let notify = new.wrapping_sub(ev) < new.wrapping_sub(old);
        if notify {
            self.evtchn.notify();
        }
        notify
    }

    /// Hostile: publish an arbitrary `req_prod` and notify.
    pub fn set_req_prod_raw(&mut self, v: u32) {
        self.ring.store_u32_release(SRING_REQ_PROD, v);
        self.evtchn.notify();
    }

    /// Collect published responses; then `RING_FINAL_CHECK_FOR_RESPONSES` (arm rsp_event).
    pub fn take_responses(&mut self) -> Vec<Response> {
        let mut out = Vec::new();
        loop {
            let rp = self.ring.load_u32_acquire(SRING_RSP_PROD);
            while self.rsp_cons != rp {
                let mut b = [0u8; 16];
                let b = &mut b[..self.abi.response_size()];
                self.ring.read(self.geom.slot_offset(self.rsp_cons), b);
                let (id, operation, status) = decode_response(self.abi, b).expect("size");
                out.push(Response { id, operation, status });
                self.rsp_cons = self.rsp_cons.wrapping_add(1);
            }
            self.ring.store_u32_release(SRING_RSP_EVENT, self.rsp_cons.wrapping_add(1));
            self.ring.fence();
            if self.ring.load_u32_acquire(SRING_RSP_PROD) == self.rsp_cons {
                return out;
            }
        }
    }

    /// Wait (on the event channel) until `n` responses arrived or `timeout` passed.
    pub fn wait_responses(&mut self, n: usize, timeout: Duration) -> Vec<Response> {
        let deadline = Instant::now() + timeout;
        let mut out = self.take_responses();
        while out.len() < n {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            self.evtchn.wait(Some((deadline - now).min(Duration::from_millis(50))));
            out.extend(self.take_responses());
        }
        out
    }

    /// Make a buffer for `layout` (one `(first_sect, last_sect)` per segment), each segment in
    /// its own freshly granted page; `data` (if given) is placed into the segments in order.
    /// `readonly` grants the pages read-only (right for writes, wrong for reads).
    pub fn make_buf(&self, layout: &[(u8, u8)], data: Option<&[u8]>, readonly: bool) -> IoBuf {
        let mut pos = 0;
        let mut segs = Vec::new();
        let mut pages = Vec::new();
        for &(f, l) in layout {
            let p = Page::new();
            let gref = self.guest.grant(&p, readonly);
            let s = Segment { gref, first_sect: f, last_sect: l };
            if let Some(d) = data {
                if s.is_valid() {
                    p.write(s.offset(), &d[pos..pos + s.len()]);
                    pos += s.len();
                }
            }
            segs.push(s);
            pages.push(p);
        }
        IoBuf { segs, pages, indirect: Vec::new() }
    }

    /// Queue a read or write of `buf` at `sector` (direct if it fits in 11 segments and
    /// `force_indirect` is false). Returns the request id.
    pub fn queue_io(&mut self, op: u8, sector: u64, buf: &mut IoBuf, force_indirect: bool) -> u64 {
        let id = self.next_id();
        if buf.segs.len() <= MAX_SEGMENTS_PER_REQUEST && !force_indirect {
            self.put(&RawRequest::rw(op, id, sector, &buf.segs));
        } else {
            let bytes = encode_segment_array(&buf.segs);
            let mut grefs = [0u32; MAX_INDIRECT_PAGES_PER_REQUEST];
            for (i, chunk) in bytes.chunks(PAGE_SIZE).enumerate().take(MAX_INDIRECT_PAGES_PER_REQUEST) {
                let p = Page::new();
                p.write(0, chunk);
                grefs[i] = self.guest.grant(&p, !self.writable_indirect);
                buf.indirect.push(grefs[i]);
            }
            self.put(&RawRequest::indirect(op, id, sector, buf.segs.len() as u16, &grefs));
        }
        id
    }

    /// Revoke the grants of a finished buffer.
    pub fn release(&self, buf: &IoBuf) {
        for s in &buf.segs {
            self.guest.revoke(s.gref);
        }
        for &g in &buf.indirect {
            self.guest.revoke(g);
        }
    }

    pub fn queue_flush(&mut self, op: u8) -> u64 {
        let id = self.next_id();
        self.put(&RawRequest::rw(op, id, 0, &[]));
        id
    }

    pub fn queue_discard(&mut self, sector: u64, nr_sectors: u64, secure: bool) -> u64 {
        let id = self.next_id();
        self.put(&RawRequest::Discard {
            flag: if secure { BLKIF_DISCARD_SECURE } else { 0 },
            handle: 0,
            id,
            sector_number: sector,
            nr_sectors,
        });
        id
    }
}

/// Split `nr_sectors` starting anywhere into a simple segment layout of full pages
/// (first segment may start mid-page to exercise offsets): helper for tests.
pub fn simple_layout(nr_sectors: u64, first_offset: u8) -> Vec<(u8, u8)> {
    let mut out = Vec::new();
    let mut left = nr_sectors;
    let mut f = first_offset.min(SECTORS_PER_PAGE - 1);
    while left > 0 {
        let n = (u64::from(SECTORS_PER_PAGE - f)).min(left);
        out.push((f, f + n as u8 - 1));
        left -= n;
        f = 0;
    }
    out
}

/// Fuzz entry point for the whole ring path: `data` is split into ring entries, queued by a
/// hostile frontend that also owns a few data pages (grant refs 9..=12, two of them
/// read-only) and two indirect-looking pages filled from `data`, then served by a
/// [`crate::BlkifRing`] over a 64 KiB disk. The backend must never panic, must answer every
/// entry unless it marked the ring broken, and must answer with the request's id.
pub fn fuzz_ring(data: &[u8]) {
    use crate::backend::{BlkifRing, Features, RingParams};
    use xensnap_blockdev::MemDisk;
    let Some((&ctl, rest)) = data.split_first() else { return };
    let abi = if ctl & 1 == 0 { Abi::X86_64 } else { Abi::X86_32 };
    let guest = TestGuest::new(1);
    let (be, fe) = evtchn_pair();
    let mut front = TestFront::new(guest.clone(), abi, u32::from(ctl >> 1) & 1, fe);
    for i in 0..4 {
        let p = Page::new();
        p.write(0, &[i as u8; PAGE_SIZE]);
        guest.grant(&p, i >= 2);
    }
    for chunk in rest.chunks(PAGE_SIZE).take(2) {
        let p = Page::new();
        p.write(0, chunk);
        guest.grant(&p, true);
    }
    let ring = BlkifRing::new(RingParams {
        domid: 1,
        abi,
        ring: guest.map_ring(1, &front.ring_refs).expect("ring"),
        grants: guest.clone(),
        evtchn: be,
        device: Arc::new(MemDisk::new(64 << 10)),
        features: Features { discard_secure: ctl & 4 != 0, max_persistent_grants: 3, ..Features::default() },
        persistent: ctl & 16 != 0,
    })
    .expect("geometry");
    let entries: Vec<&[u8]> = rest.chunks(abi.entry_size()).take(front.geom.size as usize).collect();
    for e in &entries {
        front.put_raw(e);
    }
    if ctl & 8 != 0 {
        front.set_req_prod_raw(u32::from_le_bytes([ctl, 0, 0, ctl >> 4]));
    } else {
        front.push();
    }
    while ring.poll() == crate::backend::Poll::Busy {}
    let rsps = front.take_responses();
    ring.unmap_persistent();
    assert_eq!(guest.live_mappings(), 0, "persistent grants left mapped");
    // A guest may name its own ring page as a data buffer; then the frontend's view of the
    // ring is legitimately garbage (the backend must merely survive it).
    let names_ring = front.ring_refs.iter().any(|r| data.windows(4).any(|w| w == r.to_le_bytes()));
    if ring.broken().is_none() && ctl & 8 == 0 && !names_ring {
        assert_eq!(rsps.len(), entries.len());
        for (e, r) in entries.iter().zip(&rsps) {
            let mut full = vec![0u8; abi.entry_size()];
            full[..e.len()].copy_from_slice(e);
            assert_eq!(r.id, parse_request(abi, &full).expect("size").id());
        }
    }
}
