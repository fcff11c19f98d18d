//! Persistent grants ("feature-persistent"): the ring keeps the frontend's data and indirect
//! pages mapped (the sim models a mapping as the guest's own page, i.e. shared memory) and
//! moves data by memcpy. Reuse hits, the cache bound and the grant-copy fallback, unmapping
//! when the ring stops, hostile segments, and data identical to the grant-copy path.

mod common;

use std::collections::HashMap;

use common::*;
use xensnap_blkif::abi::*;
use xensnap_blkif::sim::*;
use xensnap_blkif::*;
use xensnap_blockdev::BlockDevice;

const DISK: usize = 1 << 20; // 2048 sectors

#[test]
fn reuse_hits_and_no_grant_copy_after_warm_up() {
    let mut h = H::persistent(Abi::X86_64, 0, DISK, pfeat(1056));
    assert!(h.ring.persistent());
    // Linux blkfront grants persistent pages writable, for reads and writes alike.
    let mut b = h.front.make_buf(&[(0, 7), (0, 7)], None, false);
    for i in 0..10u64 {
        let data = pattern(i, 8192);
        b.fill(&data);
        assert_eq!(io(&mut h, BLKIF_OP_WRITE, 16 * i, &mut b, false), BLKIF_RSP_OKAY);
        assert_eq!(&h.disk.snapshot()[16 * i as usize * 512..][..8192], &data[..]);
        b.fill(&[0u8; 8192]);
        assert_eq!(io(&mut h, BLKIF_OP_READ, 16 * i, &mut b, false), BLKIF_RSP_OKAY);
        assert_eq!(b.gather(), data);
    }
    let s = h.ring.stats();
    assert_eq!((s.persistent_rings, s.persistent_grants), (1, 2));
    assert_eq!(s.persistent_misses, 2, "{s:?}");
    assert_eq!(s.persistent_hits, 2 * 20 - 2, "{s:?}");
    assert_eq!(s.persistent_fallbacks, 0);
    assert_eq!(h.guest.map_calls(), 1, "both misses mapped in one batch");
    assert_eq!(h.guest.copy_calls(), 0, "no grant copy once mapped");
    assert_eq!(h.guest.live_mappings(), 2);
    // The ring's thread returning (stop) unmaps everything.
    assert_eq!(h.ring.unmap_persistent(), 2);
    assert_eq!(h.guest.live_mappings(), 0);
    // Mapped again on next use.
    assert_eq!(io(&mut h, BLKIF_OP_READ, 0, &mut b, false), BLKIF_RSP_OKAY);
    assert_eq!(h.guest.live_mappings(), 2);
}

#[test]
fn indirect_pages_are_persistent_too() {
    let mut h = H::persistent(Abi::X86_64, 0, DISK, pfeat(1056));
    let layout = simple_layout(256, 3); // 33 segments, first one mid-page
    let data = pattern(5, 256 * 512);
    let mut b = h.front.make_buf(&layout, None, false);
    b.fill(&data);
    assert_eq!(io(&mut h, BLKIF_OP_WRITE, 100, &mut b, true), BLKIF_RSP_OKAY);
    assert_eq!(&h.disk.snapshot()[100 * 512..][..data.len()], &data[..]);
    let s = h.ring.stats();
    assert_eq!(s.persistent_misses, 33 + 1, "data pages + the indirect page: {s:?}");
    assert_eq!(h.guest.copy_calls(), 0);
    // Reuse the same indirect page for a read (as blkfront does with persistent grants).
    let ind = b.indirect.clone();
    b.fill(&vec![0u8; data.len()]);
    let id = h.front.next_id();
    h.front.put(&RawRequest::indirect(BLKIF_OP_READ, id, 100, b.segs.len() as u16, &ind[..1]));
    let r = h.run();
    assert_eq!((r[0].id, r[0].status, r[0].operation), (id, BLKIF_RSP_OKAY, BLKIF_OP_READ));
    assert_eq!(b.gather(), data);
    let s = h.ring.stats();
    assert_eq!(s.persistent_misses, 34);
    assert_eq!(s.persistent_hits, 34);
}

