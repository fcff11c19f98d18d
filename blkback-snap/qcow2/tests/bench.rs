//! Timing of checkpoint operations (ignored by default; run with
//! `cargo test --release -p xensnap-qcow2 --test bench -- --ignored --nocapture`).

use std::time::Instant;
use xensnap_qcow2::{CreateOptions, OpenOptions, Qcow2};

#[test]
#[ignore]
fn checkpoint_timing_1g_allocated() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("b.qcow2");
    let gib = 1u64 << 30;
    let mut img =
        Qcow2::create_file(&p, &CreateOptions { size: 4 * gib, cluster_bits: 16, refcount_order: 4 }).unwrap();
    let buf = vec![0x5au8; 4 << 20];
    let t = Instant::now();
    let mut off = 0;
    while off < gib {
        img.write(off, &buf).unwrap();
        off += buf.len() as u64;
    }
    img.flush().unwrap();
    eprintln!("fill 1 GiB: {:?}", t.elapsed());
    let t = Instant::now();
    img.checkpoint_create("a").unwrap();
    eprintln!("checkpoint_create (1 GiB allocated, 64K clusters): {:?}", t.elapsed());
    let t = Instant::now();
    for i in 0..1000u64 {
        img.write(i * 1_000_000, &[1u8; 4096]).unwrap();
    }
    img.flush().unwrap();
    eprintln!("1000 x 4K COW writes + flush: {:?}", t.elapsed());
    let t = Instant::now();
    img.checkpoint_create("b").unwrap();
    eprintln!("checkpoint_create #2: {:?}", t.elapsed());
    let t = Instant::now();
    img.checkpoint_revert("a").unwrap();
    eprintln!("checkpoint_revert: {:?}", t.elapsed());
    let t = Instant::now();
    img.checkpoint_delete("b").unwrap();
    eprintln!("checkpoint_delete: {:?}", t.elapsed());
    let t = Instant::now();
    let rep = img.check().unwrap();
    eprintln!("check: {:?}", t.elapsed());
    assert!(rep.is_clean(), "{rep:?}");
    img.close().unwrap();
    let t = Instant::now();
    let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
    img.checkpoint_create("c").unwrap();
    eprintln!("open + checkpoint_create (cold cache): {:?}", t.elapsed());
}
