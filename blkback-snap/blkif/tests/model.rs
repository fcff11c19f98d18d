//! Model-based property test: random batches of valid (and some out-of-range) requests through
//! the test frontend, compared with a plain byte vector.

mod common;

use common::*;
use proptest::prelude::*;
use xensnap_blkif::abi::*;
use xensnap_blkif::sim::IoBuf;
use xensnap_blkif::*;

const SECTORS: u64 = 512; // 256 KiB: small, so requests overlap a lot
const DISK: usize = SECTORS as usize * 512;

#[derive(Clone, Debug)]
enum Op {
    Write { sector: u64, layout: Vec<(u8, u8)>, seed: u64, indirect: bool, op: u8 },
    Read { sector: u64, layout: Vec<(u8, u8)>, indirect: bool },
    Discard { sector: u64, nr: u64 },
    Flush { op: u8 },
}

fn seg() -> impl Strategy<Value = (u8, u8)> {
    (0u8..8).prop_flat_map(|f| (Just(f), f..8))
}

fn layout(indirect: bool) -> impl Strategy<Value = Vec<(u8, u8)>> {
    if indirect {
        prop::collection::vec(seg(), 1..=40)
    } else {
        prop::collection::vec(seg(), 1..=11)
    }
}

fn op() -> impl Strategy<Value = Op> {
    let sector = prop_oneof![9 => 0..SECTORS, 1 => SECTORS - 40..SECTORS + 8];
    prop_oneof![
        4 => (any::<bool>(), sector.clone(), any::<u64>(), prop_oneof![8 => Just(BLKIF_OP_WRITE), 1 => Just(BLKIF_OP_FLUSH_DISKCACHE), 1 => Just(BLKIF_OP_WRITE_BARRIER)])
            .prop_flat_map(|(ind, s, seed, op)| {
                let ind = ind && op == BLKIF_OP_WRITE;
                layout(ind).prop_map(move |l| Op::Write { sector: s, layout: l, seed, indirect: ind, op })
            }),
        3 => (any::<bool>(), sector.clone())
            .prop_flat_map(|(ind, s)| layout(ind).prop_map(move |l| Op::Read { sector: s, layout: l, indirect: ind })),
        1 => (sector, 0u64..64).prop_map(|(sector, nr)| Op::Discard { sector, nr }),
        1 => prop_oneof![Just(BLKIF_OP_FLUSH_DISKCACHE), Just(BLKIF_OP_WRITE_BARRIER)].prop_map(|op| Op::Flush { op }),
    ]
}

fn nsect(l: &[(u8, u8)]) -> u64 {
    l.iter().map(|&(f, t)| u64::from(t - f) + 1).sum()
}

struct Pending {
    id: u64,
    op: u8,
    status: i16,
    buf: Option<IoBuf>,
    expect_data: Option<Vec<u8>>,
}

fn run_model(abi: Abi, order: u32, batches: Vec<Vec<Op>>) -> Result<(), TestCaseError> {
    let mut h = H::new(abi, order, DISK, Features::default());
    let mut model = vec![0u8; DISK];
    for batch in batches {
        let mut pend = Vec::new();
        for op in batch {
            match op {
                Op::Write { sector, layout, seed, indirect, op } => {
                    let n = nsect(&layout);
                    let data = pattern(seed, n as usize * 512);
                    let mut buf = h.front.make_buf(&layout, Some(&data), true);
                    let id = if op == BLKIF_OP_WRITE {
                        h.front.queue_io(op, sector, &mut buf, indirect)
                    } else {
                        let id = h.front.next_id();
                        h.front.put(&RawRequest::rw(op, id, sector, &buf.segs));
                        id
                    };
                    let ok = sector + n <= SECTORS;
                    if ok {
                        model[sector as usize * 512..][..data.len()].copy_from_slice(&data);
                    }
                    let status = if ok { BLKIF_RSP_OKAY } else { BLKIF_RSP_ERROR };
                    pend.push(Pending { id, op, status, buf: Some(buf), expect_data: None });
                }
                Op::Read { sector, layout, indirect } => {
                    let n = nsect(&layout);
                    let mut buf = h.front.make_buf(&layout, None, false);
                    let id = h.front.queue_io(BLKIF_OP_READ, sector, &mut buf, indirect);
                    let ok = sector + n <= SECTORS;
                    let expect = ok.then(|| model[sector as usize * 512..][..n as usize * 512].to_vec());
                    let status = if ok { BLKIF_RSP_OKAY } else { BLKIF_RSP_ERROR };
                    pend.push(Pending { id, op: BLKIF_OP_READ, status, buf: Some(buf), expect_data: expect });
                }
                Op::Discard { sector, nr } => {
                    let id = h.front.queue_discard(sector, nr, false);
                    let ok = sector + nr <= SECTORS;
                    if ok {
                        model[sector as usize * 512..][..nr as usize * 512].fill(0);
                    }
                    let status = if ok { BLKIF_RSP_OKAY } else { BLKIF_RSP_ERROR };
                    pend.push(Pending { id, op: BLKIF_OP_DISCARD, status, buf: None, expect_data: None });
                }
                Op::Flush { op } => {
                    let id = h.front.queue_flush(op);
                    pend.push(Pending { id, op, status: BLKIF_RSP_OKAY, buf: None, expect_data: None });
                }
            }
        }
        let rsps = h.run();
        prop_assert_eq!(rsps.len(), pend.len());
        // Responses come in ring order (we execute synchronously).
        for (p, r) in pend.iter().zip(&rsps) {
            prop_assert_eq!((r.id, r.operation, r.status), (p.id, p.op, p.status));
            if let (Some(exp), Some(buf)) = (&p.expect_data, &p.buf) {
                prop_assert!(buf.gather() == *exp, "read data differs from the model (id {})", p.id);
            }
            if let Some(b) = &p.buf {
                h.front.release(b);
            }
        }
        prop_assert!(h.disk.snapshot() == model, "disk differs from the model");
    }
    prop_assert!(h.ring.broken().is_none());
    prop_assert_eq!(h.guest.live_grants(), 1usize << order);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]
    #[test]
    fn random_requests_match_model(
        abi in prop_oneof![Just(Abi::X86_32), Just(Abi::X86_64)],
        order in 0u32..=2,
        batches in prop::collection::vec(prop::collection::vec(op(), 1..=12), 1..=12),
    ) {
        run_model(abi, order, batches)?;
    }
}

