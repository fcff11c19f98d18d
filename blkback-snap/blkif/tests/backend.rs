//! The ring backend against the in-process frontend: every op, every ABI, hostile requests,
//! event suppression and the quiesce/resume barrier.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use xensnap_blkif::abi::*;
use xensnap_blkif::request::encode_segment_array;
use xensnap_blkif::sim::*;
use xensnap_blkif::*;
use xensnap_blockdev::{BlockDevice, BlockResult, MemDisk};

const DISK: usize = 1 << 20; // 2048 sectors
const SECTORS: u64 = (DISK / 512) as u64;

fn seg(gref: u32, f: u8, l: u8) -> Segment {
    Segment { gref, first_sect: f, last_sect: l }
}

#[test]
fn basic_ops_all_abis_and_ring_orders() {
    for abi in Abi::ALL {
        for order in [0, 1, 2, 4] {
            let mut h = H::new(abi, order, DISK, Features::default());
            assert_eq!(h.ring.geometry().size, h.front.geom.size);
            // Direct write of 3 segments with odd offsets, read back with a different layout.
            let data = pattern(1, 3 * 512 + 8 * 512 + 2 * 512);
            assert_eq!(h.write(10, &[(5, 7), (0, 7), (3, 4)], &data, false), BLKIF_RSP_OKAY);
            let (st, got) = h.read(10, &simple_layout(13, 2), false);
            assert_eq!(st, BLKIF_RSP_OKAY);
            assert_eq!(got, data);
            assert_eq!(&h.disk.snapshot()[10 * 512..23 * 512], &data[..]);
            // Indirect write of 100 segments (more than 11) and indirect read.
            let layout = simple_layout(800, 0);
            assert_eq!(layout.len(), 100);
            let big = pattern(2, 800 * 512);
            assert_eq!(h.write(1000, &layout, &big, true), BLKIF_RSP_OKAY);
            let (st, got) = h.read(1000, &layout, true);
            assert_eq!(st, BLKIF_RSP_OKAY);
            assert_eq!(got, big);
            // Flush, barrier (pure and with data), discard.
            let id = h.front.queue_flush(BLKIF_OP_FLUSH_DISKCACHE);
            let r = h.run();
            assert_eq!((r[0].id, r[0].operation, r[0].status), (id, BLKIF_OP_FLUSH_DISKCACHE, 0));
            let id = h.front.queue_flush(BLKIF_OP_WRITE_BARRIER);
            let r = h.run();
            assert_eq!((r[0].id, r[0].operation, r[0].status), (id, BLKIF_OP_WRITE_BARRIER, 0));
            let mut b = h.front.make_buf(&[(0, 7)], Some(&[0xab; 4096]), true);
            let id = h.front.next_id();
            h.front.put(&RawRequest::rw(BLKIF_OP_WRITE_BARRIER, id, 0, &b.segs));
            let r = h.run();
            assert_eq!((r[0].id, r[0].status), (id, 0));
            assert_eq!(&h.disk.snapshot()[..4096], &[0xab; 4096][..]);
            h.front.release(&b);
            b = h.front.make_buf(&[(0, 0)], Some(&[0xcd; 512]), true);
            let id = h.front.next_id();
            h.front.put(&RawRequest::rw(BLKIF_OP_FLUSH_DISKCACHE, id, SECTORS - 1, &b.segs));
            assert_eq!(h.run()[0].status, 0);
            assert_eq!(&h.disk.snapshot()[DISK - 512..], &[0xcd; 512][..]);
            h.front.release(&b);
            let id = h.front.queue_discard(1000, 800, false);
            let r = h.run();
            assert_eq!((r[0].id, r[0].operation, r[0].status), (id, BLKIF_OP_DISCARD, 0));
            let (_, got) = h.read(1000, &layout, true);
            assert!(got.iter().all(|&b| b == 0));
            assert!(h.ring.broken().is_none());
            // All grants of finished requests were released (no leaks in the test front).
            assert_eq!(h.guest.live_grants(), 1 << order);
        }
    }
}

