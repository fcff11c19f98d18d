//! check() / repair() on hand-made inconsistencies, cross-checked with qemu-img check;
//! refusal of unsupported features.

mod common;
use common::*;
use xensnap_qcow2::{CreateOptions, Error, OpenOptions, Qcow2};

fn make(dir: &std::path::Path, snapshot: bool) -> (std::path::PathBuf, Vec<u8>) {
    let p = dir.join("c.qcow2");
    let mut img =
        Qcow2::create_file(&p, &CreateOptions { size: 4 << 20, cluster_bits: 16, refcount_order: 4 }).unwrap();
    let mut model = vec![0u8; 4 << 20];
    let mut rng = Rng(5);
    rng.fill(&mut model[..300_000]);
    img.write(0, &model[..300_000]).unwrap();
    if snapshot {
        img.checkpoint_create("s").unwrap();
        img.write(70_000, &[1u8; 1000]).unwrap();
        model[70_000..71_000].fill(1);
    }
    img.close().unwrap();
    (p, model)
}

fn reopen_check(p: &std::path::Path) -> xensnap_qcow2::CheckReport {
    let mut img = Qcow2::open_file(p, &OpenOptions { read_only: true }).unwrap();
    img.check().unwrap()
}

fn repair_and_verify(p: &std::path::Path, model: &[u8]) -> xensnap_qcow2::CheckReport {
    let mut img = Qcow2::open_file(p, &OpenOptions::default()).unwrap();
    let rep = img.repair().unwrap();
    assert!(rep.remaining_errors.is_empty(), "{rep:?}");
    let after = img.check().unwrap();
    assert!(after.is_clean(), "{after:?}");
    let mut b = vec![0u8; model.len()];
    img.read(0, &mut b).unwrap();
    assert!(b == model, "data changed by repair");
    img.close().unwrap();
    if have_qemu() {
        assert_qemu_clean(p);
        assert!(qemu_raw(p, None) == model);
    }
    rep
}

#[test]
fn leak_is_found_and_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let (p, model) = make(dir.path(), true);
    let mut raw = Raw { b: std::fs::read(&p).unwrap() };
    let cs = raw.cs();
    let end = raw.b.len();
    raw.b.resize(end + cs, 0);
    raw.set_refcount(end, 1);
    std::fs::write(&p, &raw.b).unwrap();
    let rep = reopen_check(&p);
    assert_eq!(rep.leaks, 1, "{rep:?}");
    assert_eq!(rep.corruptions, 0, "{rep:?}");
    if have_qemu() {
        let (code, v) = qemu_check(&p);
        assert_eq!(code, 3, "{v}");
        assert_eq!(v["leaks"], 1);
    }
    let rep = repair_and_verify(&p, &model);
    assert_eq!(rep.leaks_fixed, 1);
}

#[test]
fn refcount_too_low_is_corruption_and_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let (p, model) = make(dir.path(), true);
    let mut raw = Raw { b: std::fs::read(&p).unwrap() };
    let l2 = raw.first_l2();
    let data = (be64(&raw.b, l2) & 0x00ff_ffff_ffff_fe00) as usize;
    let rc = raw.refcount(data);
    assert!(rc >= 1);
    raw.set_refcount(data, rc - 1);
    std::fs::write(&p, &raw.b).unwrap();
    let rep = reopen_check(&p);
    assert!(rep.corruptions >= 1, "{rep:?}");
    if have_qemu() {
        let (code, _) = qemu_check(&p);
        assert_eq!(code, 2);
    }
    repair_and_verify(&p, &model);
}

#[test]
fn copied_flag_error_is_found_and_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let (p, model) = make(dir.path(), false);
    let mut raw = Raw { b: std::fs::read(&p).unwrap() };
    let l2 = raw.first_l2();
    let e = be64(&raw.b, l2);
    assert!(e & (1 << 63) != 0);
    put64(&mut raw.b, l2, e & !(1 << 63));
    std::fs::write(&p, &raw.b).unwrap();
    let rep = reopen_check(&p);
    assert_eq!(rep.copied_flag_errors, 1, "{rep:?}");
    if have_qemu() {
        let (code, _) = qemu_check(&p);
        assert_ne!(code, 0);
    }
    let rep = repair_and_verify(&p, &model);
    assert_eq!(rep.copied_flags_fixed, 1);
}

