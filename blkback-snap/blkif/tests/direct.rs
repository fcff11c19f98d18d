//! Requests whose segments are all mapped persistently, served by a device that moves data
//! itself (`BlockDevice::direct_io`): the pages go to `read_into`/`write_from` as one buffer
//! and file I/O lands straight in the mapped pages (`preadv`/`pwritev`). Same data as the
//! grant-copy path over random layouts (partial segments, gaps), nothing outside a segment
//! touched, and the copy fallbacks (unmapped segments, pages without direct access).

mod common;

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use xensnap_blkif::abi::*;
use xensnap_blkif::sim::*;
use xensnap_blkif::*;
use xensnap_blockdev::{buf_error, check_range, BlockDevice, BlockError, BlockResult, DataBuf};

const DISK: usize = 1 << 20;

/// A disk in a temporary file; reads and writes through `read_into`/`write_from` go
/// straight between the file and the buffer when it can (counted).
struct FileDisk {
    file: File,
    _dir: tempfile::TempDir,
    direct_reads: AtomicU64,
    direct_writes: AtomicU64,
}

impl FileDisk {
    fn new(size: usize) -> FileDisk {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("disk"))
            .unwrap();
        file.set_len(size as u64).unwrap();
        FileDisk { file, _dir: dir, direct_reads: AtomicU64::new(0), direct_writes: AtomicU64::new(0) }
    }
    fn contents(&self) -> Vec<u8> {
        let mut v = vec![0u8; self.size() as usize];
        self.file.read_exact_at(&mut v, 0).unwrap();
        v
    }
}

fn io_err(e: std::io::Error) -> BlockError {
    BlockError::Io(e.to_string())
}