#[test]
fn many_requests_in_one_batch_wrap_the_ring() {
    for abi in Abi::ALL {
        let mut h = H::new(abi, 0, DISK, Features::default());
        let size = h.front.geom.size as u64;
        // Several rounds of a full ring: indices wrap the ring many times.
        for round in 0..20u64 {
            let mut bufs = Vec::new();
            for i in 0..size {
                let sector = (round * size + i) % (SECTORS - 8);
                let data = pattern(round * 1000 + i, 512);
                let mut b = h.front.make_buf(&[(3, 3)], Some(&data), true);
                let id = h.front.queue_io(BLKIF_OP_WRITE, sector, &mut b, false);
                bufs.push((id, b, sector, data));
            }
            assert_eq!(h.front.free_slots(), 0);
            let r = h.run();
            assert_eq!(r.len() as u64, size);
            for ((id, b, sector, data), rsp) in bufs.iter().zip(&r) {
                assert_eq!((rsp.id, rsp.status), (*id, 0));
                assert_eq!(&h.disk.snapshot()[*sector as usize * 512..][..512], &data[..]);
                h.front.release(b);
            }
        }
        assert_eq!(h.ring.stats().requests, 20 * size);
    }
}

#[test]
fn indirect_across_indirect_page_boundary() {
    let f = Features { max_indirect_segments: 1024, ..Features::default() };
    let mut h = H::new(Abi::X86_64, 0, 8 << 20, f);
    let layout: Vec<(u8, u8)> = (0..600).map(|i| ((i % 8) as u8, 7)).collect();
    let n: usize = layout.iter().map(|(f, l)| (l - f + 1) as usize).sum();
    let data = pattern(9, n * 512);
    assert_eq!(h.write(3, &layout, &data, true), 0);
    let (st, got) = h.read(3, &simple_layout(n as u64, 0), true);
    assert_eq!(st, 0);
    assert_eq!(got, data);
}

#[test]
fn event_suppression() {
    let mut h = H::new(Abi::X86_64, 0, DISK, Features::default());
    // First request: the frontend's initial req_event = 1 asks for an event.
    h.front.put(&RawRequest::rw(BLKIF_OP_READ, 1, 0, &[]));
    assert!(h.front.push());
    assert_eq!(h.ring.poll(), Poll::Idle);
    assert_eq!(h.be_evt.sent(), 1, "rsp_event = 1 asks for the first response");
    // The frontend does not consume (rsp_event stays 1): more responses, no more events.
    for id in 2..5 {
        h.front.put(&RawRequest::rw(BLKIF_OP_READ, id, 0, &[]));
        h.front.push();
        assert_eq!(h.ring.poll(), Poll::Idle);
    }
    assert_eq!(h.be_evt.sent(), 1);
    assert_eq!(h.front.take_responses().len(), 4); // re-arms rsp_event
    h.front.put(&RawRequest::rw(BLKIF_OP_READ, 9, 0, &[]));
    h.front.push();
    h.ring.poll();
    assert_eq!(h.be_evt.sent(), 2);
    // Backend idle: it armed req_event = req_cons + 1, so the next push notifies, and a second
    // push before the backend looked again does not.
    h.front.take_responses();
    h.front.put(&RawRequest::rw(BLKIF_OP_READ, 10, 0, &[]));
    assert!(h.front.push());
    h.front.put(&RawRequest::rw(BLKIF_OP_READ, 11, 0, &[]));
    assert!(!h.front.push());
    h.ring.poll();
    assert_eq!(h.front.take_responses().len(), 2);
}

