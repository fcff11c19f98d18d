//! A failed flush poisons the image. After an `fdatasync` EIO the kernel may drop the dirty
//! pages and report success to the next `fdatasync`, and the error reaches only the first of
//! the file descriptions sharing it (a guest flush and a background barrier): so neither a
//! guest flush nor a checkpoint may ever be reported done after a failed sync, whichever
//! path saw it, until the image is reopened.

use xensnap_qcow2::{
    CheckpointState, CreateOptions, DurableStep, Error, FaultIo, MemIo, OpenOptions, Qcow2, SharedImage,
};

const SIZE: u64 = 1 << 20;

fn base() -> Vec<u8> {
    let f = FaultIo::new();
    let mut img =
        Qcow2::create(Box::new(f.clone()), &CreateOptions { size: SIZE, cluster_bits: 12, refcount_order: 4 }).unwrap();
    img.write(0, &[0x11; 64 * 1024]).unwrap();
    img.checkpoint_create("base").unwrap();
    img.close().unwrap();
    (*f.durable()).clone()
}

fn open(bytes: &[u8]) -> (FaultIo, Qcow2) {
    let f = FaultIo::from_bytes(bytes.to_vec());
    let img = Qcow2::open(Box::new(f.clone()), &OpenOptions::default()).unwrap();
    (f, img)
}

fn read(img: &mut Qcow2, cp: Option<&str>, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    match cp {
        None => img.read(off, &mut b).unwrap(),
        Some(c) => img.read_checkpoint(c, off, &mut b).unwrap(),
    }
    b
}

/// The guest's flush fails once (its writes dropped); the device would accept the next
/// flush. Every later flush, write, checkpoint step and the commit are refused, naming the
/// first failure; after reopening, the image is consistent.
#[test]
fn guest_flush_after_a_failed_sync_is_refused() {
    let (f, mut img) = open(&base());
    img.write(0, &[0x22; 8192]).unwrap();
    f.lossy_sync_after(Some(1));
    assert!(img.flush().is_err());
    match img.flush() {
        Err(Error::Poisoned { first }) => assert!(first.contains("fdatasync error"), "{first}"),
        r => panic!("a flush after a failed sync returned {r:?}"),
    }
    assert!(matches!(img.write(8192, &[1; 512]), Err(Error::Poisoned { .. })));
    assert!(matches!(img.checkpoint_take("x"), Err(Error::Poisoned { .. })));
    assert!(matches!(img.checkpoint_create("y"), Err(Error::Poisoned { .. })));
    assert!(img.close().is_err());
    let mut img = Qcow2::open(Box::new(MemIo::from_bytes((*f.durable()).clone())), &OpenOptions::default()).unwrap();
    assert!(read(&mut img, Some("base"), 0, 65536).iter().all(|b| *b == 0x11));
    assert!(img.check().unwrap().errors.is_empty());
}