#[test]
fn dirty_bit_triggers_repair_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let (p, model) = make(dir.path(), true);
    let mut raw = Raw { b: std::fs::read(&p).unwrap() };
    let cs = raw.cs();
    let end = raw.b.len();
    raw.b.resize(end + cs, 0);
    raw.set_refcount(end, 1);
    let inc = be64(&raw.b, 72);
    put64(&mut raw.b, 72, inc | 1);
    std::fs::write(&p, &raw.b).unwrap();
    // read-only open leaves it alone
    let img = Qcow2::open_file(&p, &OpenOptions { read_only: true }).unwrap();
    assert!(img.info().dirty);
    drop(img);
    assert_eq!(std::fs::read(&p).unwrap(), raw.b);
    let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
    assert!(!img.info().dirty);
    assert!(img.check().unwrap().is_clean());
    img.close().unwrap();
    if have_qemu() {
        assert_qemu_clean(&p);
        assert!(qemu_raw(&p, None) == model);
    }
}

#[test]
fn corrupt_bit_means_read_only_until_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (p, model) = make(dir.path(), false);
    let mut raw = Raw { b: std::fs::read(&p).unwrap() };
    let inc = be64(&raw.b, 72);
    put64(&mut raw.b, 72, inc | 2);
    std::fs::write(&p, &raw.b).unwrap();
    let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
    assert!(img.info().read_only && img.info().corrupt);
    assert!(matches!(img.write(0, &[1]), Err(Error::ReadOnly)));
    let mut b = vec![0u8; 1000];
    img.read(0, &mut b).unwrap();
    assert!(b[..] == model[..1000]);
    img.repair().unwrap();
    assert!(!img.info().corrupt && !img.info().read_only);
    img.write(0, &[1]).unwrap();
    img.close().unwrap();
}

fn set_and_expect_unsupported(mutate: impl Fn(&mut Vec<u8>), what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = make(dir.path(), false);
    let mut b = std::fs::read(&p).unwrap();
    mutate(&mut b);
    std::fs::write(&p, &b).unwrap();
    for ro in [true, false] {
        match Qcow2::open_file(&p, &OpenOptions { read_only: ro }) {
            Err(Error::Unsupported { what: w }) => eprintln!("{what}: refused: {w}"),
            Err(e) => panic!("{what}: unexpected error {e}"),
            Ok(_) => panic!("{what}: opened"),
        }
    }
    assert_eq!(std::fs::read(&p).unwrap(), b, "{what}: file modified");
}

#[test]
fn refuses_unsupported_features() {
    set_and_expect_unsupported(
        |b| {
            let v = be64(b, 72);
            put64(b, 72, v | (1 << 20))
        },
        "unknown incompatible bit",
    );
    set_and_expect_unsupported(
        |b| {
            let v = be64(b, 72);
            put64(b, 72, v | 4)
        },
        "external data file",
    );
    set_and_expect_unsupported(|b| put32(b, 32, 2), "encryption");
    set_and_expect_unsupported(
        |b| {
            put64(b, 8, 4000);
            put32(b, 16, 3)
        },
        "backing file",
    );
}

#[test]
fn extended_l2_is_read_only() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.qcow2");
    let ps = p.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", ps, "8M"]);
    run(&[
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 0x77 4k 8k",
        "-c",
        "write -P 0x66 1M 300k",
        "-c",
        "write -z 1100k 8k",
        ps,
    ]);
    let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
    assert!(img.info().read_only && img.info().extended_l2);
    assert!(matches!(img.write(0, &[1]), Err(Error::ReadOnly)));
    let mut model = vec![0u8; 8 << 20];
    model[4096..4096 + 8192].fill(0x77);
    model[1 << 20..(1 << 20) + (300 << 10)].fill(0x66);
    model[1100 << 10..(1100 << 10) + 8192].fill(0);
    let mut b = vec![0u8; 8 << 20];
    img.read(0, &mut b).unwrap();
    assert!(b == model);
    let rep = img.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
}
