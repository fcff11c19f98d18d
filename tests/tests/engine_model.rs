//! Model-based property test of the image engine: random sequences of write / read /
//! discard / write-zeroes / checkpoint create / revert / delete / read of a checkpoint /
//! close+reopen, checked against an in-memory model (one byte vector for the active disk and
//! one per checkpoint), with the engine's own consistency check after every step.
//!
//! Two-phase checkpoints are interleaved with all of it: take (no I/O), bounded background
//! steps, revert switch and delete begin while earlier work is pending, and waits; staged
//! steps keep a commit's barrier pending while any of the other ops run, then run it. After
//! every step the engine's exact in-memory accounting is verified (refcount = references of
//! every live tree − uncounted shares + deferred decreases), and the on-disk check must be
//! clean whenever nothing is pending (and free of corruption always).

use proptest::prelude::*;
use xensnap_qcow2::{
    CheckpointState, CowPlan, CreateOptions, DurableBarrier, DurableStep, FaultIo, ImageIo, OpenOptions, Qcow2,
};

const SECTOR: u64 = 512;

#[derive(Debug, Clone)]
enum Op {
    Write {
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    Read {
        sector: u64,
        sectors: u64,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Zero {
        sector: u64,
        sectors: u64,
        unmap: bool,
    },
    Create,
    Revert(usize),
    Delete(usize),
    ReadCheckpoint {
        which: usize,
        sector: u64,
        sectors: u64,
    },
    Reopen,
    Take,
    Step(usize),
    RevertSwitch(usize),
    DeleteBegin(usize),
    Wait,
    /// `durable_step_staged`: a commit barrier handed out is kept, so later ops run between
    /// the commit's stages.
    Staged(usize),
    /// Run the kept barrier through the I/O's sync handle and report it back.
    BarrierFinish,
    /// The first half of a guest write split around its data I/O (`cow_plan` + the data
    /// I/O, as `SharedImage` does with the lock released): the ops that follow run before
    /// `SplitEnd` links it in (or, stale, makes it the ordinary way). Clipped to one
    /// cluster; without a plan it is an ordinary write.
    SplitBegin {
        sector: u64,
        sectors: u64,
        seed: u8,
    },
    SplitEnd,
    /// A whole split write with `steps` background steps in its gap (what a durability
    /// driver does while a guest's data I/O runs).
    SplitStepped {
        sector: u64,
        sectors: u64,
        seed: u8,
        steps: usize,
    },
}

fn op(total_sectors: u64) -> impl Strategy<Value = Op> {
    let range = (0..total_sectors).prop_flat_map(move |s| (Just(s), 1..=(total_sectors - s).min(300)));
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::Write { sector, sectors, seed }),
        3 => range.clone().prop_map(|(sector, sectors)| Op::Read { sector, sectors }),
        1 => range.clone().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        1 => (range.clone(), any::<bool>()).prop_map(|((sector, sectors), unmap)| Op::Zero { sector, sectors, unmap }),
        2 => Just(Op::Create),
        1 => any::<usize>().prop_map(Op::Revert),
        1 => any::<usize>().prop_map(Op::Delete),
        2 => (any::<usize>(), range.clone()).prop_map(|(which, (sector, sectors))| Op::ReadCheckpoint { which, sector, sectors }),
        1 => Just(Op::Reopen),
        3 => Just(Op::Take),
        3 => (1usize..4).prop_map(Op::Step),
        1 => any::<usize>().prop_map(Op::RevertSwitch),
        1 => any::<usize>().prop_map(Op::DeleteBegin),
        1 => Just(Op::Wait),
        3 => (1usize..4).prop_map(Op::Staged),
        2 => Just(Op::BarrierFinish),
        3 => (range.clone(), any::<u8>()).prop_map(|((sector, sectors), seed)| Op::SplitBegin { sector, sectors, seed }),
        2 => Just(Op::SplitEnd),
        3 => (range, any::<u8>(), 0usize..4)
            .prop_map(|((sector, sectors), seed, steps)| Op::SplitStepped { sector, sectors, seed, steps }),
    ]
}

fn pattern(seed: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_add(((off as usize + i) / 7) as u8) | 1).collect()
}

struct Model {
    active: Vec<u8>,
    checkpoints: Vec<(String, Vec<u8>)>,
    next_name: u32,
}

