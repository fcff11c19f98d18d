//! Interoperability with the real qemu-img / qemu-io.

mod common;
use common::*;
use std::path::Path;
use xensnap_qcow2::{CreateOptions, OpenOptions, Qcow2};

/// Random writes / zeroes / discards applied to both the image and a model.
fn random_ops(img: &mut Qcow2, model: &mut [u8], rng: &mut Rng, n: usize) {
    let size = model.len() as u64;
    let cs = img.cluster_size();
    for _ in 0..n {
        let kind = rng.below(10);
        let off = match rng.below(3) {
            0 => rng.below(size / cs) * cs,
            _ => rng.below(size),
        };
        let max_len = (size - off).min(3 * cs + 4096);
        let len = 1 + rng.below(max_len);
        let (o, l) = (off as usize, len as usize);
        match kind {
            0 => {
                img.write_zeroes(off, len, rng.below(2) == 0).unwrap();
                model[o..o + l].fill(0);
            }
            1 => {
                img.discard(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            _ => {
                let mut b = vec![0u8; l];
                rng.fill(&mut b);
                img.write(off, &b).unwrap();
                model[o..o + l].copy_from_slice(&b);
            }
        }
        if rng.below(8) == 0 {
            img.flush().unwrap();
        }
    }
}

fn check_roundtrip(cluster_bits: u32, refcount_order: u32, size: u64, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let mut img = Qcow2::create_file(&p, &CreateOptions { size, cluster_bits, refcount_order }).unwrap();
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(seed);
    random_ops(&mut img, &mut model, &mut rng, 120);
    // read back through our engine
    let mut back = vec![0u8; size as usize];
    img.read(0, &mut back).unwrap();
    assert!(back == model, "our read-back differs");
    let rep = img.check().unwrap();
    assert!(rep.is_clean(), "our check: {rep:?}");
    img.close().unwrap();
    assert_qemu_clean(&p);
    let raw = qemu_raw(&p, None);
    assert!(raw == model, "qemu-img convert output differs from the model (cb {cluster_bits} ro {refcount_order})");
    // reopen and read again
    let mut img = Qcow2::open_file(&p, &OpenOptions { read_only: true }).unwrap();
    let mut back = vec![0u8; size as usize];
    img.read(0, &mut back).unwrap();
    assert!(back == model);
}

#[test]
fn ours_written_is_clean_for_qemu() {
    if !have_qemu() {
        eprintln!("qemu-img missing: skipped");
        return;
    }
    check_roundtrip(16, 4, 16 << 20, 1);
}

#[test]
fn cluster_sizes_and_refcount_orders() {
    if !have_qemu() {
        return;
    }
    for (cb, ro, size) in [
        (9u32, 4u32, 2u64 << 20),
        (12, 4, 8 << 20),
        (21, 4, 16 << 20),
        (16, 0, 4 << 20),
        (12, 3, 4 << 20),
        (12, 5, 4 << 20),
        (12, 6, 4 << 20),
        (10, 1, 2 << 20),
    ] {
        check_roundtrip(cb, ro, size, u64::from(cb * 31 + ro) + 7);
    }
}

#[test]
fn qemu_written_is_read_by_us() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    let ps = p.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", ps, "16M"]);
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "write -P 0xcd 3M 70k",
        "-c",
        "write -z 512k 64k",
        ps,
    ]);
    let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
    let mut model = vec![0u8; 16 << 20];
    model[..1 << 20].fill(0xab);
    model[(512 << 10)..(576 << 10)].fill(0);
    model[(3 << 20)..(3 << 20) + (70 << 10)].fill(0xcd);
    let mut back = vec![0u8; 16 << 20];
    img.read(0, &mut back).unwrap();
    assert!(back == model);
    assert!(img.check().unwrap().is_clean());
    // and we can keep writing to it
    img.write(100, b"hello").unwrap();
    model[100..105].copy_from_slice(b"hello");
    img.close().unwrap();
    assert_qemu_clean(&p);
    assert!(qemu_raw(&p, None) == model);
}

#[test]
fn qemu_io_reads_our_pattern() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.qcow2");
    let mut img = Qcow2::create_file(&p, &CreateOptions { size: 8 << 20, ..Default::default() }).unwrap();
    img.write(4096, &vec![0x5a; 8192]).unwrap();
    img.close().unwrap();
    let out = run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-r",
        "-c",
        "read -P 0x5a 4096 8192",
        "-c",
        "read -P 0 0 4096",
        p.to_str().unwrap(),
    ]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

#[allow(dead_code)]
fn exists(p: &Path) -> bool {
    p.exists()
}

/// A checkpoint made durable (inline and staged) with no guest flush after it, then a power
/// loss: QEMU writing to the active disk of what is on disk must not change the checkpoint
/// (the active tree's COPIED flags on disk are stale until written back, so the dirty bit
/// must make QEMU rebuild them first).
#[test]
fn qemu_write_after_crash_keeps_durable_checkpoint() {
    if !have_qemu() {
        eprintln!("qemu-img not installed: skipped");
        return;
    }
    use xensnap_qcow2::FaultIo;
    let size = 1usize << 20;
    let f = FaultIo::new();
    let mut img =
        Qcow2::create(Box::new(f.clone()), &CreateOptions { size: size as u64, cluster_bits: 12, refcount_order: 4 })
            .unwrap();
    img.write(0, &vec![0x11; 64 * 1024]).unwrap();
    img.close().unwrap();
    let base = (*f.durable()).clone();
    for staged in [false, true] {
        let f = FaultIo::from_bytes(base.clone());
        let mut img = Qcow2::open(Box::new(f.clone()), &OpenOptions::default()).unwrap();
        img.checkpoint_take("cp").unwrap();
        common::make_durable(&mut img, staged);
        let crashed = (*f.durable()).clone();
        drop(img);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("crashed.qcow2");
        std::fs::write(&p, &crashed).unwrap();
        run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 64k", p.to_str().unwrap()]);
        let cp = qemu_raw(&p, Some("cp"));
        assert!(cp[..64 * 1024].iter().all(|b| *b == 0x11), "staged={staged}: QEMU wrote into the durable checkpoint");
        let active = qemu_raw(&p, None);
        assert!(active[..64 * 1024].iter().all(|b| *b == 0x99));
        assert_qemu_clean(&p);
    }
}