/// Checks hostile requests one by one; after each a good request still works and the disk
/// matches the model (only legitimate writes changed it).
#[test]
fn hostile_requests() {
    for abi in Abi::ALL {
        let mut h = H::new(abi, 0, DISK, Features::default());
        let mut model = vec![0u8; DISK];
        let good = |h: &mut H, model: &mut Vec<u8>, n: u64| {
            let sector = (n * 37) % (SECTORS - 16);
            let data = pattern(n + 1000, 2 * 512);
            assert_eq!(h.write(sector, &[(6, 7)], &data, false), 0, "good write after hostile #{n}");
            model[sector as usize * 512..][..1024].copy_from_slice(&data);
            let (st, got) = h.read(sector, &[(0, 1)], false);
            assert_eq!((st, got), (0, data));
            assert_eq!(h.disk.snapshot(), *model, "disk changed by hostile #{n}");
            assert!(h.ring.broken().is_none());
        };
        let mut n = 0;
        let mut expect = |h: &mut H, model: &mut Vec<u8>, req: RawRequest, status: i16| {
            let id = req.id();
            let op = req.response_operation();
            let r = h.one(&req);
            assert_eq!((r.id, r.operation, r.status), (id, op, status), "{abi:?} {req:?}");
            n += 1;
            good(h, model, n);
        };
        let page = Page::new();
        page.write(0, &[0x55; 4096]);
        let g = h.guest.grant(&page, true);
        let gw = h.guest.grant(&Page::new(), false);
        let e = BLKIF_RSP_ERROR;
        // Sector past the end, exactly at the end, overflowing.
        expect(&mut h, &mut model, RawRequest::rw(1, 0x1111, SECTORS, &[seg(g, 0, 0)]), e);
        expect(&mut h, &mut model, RawRequest::rw(1, 0x1112, SECTORS - 1, &[seg(g, 0, 1)]), e);
        expect(&mut h, &mut model, RawRequest::rw(0, 0x1113, SECTORS - 1, &[seg(gw, 0, 0), seg(gw, 0, 0)]), e);
        expect(&mut h, &mut model, RawRequest::rw(1, 0x1114, u64::MAX, &[seg(g, 0, 0)]), e);
        expect(&mut h, &mut model, RawRequest::rw(1, 0x1115, u64::MAX - 3, &[seg(g, 0, 7)]), e);
        // Bad segments.
        expect(&mut h, &mut model, RawRequest::rw(1, 0x1121, 0, &[seg(g, 0, 7), seg(g, 5, 4)]), e);
        expect(&mut h, &mut model, RawRequest::rw(1, 0x1122, 0, &[seg(g, 0, 8)]), e);
        expect(&mut h, &mut model, RawRequest::rw(0, 0x1123, 0, &[seg(gw, 7, 255)]), e);
        // nr_segments 0 for read/write, 12, 255.
        expect(&mut h, &mut model, RawRequest::rw(0, 0x1131, 0, &[]), e);
        expect(&mut h, &mut model, RawRequest::rw(1, 0x1132, 0, &[]), e);
        for nr in [12u8, 255] {
            let mut r = RawRequest::rw(1, 0x1133, 0, &[seg(g, 0, 0); 11]);
            if let RawRequest::Rw { nr_segments, .. } = &mut r {
                *nr_segments = nr;
            }
            expect(&mut h, &mut model, r, e);
        }
        // Indirect: too many pages, more than offered, zero, bad indirect_op, bad indirect
        // page gref, bad segment inside the page, past the end.
        let ind = |op, nseg, id, sector, grefs: [u32; 8]| RawRequest::indirect(op, id, sector, nseg, &grefs);
        let segs_page = Page::new();
        segs_page.write(0, &encode_segment_array(&[seg(g, 0, 7); 20]));
        let gi = h.guest.grant(&segs_page, true);
        expect(&mut h, &mut model, ind(1, 4097, 0x1141, 0, [gi; 8]), e);
        expect(&mut h, &mut model, ind(1, 65535, 0x1142, 0, [gi; 8]), e);
        expect(&mut h, &mut model, ind(1, 257, 0x1143, 0, [gi; 8]), e);
        expect(&mut h, &mut model, ind(1, 0, 0x1144, 0, [gi; 8]), e);
        expect(&mut h, &mut model, ind(BLKIF_OP_DISCARD, 1, 0x1145, 0, [gi; 8]), e);
        expect(&mut h, &mut model, ind(BLKIF_OP_INDIRECT, 1, 0x1146, 0, [gi; 8]), e);
        expect(&mut h, &mut model, ind(1, 20, 0x1147, 0, [999_999; 8]), e);
        let bad_page = Page::new();
        let mut bad = vec![seg(g, 0, 7); 20];
        bad[13] = seg(g, 6, 2);
        bad_page.write(0, &encode_segment_array(&bad));
        let gb = h.guest.grant(&bad_page, true);
        expect(&mut h, &mut model, ind(1, 20, 0x1148, 0, [gb; 8]), e);
        expect(&mut h, &mut model, ind(1, 20, 0x1149, SECTORS - 159, [gi; 8]), e);
        expect(&mut h, &mut model, ind(0, 20, 0x114a, u64::MAX - 100, [gi; 8]), e);
        // ...and the valid version of that indirect write does work.
        let r = h.one(&ind(1, 20, 0x114b, 100, [gi; 8]));
        assert_eq!(r.status, 0);
        model[100 * 512..260 * 512].fill(0x55);
        good(&mut h, &mut model, 500);
        // Invalid grant refs: a write with one bad ref among good ones must not touch the disk.
        expect(&mut h, &mut model, RawRequest::rw(1, 0x1151, 0, &[seg(g, 0, 7), seg(12345, 0, 7)]), e);
        expect(&mut h, &mut model, RawRequest::rw(0, 0x1152, 0, &[seg(12345, 0, 7)]), e);
        // A READ into a read-only grant.
        expect(&mut h, &mut model, RawRequest::rw(0, 0x1153, 0, &[seg(g, 0, 7)]), e);
        assert_eq!(page.to_vec(), vec![0x55; 4096], "read-only page was written");
        // Unknown operations.
        for op in [BLKIF_OP_RESERVED_1, 7, 0x80, 0xff] {
            expect(
                &mut h,
                &mut model,
                RawRequest::Other { operation: op, id: 0x1160 + op as u64 },
                BLKIF_RSP_EOPNOTSUPP,
            );
        }
        // Discard: past end, overflow, secure when not offered.
        let disc = |id, s, nr, flag| RawRequest::Discard { flag, handle: 0, id, sector_number: s, nr_sectors: nr };
        expect(&mut h, &mut model, disc(0x1171, SECTORS, 1, 0), e);
        expect(&mut h, &mut model, disc(0x1172, 1, u64::MAX, 0), e);
        expect(&mut h, &mut model, disc(0x1173, 0, 8, BLKIF_DISCARD_SECURE), BLKIF_RSP_EOPNOTSUPP);
        // Garbage entries: every one gets exactly one response with its id; the ring survives.
        for i in 0..200u64 {
            let mut bytes = pattern(i + 77, abi.entry_size());
            if bytes[0] == 1 || bytes[0] == 2 || bytes[0] == 3 || bytes[0] == 5 {
                bytes[0] = 0; // never a write-type op: garbage must not be able to hit a live grant
            }
            let r = h.one_raw(&bytes);
            let req = parse_request(abi, &bytes).unwrap();
            assert_eq!(r.id, req.id());
        }
        good(&mut h, &mut model, 1000);
    }
}