/// A split write under way: its plan, offset and bytes.
type Split = (CowPlan, u64, Vec<u8>);

/// Link in (or make) a split write under way, and apply it to the model.
fn split_end(img: &mut Qcow2, m: &mut Model, split: &mut Option<Split>, ran: &mut Option<std::io::Result<()>>) {
    if let Some((plan, off, data)) = split.take() {
        let r = ran.take().unwrap_or(Ok(()));
        if !img.cow_finish(plan, r).expect("cow finish") {
            img.write(off, &data).expect("write after a stale plan");
        }
        m.active[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
}

fn assert_clean(img: &mut Qcow2, step: usize, op: &Op, split_open: bool) {
    let acc = img.verify_accounting().unwrap_or_else(|e| panic!("step {step} {op:?}: verify_accounting failed: {e}"));
    assert!(acc.is_empty(), "step {step} {op:?}: in-memory accounting: {acc:#?}");
    // a split write's cluster is counted before anything points to it: a leak on disk
    let pending = img.durable_pending() || split_open;
    let report = img.check().unwrap_or_else(|e| panic!("step {step} {op:?}: check failed: {e}"));
    if pending {
        // taken checkpoints hold references the published trees do not show: leaks only
        assert!(
            report.corruptions == 0 && report.overlaps == 0,
            "step {step} {op:?}: corruption while pending: {report:?}"
        );
    } else {
        assert!(report.is_clean(), "step {step} {op:?}: image not clean: {report:?}");
    }
}

fn run(cluster_bits: u32, size: u64, chunk: u64, ops: Vec<Op>) {
    run_with(cluster_bits, size, chunk, ops, false)
}

/// `chunk`: L2 entries per step of a background walk (small ones stop walks inside tables).
fn run_with(cluster_bits: u32, size: u64, chunk: u64, ops: Vec<Op>, qemu: bool) {
    // a FaultIo (flushes are real, and it has a sync handle for staged barriers)
    let io = FaultIo::new();
    let opts = CreateOptions { size, cluster_bits, ..Default::default() };
    let mut held: Option<DurableBarrier> = None;
    let mut img = Qcow2::create(Box::new(io.clone()) as Box<dyn ImageIo>, &opts).expect("create");
    img.set_walk_chunk(chunk);
    let mut m = Model { active: vec![0; size as usize], checkpoints: vec![], next_name: 0 };
    let (mut split, mut ran): (Option<Split>, Option<std::io::Result<()>>) = (None, None);
    let cs = 1u64 << cluster_bits;
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Write { sector, sectors, seed } => {
                let (off, len) = (sector * SECTOR, (sectors * SECTOR) as usize);
                let data = pattern(*seed, off, len);
                img.write(off, &data).expect("write");
                m.active[off as usize..off as usize + len].copy_from_slice(&data);
            }
            Op::Read { sector, sectors } => {
                let (off, len) = (sector * SECTOR, (sectors * SECTOR) as usize);
                let mut buf = vec![0xee; len];
                img.read(off, &mut buf).expect("read");
                assert!(buf == m.active[off as usize..off as usize + len], "step {step} {op:?}: data differs");
            }
            Op::Discard { sector, sectors } => {
                let (off, len) = (sector * SECTOR, sectors * SECTOR);
                img.discard(off, len).expect("discard");
                m.active[off as usize..(off + len) as usize].fill(0);
            }
            Op::Zero { sector, sectors, unmap } => {
                let (off, len) = (sector * SECTOR, sectors * SECTOR);
                img.write_zeroes(off, len, *unmap).expect("write_zeroes");
                m.active[off as usize..(off + len) as usize].fill(0);
            }
            Op::Create => {
                let name = format!("ck{}", m.next_name);
                m.next_name += 1;
                img.checkpoint_create(&name).expect("checkpoint create");
                m.checkpoints.push((name, m.active.clone()));
            }
            Op::Revert(i) => {
                if m.checkpoints.is_empty() {
                    assert!(img.checkpoint_revert("nonexistent").is_err());
                    continue;
                }
                let (name, data) = &m.checkpoints[i % m.checkpoints.len()];
                img.checkpoint_revert(name).expect("revert");
                m.active = data.clone();
            }
            Op::Delete(i) => {
                if m.checkpoints.is_empty() {
                    continue;
                }
                let (name, _) = m.checkpoints.remove(i % m.checkpoints.len());
                img.checkpoint_delete(&name).expect("delete");
            }
            Op::ReadCheckpoint { which, sector, sectors } => {
                if m.checkpoints.is_empty() {
                    continue;
                }
                let (name, data) = &m.checkpoints[which % m.checkpoints.len()];
                let (off, len) = (sector * SECTOR, (sectors * SECTOR) as usize);
                let mut buf = vec![0xee; len];
                img.read_checkpoint(name, off, &mut buf).expect("read checkpoint");
                assert!(buf == data[off as usize..off as usize + len], "step {step} {op:?}: checkpoint data differs");
            }
            Op::Reopen => {
                // (a served image closes after its requests are done)
                split_end(&mut img, &mut m, &mut split, &mut ran);
                held = None;
                img.close().expect("close");
                img = Qcow2::open(Box::new(io.clone()), &OpenOptions { read_only: false }).expect("reopen");
                img.set_walk_chunk(chunk);
                assert!(!img.durable_pending());
                assert!(img.checkpoint_list().iter().all(|c| c.state == CheckpointState::Durable));
            }
            Op::Take => {
                let name = format!("ck{}", m.next_name);
                m.next_name += 1;
                let info = img.checkpoint_take(&name).expect("checkpoint take");
                assert_eq!(info.state, CheckpointState::Taken);
                m.checkpoints.push((name, m.active.clone()));
            }
            Op::Step(n) => {
                let done = img.durable_step(*n).expect("durable step");
                assert_eq!(done, !img.durable_pending());
            }
            Op::RevertSwitch(i) => {
                if m.checkpoints.is_empty() {
                    continue;
                }
                let (name, data) = &m.checkpoints[i % m.checkpoints.len()];
                img.checkpoint_revert_switch(name).expect("revert switch");
                m.active = data.clone();
            }
            Op::DeleteBegin(i) => {
                if m.checkpoints.is_empty() {
                    continue;
                }
                let (name, _) = m.checkpoints.remove(i % m.checkpoints.len());
                img.checkpoint_delete_begin(&name).expect("delete begin");
            }
            Op::Wait => {
                img.wait_durable().expect("wait durable");
                assert!(img.checkpoint_list().iter().all(|c| c.state == CheckpointState::Durable));
            }
            Op::Staged(n) => match img.durable_step_staged(*n).expect("staged step") {
                DurableStep::Barrier(b) => held = Some(b),
                DurableStep::Done(done) => assert_eq!(done, !img.durable_pending()),
            },
            Op::BarrierFinish => {
                if let Some(b) = held.take() {
                    let s = b.sync().expect("barrier");
                    img.durable_barrier_done(s);
                }
            }
            Op::SplitBegin { sector, sectors, seed } | Op::SplitStepped { sector, sectors, seed, .. } => {
                split_end(&mut img, &mut m, &mut split, &mut ran);
                let off = sector * SECTOR;
                let len = (sectors * SECTOR).min(cs - off % cs) as usize;
                let data = pattern(*seed, off, len);
                match img.cow_plan(off, len).expect("cow plan") {
                    Some(plan) => {
                        ran = Some(plan.run(&data));
                        split = Some((plan, off, data));
                    }
                    None => {
                        img.write(off, &data).expect("write");
                        m.active[off as usize..off as usize + len].copy_from_slice(&data);
                    }
                }
                if let Op::SplitStepped { steps, .. } = op {
                    for _ in 0..*steps {
                        img.durable_step(1).expect("durable step in the gap");
                    }
                    split_end(&mut img, &mut m, &mut split, &mut ran);
                }
            }
            Op::SplitEnd => split_end(&mut img, &mut m, &mut split, &mut ran),
        }
        assert_clean(&mut img, step, op, split.is_some());
        let names: Vec<String> = img.checkpoint_list().into_iter().map(|s| s.name).collect();
        let want: Vec<String> = m.checkpoints.iter().map(|c| c.0.clone()).collect();
        assert_eq!(names, want, "step {step} {op:?}: checkpoint list");
    }
    split_end(&mut img, &mut m, &mut split, &mut ran);
    // Full comparison at the end: the active disk and every checkpoint.
    let mut buf = vec![0; size as usize];
    img.read(0, &mut buf).expect("final read");
    assert!(buf == m.active, "final active disk differs");
    for (name, data) in &m.checkpoints {
        img.read_checkpoint(name, 0, &mut buf).expect("final checkpoint read");
        assert!(&buf == data, "final checkpoint {name} differs");
    }
    img.close().expect("close");
    if qemu {
        qemu_agrees(&io.current(), &m);
    }
}