// ---- many requests in flight --------------------------------------------------------------
//
// The same kind of random requests, but a whole batch (up to a full ring) is published at once
// and served by `BlkifRing::run` with a pool of I/O threads, so requests complete out of order
// (mostly with every eligible request handed off; sometimes with the adaptive policy).
//
// What the model accepts: blkif orders nothing between requests in flight except FLUSH_DISKCACHE
// and WRITE_BARRIER (with or without data), which this backend runs after every earlier request
// and before every later one (when it is valid: a rejected one is answered at once and orders
// nothing). A batch is therefore a sequence of *epochs* separated by those
// requests. Inside an epoch the writes and discards touching one sector may land in any order,
// so per sector the model keeps the set of values the disk may hold: after an epoch with
// writers to a sector, one of their values (whichever ran last); a read inside an epoch may
// see the value before the epoch or any writer's value of that epoch. Sectors no other request
// of the epoch touches are checked exactly. At the end of a batch every sector must hold one
// of its possible values; then the model takes the disk's value. Every request must be answered
// exactly once, with its id, operation and status.

type Sector = Vec<u8>;

struct Epoch {
    /// Reads: (pending index, first sector).
    reads: Vec<(usize, u64)>,
    /// Values written per sector in this epoch.
    writes: std::collections::HashMap<u64, Vec<Sector>>,
}

impl Epoch {
    fn new() -> Epoch {
        Epoch { reads: Vec::new(), writes: std::collections::HashMap::new() }
    }
    fn write(&mut self, sector: u64, data: &[u8]) {
        for (i, chunk) in data.chunks(512).enumerate() {
            self.writes.entry(sector + i as u64).or_default().push(chunk.to_vec());
        }
    }
}