#[test]
fn hostile_producer_breaks_only_that_ring() {
    for abi in Abi::ALL {
        let mut h = H::new(abi, 0, DISK, Features::default());
        let data = pattern(5, 512);
        assert_eq!(h.write(0, &[(0, 0)], &data, false), 0);
        let size = h.front.geom.size;
        // req_prod ahead of rsp_prod by more than the ring size.
        h.front.set_req_prod_raw(1 + size + 1);
        assert_eq!(h.ring.poll(), Poll::Broken);
        assert!(h.ring.broken().unwrap().contains("req_prod"));
        assert_eq!(h.ring.poll(), Poll::Broken);
        // Worker exits cleanly on a broken ring.
        assert_eq!(h.ring.run(), Poll::Broken);
        assert_eq!(&h.disk.snapshot()[..512], &data[..]);
        // req_prod behind (wrapped): also more than size ahead in modular arithmetic.
        let mut h = H::new(abi, 0, DISK, Features::default());
        h.front.set_req_prod_raw(u32::MAX);
        assert_eq!(h.ring.poll(), Poll::Broken);
        // A full ring (exactly size outstanding) is legal.
        let mut h = H::new(abi, 0, DISK, Features::default());
        for i in 0..size {
            h.front.put(&RawRequest::rw(BLKIF_OP_FLUSH_DISKCACHE, i as u64, 0, &[]));
        }
        assert_eq!(h.run().len(), size as usize);
        assert!(h.ring.broken().is_none());
    }
}

