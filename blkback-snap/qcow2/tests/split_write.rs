//! Guest writes split around their data I/O (`Qcow2::cow_plan` / `CowPlan::run` /
//! `Qcow2::cow_finish`, what `SharedImage` does with the image lock released): linked in
//! when only background steps ran in between, made the ordinary way when anything that can
//! change the merge happened, exact accounting throughout, and the on-disk result clean for
//! our check and qemu-img's.

mod common;
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use xensnap_blockdev::BlockDevice;
use xensnap_qcow2::{CreateOptions, FaultIo, ImageIo, OpenOptions, Qcow2, SharedImage};

const CS: u64 = 4096;
const SIZE: u64 = 4 << 20;

/// An image of SIZE bytes with every cluster written (pattern `base`), on a FaultIo.
fn filled(base: u8) -> (FaultIo, Qcow2, Vec<u8>) {
    let io = FaultIo::new();
    let opts = CreateOptions { size: SIZE, cluster_bits: CS.trailing_zeros(), ..Default::default() };
    let mut img = Qcow2::create(Box::new(io.clone()) as Box<dyn ImageIo>, &opts).unwrap();
    img.set_walk_chunk(16);
    let model: Vec<u8> = (0..SIZE as usize).map(|i| base.wrapping_add((i / 511) as u8)).collect();
    img.write(0, &model).unwrap();
    img.flush().unwrap();
    (io, img, model)
}

fn exact(img: &mut Qcow2, what: &str) {
    let acc = img.verify_accounting().unwrap();
    assert!(acc.is_empty(), "{what}: accounting {acc:#?}");
}

fn read_all(img: &mut Qcow2) -> Vec<u8> {
    let mut b = vec![0u8; SIZE as usize];
    img.read(0, &mut b).unwrap();
    b
}

#[test]
fn a_split_write_is_linked_in_across_background_steps() {
    let (io, mut img, mut model) = filled(3);
    let snap = model.clone();
    img.checkpoint_take("a").unwrap();
    let mut linked = 0;
    for (k, off) in [5 * CS + 100, 700 * CS, 701 * CS + 4000, 1000 * CS].into_iter().enumerate() {
        let len = (CS - off % CS).min(1500) as usize;
        let data = vec![0x70 + k as u8; len];
        let plan = img.cow_plan(off, len).unwrap().expect("a shared cluster while work is pending: a plan");
        plan.run(&data).unwrap();
        exact(&mut img, "between plan and finish");
        // the driver's steps run in between (the walk passes some positions meanwhile)
        for _ in 0..3 {
            img.durable_step(1).unwrap();
        }
        exact(&mut img, "after steps in the gap");
        assert!(img.cow_finish(plan, Ok(())).unwrap(), "only background steps ran: linked in");
        linked += 1;
        model[off as usize..off as usize + len].copy_from_slice(&data);
        exact(&mut img, "after finish");
        assert!(read_all(&mut img) == model, "active disk after split write {k}");
    }
    assert_eq!(linked, 4);
    // a cluster the active disk owns is written in place: no plan
    let owned = 5 * CS;
    assert!(img.cow_plan(owned, 512).unwrap().is_none(), "owned cluster: in place, no plan");
    img.wait_durable().unwrap();
    // nothing pending: no plan
    assert!(img.cow_plan(300 * CS, 512).unwrap().is_none(), "no background work: no plan");
    let mut b = vec![0u8; SIZE as usize];
    img.read_checkpoint("a", 0, &mut b).unwrap();
    assert!(b == snap, "checkpoint content");
    img.flush().unwrap();
    assert!(img.check().unwrap().is_clean());
    img.close().unwrap();
    let mut img = Qcow2::open(Box::new(io.clone()), &OpenOptions::default()).unwrap();
    assert!(read_all(&mut img) == model, "active disk after reopen");
    assert!(img.check().unwrap().is_clean());
    img.close().unwrap();
    if have_qemu() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s.qcow2");
        std::fs::write(&p, io.current()).unwrap();
        assert_qemu_clean(&p);
        assert!(qemu_raw(&p, None) == model, "qemu-img reads the active disk as written");
        assert!(qemu_raw(&p, Some("a")) == snap, "qemu-img reads the checkpoint as taken");
    }
}