/// The background barrier of a staged commit (run through the sync handle, as
/// `SharedImage::durable_work` does) fails first: the guest's next flush must not succeed
/// (the kernel would report the error only once), and the checkpoint never becomes durable.
#[test]
fn background_barrier_failure_fails_the_guest_flush_and_the_commit() {
    let (f, img) = open(&base());
    let shared = SharedImage::new(img);
    {
        let mut g = shared.0.lock().unwrap();
        g.write(0, &[0x33; 8192]).unwrap();
        g.checkpoint_take("cp").unwrap();
    }
    f.lossy_sync_after(Some(1));
    let mut failed = None;
    for _ in 0..1000 {
        match shared.durable_work(1) {
            Ok(p) if p.done => break,
            Ok(_) => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let e = failed.expect("the barrier's sync did not fail");
    assert!(!matches!(e, Error::Poisoned { .. }), "the first failure is reported as itself: {e}");
    let mut g = shared.0.lock().unwrap();
    assert!(matches!(g.flush(), Err(Error::Poisoned { .. })), "guest flush succeeded after a failed barrier");
    drop(g);
    for _ in 0..10 {
        assert!(matches!(shared.durable_work(1), Err(Error::Poisoned { .. })), "background work went on");
    }
    let mut g = shared.0.lock().unwrap();
    assert!(g.checkpoint_list().iter().all(|c| c.name != "cp" || c.state == CheckpointState::Taken));
    assert!(g.wait_durable().is_err());
}

/// One scenario with guest writes and flushes, a staged commit whose barriers run through
/// the sync handle, and a second checkpoint made inline; a recoverable sync failure at each
/// flush in turn. Nothing may be reported done after the failure, and what was reported
/// done before it is on disk.
#[test]
fn nothing_is_reported_done_after_a_failed_sync() {
    let base = base();
    #[derive(Default)]
    struct Done {
        flushed: Vec<(u64, u8)>,
        durable: Vec<String>,
        failed: bool,
        after: Vec<String>,
    }
    let scenario = |img: &mut Qcow2| -> Done {
        let mut d = Done::default();
        let note = |d: &mut Done, ok: bool, what: String| {
            if !ok {
                d.failed = true;
            } else if d.failed {
                d.after.push(what);
            }
        };
        for round in 0..3u64 {
            let off = round * 16384;
            let v = 0x40 + round as u8;
            let w = img.write(off, &[v; 8192]).is_ok();
            note(&mut d, w, format!("write {round}"));
            let ok = img.flush().is_ok();
            note(&mut d, ok, format!("flush {round}"));
            if ok && w {
                d.flushed.push((off, v));
            }
        }
        let name = "staged".to_string();
        let took = img.checkpoint_take(&name).is_ok();
        note(&mut d, took, "take".into());
        for _ in 0..200 {
            match img.durable_step_staged(1) {
                Ok(DurableStep::Done(true)) => break,
                Ok(DurableStep::Done(false)) => {}
                Ok(DurableStep::Barrier(b)) => {
                    let w = img.write(100_000, &[0x55; 4096]).is_ok();
                    note(&mut d, w, "write during barrier".into());
                    let ok = img.flush().is_ok();
                    note(&mut d, ok, "flush during barrier".into());
                    match b.sync() {
                        Ok(s) => img.durable_barrier_done(s),
                        Err(_) => note(&mut d, false, String::new()),
                    }
                }
                Err(_) => note(&mut d, false, String::new()),
            }
        }
        if img.checkpoint_list().iter().any(|c| c.name == name && c.state == CheckpointState::Durable) {
            note(&mut d, true, "staged checkpoint durable".into());
            d.durable.push(name);
        }
        let ok = img.checkpoint_create("inline").is_ok();
        note(&mut d, ok, "inline checkpoint".into());
        if ok {
            d.durable.push("inline".into());
        }
        d
    };
    let (f, mut img) = open(&base);
    let (_, f0) = f.op_counts();
    let clean = scenario(&mut img);
    assert!(!clean.failed && clean.durable.len() == 2);
    let flushes = f.op_counts().1 - f0;
    drop(img);
    for n in 1..=flushes {
        let (f, mut img) = open(&base);
        f.lossy_sync_after(Some(n));
        let d = scenario(&mut img);
        assert!(d.failed, "sync {n}/{flushes}: no failure seen");
        assert!(d.after.is_empty(), "sync {n}/{flushes}: reported done after a failed sync: {:?}", d.after);
        drop(img);
        let mut im = Qcow2::open(Box::new(MemIo::from_bytes((*f.durable()).clone())), &OpenOptions::default()).unwrap();
        for (off, v) in &d.flushed {
            assert!(read(&mut im, None, *off, 8192).iter().all(|b| b == v), "sync {n}: flushed write at {off} lost");
        }
        let names: Vec<String> = im.checkpoint_list().into_iter().map(|c| c.name).collect();
        for c in &d.durable {
            assert!(names.contains(c), "sync {n}: durable checkpoint {c} lost ({names:?})");
        }
    }
}
