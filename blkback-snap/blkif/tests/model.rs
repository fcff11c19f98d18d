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