#[test]
fn cache_bound_and_grant_copy_fallback() {
    let mut h = H::persistent(Abi::X86_64, 0, DISK, pfeat(4));
    let data = pattern(9, 8 * 4096);
    let mut b = h.front.make_buf(&simple_layout(64, 0), None, false);
    b.fill(&data);
    assert_eq!(io(&mut h, BLKIF_OP_WRITE, 0, &mut b, false), BLKIF_RSP_OKAY);
    assert_eq!(&h.disk.snapshot()[..data.len()], &data[..]);
    let s = h.ring.stats();
    assert_eq!((s.persistent_grants, s.persistent_misses, s.persistent_fallbacks), (4, 4, 4), "{s:?}");
    assert_eq!(h.guest.live_mappings(), 4);
    assert_eq!(h.guest.copy_calls(), 1, "the 4 segments beyond the bound in one grant copy");
    // A read through the same mixed path (4 mapped, 4 copied) returns the same bytes.
    b.fill(&vec![0u8; data.len()]);
    assert_eq!(io(&mut h, BLKIF_OP_READ, 0, &mut b, false), BLKIF_RSP_OKAY);
    assert_eq!(b.gather(), data);
    // New grants while the cache is full: all by grant copy, nothing more mapped.
    let mut c = h.front.make_buf(&[(0, 7)], None, false);
    assert_eq!(io(&mut h, BLKIF_OP_READ, 8, &mut c, false), BLKIF_RSP_OKAY);
    assert_eq!(c.gather(), data[4096..8192].to_vec());
    assert_eq!(h.guest.live_mappings(), 4);
    let s = h.ring.stats();
    assert_eq!(s.persistent_fallbacks, 4 + 4 + 1);
}

#[test]
fn read_only_grants_and_unmappable_hosts_fall_back() {
    let mut h = H::persistent(Abi::X86_64, 0, DISK, pfeat(1056));
    // A frontend granting write buffers read-only: cannot be mapped read-write; the write is
    // served by grant copy, and a read into such a page fails as it does without persistence.
    let data = pattern(3, 4096 + 1024);
    assert_eq!(h.write(8, &[(0, 7), (2, 3)], &data, false), BLKIF_RSP_OKAY);
    assert_eq!(&h.disk.snapshot()[8 * 512..][..data.len()], &data[..]);
    assert_eq!(h.guest.live_mappings(), 0);
    let s = h.ring.stats();
    assert_eq!(s.persistent_fallbacks, 2);
    let mut ro = h.front.make_buf(&[(0, 7)], None, true);
    assert_eq!(io(&mut h, BLKIF_OP_READ, 0, &mut ro, false), BLKIF_RSP_ERROR);
    // A mixed batch (one writable, one read-only): the writable one is still mapped.
    let rw = h.front.make_buf(&[(0, 7)], None, false);
    let mut mixed = IoBuf {
        segs: vec![rw.segs[0], ro.segs[0]],
        pages: vec![rw.pages[0].clone(), ro.pages[0].clone()],
        indirect: vec![],
    };
    mixed.fill(&pattern(4, 8192));
    assert_eq!(io(&mut h, BLKIF_OP_WRITE, 32, &mut mixed, false), BLKIF_RSP_OKAY);
    assert_eq!(&h.disk.snapshot()[32 * 512..][..8192], &pattern(4, 8192)[..]);
    assert_eq!(h.guest.live_mappings(), 1);
    // gntdev unable to map at all: everything by grant copy, still correct.
    let mut h = H::persistent(Abi::X86_32, 1, DISK, pfeat(1056));
    h.guest.set_mappable(false);
    let mut b = h.front.make_buf(&simple_layout(24, 1), None, false);
    let d = pattern(8, 24 * 512);
    b.fill(&d);
    assert_eq!(io(&mut h, BLKIF_OP_WRITE, 3, &mut b, true), BLKIF_RSP_OKAY);
    b.fill(&vec![0u8; d.len()]);
    assert_eq!(io(&mut h, BLKIF_OP_READ, 3, &mut b, false), BLKIF_RSP_OKAY);
    assert_eq!(b.gather(), d);
    assert_eq!(h.guest.live_mappings(), 0);
    assert!(h.ring.stats().persistent_fallbacks >= 8);
}

