//! Two-phase checkpoints on a file: coalesced sequential fill, take, background steps
//! interleaved with copy-on-write writes, then growth, contents and qemu-img check.

mod common;
use common::*;
use xensnap_qcow2::{CheckpointState, CreateOptions, OpenOptions, Qcow2};

#[test]
fn fill_take_steps_cow_growth_and_contents() {
    for cluster_bits in [12u32, 14] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.qcow2");
        let size = 16u64 << 20;
        let mut img = Qcow2::create_file(&p, &CreateOptions { size, cluster_bits, ..Default::default() }).unwrap();
        let mut model = vec![0u8; size as usize];
        let mut rng = Rng(5);
        for off in (0..size).step_by(1 << 20) {
            let mut b = vec![0u8; 1 << 20];
            rng.fill(&mut b);
            img.write(off, &b).unwrap();
            model[off as usize..off as usize + b.len()].copy_from_slice(&b);
        }
        img.flush().unwrap();
        let snap = model.clone();
        let info = img.checkpoint_take("a").unwrap();
        assert_eq!(info.state, CheckpointState::Taken);
        let before = img.info().file_length;
        let n = 512u64;
        for i in 0..n {
            let off = rng.below(size / 4096) * 4096;
            let b = vec![(i as u8) | 1; 4096];
            img.write(off, &b).unwrap();
            model[off as usize..off as usize + 4096].copy_from_slice(&b);
            if i % 64 == 0 {
                img.durable_step(1).unwrap();
            }
        }
        img.wait_durable().unwrap();
        assert_eq!(img.checkpoint_list()[0].state, CheckpointState::Durable);
        let mut buf = vec![0u8; size as usize];
        img.read_checkpoint("a", 0, &mut buf).unwrap();
        assert!(buf == snap, "checkpoint content");
        img.read(0, &mut buf).unwrap();
        assert!(buf == model, "active content");
        let grown = img.info().file_length - before;
        let alloc = img.info().allocated_clusters;
        assert!(grown >= n * 4096 / 2 || alloc * (1 << cluster_bits) > size + n * 4096 / 2, "cluster_bits {cluster_bits}: only {grown} bytes grown for {n} COW writes, {alloc} clusters allocated");
        assert!(img.check().unwrap().is_clean());
        img.close().unwrap();
        if have_qemu() {
            assert_qemu_clean(&p);
        }
        let mut img = Qcow2::open_file(&p, &OpenOptions::default()).unwrap();
        img.read_checkpoint("a", 0, &mut buf).unwrap();
        assert!(buf == snap, "checkpoint content after reopen");
    }
}