impl BlockDevice for FileDisk {
    fn size(&self) -> u64 {
        self.file.metadata().unwrap().len()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        self.file.read_exact_at(buf, offset).map_err(io_err)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        self.file.write_all_at(buf, offset).map_err(io_err)
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> BlockResult<()> {
        self.write_at(offset, &vec![0u8; len as usize])
    }
    fn read_into(&self, offset: u64, dst: &mut dyn DataBuf) -> BlockResult<()> {
        let len = dst.len();
        check_range(offset, len as u64, self.size())?;
        // in two parts when it can, to exercise positions inside the buffer
        let half = len / 2 / 512 * 512;
        let mut done = 0;
        for (pos, n) in [(0, half), (half, len - half)] {
            if dst.read_file(self.file.as_fd(), offset + pos as u64, pos, n).map_err(io_err)? {
                self.direct_reads.fetch_add(1, Ordering::Relaxed);
            } else {
                let mut b = vec![0u8; n];
                self.file.read_exact_at(&mut b, offset + pos as u64).map_err(io_err)?;
                dst.copy_in(pos, &b).map_err(buf_error)?;
            }
            done += n;
        }
        assert_eq!(done, len);
        Ok(())
    }
    fn write_from(&self, offset: u64, src: &dyn DataBuf) -> BlockResult<()> {
        let len = src.len();
        check_range(offset, len as u64, self.size())?;
        if src.write_file(self.file.as_fd(), offset, 0, len).map_err(io_err)? {
            self.direct_writes.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let mut b = vec![0u8; len];
        src.copy_out(0, &mut b).map_err(buf_error)?;
        self.file.write_all_at(&b, offset).map_err(io_err)
    }
    fn direct_io(&self) -> bool {
        true
    }
}

/// Every page of `buf` whole (to check bytes outside the segments).
fn whole_pages(buf: &IoBuf) -> Vec<Vec<u8>> {
    buf.pages.iter().map(|p| p.to_vec()).collect()
}

fn direct_ring(max_grants: u32) -> (H, Arc<FileDisk>) {
    let disk = Arc::new(FileDisk::new(DISK));
    let h = H::persistent_serving(Abi::X86_64, 0, disk.clone(), pfeat(max_grants));
    (h, disk)
}

/// Random layouts (segments with any first/last sector, gaps between them), reads and writes,
/// against a grant-copy ring over a MemDisk: identical read data and disks, and bytes of the
/// pages outside the segments never change.
#[test]
fn same_results_as_the_grant_copy_path_and_nothing_outside_the_segments() {
    for direct_pages in [true, false] {
        let mut a = H::new(Abi::X86_64, 0, DISK, Features { workers: 0, ..Features::default() });
        // a small cache: some requests have unmapped segments (copy path), most not
        let (mut b, disk) = direct_ring(60);
        b.guest.set_direct(direct_pages);
        let mut next = rng(0x2545_f491_4f6c_dd1du64);
        let layouts: Vec<Vec<(u8, u8)>> = (0..8)
            .map(|i| {
                if i % 2 == 0 {
                    simple_layout(1 + next(120), next(8) as u8)
                } else {
                    (0..1 + next(11))
                        .map(|_| {
                            let f = next(8) as u8;
                            (f, f + next(u64::from(8 - f)) as u8)
                        })
                        .collect()
                }
            })
            .collect();
        let mut pools: [HashMap<usize, IoBuf>; 2] = [HashMap::new(), HashMap::new()];
        for step in 0..400u64 {
            let RandomRequest { slot, layout, sector, write, indirect, data } =
                random_request(&mut next, &layouts, 2048, step);
            let mut outs = Vec::new();
            for (i, h) in [&mut a, &mut b].into_iter().enumerate() {
                let mut buf = match pools[i].remove(&slot) {
                    Some(buf) if slot < 7 => buf,
                    _ => h.front.make_buf(&layout, None, false),
                };
                buf.indirect.clear();
                // the whole pages hold a marker; the segments the request's data or 0x77
                for p in &buf.pages {
                    p.write(0, &[0xc3; PAGE_SIZE]);
                }
                buf.fill(&if write { data.clone() } else { vec![0x77; data.len()] });
                let before = whole_pages(&buf);
                let st = io(h, if write { BLKIF_OP_WRITE } else { BLKIF_OP_READ }, sector, &mut buf, indirect);
                assert_eq!(st, BLKIF_RSP_OKAY, "step {step}");
                let after = whole_pages(&buf);
                for ((s, b0), a0) in buf.segs.iter().zip(&before).zip(&after) {
                    let (o, n) = (s.offset(), s.len());
                    assert!(
                        a0[..o] == b0[..o] && a0[o + n..] == b0[o + n..],
                        "step {step}: bytes outside a segment changed"
                    );
                }
                outs.push(buf.gather());
                pools[i].insert(slot, buf);
            }
            assert_eq!(outs[0], outs[1], "step {step}");
        }
        assert!(a.disk.snapshot() == disk.contents(), "disks differ");
        let (r, w) = (disk.direct_reads.load(Ordering::Relaxed), disk.direct_writes.load(Ordering::Relaxed));
        if direct_pages {
            assert!(r > 0 && w > 0, "direct transfers: {r} reads, {w} writes");
        } else {
            assert_eq!((r, w), (0, 0), "pages without direct access are copied");
        }
        let s = b.ring.stats();
        assert!(s.persistent_hits > 0 && s.persistent_fallbacks > 0, "{s:?}");
    }
}

/// With every segment mapped, the device gets the pages and reads straight into them (no
/// grant copy at all); a segment in the middle of a page gets exactly its bytes.
#[test]
fn mapped_requests_go_to_the_device_as_pages() {
    let (mut h, disk) = direct_ring(1056);
    disk.write_at(0, &pattern(1, DISK)).unwrap();
    let p = Page::new();
    p.write(0, &[0xee; PAGE_SIZE]);
    let g = h.guest.grant(&p, false);
    let q = Page::new();
    q.write(0, &[0xdd; PAGE_SIZE]);
    let gq = h.guest.grant(&q, false);
    let mut b = IoBuf {
        segs: vec![Segment { gref: g, first_sect: 2, last_sect: 5 }, Segment { gref: gq, first_sect: 7, last_sect: 7 }],
        pages: vec![p.clone(), q.clone()],
        indirect: vec![],
    };
    assert_eq!(io(&mut h, BLKIF_OP_READ, 10, &mut b, false), BLKIF_RSP_OKAY);
    let src = pattern(1, DISK);
    let (v, w) = (p.to_vec(), q.to_vec());
    assert!(v[..1024].iter().all(|&x| x == 0xee) && v[3072..].iter().all(|&x| x == 0xee));
    assert!(v[1024..3072] == src[10 * 512..14 * 512]);
    assert!(w[..3584].iter().all(|&x| x == 0xdd) && w[3584..] == src[14 * 512..15 * 512]);
    assert_eq!(disk.direct_reads.load(Ordering::Relaxed), 2, "both halves straight into the pages");
    assert_eq!(h.guest.copy_calls(), 0);
    // and a write from the same pages
    p.write(1024, &[0x42; 2048]);
    assert_eq!(io(&mut h, BLKIF_OP_WRITE, 100, &mut b, false), BLKIF_RSP_OKAY);
    let d = disk.contents();
    assert!(d[100 * 512..104 * 512].iter().all(|&x| x == 0x42) && d[104 * 512..105 * 512] == src[14 * 512..15 * 512]);
    assert!(d[99 * 512..100 * 512] == src[99 * 512..100 * 512] && d[105 * 512..106 * 512] == src[105 * 512..106 * 512]);
    assert_eq!(disk.direct_writes.load(Ordering::Relaxed), 1);
    // a read-only view still reads straight into the pages and refuses writes
    let ro: Arc<dyn BlockDevice> = Arc::new(xensnap_blockdev::ReadOnly(disk.clone()));
    assert!(ro.direct_io());
    let mut h = H::persistent_serving(Abi::X86_64, 0, ro, pfeat(1056));
    let p = Page::new();
    let g = h.guest.grant(&p, false);
    let mut b = IoBuf {
        segs: vec![Segment { gref: g, first_sect: 0, last_sect: 7 }],
        pages: vec![p.clone()],
        indirect: vec![],
    };
    let reads = disk.direct_reads.load(Ordering::Relaxed);
    assert_eq!(io(&mut h, BLKIF_OP_READ, 0, &mut b, false), BLKIF_RSP_OKAY);
    assert!(p.to_vec() == src[..4096]);
    assert_eq!(disk.direct_reads.load(Ordering::Relaxed), reads + 2);
    p.write(0, &[9; PAGE_SIZE]);
    assert_ne!(io(&mut h, BLKIF_OP_WRITE, 0, &mut b, false), BLKIF_RSP_OKAY);
    assert!(disk.contents()[..4096] == src[..4096]);
}

/// A device that refuses any transfer longer than one 4 KiB request (a merged call fails,
/// the requests one by one succeed).
struct ShortOnly(Arc<FileDisk>);

impl BlockDevice for ShortOnly {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.0.write_at(offset, buf)
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult<()> {
        self.0.write_zeroes(offset, len, may_unmap)
    }
    fn read_into(&self, offset: u64, dst: &mut dyn DataBuf) -> BlockResult<()> {
        if dst.len() > 4096 {
            return Err(BlockError::Io("too long".into()));
        }
        self.0.read_into(offset, dst)
    }
    fn write_from(&self, offset: u64, src: &dyn DataBuf) -> BlockResult<()> {
        if src.len() > 4096 {
            return Err(BlockError::Io("too long".into()));
        }
        self.0.write_from(offset, src)
    }
    fn direct_io(&self) -> bool {
        true
    }
}

/// A burst the frontend queued at once: reads (and writes) whose sectors follow each other
/// reach the device as one call; a request that breaks the run (another sector, the other
/// direction, a flush, a hostile request) is served on its own, in ring order, and the run
/// goes on after it. Every request gets its own response with its own id. If the merged
/// call fails, the requests are repeated one by one and each gets its own status.
#[test]
fn adjacent_requests_of_a_burst_go_to_the_device_as_one_call() {
    for short in [false, true] {
        let disk = Arc::new(FileDisk::new(DISK));
        let src = pattern(3, DISK);
        disk.write_at(0, &src).unwrap();
        let served: Arc<dyn BlockDevice> = if short { Arc::new(ShortOnly(disk.clone())) } else { disk.clone() };
        let mut h = H::persistent_serving(Abi::X86_64, 0, served, pfeat(1056));
        // (op, sector): 8 adjacent reads, one elsewhere, a write, 3 adjacent writes, a
        // flush, 2 adjacent reads, a hostile read, then 2 more adjacent reads
        let mut plan: Vec<(u8, u64)> = (0..8).map(|i| (BLKIF_OP_READ, 100 + 8 * i)).collect();
        plan.extend([(BLKIF_OP_READ, 500), (BLKIF_OP_WRITE, 600)]);
        plan.extend((0..3).map(|i| (BLKIF_OP_WRITE, 700 + 8 * i)));
        plan.push((BLKIF_OP_FLUSH_DISKCACHE, 0));
        plan.extend([(BLKIF_OP_READ, 0), (BLKIF_OP_READ, 8), (0xff, 16), (BLKIF_OP_READ, 16), (BLKIF_OP_READ, 24)]);
        let mut queued = Vec::new();
        for (k, &(op, sector)) in plan.iter().enumerate() {
            match op {
                BLKIF_OP_FLUSH_DISKCACHE => queued.push((h.front.queue_flush(op), op, sector, None)),
                0xff => {
                    // first sector after the last: refused before any I/O
                    let id = h.front.next_id();
                    h.front.put(&RawRequest::rw(
                        BLKIF_OP_READ,
                        id,
                        sector,
                        &[Segment { gref: 1, first_sect: 5, last_sect: 2 }],
                    ));
                    queued.push((id, op, sector, None));
                }
                _ => {
                    let mut b = h.front.make_buf(&[(0, 7)], None, false);
                    b.fill(&if op == BLKIF_OP_WRITE { pattern(100 + k as u64, 4096) } else { vec![0; 4096] });
                    let id = h.front.queue_io(op, sector, &mut b, false);
                    queued.push((id, op, sector, Some((b, k))));
                }
            }
        }
        let rsp = h.run();
        assert_eq!(rsp.len(), queued.len());
        // answered in ring order (everything ran in the ring's thread)
        for (r, (id, op, sector, buf)) in rsp.iter().zip(&queued) {
            assert_eq!(r.id, *id, "short {short}");
            if *op == 0xff {
                assert_eq!(r.status, BLKIF_RSP_ERROR);
                continue;
            }
            assert_eq!((r.operation, r.status), (*op, BLKIF_RSP_OKAY), "sector {sector}, short {short}");
            if let (BLKIF_OP_READ, Some((b, _))) = (*op, buf) {
                assert!(b.gather() == src[*sector as usize * 512..][..4096], "read at sector {sector}");
            }
        }
        let d = disk.contents();
        for (_, op, sector, buf) in &queued {
            if let (BLKIF_OP_WRITE, Some((_, k))) = (*op, buf) {
                assert!(d[*sector as usize * 512..][..4096] == pattern(100 + *k as u64, 4096)[..], "write at {sector}");
            }
        }
        assert!(d[..600 * 512] == src[..600 * 512] && d[724 * 512..] == src[724 * 512..]);
        let s = h.ring.stats();
        if short {
            assert_eq!(s.merged, 0, "{s:?}");
        } else {
            // 8 + 3 + 2 + 2 requests in four calls; FileDisk splits each read call in two
            assert_eq!(s.merged, 15, "{s:?}");
            assert_eq!(disk.direct_reads.load(Ordering::Relaxed), 2 * 4);
            assert_eq!(disk.direct_writes.load(Ordering::Relaxed), 2);
        }
        assert_eq!(s.errors, 1);
        assert!(h.ring.broken().is_none());
    }
}

/// Random bursts (runs of adjacent reads and writes, some elsewhere, both directions mixed)
/// queued at once on a merging ring and on a grant-copy ring over a MemDisk: the same data
/// read, the same disk, every request answered OK.
#[test]
fn random_bursts_read_and_write_what_requests_one_by_one_do() {
    let mut a = H::new(Abi::X86_64, 0, DISK, Features { workers: 0, ..Features::default() });
    let (mut b, disk) = direct_ring(1056);
    let mut next = rng(0x9e37_79b9_7f4a_7c15);
    for burst in 0..60u64 {
        let n = 2 + next(14);
        let mut reqs = Vec::new();
        let mut sector = next(1500);
        let mut write = next(2) == 0;
        for k in 0..n {
            let layout = if next(3) == 0 { simple_layout(8 + next(56), 0) } else { vec![(0, 7)] };
            let len: usize = layout.iter().map(|(f, l)| usize::from(l - f + 1) * 512).sum();
            if next(4) == 0 {
                sector = next(1900);
            }
            if next(5) == 0 {
                write = !write;
            }
            if sector * 512 + len as u64 > DISK as u64 {
                sector = 0;
            }
            reqs.push((layout, sector, write, pattern(burst * 100 + k, len)));
            sector += len as u64 / 512;
        }
        let mut outs: [Vec<Vec<u8>>; 2] = [vec![], vec![]];
        for (i, h) in [&mut a, &mut b].into_iter().enumerate() {
            let mut bufs = Vec::new();
            for (layout, sector, write, data) in &reqs {
                let mut buf = h.front.make_buf(layout, None, false);
                buf.fill(&if *write { data.clone() } else { vec![0x55; data.len()] });
                let op = if *write { BLKIF_OP_WRITE } else { BLKIF_OP_READ };
                let id = h.front.queue_io(op, *sector, &mut buf, layout.len() > 11);
                bufs.push((id, buf));
            }
            let rsp = h.run();
            assert_eq!(rsp.len(), bufs.len(), "burst {burst}");
            for (r, (id, buf)) in rsp.iter().zip(&bufs) {
                assert_eq!((r.id, r.status), (*id, BLKIF_RSP_OKAY), "burst {burst}");
                outs[i].push(buf.gather());
                h.front.release(buf);
            }
        }
        assert!(outs[0] == outs[1], "burst {burst}: reads differ");
    }
    assert!(a.disk.snapshot() == disk.contents(), "disks differ");
    let s = b.ring.stats();
    assert!(s.merged > 50, "{s:?}");
    assert_eq!(a.ring.stats().merged, 0);
}
