//! Power-loss tests: stop the engine at every write/flush of an operation (injected I/O
//! error), then simulate a power loss (unsynced writes kept, dropped or torn) and check
//! that the image only ever leaks: no refcount corruption, data is the old or the new state.

mod common;
#[path = "common/copied.rs"]
mod copied;
use common::Rng;
use copied::harmful_copied_flags;
use std::collections::BTreeMap;
use xensnap_qcow2::{CheckReport, CreateOptions, DurableStep, FaultIo, ImageIo, MemIo, OpenOptions, Qcow2};

const SIZE: usize = 1 << 20;

fn open_fault(bytes: &[u8]) -> (FaultIo, Qcow2) {
    let f = FaultIo::from_bytes(bytes.to_vec());
    let img = Qcow2::open(Box::new(f.clone()), &OpenOptions::default()).unwrap();
    (f, img)
}

fn read_all(img: &mut Qcow2, snap: Option<&str>) -> Vec<u8> {
    let mut b = vec![0u8; SIZE];
    match snap {
        None => img.read(0, &mut b).unwrap(),
        Some(s) => img.read_checkpoint(s, 0, &mut b).unwrap(),
    }
    b
}

struct Expect {
    actives: Vec<Vec<u8>>,
    snaps: BTreeMap<String, Vec<u8>>,
    snap_sets: Vec<Vec<String>>,
}

/// A crashed image checked as it lies on disk (no COPIED flag on a shared cluster while the
/// dirty bit is clear), then opened read-only and checked: no corruption. Returns the image
/// and its check report for the test's own expectations.
fn open_crashed(bytes: &[u8], ctx: &str) -> (Qcow2, CheckReport) {
    let harmful = harmful_copied_flags(bytes);
    assert!(harmful.is_empty(), "{ctx}: dirty bit clear with COPIED on shared clusters: {harmful:?}");
    let mut img = Qcow2::open(Box::new(MemIo::from_bytes(bytes.to_vec())), &OpenOptions { read_only: true })
        .unwrap_or_else(|e| panic!("{ctx}: open after crash failed: {e}"));
    let rep = img.check().unwrap();
    assert_eq!(rep.corruptions, 0, "{ctx}: {rep:?}");
    (img, rep)
}

/// Repair of a crashed image by our engine leaves it clean.
fn assert_repairs(bytes: Vec<u8>, ctx: &str) {
    let mut im = Qcow2::open(Box::new(MemIo::from_bytes(bytes)), &OpenOptions::default()).unwrap();
    im.repair().unwrap();
    assert!(im.check().unwrap().is_clean(), "{ctx}: not clean after repair");
}

fn verify(bytes: Vec<u8>, ex: &Expect, ctx: &str) {
    let (mut img, rep) = open_crashed(&bytes, ctx);
    assert_eq!(rep.overlaps, 0, "{ctx}: {rep:?}");
    assert!(rep.errors.iter().all(|e| e.contains("OFLAG_COPIED")), "{ctx}: {rep:?}");
    let active = read_all(&mut img, None);
    assert!(ex.actives.contains(&active), "{ctx}: active data is neither old nor new");
    let names: Vec<String> = img.checkpoint_list().into_iter().map(|s| s.name).collect();
    assert!(ex.snap_sets.contains(&names), "{ctx}: snapshot set {names:?}");
    for n in &names {
        assert!(read_all(&mut img, Some(n)) == ex.snaps[n], "{ctx}: snapshot {n} content");
    }
    drop(img);
    let mut img = Qcow2::open(Box::new(MemIo::from_bytes(bytes)), &OpenOptions::default()).unwrap();
    img.repair().unwrap();
    let rep = img.check().unwrap();
    assert!(rep.is_clean(), "{ctx}: after repair {rep:?}");
}