#[test]
fn read_only_device_and_features_off() {
    let disk = Arc::new(MemDisk::from_vec(pattern(3, DISK), true));
    let f = Features { flush: false, barrier: false, discard: false, max_indirect_segments: 0, ..Features::default() };
    let mut h = H::with_device(Abi::X86_64, 0, disk, f);
    let g = h.guest.grant(&Page::new(), true);
    assert_eq!(h.one(&RawRequest::rw(1, 1, 0, &[seg(g, 0, 0)])).status, BLKIF_RSP_ERROR);
    assert_eq!(h.one(&RawRequest::rw(3, 2, 0, &[])).status, BLKIF_RSP_EOPNOTSUPP);
    assert_eq!(h.one(&RawRequest::rw(2, 3, 0, &[])).status, BLKIF_RSP_EOPNOTSUPP);
    let d = RawRequest::Discard { flag: 0, handle: 0, id: 4, sector_number: 0, nr_sectors: 1 };
    assert_eq!(h.one(&d).status, BLKIF_RSP_EOPNOTSUPP);
    let (st, got) = h.read(0, &[(0, 7)], true);
    assert_eq!(st, BLKIF_RSP_EOPNOTSUPP);
    assert!(got.iter().all(|&b| b == 0));
    let (st, got) = h.read(2, &[(0, 7)], false);
    assert_eq!(st, 0);
    assert_eq!(got, pattern(3, DISK)[1024..1024 + 4096]);
    assert_eq!(h.disk.snapshot(), pattern(3, DISK));
}

#[test]
fn secure_discard_when_offered() {
    let f = Features { discard_secure: true, ..Features::default() };
    let disk = Arc::new(MemDisk::from_vec(vec![0xee; DISK], false));
    let mut h = H::with_device(Abi::X86_32, 0, disk, f);
    let d = RawRequest::Discard { flag: BLKIF_DISCARD_SECURE, handle: 0, id: 4, sector_number: 8, nr_sectors: 8 };
    assert_eq!(h.one(&d).status, 0);
    let s = h.disk.snapshot();
    assert!(s[4096..8192].iter().all(|&b| b == 0));
    assert!(s[..4096].iter().chain(&s[8192..]).all(|&b| b == 0xee));
}

/// A device whose writes block until released, to hold a request in flight.
struct GateDisk {
    inner: Arc<MemDisk>,
    state: Mutex<(bool, usize)>, // (held, writers inside)
    cv: Condvar,
}

impl GateDisk {
    fn set_held(&self, held: bool) {
        self.state.lock().unwrap().0 = held;
        self.cv.notify_all();
    }
    fn wait_inside(&self, n: usize) {
        let mut g = self.state.lock().unwrap();
        while g.1 < n {
            g = self.cv.wait(g).unwrap();
        }
    }
}

impl BlockDevice for GateDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, o: u64, b: &mut [u8]) -> BlockResult<()> {
        self.inner.read_at(o, b)
    }
    fn write_at(&self, o: u64, b: &[u8]) -> BlockResult<()> {
        let mut g = self.state.lock().unwrap();
        g.1 += 1;
        self.cv.notify_all();
        while g.0 {
            g = self.cv.wait(g).unwrap();
        }
        drop(g);
        self.inner.write_at(o, b)
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn discard(&self, o: u64, l: u64) -> BlockResult<()> {
        self.inner.discard(o, l)
    }
    fn write_zeroes(&self, o: u64, l: u64, u: bool) -> BlockResult<()> {
        self.inner.write_zeroes(o, l, u)
    }
}

