//! Shared harness: one MemDisk served by one BlkifRing to one TestFront, driven in-process.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use xensnap_blkif::abi::*;
pub use xensnap_blkif::sim::pattern;
use xensnap_blkif::sim::*;
use xensnap_blkif::*;
use xensnap_blockdev::{BlockDevice, MemDisk};

pub const DOMID: u16 = 7;

pub struct H {
    pub disk: Arc<MemDisk>,
    pub guest: Arc<TestGuest>,
    pub front: TestFront,
    pub ring: Arc<BlkifRing>,
    pub be_evt: Arc<sim::LocalEvtchn>,
}

impl H {
    pub fn new(abi: Abi, order: u32, disk_bytes: usize, features: Features) -> H {
        Self::with_device(abi, order, Arc::new(MemDisk::new(disk_bytes)), features)
    }

    pub fn with_device(abi: Abi, order: u32, disk: Arc<MemDisk>, features: Features) -> H {
        Self::with_dyn(abi, order, disk.clone(), disk, features)
    }

    /// `served` is what the ring serves (may wrap `disk`); `disk` is what tests inspect.
    pub fn with_dyn(abi: Abi, order: u32, disk: Arc<MemDisk>, served: Arc<dyn BlockDevice>, features: Features) -> H {
        Self::build(abi, order, disk, served, features, false)
    }

    /// Like [`H::new`] with persistent grants negotiated (`features.persistent` must be set).
    pub fn persistent(abi: Abi, order: u32, disk_bytes: usize, features: Features) -> H {
        let disk = Arc::new(MemDisk::new(disk_bytes));
        Self::build(abi, order, disk.clone(), disk, features, true)
    }

    /// Persistent grants negotiated, serving `served` (the MemDisk is an unused stand-in).
    pub fn persistent_serving(abi: Abi, order: u32, served: Arc<dyn BlockDevice>, features: Features) -> H {
        Self::build(abi, order, Arc::new(MemDisk::new(0)), served, features, true)
    }

    fn build(
        abi: Abi,
        order: u32,
        disk: Arc<MemDisk>,
        served: Arc<dyn BlockDevice>,
        features: Features,
        persistent: bool,
    ) -> H {
        let guest = TestGuest::new(DOMID);
        let (be_evt, fe_evt) = evtchn_pair();
        let mut front = TestFront::new(guest.clone(), abi, order, fe_evt);
        front.writable_indirect = persistent;
        let ring_mem = guest.map_ring(DOMID, &front.ring_refs).unwrap();
        let ring = Arc::new(
            BlkifRing::new(RingParams {
                domid: DOMID,
                abi,
                ring: ring_mem,
                grants: guest.clone(),
                evtchn: be_evt.clone(),
                device: served,
                features,
                persistent,
            })
            .unwrap(),
        );
        H { disk, guest, front, ring, be_evt }
    }

    /// Publish what is queued, let the backend run in this thread, collect responses.
    pub fn run(&mut self) -> Vec<Response> {
        self.front.push();
        let mut p;
        loop {
            p = self.ring.poll();
            if p != Poll::Busy {
                break;
            }
        }
        self.front.take_responses()
    }

    pub fn one(&mut self, req: &RawRequest) -> Response {
        self.front.put(req);
        let r = self.run();
        assert_eq!(r.len(), 1, "{r:?}");
        r[0]
    }

    pub fn one_raw(&mut self, bytes: &[u8]) -> Response {
        self.front.put_raw(bytes);
        let r = self.run();
        assert_eq!(r.len(), 1, "{r:?}");
        r[0]
    }

    pub fn read(&mut self, sector: u64, layout: &[(u8, u8)], indirect: bool) -> (i16, Vec<u8>) {
        let mut b = self.front.make_buf(layout, None, false);
        let id = self.front.queue_io(BLKIF_OP_READ, sector, &mut b, indirect);
        let r = self.run();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].id, id);
        assert_eq!(r[0].operation, BLKIF_OP_READ);
        let data = b.gather();
        self.front.release(&b);
        (r[0].status, data)
    }

    pub fn write(&mut self, sector: u64, layout: &[(u8, u8)], data: &[u8], indirect: bool) -> i16 {
        let mut b = self.front.make_buf(layout, Some(data), true);
        let id = self.front.queue_io(BLKIF_OP_WRITE, sector, &mut b, indirect);
        let r = self.run();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].id, id);
        assert_eq!(r[0].operation, BLKIF_OP_WRITE);
        self.front.release(&b);
        r[0].status
    }
}

pub const SHORT: Duration = Duration::from_secs(5);

/// Features with persistent grants bounded at `max` and no I/O threads.
pub fn pfeat(max: u32) -> Features {
    Features { max_persistent_grants: max, workers: 0, ..Features::default() }
}

/// Queue `op` on `buf` (kept granted: the frontend reuses it), run, return the status.
pub fn io(h: &mut H, op: u8, sector: u64, buf: &mut IoBuf, indirect: bool) -> i16 {
    let id = h.front.queue_io(op, sector, buf, indirect);
    let r = h.run();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].id, id);
    r[0].status
}

/// One random request of the twin-ring tests (a grant-copy ring against another data path):
/// a buffer slot with its fixed layout, a sector where it fits in the first `sectors`, read or
/// write, indirect when the layout needs it (else one time in four), and the data a write
/// carries (`pattern(step, ..)`).
pub struct RandomRequest {
    pub slot: usize,
    pub layout: Vec<(u8, u8)>,
    pub sector: u64,
    pub write: bool,
    pub indirect: bool,
    pub data: Vec<u8>,
}

pub fn random_request(
    next: &mut impl FnMut(u64) -> u64,
    layouts: &[Vec<(u8, u8)>],
    sectors: u64,
    step: u64,
) -> RandomRequest {
    let slot = next(layouts.len() as u64) as usize;
    let layout = layouts[slot].clone();
    let nsect: u64 = layout.iter().map(|&(f, l)| u64::from(l - f) + 1).sum();
    let sector = next(sectors - nsect);
    let write = next(2) == 0;
    let indirect = layout.len() > 11 || next(4) == 0;
    let data = pattern(step, nsect as usize * 512);
    RandomRequest { slot, layout, sector, write, indirect, data }
}
