//! Checkpoints (internal snapshots) against the real qemu-img.

mod common;
use common::*;
use xensnap_qcow2::{CreateOptions, OpenOptions, Qcow2};

fn write_random(img: &mut Qcow2, model: &mut [u8], rng: &mut Rng, n: usize) {
    let size = model.len() as u64;
    for _ in 0..n {
        let off = rng.below(size);
        let len = 1 + rng.below((size - off).min(200_000));
        let mut b = vec![0u8; len as usize];
        rng.fill(&mut b);
        if rng.below(7) == 0 {
            img.discard(off, len).unwrap();
            b.fill(0);
        } else {
            img.write(off, &b).unwrap();
        }
        model[off as usize..(off + len) as usize].copy_from_slice(&b);
    }
}

fn read_all(img: &mut Qcow2, snap: Option<&str>, size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size];
    match snap {
        None => img.read(0, &mut b).unwrap(),
        Some(s) => img.read_checkpoint(s, 0, &mut b).unwrap(),
    }
    b
}

#[test]
fn create_revert_delete_with_qemu() {
    if !have_qemu() {
        return;
    }
    let size = 24usize << 20;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    let mut img =
        Qcow2::create_file(&p, &CreateOptions { size: size as u64, cluster_bits: 16, refcount_order: 4 }).unwrap();
    let mut rng = Rng(42);
    let mut model = vec![0u8; size];
    write_random(&mut img, &mut model, &mut rng, 40);
    let a = img.checkpoint_create("a").unwrap();
    assert_eq!(a.id, "1");
    assert_eq!(a.disk_size, size as u64);
    let model_a = model.clone();
    write_random(&mut img, &mut model, &mut rng, 40);
    assert!(read_all(&mut img, Some("a"), size) == model_a);
    let b = img.checkpoint_create("b").unwrap();
    assert_eq!(b.id, "2");
    let model_b = model.clone();
    write_random(&mut img, &mut model, &mut rng, 40);
    assert!(img.checkpoint_create("b").is_err(), "duplicate name refused");
    let rep = img.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    img.close().unwrap();

    assert_qemu_clean(&p);
    let list = run(&["qemu-img", "snapshot", "-l", p.to_str().unwrap()]);
    assert!(list.contains(" a ") && list.contains(" b "), "{list}");
    assert!(qemu_raw(&p, Some("a")) == model_a, "snapshot a differs");
    assert!(qemu_raw(&p, Some("b")) == model_b, "snapshot b differs");
    assert!(qemu_raw(&p, None) == model, "active differs");

    // revert to a, write, delete b
    let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
    assert_eq!(img.checkpoint_list().len(), 2);
    img.checkpoint_revert("a").unwrap();
    let mut model = model_a.clone();
    assert!(read_all(&mut img, None, size) == model);
    assert!(img.check().unwrap().is_clean());
    write_random(&mut img, &mut model, &mut rng, 30);
    img.checkpoint_delete("b").unwrap();
    let rep = img.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert!(read_all(&mut img, Some("a"), size) == model_a);
    img.close().unwrap();
    assert_qemu_clean(&p);
    assert!(qemu_raw(&p, Some("a")) == model_a);
    assert!(qemu_raw(&p, None) == model);
    let list = run(&["qemu-img", "snapshot", "-l", p.to_str().unwrap()]);
    assert!(!list.contains(" b "), "{list}");

    // delete the last one: everything unshared again, COPIED restored
    let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
    img.checkpoint_delete("1").unwrap();
    assert!(img.checkpoint_list().is_empty());
    assert!(img.check().unwrap().is_clean());
    img.close().unwrap();
    assert_qemu_clean(&p);
    assert!(qemu_raw(&p, None) == model);
}

#[test]
fn qemu_snapshots_handled_by_us() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("q.qcow2");
    let ps = p.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", ps, "8M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 2M", ps]);
    run(&["qemu-img", "snapshot", "-c", "s1", ps]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 2M", ps]);
    run(&["qemu-img", "snapshot", "-c", "s2", ps]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x33 5M 100k", ps]);
    let mut s1 = vec![0u8; 8 << 20];
    s1[..2 << 20].fill(0x11);
    let mut s2 = s1.clone();
    s2[1 << 20..3 << 20].fill(0x22);
    let mut cur = s2.clone();
    cur[5 << 20..(5 << 20) + (100 << 10)].fill(0x33);

    let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
    let l = img.checkpoint_list();
    assert_eq!(l.len(), 2);
    assert_eq!(l[0].name, "s1");
    assert!(read_all(&mut img, Some("s1"), 8 << 20) == s1);
    assert!(read_all(&mut img, Some("s2"), 8 << 20) == s2);
    assert!(read_all(&mut img, None, 8 << 20) == cur);
    assert!(img.check().unwrap().is_clean());
    img.checkpoint_revert("s1").unwrap();
    assert!(read_all(&mut img, None, 8 << 20) == s1);
    img.checkpoint_delete("s2").unwrap();
    let c = img.checkpoint_create("ours").unwrap();
    assert_eq!(c.id, "2"); // max id + 1, like QEMU
    img.write(0, &[9u8; 10]).unwrap();
    let mut now = s1.clone();
    now[..10].fill(9);
    img.close().unwrap();
    assert_qemu_clean(&p);
    assert!(qemu_raw(&p, None) == now);
    assert!(qemu_raw(&p, Some("ours")) == s1);
    assert!(qemu_raw(&p, Some("s1")) == s1);
    // qemu can delete ours and stays clean
    run(&["qemu-img", "snapshot", "-d", "ours", ps]);
    assert_qemu_clean(&p);
}

#[test]
fn small_clusters_many_checkpoints() {
    if !have_qemu() {
        return;
    }
    let size = 4usize << 20;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    let mut img =
        Qcow2::create_file(&p, &CreateOptions { size: size as u64, cluster_bits: 9, refcount_order: 4 }).unwrap();
    let mut rng = Rng(7);
    let mut model = vec![0u8; size];
    let mut models = Vec::new();
    for i in 0..6 {
        write_random(&mut img, &mut model, &mut rng, 10);
        img.checkpoint_create(&format!("c{i}")).unwrap();
        models.push(model.clone());
    }
    img.checkpoint_delete("c2").unwrap();
    img.checkpoint_revert("c4").unwrap();
    model = models[4].clone();
    write_random(&mut img, &mut model, &mut rng, 10);
    let rep = img.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    img.close().unwrap();
    assert_qemu_clean(&p);
    assert!(qemu_raw(&p, None) == model);
    for i in [0usize, 1, 3, 4, 5] {
        assert!(qemu_raw(&p, Some(&format!("c{i}"))) == models[i], "c{i}");
    }
}