/// Run `op` on a copy of `base`, failing at every possible I/O op, crash with a few seeds.
fn crash_sweep(base: &[u8], ex: &Expect, name: &str, op: &dyn Fn(&mut Qcow2) -> xensnap_qcow2::Result<()>) {
    let (f, mut img) = open_fault(base);
    let (w0, f0) = f.op_counts();
    op(&mut img).unwrap();
    let (w1, f1) = f.op_counts();
    let total = (w1 - w0) + (f1 - f0);
    assert!(total > 0);
    eprintln!("{name}: {total} I/O ops swept");
    for k in 1..=total + 1 {
        let (f, mut img) = open_fault(base);
        f.fail_after(Some(k));
        let _ = op(&mut img);
        drop(img);
        for seed in 0..6 {
            verify(f.crash(seed * 7919 + k), ex, &format!("{name}: failing op {k}/{total}, seed {seed}"));
        }
    }
}

fn base_image() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let f = FaultIo::new();
    let mut img =
        Qcow2::create(Box::new(f.clone()), &CreateOptions { size: SIZE as u64, cluster_bits: 12, refcount_order: 4 })
            .unwrap();
    let mut rng = Rng(99);
    let mut model = vec![0u8; SIZE];
    for _ in 0..20 {
        let off = rng.below(SIZE as u64 - 20000) as usize;
        let len = 1 + rng.below(20000) as usize;
        let mut b = vec![0u8; len];
        rng.fill(&mut b);
        img.write(off as u64, &b).unwrap();
        model[off..off + len].copy_from_slice(&b);
    }
    img.checkpoint_create("base").unwrap();
    let snap = model.clone();
    for _ in 0..10 {
        let off = rng.below(SIZE as u64 - 20000) as usize;
        let len = 1 + rng.below(20000) as usize;
        let mut b = vec![0u8; len];
        rng.fill(&mut b);
        img.write(off as u64, &b).unwrap();
        model[off..off + len].copy_from_slice(&b);
    }
    img.close().unwrap();
    let bytes = (*f.durable()).clone();
    (bytes, snap, model)
}

#[test]
fn crash_during_checkpoint_create() {
    let (base, snap, model) = base_image();
    let ex = Expect {
        actives: vec![model.clone()],
        snaps: [("base".to_string(), snap), ("new".to_string(), model)].into_iter().collect(),
        snap_sets: vec![vec!["base".into()], vec!["base".into(), "new".into()]],
    };
    crash_sweep(&base, &ex, "create", &|img| img.checkpoint_create("new").map(|_| ()));
}

#[test]
fn crash_during_revert() {
    let (base, snap, model) = base_image();
    let ex = Expect {
        actives: vec![model, snap.clone()],
        snaps: [("base".to_string(), snap)].into_iter().collect(),
        snap_sets: vec![vec!["base".into()]],
    };
    crash_sweep(&base, &ex, "revert", &|img| img.checkpoint_revert("base"));
}

#[test]
fn crash_during_delete() {
    sweep_delete("delete", &|img| img.checkpoint_delete("base"));
}

/// The flush after a deletion writes back what its drop walk changed: the decreased counts
/// and the COPIED flags set on their strength. The counts must reach disk first: a crash in
/// between would leave COPIED on clusters the on-disk counts still call shared, with the
/// dirty bit clear (a deletion does not set it).
#[test]
fn crash_during_delete_and_the_flush_after_it() {
    sweep_delete("delete + flush", &|img| {
        img.checkpoint_delete("base")?;
        img.flush()
    });
}

/// Crash points through `op`, which deletes checkpoint "base": the active disk is unchanged
/// and "base" is either intact or gone.
fn sweep_delete(what: &str, op: &dyn Fn(&mut Qcow2) -> xensnap_qcow2::Result<()>) {
    let (base, snap, model) = base_image();
    let ex = Expect {
        actives: vec![model],
        snaps: [("base".to_string(), snap)].into_iter().collect(),
        snap_sets: vec![vec!["base".into()], vec![]],
    };
    crash_sweep(&base, &ex, what, op);
}

