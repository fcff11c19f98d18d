//! Model-based tests: random sequences of writes, zeroes, discards and checkpoint
//! create/revert/delete against a plain byte model, with tiny metadata caches so eviction
//! and mid-operation write-back are exercised; plus the BlockDevice adapters.

mod common;
use common::Rng;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use xensnap_blockdev::{BlockDevice, BlockError};
use xensnap_qcow2::{CheckpointDevice, CreateOptions, MemIo, OpenOptions, Qcow2, SharedImage};

fn run_model(seed: u64, cluster_bits: u32, size: u64, cache: usize, steps: usize) {
    let io = MemIo::new();
    let mut img =
        Qcow2::create(Box::new(io.clone()), &CreateOptions { size, cluster_bits, refcount_order: 4 }).unwrap();
    img.set_cache_limit(cache);
    let mut rng = Rng(seed);
    let mut model = vec![0u8; size as usize];
    let mut snaps: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut next = 0;
    let cs = img.cluster_size();
    for step in 0..steps {
        let ctx = format!("seed {seed} cb {cluster_bits} step {step}");
        match rng.below(20) {
            0 if snaps.len() < 5 => {
                let name = format!("n{next}");
                next += 1;
                img.checkpoint_create(&name).unwrap();
                snaps.insert(name, model.clone());
            }
            1 if !snaps.is_empty() => {
                let k = snaps.keys().nth(rng.below(snaps.len() as u64) as usize).unwrap().clone();
                img.checkpoint_revert(&k).unwrap();
                model = snaps[&k].clone();
            }
            2 if !snaps.is_empty() => {
                let k = snaps.keys().nth(rng.below(snaps.len() as u64) as usize).unwrap().clone();
                img.checkpoint_delete(&k).unwrap();
                snaps.remove(&k);
            }
            3 => {
                let rep = img.check().unwrap();
                assert!(rep.is_clean(), "{ctx}: {rep:?}");
            }
            4 => {
                // reopen
                img.close().unwrap();
                img = Qcow2::open(Box::new(io.clone()), &OpenOptions::default()).unwrap();
                img.set_cache_limit(cache);
            }
            k => {
                let off = if rng.below(2) == 0 { rng.below(size / cs) * cs } else { rng.below(size) };
                let len = 1 + rng.below((size - off).min(4 * cs + 100));
                let (o, l) = (off as usize, len as usize);
                match k % 4 {
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
                if rng.below(5) == 0 {
                    img.flush().unwrap();
                }
            }
        }
        if step % 10 == 0 {
            let mut b = vec![0u8; size as usize];
            img.read(0, &mut b).unwrap();
            assert!(b == model, "{ctx}: active differs");
            for (n, m) in &snaps {
                img.read_checkpoint(n, 0, &mut b).unwrap();
                assert!(b == *m, "{ctx}: checkpoint {n} differs");
            }
        }
    }
    let rep = img.check().unwrap();
    assert!(rep.is_clean(), "seed {seed}: {rep:?}");
    img.close().unwrap();
    // final state through a fresh read-only open
    let mut img = Qcow2::open(Box::new(MemIo::from_bytes(io.bytes())), &OpenOptions { read_only: true }).unwrap();
    let mut b = vec![0u8; size as usize];
    img.read(0, &mut b).unwrap();
    assert!(b == model);
    assert!(img.check().unwrap().is_clean());
}

#[test]
fn model_4k_clusters_tiny_cache() {
    for seed in 1..6 {
        run_model(seed, 12, (2 << 20) + 4608, 6, 150);
    }
}

#[test]
fn model_512b_clusters() {
    for seed in 10..13 {
        run_model(seed, 9, (256 << 10) + 512, 8, 150);
    }
}

#[test]
fn model_64k_clusters_big_cache() {
    run_model(99, 16, 8 << 20, 10_000, 200);
}

#[test]
fn blockdev_adapters() {
    let img =
        Qcow2::create(Box::new(MemIo::new()), &CreateOptions { size: 1 << 20, cluster_bits: 12, refcount_order: 4 })
            .unwrap();
    let dev = SharedImage::new(img);
    assert_eq!(dev.size(), 1 << 20);
    assert!(!dev.read_only());
    dev.write_at(4096, &[7u8; 8192]).unwrap();
    dev.flush().unwrap();
    let shared: Arc<Mutex<Qcow2>> = dev.0.clone();
    shared.lock().unwrap().checkpoint_create("cp").unwrap();
    dev.write_at(4096, &[9u8; 100]).unwrap();
    dev.write_zeroes(8192, 4096, true).unwrap();
    let cp = CheckpointDevice::new(shared.clone(), "cp").unwrap();
    assert!(cp.read_only());
    assert_eq!(cp.size(), 1 << 20);
    let mut b = vec![0u8; 8192];
    cp.read_at(4096, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 7));
    dev.read_at(4096, &mut b).unwrap();
    assert!(
        b[..100].iter().all(|x| *x == 9) && b[100..4096].iter().all(|x| *x == 7) && b[4096..].iter().all(|x| *x == 0)
    );
    assert!(matches!(cp.write_at(0, &[1]), Err(BlockError::ReadOnly)));
    assert!(matches!(dev.read_at((1 << 20) - 1, &mut b), Err(BlockError::OutOfRange { .. })));
    assert!(CheckpointDevice::new(shared.clone(), "nope").is_err());
    dev.discard(0, 1 << 20).unwrap();
    dev.read_at(4096, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0));
    cp.read_at(4096, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 7));
}
