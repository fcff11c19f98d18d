//! The whole data path of a persistently mapped request on a qcow2 image file, without Xen:
//! blkif ring (sim guest, persistent grants) -> `SharedImage::read_into`/`write_from` ->
//! `preadv`/`pwritev` straight between the image file and the mapped pages. Against a twin
//! image written with plain `Qcow2::write`: same reads, same disk; a checkpoint taken midway
//! keeps its data while the guest overwrites it (copy-on-write), and the file's bytes of the
//! checkpoint's data clusters never change.

use std::sync::Arc;

use xensnap_blkif::abi::*;
use xensnap_blkif::sim::*;
use xensnap_blkif::*;
use xensnap_blockdev::BlockDevice;
use xensnap_qcow2::{CreateOptions, Qcow2, SharedImage};

const DOMID: u16 = 3;
const SIZE: u64 = 8 << 20;

/// A checkpoint's contents, the image file when it was taken, its data clusters' host runs.
type Taken = (Vec<u8>, Vec<u8>, Vec<(u64, u64)>);

struct Rig {
    front: TestFront,
    ring: Arc<BlkifRing>,
    img: SharedImage,
}

impl Rig {
    fn new(img: SharedImage) -> Rig {
        let guest = TestGuest::new(DOMID);
        let (be_evt, fe_evt) = evtchn_pair();
        let mut front = TestFront::new(guest.clone(), Abi::X86_64, 0, fe_evt);
        front.writable_indirect = true;
        let ring_mem = guest.map_ring(DOMID, &front.ring_refs).unwrap();
        let ring = Arc::new(
            BlkifRing::new(RingParams {
                domid: DOMID,
                abi: Abi::X86_64,
                ring: ring_mem,
                grants: guest.clone(),
                evtchn: be_evt,
                device: Arc::new(img.clone()),
                features: Features { workers: 0, ..Features::default() },
                persistent: true,
            })
            .unwrap(),
        );
        Rig { front, ring, img }
    }
    fn io(&mut self, op: u8, sector: u64, buf: &mut IoBuf, indirect: bool) -> i16 {
        let id = self.front.queue_io(op, sector, buf, indirect);
        self.front.push();
        while self.ring.poll() == Poll::Busy {}
        let r = self.front.take_responses();
        assert_eq!(r.len(), 1, "{r:?}");
        assert_eq!(r[0].id, id);
        r[0].status
    }
}

#[test]
fn guest_io_on_mapped_pages_matches_plain_writes_and_keeps_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.qcow2");
    let opts = CreateOptions { size: SIZE, cluster_bits: 16, ..Default::default() };
    let mut rig = Rig::new(SharedImage::new(Qcow2::create_file(&path, &opts).unwrap()));
    let mut twin = Qcow2::create_file(&dir.path().join("twin.qcow2"), &opts).unwrap();
    let mut model = vec![0u8; SIZE as usize];
    let mut next = rng(0x1234_5678_9abc_def1u64);
    let mut checkpoint: Option<Taken> = None;
    let pool = rig.front.make_buf(&simple_layout(8 * 200, 0), None, false);
    for step in 0..600u64 {
        if step == 300 {
            // a checkpoint of everything so far; remember its data clusters' bytes in the file
            let mut q = rig.img.0.lock().unwrap();
            q.checkpoint_create("mid").unwrap();
            q.flush().unwrap();
            let map = q.map(Some("mid")).unwrap();
            let runs: Vec<(u64, u64)> =
                map.iter().filter(|m| m.kind == "data").filter_map(|m| m.host_offset.map(|h| (h, m.length))).collect();
            drop(q);
            twin.checkpoint_create("mid").unwrap();
            checkpoint = Some((model.clone(), std::fs::read(&path).unwrap(), runs));
        }
        // 1..=88 sectors (up to 11 segments), any first sector, on pages of a pool the
        // frontend keeps granted (as blkfront's persistent grants)
        let nsect = 1 + next(88);
        let first = next(8) as u8;
        let layout = simple_layout(nsect, first);
        let sector = next(SIZE / 512 - nsect);
        let (o, l) = (sector as usize * 512, nsect as usize * 512);
        let at = next((pool.pages.len() - layout.len()) as u64) as usize;
        let mut buf = IoBuf {
            segs: layout
                .iter()
                .zip(&pool.segs[at..])
                .map(|(&(f, e), s)| Segment { gref: s.gref, first_sect: f, last_sect: e })
                .collect(),
            pages: pool.pages[at..at + layout.len()].to_vec(),
            indirect: vec![],
        };
        let indirect = next(4) == 0;
        if next(2) == 0 {
            let data = pattern(step, l);
            buf.fill(&data);
            assert_eq!(rig.io(BLKIF_OP_WRITE, sector, &mut buf, indirect), BLKIF_RSP_OKAY, "step {step}");
            twin.write(sector * 512, &data).unwrap();
            model[o..o + l].copy_from_slice(&data);
        } else {
            buf.fill(&vec![0x77; l]);
            assert_eq!(rig.io(BLKIF_OP_READ, sector, &mut buf, indirect), BLKIF_RSP_OKAY, "step {step}");
            assert!(buf.gather() == model[o..o + l], "step {step}: read differs");
        }
        if next(40) == 0 {
            let z = next(SIZE / 65536) * 65536;
            rig.img.write_zeroes(z, 65536, true).unwrap();
            twin.write_zeroes(z, 65536, true).unwrap();
            model[z as usize..z as usize + 65536].fill(0);
        }
    }
    let s = rig.ring.stats();
    // (indirect pages are fresh grants each time: some fall back once the cache is full)
    assert!(s.persistent_hits > 2000 && s.persistent_misses <= 1056, "{s:?}");
    let mut got = vec![0u8; SIZE as usize];
    rig.img.read_at(0, &mut got).unwrap();
    assert!(got == model, "the disk differs from the model");
    twin.read(0, &mut got).unwrap();
    assert!(got == model, "the twin differs from the model");
    let (snap, before, runs) = checkpoint.unwrap();
    let mut q = rig.img.0.lock().unwrap();
    q.read_checkpoint("mid", 0, &mut got).unwrap();
    assert!(got == snap, "the checkpoint changed");
    q.flush().unwrap();
    let after = std::fs::read(&path).unwrap();
    assert!(!runs.is_empty());
    for (h, len) in runs {
        let r = h as usize..(h + len) as usize;
        assert!(after[r.clone()] == before[r], "checkpoint data at {h:#x} overwritten in the file");
    }
    assert!(q.verify_accounting().unwrap().is_empty());
}