#[test]
fn crash_during_cow_writes() {
    let (base, snap, model) = base_image();
    let mut new = model.clone();
    let writes: Vec<(usize, Vec<u8>)> =
        (0..6).map(|i| (i * 150_001 % (SIZE - 9000), vec![0xE0 + i as u8; 9000])).collect();
    for (o, b) in &writes {
        new[*o..*o + b.len()].copy_from_slice(b);
    }
    // without a flush the writes may be lost wholesale or partially; we only check the
    // old/new extremes for the committed case, and metadata integrity everywhere
    let ex = Expect {
        actives: vec![model.clone(), new.clone()],
        snaps: [("base".to_string(), snap.clone())].into_iter().collect(),
        snap_sets: vec![vec!["base".into()]],
    };
    let op = |img: &mut Qcow2| -> xensnap_qcow2::Result<()> {
        for (o, b) in &writes {
            img.write(*o as u64, b)?;
        }
        img.discard(0, 64 << 10)?;
        img.write(0, &[0u8; 10])?;
        img.flush()
    };
    let mut new2 = new.clone();
    new2[..64 << 10].fill(0);
    let ex = Expect { actives: vec![model, new2.clone()], ..ex };
    // metadata-only verification: the active data may be any mix before the final flush
    let (f, mut img) = open_fault(&base);
    let (w0, f0) = f.op_counts();
    op(&mut img).unwrap();
    assert!(read_all(&mut img, None) == new2);
    let (w1, f1) = f.op_counts();
    let total = (w1 - w0) + (f1 - f0);
    for k in 1..=total + 1 {
        let (f, mut img) = open_fault(&base);
        f.fail_after(Some(k));
        let r = op(&mut img);
        drop(img);
        for seed in 0..6 {
            let bytes = f.crash(seed + 1000 * k);
            let (mut im, rep) = open_crashed(&bytes, &format!("cow k={k} seed={seed}"));
            assert!(rep.errors.iter().all(|e| e.contains("OFLAG_COPIED")), "cow k={k}: {rep:?}");
            assert!(read_all(&mut im, Some("base")) == ex.snaps["base"], "snapshot changed by COW writes");
            if r.is_ok() {
                assert!(read_all(&mut im, None) == new2, "flushed data lost");
            }
        }
    }
    let _ = f_len_unused();
}

fn f_len_unused() -> u64 {
    let m = MemIo::new();
    m.len().unwrap_or(0)
}