#[test]
fn hostile_segments_get_errors_and_nothing_outside_the_segment_changes() {
    let mut h = H::persistent(Abi::X86_64, 0, DISK, pfeat(1056));
    h.disk.write_at(0, &vec![0x11; DISK]).unwrap();
    // Read into sectors 2..=5 of a page: bytes outside 1024..3072 stay as the guest left them.
    let p = Page::new();
    p.write(0, &[0xee; PAGE_SIZE]);
    let g = h.guest.grant(&p, false);
    let mut b = IoBuf {
        segs: vec![Segment { gref: g, first_sect: 2, last_sect: 5 }],
        pages: vec![p.clone()],
        indirect: vec![],
    };
    assert_eq!(io(&mut h, BLKIF_OP_READ, 0, &mut b, false), BLKIF_RSP_OKAY);
    let v = p.to_vec();
    assert!(v[..1024].iter().all(|&x| x == 0xee) && v[3072..].iter().all(|&x| x == 0xee));
    assert!(v[1024..3072].iter().all(|&x| x == 0x11));
    // Bad grant references (never granted), alone and next to a good one: error, no panic;
    // the good one stays mapped for later.
    let bad = Segment { gref: 99_999, first_sect: 0, last_sect: 7 };
    for segs in [vec![bad], vec![b.segs[0], bad]] {
        let id = h.front.next_id();
        h.front.put(&RawRequest::rw(BLKIF_OP_READ, id, 0, &segs));
        let r = h.run();
        assert_eq!((r[0].id, r[0].status), (id, BLKIF_RSP_ERROR));
        let id = h.front.next_id();
        h.front.put(&RawRequest::rw(BLKIF_OP_WRITE, id, 0, &segs));
        let r = h.run();
        assert_eq!((r[0].id, r[0].status), (id, BLKIF_RSP_ERROR));
    }
    assert!(h.disk.snapshot()[..4096].iter().all(|&x| x == 0x11), "failed writes touched the disk");
    // Offsets outside the page, first > last, too many segments: refused before any mapping.
    let maps = h.guest.map_calls();
    for s in [Segment { gref: g, first_sect: 0, last_sect: 8 }, Segment { gref: g, first_sect: 5, last_sect: 4 }] {
        let id = h.front.next_id();
        h.front.put(&RawRequest::rw(BLKIF_OP_READ, id, 0, &[s]));
        assert_eq!(h.run()[0].status, BLKIF_RSP_ERROR);
    }
    let mut r = RawRequest::rw(BLKIF_OP_READ, 1, 0, &[b.segs[0]]);
    if let RawRequest::Rw { nr_segments, .. } = &mut r {
        *nr_segments = 12;
    }
    h.front.put(&r);
    assert_eq!(h.run()[0].status, BLKIF_RSP_ERROR);
    assert_eq!(h.guest.map_calls(), maps);
    // Indirect request whose indirect page is not granted, or holds bad descriptors.
    let id = h.front.next_id();
    h.front.put(&RawRequest::indirect(BLKIF_OP_READ, id, 0, 2, &[88_888]));
    assert_eq!(h.run()[0].status, BLKIF_RSP_ERROR);
    let ip = Page::new();
    ip.write(0, &request::encode_segment_array(&[Segment { gref: g, first_sect: 0, last_sect: 9 }]));
    let ig = h.guest.grant(&ip, false);
    let id = h.front.next_id();
    h.front.put(&RawRequest::indirect(BLKIF_OP_WRITE, id, 0, 1, &[ig]));
    assert_eq!(h.run()[0].status, BLKIF_RSP_ERROR);
    // A guest revoking a grant we hold mapped: Xen keeps the page (it is still mapped); we
    // keep serving the mapping, which touches only that page.
    h.guest.revoke(g);
    assert_eq!(io(&mut h, BLKIF_OP_READ, 0, &mut b, false), BLKIF_RSP_OKAY);
    assert!(h.ring.broken().is_none());
}

/// The same random sequence of requests against a grant-copy ring and a persistent ring (with
/// a small cache, so hits, misses and fallbacks mix): identical disks and read data.
#[test]
fn same_results_as_the_grant_copy_path() {
    for abi in Abi::ALL {
        let mut a = H::new(abi, 0, DISK, Features { workers: 0, ..Features::default() });
        let mut b = H::persistent(abi, 0, DISK, pfeat(40));
        let mut next = rng(0x2545_f491_4f6c_dd1du64);
        // A pool of reusable buffers per side, as blkfront's persistent grant list: slot i
        // has a fixed layout; slot 6 always gets fresh grants.
        let layouts: Vec<Vec<(u8, u8)>> = (0..7)
            .map(|_| {
                let nsect = 1 + next(80);
                simple_layout(nsect, next(8) as u8)
            })
            .collect();
        let mut pools: [HashMap<usize, IoBuf>; 2] = [HashMap::new(), HashMap::new()];
        for step in 0..300u64 {
            let RandomRequest { slot, layout, sector, write, indirect, data } =
                random_request(&mut next, &layouts, 2048, step);
            let mut outs = Vec::new();
            for (i, h) in [&mut a, &mut b].into_iter().enumerate() {
                // Reuse a buffer if its layout fits, else make a new one (new grants).
                let reuse = slot < 6 && pools[i].contains_key(&slot);
                let mut buf =
                    if reuse { pools[i].remove(&slot).unwrap() } else { h.front.make_buf(&layout, None, false) };
                buf.indirect.clear();
                if write {
                    buf.fill(&data);
                } else {
                    buf.fill(&vec![0x77; data.len()]);
                }
                let st = io(h, if write { BLKIF_OP_WRITE } else { BLKIF_OP_READ }, sector, &mut buf, indirect);
                assert_eq!(st, BLKIF_RSP_OKAY, "step {step}");
                outs.push(buf.gather());
                pools[i].insert(slot, buf);
            }
            assert_eq!(outs[0], outs[1], "step {step}");
        }
        assert_eq!(a.disk.snapshot(), b.disk.snapshot());
        let s = b.ring.stats();
        assert!(s.persistent_hits > 0 && s.persistent_misses > 0 && s.persistent_fallbacks > 0, "{s:?}");
        assert_eq!(s.persistent_grants, 40);
        assert_eq!(a.ring.stats().persistent_rings, 0);
        assert_eq!(a.guest.live_mappings(), 0);
    }
}