#[test]
fn a_stale_plan_frees_its_cluster_and_the_write_is_made_after_what_ran_in_between() {
    let off = 40 * CS + 512;
    let data = vec![0xabu8; 1024];
    // each case: something that can change the merge or the mapping runs in the gap
    type Between = fn(&mut Qcow2, &mut Vec<u8>);
    let cases: Vec<(&str, Between)> = vec![
        ("a write to the same cluster", |img, m| {
            let b = vec![0x11u8; 512];
            img.write(40 * CS, &b).unwrap();
            m[(40 * CS) as usize..(40 * CS) as usize + 512].copy_from_slice(&b);
        }),
        ("a write elsewhere", |img, m| {
            let b = vec![0x12u8; 512];
            img.write(900 * CS, &b).unwrap();
            m[(900 * CS) as usize..(900 * CS) as usize + 512].copy_from_slice(&b);
        }),
        ("a flush", |img, _| img.flush().unwrap()),
        ("a discard of the cluster", |img, m| {
            img.discard(40 * CS, CS).unwrap();
            m[(40 * CS) as usize..(41 * CS) as usize].fill(0);
        }),
        ("another take", |img, _| {
            img.checkpoint_take("b").unwrap();
        }),
        ("the checkpoint deleted (the cluster becomes the active disk's alone)", |img, _| {
            img.checkpoint_delete_begin("a").unwrap();
        }),
        ("a revert switch", |img, m| {
            img.checkpoint_revert_switch("a").unwrap();
            let mut b = vec![0u8; SIZE as usize];
            img.read(0, &mut b).unwrap();
            *m = b;
        }),
    ];
    for (what, between) in cases {
        let (_io, mut img, mut model) = filled(9);
        img.checkpoint_take("a").unwrap();
        let plan = img.cow_plan(off, data.len()).unwrap().expect("plan");
        plan.run(&data).unwrap();
        between(&mut img, &mut model);
        assert!(!img.cow_finish(plan, Ok(())).unwrap(), "{what}: the plan must be stale");
        exact(&mut img, what);
        img.write(off, &data).unwrap();
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        exact(&mut img, what);
        assert!(read_all(&mut img) == model, "{what}: active disk");
        img.wait_durable().unwrap();
        img.flush().unwrap();
        assert!(img.check().unwrap().is_clean(), "{what}: check");
    }
}

#[test]
fn a_failed_data_write_in_the_gap_links_nothing() {
    let (io, mut img, model) = filled(4);
    img.checkpoint_take("a").unwrap();
    let plan = img.cow_plan(77 * CS, 512).unwrap().expect("plan");
    io.fail_after(Some(1));
    let ran = plan.run(&[0xcd; 512]);
    assert!(ran.is_err(), "the injected failure reaches the split write");
    assert!(!img.cow_finish(plan, ran).unwrap(), "a failed data write is not linked in");
    io.fail_after(None);
    assert!(img.write(77 * CS, &[0xcd; 512]).is_err(), "the image is poisoned by the failed write");
    let mut b = vec![0u8; SIZE as usize];
    img.read(0, &mut b).unwrap();
    assert!(b == model, "nothing of the failed write is visible");
}

/// Through `SharedImage`: a guest thread's copy-on-write writes while a durability driver
/// makes a checkpoint durable, the driver's steps running during the guest's data I/O; the
/// data and the checkpoint are exact afterwards and the image checks clean.
#[test]
fn guest_writes_and_a_driver_thread_through_shared_image() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.qcow2");
    let size = 16u64 << 20;
    let mut img = Qcow2::create_file(&p, &CreateOptions { size, cluster_bits: 12, ..Default::default() }).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(17);
    rng.fill(&mut model);
    img.write(0, &model).unwrap();
    img.flush().unwrap();
    img.set_walk_chunk(32);
    let snap = model.clone();
    let shared = SharedImage::new(img);
    shared.0.lock().unwrap().checkpoint_take("a").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, st2) = (shared.clone(), stop.clone());
    let driver = std::thread::spawn(move || {
        let waiting = s2.handoff_flag();
        while !st2.load(Ordering::SeqCst) {
            let p = s2.durable_work_handed(1, Some(&waiting)).unwrap();
            if p.done {
                break;
            }
        }
    });
    for i in 0..3000u64 {
        let off = rng.below(size / 1024) * 1024;
        let b = vec![(i as u8) | 1; 1024];
        shared.write_at(off, &b).unwrap();
        model[off as usize..off as usize + 1024].copy_from_slice(&b);
        if i % 500 == 0 {
            shared.flush().unwrap();
        }
    }
    stop.store(true, Ordering::SeqCst);
    driver.join().unwrap();
    let mut g = shared.0.lock().unwrap();
    g.wait_durable().unwrap();
    let acc = g.verify_accounting().unwrap();
    assert!(acc.is_empty(), "accounting {acc:#?}");
    let mut b = vec![0u8; size as usize];
    g.read(0, &mut b).unwrap();
    assert!(b == model, "active disk");
    g.read_checkpoint("a", 0, &mut b).unwrap();
    assert!(b == snap, "checkpoint");
    g.flush().unwrap();
    assert!(g.check().unwrap().is_clean());
    drop(g);
    drop(shared);
    if have_qemu() {
        assert_qemu_clean(&p);
    }
}