fn run_model_concurrent(
    abi: Abi,
    order: u32,
    workers: u32,
    adaptive_offload: bool,
    batches: Vec<(Vec<Op>, bool)>,
) -> Result<(), TestCaseError> {
    use std::collections::HashMap;
    use std::time::Duration;
    let f = Features { workers, adaptive_offload, ..Features::default() };
    let H { ring, mut front, disk, guest, .. } = H::new(abi, order, DISK, f);
    let worker = ring.spawn("blkif-model".into()).expect("spawn");
    let size = front.geom.size as usize;
    // possible[s]: the values sector s may hold now.
    let mut possible: Vec<Vec<Sector>> = (0..SECTORS).map(|_| vec![vec![0u8; 512]]).collect();
    let mut total = 0usize;
    for (mut batch, quiesce) in batches {
        batch.truncate(size);
        let mut pend: Vec<Pending> = Vec::new();
        let mut epochs = vec![Epoch::new()];
        for op in batch {
            // A rejected flush/barrier (here: data past the end of the disk) orders nothing.
            let barrier = matches!(op, Op::Flush { .. })
                || matches!(op, Op::Write { op, sector, ref layout, .. }
                    if op != BLKIF_OP_WRITE && sector + nsect(layout) <= SECTORS);
            if barrier {
                epochs.push(Epoch::new());
            }
            let ep = epochs.last_mut().expect("one epoch");
            match op {
                Op::Write { sector, layout, seed, indirect, op } => {
                    let n = nsect(&layout);
                    let data = pattern(seed, n as usize * 512);
                    let mut buf = front.make_buf(&layout, Some(&data), true);
                    let id = if op == BLKIF_OP_WRITE {
                        front.queue_io(op, sector, &mut buf, indirect)
                    } else {
                        let id = front.next_id();
                        front.put(&RawRequest::rw(op, id, sector, &buf.segs));
                        id
                    };
                    let ok = sector + n <= SECTORS;
                    if ok {
                        ep.write(sector, &data);
                    }
                    let status = if ok { BLKIF_RSP_OKAY } else { BLKIF_RSP_ERROR };
                    pend.push(Pending { id, op, status, buf: Some(buf), expect_data: None });
                }
                Op::Read { sector, layout, indirect } => {
                    let n = nsect(&layout);
                    let mut buf = front.make_buf(&layout, None, false);
                    let id = front.queue_io(BLKIF_OP_READ, sector, &mut buf, indirect);
                    let ok = sector + n <= SECTORS;
                    if ok {
                        ep.reads.push((pend.len(), sector));
                    }
                    let status = if ok { BLKIF_RSP_OKAY } else { BLKIF_RSP_ERROR };
                    pend.push(Pending { id, op: BLKIF_OP_READ, status, buf: Some(buf), expect_data: None });
                }
                Op::Discard { sector, nr } => {
                    let id = front.queue_discard(sector, nr, false);
                    let ok = sector + nr <= SECTORS;
                    if ok {
                        ep.write(sector, &vec![0u8; nr as usize * 512]);
                    }
                    let status = if ok { BLKIF_RSP_OKAY } else { BLKIF_RSP_ERROR };
                    pend.push(Pending { id, op: BLKIF_OP_DISCARD, status, buf: None, expect_data: None });
                }
                Op::Flush { op } => {
                    let id = front.queue_flush(op);
                    pend.push(Pending { id, op, status: BLKIF_RSP_OKAY, buf: None, expect_data: None });
                }
            }
            if barrier {
                epochs.push(Epoch::new());
            }
        }
        front.push();
        if quiesce {
            // Quiesce with the batch in flight: when it returns, every consumed request is
            // answered and published; nothing moves until resume.
            ring.quiesce();
            let (c, p) = ring.indices();
            prop_assert_eq!(c, p, "quiesce returned with consumed requests unanswered");
            prop_assert_eq!(ring.in_flight(), 0);
            ring.resume();
        }
        let rsps = front.wait_responses(pend.len(), Duration::from_secs(30));
        prop_assert_eq!(rsps.len(), pend.len(), "not every request was answered (stall?)");
        let by_id: HashMap<u64, usize> = pend.iter().enumerate().map(|(i, p)| (p.id, i)).collect();
        let mut seen = vec![false; pend.len()];
        for r in &rsps {
            let i = *by_id.get(&r.id).ok_or_else(|| TestCaseError::fail(format!("unknown id {}", r.id)))?;
            prop_assert!(!seen[i], "id {} answered twice", r.id);
            seen[i] = true;
            let p = &pend[i];
            prop_assert_eq!((r.operation, r.status), (p.op, p.status), "id {}", r.id);
        }
        // Replay the epochs over the possible values.
        for ep in &epochs {
            for &(i, first) in &ep.reads {
                let got = pend[i].buf.as_ref().expect("read buffer").gather();
                for (k, chunk) in got.chunks(512).enumerate() {
                    let s = first + k as u64;
                    let ok = possible[s as usize].iter().any(|v| v[..] == *chunk)
                        || ep.writes.get(&s).is_some_and(|w| w.iter().any(|v| v[..] == *chunk));
                    prop_assert!(ok, "read id {} sector {}: a value no ordering allows", pend[i].id, s);
                }
            }
            for (&s, vals) in &ep.writes {
                possible[s as usize] = vals.clone();
            }
        }
        let snap = disk.snapshot();
        for (s, vals) in possible.iter_mut().enumerate() {
            let cur = &snap[s * 512..][..512];
            prop_assert!(vals.iter().any(|v| v[..] == *cur), "sector {}: a value no ordering allows", s);
            *vals = vec![cur.to_vec()];
        }
        for p in &pend {
            if let Some(b) = &p.buf {
                front.release(b);
            }
        }
        total += pend.len();
    }
    prop_assert!(ring.broken().is_none());
    prop_assert_eq!(ring.stats().requests, total as u64);
    ring.stop();
    prop_assert_eq!(worker.join().expect("worker"), Poll::Stopped);
    prop_assert_eq!(guest.live_grants(), 1usize << order);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn many_in_flight_match_model(
        abi in prop_oneof![Just(Abi::X86_32), Just(Abi::X86_64)],
        order in 0u32..=1,
        workers in prop_oneof![Just(1u32), Just(2), Just(4), Just(8)],
        adaptive in prop_oneof![3 => Just(false), 1 => Just(true)],
        batches in prop::collection::vec((prop::collection::vec(op(), 1..=40), any::<bool>()), 1..=10),
    ) {
        run_model_concurrent(abi, order, workers, adaptive, batches)?;
    }
}