/// With the I/O-thread pool and QD 8: correct data, and stopping the ring (what a disconnect
/// does) unmaps every grant once the threads are done.
#[test]
fn pool_threads_share_the_cache_and_stop_unmaps() {
    let mut h =
        H::persistent(Abi::X86_64, 0, DISK, Features { workers: 4, adaptive_offload: false, ..Features::default() });
    let worker = h.ring.spawn("pgrant".into()).unwrap();
    let mut bufs: Vec<IoBuf> = (0..8).map(|_| h.front.make_buf(&simple_layout(16, 0), None, false)).collect();
    for round in 0..20u64 {
        let mut ids = Vec::new();
        for (i, b) in bufs.iter_mut().enumerate() {
            b.fill(&pattern(round * 8 + i as u64, 8192));
            ids.push(h.front.queue_io(BLKIF_OP_WRITE, 16 * i as u64, b, false));
        }
        h.front.push();
        let r = h.front.wait_responses(8, SHORT);
        assert_eq!(r.len(), 8);
        assert!(r.iter().all(|x| x.status == 0 && ids.contains(&x.id)));
        for b in &bufs {
            b.fill(&[0u8; 8192]);
        }
        for (i, b) in bufs.iter_mut().enumerate() {
            h.front.queue_io(BLKIF_OP_READ, 16 * i as u64, b, false);
        }
        h.front.push();
        let r = h.front.wait_responses(8, SHORT);
        assert!(r.len() == 8 && r.iter().all(|x| x.status == 0));
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(b.gather(), pattern(round * 8 + i as u64, 8192), "round {round} buf {i}");
        }
    }
    assert_eq!(h.guest.live_mappings(), 16);
    let s = h.ring.stats();
    assert_eq!(s.persistent_misses, 16, "{s:?}");
    assert_eq!(s.persistent_hits, 20 * 2 * 16 - 16);
    h.ring.stop();
    assert_eq!(worker.join().unwrap(), Poll::Stopped);
    assert_eq!(h.guest.live_mappings(), 0);
    assert_eq!(h.ring.stats().persistent_grants, 0);
}

/// The whole-ring fuzz entry with persistent grants (ctl bit 16) and a cache of 3 over
/// structured hostile requests: segments on the sim's granted pages (refs 9..=12, two
/// read-only), on its indirect-looking pages (13, 14), on unknown refs, with bad sector
/// ranges. No panic, every request answered, nothing left mapped.
#[test]
fn fuzz_ring_with_persistent_grants() {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..300 {
        let ctl = (next() as u8 & !8) | 16;
        let abi = if ctl & 1 == 0 { Abi::X86_64 } else { Abi::X86_32 };
        let mut data = vec![ctl];
        for _ in 0..(1 + next() % 12) {
            let n = (next() % 12) as usize;
            let segs: Vec<Segment> = (0..n)
                .map(|_| Segment {
                    gref: 7 + (next() % 10) as u32,
                    first_sect: (next() % 9) as u8,
                    last_sect: (next() % 9) as u8,
                })
                .collect();
            let op = [BLKIF_OP_READ, BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_OP_INDIRECT][(next() % 4) as usize];
            let req = if op == BLKIF_OP_INDIRECT {
                RawRequest::Indirect {
                    indirect_op: (next() % 2) as u8,
                    nr_segments: (next() % 40) as u16,
                    id: next(),
                    sector_number: next() % 160,
                    handle: 0,
                    indirect_grefs: [13 + (next() % 3) as u32, 14, 0, 0, 0, 0, 0, 0],
                }
            } else {
                let mut r = RawRequest::rw(op, next(), next() % 160, &segs);
                if let RawRequest::Rw { nr_segments, .. } = &mut r {
                    if next() % 8 == 0 {
                        *nr_segments = 12;
                    }
                }
                r
            };
            data.extend(req.encode(abi));
        }
        fuzz_ring(&data);
    }
}