/// Power loss while the refcount table grows and new refblocks are created (512-byte
/// clusters: one reftable cluster covers 16384 clusters). Fail points are sampled.
#[test]
fn crash_during_reftable_growth() {
    let size = 16u64 << 20;
    let f = FaultIo::new();
    let mut img =
        Qcow2::create(Box::new(f.clone()), &CreateOptions { size, cluster_bits: 9, refcount_order: 4 }).unwrap();
    let mut rng = Rng(5);
    let mut old = vec![0u8; 7 << 20];
    rng.fill(&mut old);
    img.write(0, &old).unwrap();
    img.close().unwrap();
    let base = (*f.durable()).clone();
    let mut new = vec![0u8; 2 << 20];
    rng.fill(&mut new);
    let off = 8u64 << 20;
    let op = |img: &mut Qcow2| -> xensnap_qcow2::Result<()> {
        for (i, c) in new.chunks(64 << 10).enumerate() {
            img.write(off + (i as u64) * (64 << 10), c)?;
        }
        img.flush()
    };
    let (f, mut img) = open_fault(&base);
    let (w0, f0) = f.op_counts();
    op(&mut img).unwrap();
    let (w1, f1) = f.op_counts();
    let total = (w1 - w0) + (f1 - f0);
    drop(img);
    let grown = f.durable();
    assert!(be32(&grown, 56) > 1 || be64(&grown, 48) != be64(&base, 48), "reftable did not move/grow");
    // find the op that switches the header to the new reftable (binary search on the
    // running view), then sweep densely around it and sparsely elsewhere
    let moved = |k: u64| {
        let (f, mut img) = open_fault(&base);
        f.fail_after(Some(k));
        let _ = op(&mut img);
        drop(img);
        be64(&f.current(), 48) != be64(&base, 48)
    };
    let (mut lo, mut hi) = (1u64, total + 1);
    while lo < hi {
        let mid = (lo + hi) / 2;
        if moved(mid) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    eprintln!("reftable growth: {total} I/O ops, header switch at op {lo}");
    let mut points: Vec<u64> = (lo.saturating_sub(40).max(1)..=(lo + 10).min(total + 1)).collect();
    points.extend((1..=total + 1).step_by(1 + total as usize / 40));
    for k in points {
        let (f, mut img) = open_fault(&base);
        f.fail_after(Some(k));
        let r = op(&mut img);
        drop(img);
        for seed in 0..3 {
            let bytes = f.crash(seed + 31 * k);
            let mut im = Qcow2::open(Box::new(MemIo::from_bytes(bytes)), &OpenOptions { read_only: true })
                .unwrap_or_else(|e| panic!("k={k}: open: {e}"));
            let rep = im.check().unwrap();
            assert_eq!(rep.corruptions, 0, "k={k} seed={seed}: {:?}", &rep.errors[..rep.errors.len().min(5)]);
            let mut b = vec![0u8; old.len()];
            im.read(0, &mut b).unwrap();
            assert!(b == old, "k={k}: old data damaged");
            if r.is_ok() {
                let mut b = vec![0u8; new.len()];
                im.read(off, &mut b).unwrap();
                assert!(b == new, "k={k}: flushed data lost");
            }
        }
    }
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}
fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// One staged commit driven like a server does it (barriers through the I/O's sync handle),
/// with guest I/O between every stage: copy-on-write writes before and after each barrier, a
/// guest flush after some, and a second take in the middle. Returns the active disk the
/// guest ends with.
fn staged_commit_with_guest_io(img: &mut Qcow2, active: &mut Vec<u8>) -> xensnap_qcow2::Result<()> {
    use xensnap_qcow2::DurableStep;
    img.checkpoint_take("new")?;
    let mut i = 0usize;
    let write = |img: &mut Qcow2, active: &mut Vec<u8>, i: usize| -> xensnap_qcow2::Result<()> {
        let off = (i * 77_777) % (SIZE - 5000);
        let b = vec![0x30 + (i % 200) as u8; 5000];
        img.write(off as u64, &b)?;
        active[off..off + b.len()].copy_from_slice(&b);
        Ok(())
    };
    loop {
        match img.durable_step_staged(1)? {
            DurableStep::Done(true) => break,
            DurableStep::Done(false) => write(img, active, i)?,
            DurableStep::Barrier(b) => {
                write(img, active, i)?;
                if i % 3 == 1 {
                    img.flush()?;
                }
                if i == 4 {
                    img.checkpoint_take("second")?;
                }
                let s = b.sync()?;
                write(img, active, i + 1000)?;
                img.durable_barrier_done(s);
            }
        }
        i += 1;
    }
    img.flush()
}

#[test]
fn crash_during_staged_commit_with_guest_io() {
    let (base, snap, model) = base_image();
    let mut final_active = model.clone();
    let (f, mut img) = open_fault(&base);
    let (w0, f0) = f.op_counts();
    staged_commit_with_guest_io(&mut img, &mut final_active).unwrap();
    let (w1, f1) = f.op_counts();
    assert!(read_all(&mut img, None) == final_active);
    assert!(read_all(&mut img, Some("new")) == model);
    assert!(img.check().unwrap().is_clean());
    drop(img);
    let total = (w1 - w0) + (f1 - f0);
    eprintln!("staged commit with guest I/O: {total} I/O ops swept");
    for k in 1..=total + 1 {
        let (f, mut img) = open_fault(&base);
        f.fail_after(Some(k));
        let mut active = model.clone();
        let r = staged_commit_with_guest_io(&mut img, &mut active);
        drop(img);
        for seed in 0..4 {
            let ctx = format!("staged commit: failing op {k}/{total}, seed {seed}");
            let bytes = f.crash(seed * 7919 + k);
            let (mut im, rep) = open_crashed(&bytes, &ctx);
            assert!(rep.errors.iter().all(|e| e.contains("OFLAG_COPIED")), "{ctx}: {rep:?}");
            let names: Vec<String> = im.checkpoint_list().into_iter().map(|s| s.name).collect();
            assert!(names.first().is_some_and(|n| n == "base"), "{ctx}: {names:?}");
            assert!(read_all(&mut im, Some("base")) == snap, "{ctx}: base changed");
            if names.iter().any(|n| n == "new") {
                assert!(read_all(&mut im, Some("new")) == model, "{ctx}: checkpoint new differs");
            }
            if r.is_ok() {
                assert!(names.iter().any(|n| n == "new"), "{ctx}: durable checkpoint lost");
                assert!(read_all(&mut im, None) == final_active, "{ctx}: flushed data lost");
            }
            drop(im);
            assert_repairs(bytes, &ctx);
        }
    }
}

/// A taken checkpoint abandoned before it is durable (the memory save that went with it
/// failed): deleting it does no I/O, its background removal writes no snapshot table and
/// runs no flush, it never reaches the table, and a power loss at any point never brings it
/// back.
#[test]
fn abandoned_taken_checkpoint_is_dropped_unpublished() {
    let (base, snap, model) = base_image();
    let op = |img: &mut Qcow2, f: &FaultIo| -> xensnap_qcow2::Result<(u64, u64)> {
        img.checkpoint_take("doomed")?;
        img.write(4096, &[0x77; 9000])?;
        let before = f.op_counts();
        img.checkpoint_delete_begin("doomed")?;
        let begin = f.op_counts();
        assert_eq!(before, begin, "delete begin of a taken checkpoint did I/O");
        assert!(img.checkpoint_list().iter().all(|c| c.name != "doomed"));
        img.write(200_000, &[0x78; 9000])?;
        let begin = f.op_counts();
        img.wait_durable()?;
        let after = f.op_counts();
        img.flush()?;
        Ok((after.0 - begin.0, after.1 - begin.1))
    };
    let (f, mut img) = open_fault(&base);
    let (w0, f0) = f.op_counts();
    let (writes, flushes) = op(&mut img, &f).unwrap();
    assert_eq!(flushes, 0, "abandoning a taken checkpoint flushed");
    assert_eq!(writes, 0, "abandoning a taken checkpoint wrote to the image");
    let mut active = model.clone();
    active[4096..4096 + 9000].fill(0x77);
    active[200_000..200_000 + 9000].fill(0x78);
    assert!(read_all(&mut img, None) == active);
    assert!(img.check().unwrap().is_clean());
    let (w1, f1) = f.op_counts();
    drop(img);
    assert_eq!(
        Qcow2::open(Box::new(MemIo::from_bytes((*f.durable()).clone())), &OpenOptions { read_only: true })
            .unwrap()
            .checkpoint_list()
            .len(),
        1
    );
    let total = (w1 - w0) + (f1 - f0);
    for k in 1..=total + 1 {
        let (f, mut img) = open_fault(&base);
        f.fail_after(Some(k));
        let _ = op(&mut img, &f);
        drop(img);
        for seed in 0..4 {
            let ex = Expect {
                actives: vec![],
                snaps: [("base".to_string(), snap.clone())].into_iter().collect(),
                snap_sets: vec![vec!["base".into()]],
            };
            let bytes = f.crash(seed * 31 + k);
            let (mut im, _) = open_crashed(&bytes, &format!("abandon k={k} seed={seed}"));
            let names: Vec<String> = im.checkpoint_list().into_iter().map(|s| s.name).collect();
            assert!(ex.snap_sets.contains(&names), "abandon k={k}: {names:?}");
            assert!(read_all(&mut im, Some("base")) == ex.snaps["base"], "abandon k={k}: base changed");
        }
    }
}

/// A checkpoint made durable with no guest flush after it (inline: take + wait_durable;
/// staged: barriers through the sync handle): the walk cleared the active tree's COPIED
/// flags of the clusters it now shares only in memory, so until they are written back the
/// dirty bit must stay set on disk, or QEMU would write into the checkpoint's clusters. A
/// power loss at any point after the commit must leave no COPIED flag on a shared cluster
/// with the dirty bit clear; a later guest flush writes the flags back and clears the bit.
#[test]
fn durable_checkpoint_without_flush_keeps_copied_flags_safe() {
    let (base, snap, model) = base_image();
    for staged in [false, true] {
        let (f, mut img) = open_fault(&base);
        img.checkpoint_take("cp").unwrap();
        common::make_durable(&mut img, staged);
        let ctx = if staged { "staged" } else { "inline" };
        let mut images = vec![(*f.durable()).clone(), f.current()];
        images.extend((0..16).map(|seed| f.crash(seed)));
        for (n, bytes) in images.into_iter().enumerate() {
            let harmful = harmful_copied_flags(&bytes);
            assert!(harmful.is_empty(), "{ctx} image {n}: dirty bit clear with COPIED on shared clusters: {harmful:?}");
            let mut im = Qcow2::open(Box::new(MemIo::from_bytes(bytes)), &OpenOptions { read_only: true }).unwrap();
            assert_eq!(im.checkpoint_list().len(), 2, "{ctx} image {n}: durable checkpoint lost");
            assert!(read_all(&mut im, Some("cp")) == model, "{ctx} image {n}: checkpoint cp differs");
            assert!(read_all(&mut im, Some("base")) == snap, "{ctx} image {n}: checkpoint base differs");
        }
        // the next guest flush writes the flags back and clears the dirty bit
        img.flush().unwrap();
        assert!(harmful_copied_flags(&f.durable()).is_empty());
        // (the clear itself needs no barrier)
        let bytes = f.current();
        assert_eq!(common::be64(&bytes, 72) & 1, 0, "{ctx}: dirty bit still set after a flush with no work queued");
        let mut im = Qcow2::open(Box::new(MemIo::from_bytes(bytes)), &OpenOptions { read_only: true }).unwrap();
        assert!(im.check().unwrap().is_clean(), "{ctx}: not clean after the flush");
    }
}

/// A durable checkpoint's deletion queued before a take, then guest writes that copy
/// clusters the taken checkpoint shares (a *hand-over*: the checkpoint gets its own count at
/// once, the active tree's is given back once its pointer removal is durable). The
/// deletion's table rewrite runs first and writes every dirty refcount block, hand-over
/// counts included: until the checkpoint is published those counts are leaks, and the active
/// tree on disk still marks those clusters COPIED. So the dirty bit must be durable before
/// that write, or a crash leaves refcount 2 under COPIED with the bit clear (QEMU writes in
/// place there, `qemu-img check` reports OFLAG_COPIED errors). With the bit clear, a crash
/// at any point must leave refcounts equal to the references (no leak at all) here: every
/// leak of this sequence is one of the pending checkpoint work, covered by the bit.
/// Inline (`wait_durable`), and staged with guest writes and flushes run while each
/// barrier is handed out (so a hand-over lands between the dirty bit's write and its
/// barrier).
#[test]
fn delete_before_take_with_hand_over_keeps_dirty_bit() {
    let (base0, snap, _) = base_image();
    // clusters of the active tree only (refcount 1, COPIED on disk), dirty bit clear
    let (f, mut img) = open_fault(&base0);
    img.write(300_000, &[0x55; 20_000]).unwrap();
    img.flush().unwrap();
    let taken = read_all(&mut img, None);
    img.close().unwrap();
    let base = (*f.durable()).clone();
    assert_eq!(be64(&base, 72) & 1, 0);
    for staged in [false, true] {
        let op = |img: &mut Qcow2| -> xensnap_qcow2::Result<()> {
            img.checkpoint_delete_begin("base")?;
            img.checkpoint_take("cp")?;
            // copy-on-write of clusters shared with the taken checkpoint: hand-overs
            img.write(300_100, &[0x66; 5000])?;
            let mut n = 0u64;
            if staged {
                loop {
                    match img.durable_step_staged(1)? {
                        DurableStep::Done(true) => break,
                        DurableStep::Done(false) => {}
                        DurableStep::Barrier(b) => {
                            n += 1;
                            img.write(306_000 + n * 4096, &[0x70 + n as u8; 3000])?;
                            if n % 2 == 1 {
                                img.flush()?;
                            }
                            let s = b.sync()?;
                            img.durable_barrier_done(s);
                        }
                    }
                }
            } else {
                img.wait_durable()?;
            }
            img.flush()
        };
        let ctx = if staged { "staged" } else { "inline" };
        let first = |img: &mut Qcow2| {
            let names: Vec<String> = img.checkpoint_list().into_iter().map(|s| s.name).collect();
            assert_eq!(names, vec!["cp".to_string()]);
        };
        sweep_no_leak_with_bit_clear(ctx, &base, 24, 131, op, first, |c, im| {
            let names: Vec<String> = im.checkpoint_list().into_iter().map(|s| s.name).collect();
            for n in &names {
                let want = match n.as_str() {
                    "base" => &snap,
                    "cp" => &taken,
                    other => panic!("{c}: unexpected checkpoint {other}"),
                };
                assert!(read_all(im, Some(n)) == *want, "{c}: checkpoint {n} differs");
            }
        });
    }
}

/// A taken checkpoint abandoned before its commit's preparation: its walk still raises the
/// counts of what it shares with the active tree and clears the active tree's COPIED flags
/// in memory (the drop that follows gives them back). A guest flush between the walk and
/// the drop writes those counts: the dirty bit must be durable first, or a crash between
/// the refcount blocks and the L2 tables leaves refcount 2 under COPIED with the bit clear.
/// Every crash point: no COPIED over refcount > 1 and no leak at all with the bit clear,
/// the abandoned checkpoint never appears, base intact.
#[test]
fn abandoned_checkpoint_walk_flushed_before_its_drop_keeps_dirty_bit() {
    let (base, snap, _) = base_image();
    let op = |img: &mut Qcow2| -> xensnap_qcow2::Result<()> {
        img.checkpoint_take("doomed")?;
        img.checkpoint_delete_begin("doomed")?;
        // one step: the walk, not yet the drop
        let done = img.durable_step(1)?;
        assert!(!done, "the walk and the drop ran in one step: the flush would find nothing");
        img.flush()?;
        img.wait_durable()?;
        img.flush()
    };
    sweep_no_leak_with_bit_clear(
        "abandoned walk",
        &base,
        12,
        17,
        op,
        |_| {},
        |c, im| {
            let names: Vec<String> = im.checkpoint_list().into_iter().map(|s| s.name).collect();
            assert_eq!(names, vec!["base".to_string()], "{c}");
            assert!(read_all(im, Some("base")) == snap, "{c}: base changed");
        },
    );
}

/// Run `op` once on `base` (it must succeed and leave a clean image; `first` looks at it),
/// then once failing at each of its writes and flushes. Each time the durable image, the
/// current one and `crashes` power-loss images must hold no COPIED flag on a shared cluster,
/// no corruption, and, with the dirty bit clear, refcounts equal to references (no leak at
/// all); `also` then checks what the test is about on the image opened read-only.
fn sweep_no_leak_with_bit_clear(
    ctx: &str,
    base: &[u8],
    crashes: u64,
    seed_mul: u64,
    op: impl Fn(&mut Qcow2) -> xensnap_qcow2::Result<()>,
    first: impl FnOnce(&mut Qcow2),
    mut also: impl FnMut(&str, &mut Qcow2),
) {
    let (f, mut img) = open_fault(base);
    let (w0, f0) = f.op_counts();
    op(&mut img).unwrap();
    assert!(img.check().unwrap().is_clean(), "{ctx}: not clean at the end");
    first(&mut img);
    let (w1, f1) = f.op_counts();
    drop(img);
    let total = (w1 - w0) + (f1 - f0);
    for k in 1..=total + 1 {
        let (f, mut img) = open_fault(base);
        f.fail_after(Some(k));
        let _ = op(&mut img);
        drop(img);
        let mut images = vec![(*f.durable()).clone(), f.current()];
        images.extend((0..crashes).map(|seed| f.crash(seed * seed_mul + k)));
        for (n, bytes) in images.into_iter().enumerate() {
            let c = format!("{ctx} k={k}/{total} image {n}");
            let dirty = be64(&bytes, 72) & 1 != 0;
            let (mut im, rep) = open_crashed(&bytes, &c);
            assert!(dirty || rep.is_clean(), "{c}: dirty bit clear, refcounts differ from references: {rep:?}");
            also(&c, &mut im);
        }
    }
}

/// The ranged barriers of a staged commit: after the commit's first (whole-file) barrier,
/// each barrier makes only the commit's own writes durable (`SyncHandle::sync_ranges`), not
/// the guest's data written since the take. A checkpoint reported durable still survives a
/// power loss with the guest data written *before* the take and never flushed by the guest
/// (the first barrier synced it), while the guest's writes after the take may be lost (no
/// flush asked for them). Swept over every write/flush of the operation, with crashes.
#[test]
fn ranged_barriers_keep_data_written_before_the_take() {
    use xensnap_qcow2::DurableStep;
    let (base, snap, model) = base_image();
    let op = |img: &mut Qcow2, model_at_take: &mut Vec<u8>| -> xensnap_qcow2::Result<()> {
        // guest data before the take, never flushed by the guest
        for i in 0..6usize {
            let off = (i * 151_111) % (SIZE - 9000);
            let b = vec![0xA0 + i as u8; 9000];
            img.write(off as u64, &b)?;
            model_at_take[off..off + b.len()].copy_from_slice(&b);
        }
        img.checkpoint_take("new")?;
        let mut i = 0usize;
        loop {
            // guest writes after the take (copy-on-write of the checkpoint's clusters), no flush
            let off = (i * 77_777 + 12_345) % (SIZE - 5000);
            img.write(off as u64, &vec![0x11 + (i % 100) as u8; 5000])?;
            match img.durable_step_staged(1)? {
                DurableStep::Done(true) => return Ok(()),
                DurableStep::Done(false) => {}
                DurableStep::Barrier(b) => {
                    img.write((off as u64 + 40_000) % (SIZE as u64 - 5000), &[0x66; 5000])?;
                    let s = b.sync()?;
                    img.durable_barrier_done(s);
                }
            }
            i += 1;
        }
    };
    let (f, mut img) = open_fault(&base);
    let mut at_take = model.clone();
    let (w0, f0) = f.op_counts();
    let r0 = f.range_flush_count();
    op(&mut img, &mut at_take).unwrap();
    let (w1, f1) = f.op_counts();
    assert!(f.range_flush_count() > r0, "the staged commit ran no ranged barrier");
    assert!(f.pending_ops() > 0, "the guest's writes after the take were synced by the commit");
    assert!(read_all(&mut img, Some("new")) == at_take);
    drop(img);
    let total = (w1 - w0) + (f1 - f0);
    for k in 1..=total + 1 {
        let (f, mut img) = open_fault(&base);
        f.fail_after(Some(k));
        let mut at_take = model.clone();
        let r = op(&mut img, &mut at_take);
        drop(img);
        for seed in 0..6 {
            let ctx = format!("ranged barriers: failing op {k}/{total}, seed {seed}");
            let bytes = f.crash(seed * 104_729 + k);
            let (mut im, _) = open_crashed(&bytes, &ctx);
            let names: Vec<String> = im.checkpoint_list().into_iter().map(|s| s.name).collect();
            assert!(read_all(&mut im, Some("base")) == snap, "{ctx}: base changed");
            if r.is_ok() {
                assert!(names.iter().any(|n| n == "new"), "{ctx}: durable checkpoint lost");
            }
            if names.iter().any(|n| n == "new") {
                assert!(
                    read_all(&mut im, Some("new")) == at_take,
                    "{ctx}: checkpoint lost data written before the take"
                );
            }
            drop(im);
            assert_repairs(bytes, &ctx);
        }
    }
}