#[test]
fn quiesce_waits_for_in_flight_and_holds_new_requests() {
    // workers = 0: one request at a time (request 2 stays on the ring behind the blocked one);
    // workers = 4: both writes are in the device at once and quiesce waits for both.
    for workers in [0u32, 4] {
        let disk = Arc::new(MemDisk::new(DISK));
        let gate = Arc::new(GateDisk { inner: disk.clone(), state: Mutex::new((true, 0)), cv: Condvar::new() });
        let f = Features { workers, adaptive_offload: false, ..Features::default() };
        let mut h = H::with_dyn(Abi::X86_64, 0, disk, gate.clone(), f);
        let worker = h.ring.spawn("blkif-test".into()).unwrap();
        let mut b1 = h.front.make_buf(&[(0, 7)], Some(&[1; 4096]), true);
        let mut b2 = h.front.make_buf(&[(0, 7)], Some(&[2; 4096]), true);
        h.front.queue_io(BLKIF_OP_WRITE, 0, &mut b1, false);
        h.front.queue_io(BLKIF_OP_WRITE, 8, &mut b2, false);
        h.front.push();
        let admitted = if workers == 0 { 1 } else { 2 };
        gate.wait_inside(admitted); // the admitted requests are inside the device
        let ring = h.ring.clone();
        let done = Arc::new(AtomicBool::new(false));
        let d2 = done.clone();
        let q = std::thread::spawn(move || {
            let n = ring.quiesce();
            d2.store(true, Ordering::SeqCst);
            n
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(!done.load(Ordering::SeqCst), "quiesce returned with a request in flight");
        gate.set_held(false);
        assert_eq!(q.join().unwrap(), admitted);
        let st = h.ring.stats();
        assert_eq!(st.peak_in_flight, admitted as u64);
        assert_eq!(st.offloaded, admitted as u64 - 1, "all but the last visible request go to the pool");
        // Every admitted request's response is published before quiesce returned.
        let r = h.front.take_responses();
        assert_eq!(r.len(), admitted);
        let a = admitted as u32;
        assert_eq!(h.ring.indices(), (a, a));
        // The frontend queues more while quiesced: nothing moves.
        let mut b3 = h.front.make_buf(&[(0, 7)], Some(&[3; 4096]), true);
        h.front.queue_io(BLKIF_OP_WRITE, 16, &mut b3, false);
        h.front.push();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(h.ring.indices(), (a, a));
        assert!(h.disk.snapshot()[(8 * admitted) * 512..24 * 512].iter().all(|&b| b == 0));
        assert_eq!(h.ring.quiesce(), 0, "quiesce is idempotent");
        h.ring.resume();
        let r = h.front.wait_responses(3 - admitted, SHORT);
        assert_eq!(r.len(), 3 - admitted);
        assert!(r.iter().all(|r| r.status == 0));
        let s = h.disk.snapshot();
        assert!(s[..4096].iter().all(|&b| b == 1) && s[4096..8192].iter().all(|&b| b == 2));
        assert!(s[8192..12288].iter().all(|&b| b == 3));
        h.ring.stop();
        assert_eq!(worker.join().unwrap(), Poll::Stopped);
    }
}

#[test]
fn quiesce_resume_with_concurrent_submitter() {
    for abi in Abi::ALL {
        let h = H::new(abi, 1, DISK, Features::default());
        let H { disk, ring, mut front, .. } = h;
        let worker = ring.spawn("blkif-worker".into()).unwrap();
        // The submitter runs until the main thread has done enough quiesce/resume cycles (a
        // count, not a time, so the test does not depend on the machine's speed).
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_sub = stop.clone();
        let sub = std::thread::spawn(move || {
            // Keep up to 8 writes in flight; each write stamps its sequence number on sector
            // (seq % 64). Returns the final per-sector stamp.
            let mut inflight = std::collections::HashMap::new();
            let mut last = vec![0u64; 64];
            let mut seq = 1u64;
            loop {
                let stopping = stop_sub.load(std::sync::atomic::Ordering::SeqCst);
                if stopping && inflight.is_empty() {
                    break;
                }
                while !stopping && inflight.len() < 8 {
                    let mut data = vec![0u8; 512];
                    data[..8].copy_from_slice(&seq.to_le_bytes());
                    let mut b = front.make_buf(&[(1, 1)], Some(&data), true);
                    let id = front.queue_io(BLKIF_OP_WRITE, seq % 64, &mut b, seq.is_multiple_of(3));
                    inflight.insert(id, (b, seq));
                    seq += 1;
                }
                front.push();
                for r in front.wait_responses(1, Duration::from_millis(20)) {
                    assert_eq!(r.status, 0);
                    let (b, s) = inflight.remove(&r.id).expect("known id");
                    front.release(&b);
                    last[(s % 64) as usize] = last[(s % 64) as usize].max(s);
                }
            }
            last
        });
        let mut quiesces = 0;
        let mut drained_total = 0;
        while quiesces < 30 {
            assert!(!sub.is_finished(), "submitter ended early");
            let drained = ring.quiesce();
            drained_total += drained;
            quiesces += 1;
            let (c1, p1) = ring.indices();
            assert_eq!(c1, p1, "every consumed request is answered when quiesced");
            let snap = disk.snapshot();
            std::thread::sleep(Duration::from_millis(2));
            assert_eq!(ring.indices(), (c1, p1), "progress while quiesced");
            assert_eq!(disk.snapshot(), snap, "disk changed while quiesced");
            ring.resume();
            std::thread::sleep(Duration::from_millis(3));
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let last = sub.join().unwrap();
        let s = disk.snapshot();
        for (sector, &seq) in last.iter().enumerate() {
            let got = u64::from_le_bytes(s[sector * 512..][..8].try_into().unwrap());
            assert_eq!(got, seq, "sector {sector}");
        }
        eprintln!("{abi:?}: {quiesces} quiesce/resume cycles, {drained_total} requests drained");
        ring.stop();
        assert_eq!(worker.join().unwrap(), Poll::Stopped);
    }
}

#[test]
fn fuzz_ring_smoke() {
    for seed in 0..300u64 {
        let len = (seed as usize * 37) % 5000;
        let mut d = pattern(seed, len);
        if let Some(c) = d.first_mut() {
            *c &= !8; // mostly well-behaved producer index
        }
        fuzz_ring(&d);
    }
    fuzz_ring(&[8, 1, 2, 3]);
    fuzz_ring(&[]);
}

/// A frontend that behaves like Linux blkfront: it notifies only when `req_event` asks for it
/// and then sleeps on its event channel until the backend notifies a response. Meanwhile
/// another thread quiesces and resumes the ring as fast as it can, so requests are queued on
/// the ring (and in flight) at every kind of moment of a quiesce/resume. A backend that misses
/// the wake-up of a resume (or loses a notification either way) leaves the frontend without a
/// response: the bounded wait below fails the test instead of hanging.
#[test]
fn no_lost_wakeup_across_quiesce_resume() {
    const BOUND: Duration = Duration::from_secs(10);
    for (workers, adaptive_offload) in [(0u32, false), (4, false), (4, true)] {
        for abi in Abi::ALL {
            let f = Features { workers, adaptive_offload, ..Features::default() };
            let H { ring, mut front, disk, .. } = H::new(abi, 0, DISK, f);
            let worker = ring.spawn("blkif-wakeup".into()).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let (s2, r2) = (stop.clone(), ring.clone());
            let ctl = std::thread::spawn(move || {
                let mut cycles = 0u64;
                while !s2.load(Ordering::SeqCst) {
                    r2.quiesce();
                    let (c, p) = r2.indices();
                    assert_eq!(c, p, "quiesce returned with an unanswered request");
                    r2.resume();
                    cycles += 1;
                }
                cycles
            });
            let mut inflight = std::collections::HashMap::new();
            let mut answered = 0u64;
            let mut seq = 0u64;
            while answered < 2000 {
                while inflight.len() < 8 {
                    seq += 1;
                    let mut data = vec![0u8; 512];
                    data[..8].copy_from_slice(&seq.to_le_bytes());
                    let mut b = front.make_buf(&[(0, 0)], Some(&data), true);
                    let id = front.queue_io(BLKIF_OP_WRITE, seq % 64, &mut b, seq.is_multiple_of(5));
                    inflight.insert(id, b);
                }
                front.push();
                let mut got = front.take_responses();
                while got.is_empty() {
                    if !front.evtchn.wait(Some(BOUND)) {
                        panic!(
                            "{abi:?}, {workers} workers: no response for {BOUND:?} after {answered} \
                             answers, {} in flight, ring indices {:?}, quiesced {}",
                            inflight.len(),
                            ring.indices(),
                            ring.is_quiesced()
                        );
                    }
                    got = front.take_responses();
                }
                for r in got {
                    assert_eq!(r.status, 0);
                    let b = inflight.remove(&r.id).expect("answer to a request in flight");
                    front.release(&b);
                    answered += 1;
                }
            }
            stop.store(true, Ordering::SeqCst);
            let cycles = ctl.join().unwrap();
            assert!(cycles > 0);
            // Drain what is still in flight, then check the last stamp of a few sectors.
            while !inflight.is_empty() {
                let got = front.wait_responses(1, BOUND);
                assert!(!got.is_empty(), "stalled while draining");
                for r in got {
                    front.release(&inflight.remove(&r.id).expect("known id"));
                }
            }
            let s = disk.snapshot();
            let last = u64::from_le_bytes(s[(seq % 64) as usize * 512..][..8].try_into().unwrap());
            assert_eq!(last, seq, "newest write of its sector");
            ring.stop();
            assert_eq!(worker.join().unwrap(), Poll::Stopped);
        }
    }
}