/// QEMU's tools read the image we wrote exactly as the model says: `qemu-img check` is clean,
/// `qemu-img compare` finds the active disk equal to the model, `snapshot -l` lists every
/// checkpoint and `convert -l` of each equals the model's copy.
fn qemu_agrees(image: &[u8], m: &Model) {
    use std::process::Command;
    let d = tempfile::tempdir().expect("tempdir");
    let img = d.path().join("m.qcow2");
    std::fs::write(&img, image).expect("write image");
    let run = |c: &mut Command| {
        let out = c.output().expect("spawn qemu tool");
        assert!(
            out.status.success(),
            "{c:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    run(Command::new("qemu-img").arg("check").arg(&img));
    let raw = d.path().join("active.raw");
    std::fs::write(&raw, &m.active).expect("write raw");
    run(Command::new("qemu-img").args(["compare", "-f", "qcow2", "-F", "raw"]).arg(&img).arg(&raw));
    let list = run(Command::new("qemu-img").args(["snapshot", "-l"]).arg(&img));
    for (name, data) in &m.checkpoints {
        assert!(list.split_whitespace().any(|w| w == name), "qemu-img snapshot -l lacks {name}: {list}");
        let out = d.path().join(format!("{name}.raw"));
        run(Command::new("qemu-img")
            .args(["convert", "-l", &format!("snapshot.name={name}"), "-O", "raw"])
            .arg(&img)
            .arg(&out));
        let got = std::fs::read(&out).expect("read converted");
        assert!(&got == data, "qemu-img convert -l {name} differs from the model");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn model_512b_clusters(chunk in 1u64..=64, ops in proptest::collection::vec(op(512), 1..60)) {
        run(9, 256 * 1024, chunk, ops);
    }

    #[test]
    fn model_4k_clusters(chunk in prop_oneof![1u64..=16, Just(256), Just(512)],
                         ops in proptest::collection::vec(op(2048), 1..60)) {
        run(12, 1024 * 1024, chunk, ops);
    }

    #[test]
    fn model_then_qemu_agrees(cluster_bits in prop_oneof![Just(9u32), Just(12), Just(16), Just(21)],
                              chunk in prop_oneof![1u64..=8, Just(256)],
                              ops in proptest::collection::vec(op(4096), 1..40)) {
        run_with(cluster_bits, 2 * 1024 * 1024, chunk, ops, true);
    }

    #[test]
    fn model_64k_clusters(chunk in prop_oneof![1u64..=64, Just(256), Just(8192)],
                          ops in proptest::collection::vec(op(8192), 1..40)) {
        run(16, 4 * 1024 * 1024, chunk, ops);
    }
}

/// Found by the model with walks in chunks: a guest write copies an L2 table while a drop
/// walk is in the middle of that index (an abandoned take; a deleted checkpoint with its
/// table rewrite staged). The copy must keep COPIED on the entries the drop already gave
/// back, which are the copy's alone: the image is clean once nothing is pending.
#[test]
fn table_copied_in_the_middle_of_a_drop_walk_keeps_copied_flags() {
    run(
        12,
        1024 * 1024,
        256,
        vec![
            Op::Write { sector: 0, sectors: 1, seed: 0 },
            Op::Take,
            Op::DeleteBegin(0),
            Op::Step(3),
            Op::Write { sector: 8, sectors: 1, seed: 18 },
            Op::Reopen,
        ],
    );
    run(
        9,
        256 * 1024,
        32,
        vec![
            Op::Write { sector: 0, sectors: 129, seed: 0 },
            Op::Create,
            Op::DeleteBegin(0),
            Op::Step(3),
            Op::Staged(1),
            Op::Staged(2),
            Op::Write { sector: 133, sectors: 1, seed: 100 },
            Op::Reopen,
        ],
    );
}
