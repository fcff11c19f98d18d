//! Compressed clusters (zlib, zstd) written by qemu-img convert -c, refcount table growth,
//! refcount orders against qemu-img.

mod common;
use common::*;
use xensnap_qcow2::{CreateOptions, OpenOptions, Qcow2};

fn model_raw(dir: &std::path::Path, size: usize) -> (std::path::PathBuf, Vec<u8>) {
    let mut m = vec![0u8; size];
    let mut rng = Rng(3);
    // compressible text-like data, some random, some zero
    for (i, chunk) in m.chunks_mut(65536).enumerate() {
        match i % 4 {
            0 => chunk.iter_mut().enumerate().for_each(|(j, x)| *x = b"hello qcow2 world "[j % 18]),
            1 => rng.fill(chunk),
            2 => {}
            _ => chunk.iter_mut().enumerate().for_each(|(j, x)| *x = (j / 100) as u8),
        }
    }
    let p = dir.join("m.raw");
    std::fs::write(&p, &m).unwrap();
    (p, m)
}

fn compressed_case(opts: &str, tag: &str) {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 3 << 20;
    let (raw, model) = model_raw(dir.path(), size);
    let p = dir.path().join(format!("{tag}.qcow2"));
    let mut args = vec!["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2"];
    if !opts.is_empty() {
        args.push("-o");
        args.push(opts);
    }
    args.push(raw.to_str().unwrap());
    args.push(p.to_str().unwrap());
    run(&args);
    let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
    let map = img.map(None).unwrap();
    assert!(map.iter().any(|e| e.kind == "compressed"), "{tag}: no compressed clusters: {map:?}");
    let mut b = vec![0u8; size];
    img.read(0, &mut b).unwrap();
    assert!(b == model, "{tag}: decompressed data differs");
    let rep = img.check().unwrap();
    assert!(rep.is_clean(), "{tag}: {rep:?}");
    // overwrite part of a compressed cluster: becomes a normal cluster, rest kept
    let mut model = model;
    img.write(100, b"overwrite").unwrap();
    model[100..109].copy_from_slice(b"overwrite");
    img.write(65536 * 3 + 5, &[0xee; 70000]).unwrap();
    model[65536 * 3 + 5..65536 * 3 + 5 + 70000].fill(0xee);
    img.checkpoint_create("after").unwrap();
    img.write(200, b"x").unwrap();
    model[200] = b'x';
    let mut b = vec![0u8; size];
    img.read(0, &mut b).unwrap();
    assert!(b == model);
    assert!(img.check().unwrap().is_clean());
    img.close().unwrap();
    assert_qemu_clean(&p);
    assert!(qemu_raw(&p, None) == model, "{tag}: qemu sees different data");
}

#[test]
fn zlib_compressed_clusters() {
    compressed_case("", "zlib");
}

#[test]
fn zstd_compressed_clusters() {
    compressed_case("compression_type=zstd", "zstd");
}

#[test]
fn zlib_compressed_small_clusters() {
    compressed_case("cluster_size=4096", "zlib4k");
}

#[test]
fn reftable_grows() {
    // 512-byte clusters: one reftable cluster covers 64 refblocks * 256 clusters = 8 MiB
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("g.qcow2");
    let size = 24usize << 20;
    let mut img =
        Qcow2::create_file(&p, &CreateOptions { size: size as u64, cluster_bits: 9, refcount_order: 4 }).unwrap();
    let mut model = vec![0u8; size];
    let mut rng = Rng(11);
    for i in 0..12 {
        let off = i * (2 << 20);
        let mut b = vec![0u8; 1 << 20];
        rng.fill(&mut b);
        img.write(off as u64, &b).unwrap();
        model[off..off + (1 << 20)].copy_from_slice(&b);
        if i == 5 {
            img.checkpoint_create("mid").unwrap();
        }
    }
    let rep = img.check().unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    img.close().unwrap();
    let raw = std::fs::read(&p).unwrap();
    assert!(be32(&raw, 56) > 1, "reftable did not grow");
    if have_qemu() {
        assert_qemu_clean(&p);
        assert!(qemu_raw(&p, None) == model);
    }
}

#[test]
fn qemu_images_with_other_refcount_orders() {
    if !have_qemu() {
        return;
    }
    for bits in [1u32, 2, 4, 8, 32, 64] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.qcow2");
        let ps = p.to_str().unwrap();
        run(&[
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &format!("refcount_bits={bits},cluster_size=4096"),
            ps,
            "4M",
        ]);
        run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x42 8k 100k", ps]);
        if bits > 1 {
            run(&["qemu-img", "snapshot", "-c", "q", ps]);
        }
        let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
        assert_eq!(img.info().refcount_bits, bits);
        assert!(img.check().unwrap().is_clean(), "refcount_bits {bits}");
        img.write(0, &[7u8; 20000]).unwrap();
        if bits > 1 {
            img.checkpoint_create("ours").unwrap();
            img.write(9000, &[8u8; 100]).unwrap();
        }
        assert!(img.check().unwrap().is_clean(), "refcount_bits {bits} after writes");
        img.close().unwrap();
        assert_qemu_clean(&p);
    }
}

#[test]
fn refcount_order_zero_refuses_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.qcow2");
    let mut img =
        Qcow2::create_file(&p, &CreateOptions { size: 1 << 20, cluster_bits: 12, refcount_order: 0 }).unwrap();
    img.write(0, &[1u8; 10000]).unwrap();
    img.flush().unwrap();
    let before = std::fs::read(&p).unwrap();
    let e = img.checkpoint_create("x").unwrap_err();
    assert!(matches!(e, xensnap_qcow2::Error::RefcountOverflow { .. }), "{e}");
    assert_eq!(std::fs::read(&p).unwrap(), before, "partial write on refused checkpoint");
    assert!(img.check().unwrap().is_clean());
    img.write(20000, &[2u8; 10]).unwrap();
    img.close().unwrap();
    if have_qemu() {
        assert_qemu_clean(&p);
    }
}

#[test]
fn v2_images_are_read_only() {
    if !have_qemu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("v2.qcow2");
    let ps = p.to_str().unwrap();
    run(&["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", ps, "4M"]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x31 1k 70k", ps]);
    run(&["qemu-img", "snapshot", "-c", "old", ps]);
    run(&["qemu-io", "-f", "qcow2", "-c", "write -P 0x32 0 4k", ps]);
    let before = std::fs::read(&p).unwrap();
    let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
    let info = img.info();
    assert_eq!(info.version, 2);
    assert!(info.read_only);
    let mut model = vec![0u8; 4 << 20];
    model[1024..1024 + (70 << 10)].fill(0x31);
    let snap = model.clone();
    model[..4096].fill(0x32);
    let mut b = vec![0u8; 4 << 20];
    img.read(0, &mut b).unwrap();
    assert!(b == model);
    img.read_checkpoint("old", 0, &mut b).unwrap();
    assert!(b == snap);
    assert!(img.write(0, &[0]).is_err());
    assert!(img.check().unwrap().is_clean());
    drop(img);
    assert_eq!(std::fs::read(&p).unwrap(), before);
}
