//! `Qcow2::read_into` / `Qcow2::write_from` (file I/O straight into or out of a request's
//! memory) against `read` / `write` on a twin image: same bytes read, same bytes on the
//! disk, checkpoints unchanged by later writes, nothing outside the buffer touched.

mod common;

use common::{have_qemu, Rng};
use std::cell::Cell;
use std::fs::File;
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use xensnap_blockdev::DataBuf;
use xensnap_qcow2::{CreateOptions, OpenOptions, Qcow2};

const CANARY: u8 = 0xa5;
const MARGIN: usize = 4096;

/// A window `MARGIN..MARGIN+len` of a larger buffer whose margins must stay `CANARY`; file
/// transfers go straight to the window (counted), like guest pages with a mapping.
struct Win {
    mem: Vec<u8>,
    len: usize,
    direct: bool,
    reads: Cell<u64>,
    writes: Cell<u64>,
}

impl Win {
    fn new(len: usize, direct: bool) -> Win {
        Win { mem: vec![CANARY; len + 2 * MARGIN], len, direct, reads: Cell::new(0), writes: Cell::new(0) }
    }
    fn with(data: &[u8], direct: bool) -> Win {
        let mut w = Win::new(data.len(), direct);
        w.mem[MARGIN..MARGIN + data.len()].copy_from_slice(data);
        w
    }
    fn bytes(&self) -> &[u8] {
        &self.mem[MARGIN..MARGIN + self.len]
    }
    fn assert_margins(&self) {
        assert!(self.mem[..MARGIN].iter().all(|&b| b == CANARY), "bytes before the buffer changed");
        assert!(self.mem[MARGIN + self.len..].iter().all(|&b| b == CANARY), "bytes after the buffer changed");
    }
    fn range(&self, pos: usize, len: usize) -> io::Result<std::ops::Range<usize>> {
        match pos.checked_add(len) {
            Some(end) if end <= self.len => Ok(MARGIN + pos..MARGIN + end),
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, "outside the window")),
        }
    }
}

impl DataBuf for Win {
    fn len(&self) -> usize {
        self.len
    }
    fn copy_in(&mut self, pos: usize, src: &[u8]) -> io::Result<()> {
        let r = self.range(pos, src.len())?;
        self.mem[r].copy_from_slice(src);
        Ok(())
    }
    fn copy_out(&self, pos: usize, dst: &mut [u8]) -> io::Result<()> {
        let r = self.range(pos, dst.len())?;
        dst.copy_from_slice(&self.mem[r]);
        Ok(())
    }
    fn read_file(&mut self, fd: BorrowedFd<'_>, file_off: u64, pos: usize, len: usize) -> io::Result<bool> {
        if !self.direct {
            return Ok(false);
        }
        let r = self.range(pos, len)?;
        File::from(fd.try_clone_to_owned()?).read_exact_at(&mut self.mem[r], file_off)?;
        self.reads.set(self.reads.get() + 1);
        Ok(true)
    }
    fn write_file(&self, fd: BorrowedFd<'_>, file_off: u64, pos: usize, len: usize) -> io::Result<bool> {
        if !self.direct {
            return Ok(false);
        }
        let r = self.range(pos, len)?;
        File::from(fd.try_clone_to_owned()?).write_all_at(&self.mem[r], file_off)?;
        self.writes.set(self.writes.get() + 1);
        Ok(true)
    }
}

fn create(path: &Path, size: u64, cluster_bits: u32) -> Qcow2 {
    Qcow2::create_file(path, &CreateOptions { size, cluster_bits, ..Default::default() }).unwrap()
}

/// Random guest I/O on two images, one through `read`/`write`, one through
/// `read_into`/`write_from`, with zeroes, discards and checkpoints in between.
fn twin_run(cluster_bits: u32, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let size: u64 = 6 << 20;
    let cs = 1u64 << cluster_bits;
    let mut a = create(&dir.path().join("a.qcow2"), size, cluster_bits);
    let mut b = create(&dir.path().join("b.qcow2"), size, cluster_bits);
    let mut model = vec![0u8; size as usize];
    let mut checkpoints: Vec<(String, Vec<u8>)> = Vec::new();
    let mut rng = Rng(seed);
    let (mut direct_reads, mut direct_writes) = (0u64, 0u64);
    for step in 0..400 {
        // offsets: sector-aligned, cluster-aligned or anywhere; lengths up to 4 clusters + a bit
        let align = match rng.below(3) {
            0 => 512,
            1 => cs,
            _ => 1,
        };
        let len = (1 + rng.below(4 * cs + 3000)).min(size);
        let off = (rng.below(size - len + 1) / align * align).min(size - len);
        let (o, l) = (off as usize, len as usize);
        match rng.below(12) {
            0..=4 => {
                let mut data = vec![0u8; l];
                rng.fill(&mut data);
                a.write(off, &data).unwrap();
                let w = Win::with(&data, true);
                b.write_from(off, &w).unwrap();
                direct_writes += w.writes.get();
                model[o..o + l].copy_from_slice(&data);
            }
            5 => {
                let unmap = rng.below(2) == 0;
                a.write_zeroes(off, len, unmap).unwrap();
                b.write_zeroes(off, len, unmap).unwrap();
                model[o..o + l].fill(0);
            }
            6 => {
                a.discard(off, len).unwrap();
                b.discard(off, len).unwrap();
                model[o..o + l].fill(0);
            }
            7 if step % 5 == 0 => {
                let name = format!("c{step}");
                a.checkpoint_create(&name).unwrap();
                b.checkpoint_create(&name).unwrap();
                checkpoints.push((name, model.clone()));
            }
            _ => {
                let mut r = vec![0u8; l];
                a.read(off, &mut r).unwrap();
                assert!(r == model[o..o + l], "read of {len} at {off} differs from the model");
                let mut w = Win::new(l, rng.below(4) != 0);
                b.read_into(off, &mut w).unwrap();
                w.assert_margins();
                assert!(w.bytes() == &model[o..o + l], "read_into of {len} at {off} differs from the model");
                direct_reads += w.reads.get();
            }
        }
    }
    assert!(
        direct_reads > 0 && direct_writes > 0,
        "the direct paths were never taken ({direct_reads} reads, {direct_writes} writes)"
    );
    // whole disk, and every checkpoint, through both paths
    let mut w = Win::new(size as usize, true);
    b.read_into(0, &mut w).unwrap();
    w.assert_margins();
    assert!(w.bytes() == &model[..], "the disk read through read_into differs");
    let mut r = vec![0u8; size as usize];
    a.read(0, &mut r).unwrap();
    assert!(r == model, "the disk read through read differs");
    for (name, data) in &checkpoints {
        for img in [&mut a, &mut b] {
            img.read_checkpoint(name, 0, &mut r).unwrap();
            assert!(&r == data, "checkpoint {name} changed after it was taken");
        }
    }
    for img in [&mut a, &mut b] {
        img.flush().unwrap();
        let problems = img.verify_accounting().unwrap();
        assert!(problems.is_empty(), "refcounts: {problems:?}");
    }
    drop((a, b));
    if have_qemu() {
        common::assert_qemu_clean(&dir.path().join("b.qcow2"));
    }
}

#[test]
fn direct_io_matches_copies_4k_clusters() {
    twin_run(12, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn direct_io_matches_copies_64k_clusters() {
    twin_run(16, 0xdead_beef_1234_5678);
}

#[test]
fn direct_io_matches_copies_512b_clusters() {
    twin_run(9, 7);
}

/// Data clusters that follow each other in the file are read with one transfer.
#[test]
fn contiguous_clusters_are_one_read() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = create(&dir.path().join("a.qcow2"), 4 << 20, 16);
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    img.write(0, &data).unwrap();
    let mut w = Win::new(1 << 20, true);
    img.read_into(0, &mut w).unwrap();
    assert_eq!(w.reads.get(), 1);
    assert!(w.bytes() == &data[..]);
    // a zero range in the middle splits it in two, and is zero-filled in the buffer
    img.write_zeroes(256 << 10, 128 << 10, true).unwrap();
    let mut w = Win::with(&vec![0xffu8; 1 << 20], true);
    img.read_into(0, &mut w).unwrap();
    assert_eq!(w.reads.get(), 2);
    assert!(w.bytes()[256 << 10..384 << 10].iter().all(|&b| b == 0));
    assert!(w.bytes()[..256 << 10] == data[..256 << 10] && w.bytes()[384 << 10..] == data[384 << 10..]);
    w.assert_margins();
}

/// An overwrite of clusters the active disk owns, following each other in the file, is one
/// transfer (unaligned start and end included); a cluster shared with a checkpoint, or one
/// not next in the file, ends the run, and the checkpoint keeps its data.
#[test]
fn inplace_overwrite_of_contiguous_clusters_is_one_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut img = create(&dir.path().join("a.qcow2"), 4 << 20, 14);
    let old: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    img.write(0, &old).unwrap();
    // 100 KiB from 6 KiB: 7 clusters of 16 KiB, the first and last partly
    let new: Vec<u8> = (0..100 << 10).map(|i: u32| (i % 241) as u8 ^ 0x5a).collect();
    let w = Win::with(&new, true);
    img.write_from(6 << 10, &w).unwrap();
    assert_eq!(w.writes.get(), 1);
    let mut want = old.clone();
    want[6 << 10..106 << 10].copy_from_slice(&new);
    let mut got = vec![0u8; 1 << 20];
    img.read(0, &mut got).unwrap();
    assert!(got == want);
    // after a checkpoint every cluster is shared: copy-on-write, never one in-place run
    img.checkpoint_create("c").unwrap();
    let w2 = Win::with(&vec![0x11u8; 64 << 10], true);
    img.write_from(0, &w2).unwrap();
    // now clusters 0..4 are new and contiguous, 4.. are still shared: a run over 0..4 only
    let w3 = Win::with(&vec![0x22u8; 96 << 10], true);
    img.write_from(0, &w3).unwrap();
    assert_eq!(w3.writes.get(), 2, "one in-place run, then one new run");
    img.read(0, &mut got).unwrap();
    assert!(got[..64 << 10].iter().all(|&b| b == 0x22) && got[64 << 10..96 << 10].iter().all(|&b| b == 0x22));
    assert!(got[96 << 10..] == want[96 << 10..]);
    let mut cp = vec![0u8; 1 << 20];
    img.read_checkpoint("c", 0, &mut cp).unwrap();
    assert!(cp == want, "the checkpoint changed");
    assert!(img.check().unwrap().is_clean());
}

/// Writes after a checkpoint copy-on-write even when the data comes straight from the
/// buffer: the checkpoint's clusters are never written.
#[test]
fn direct_writes_after_a_checkpoint_leave_it_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.qcow2");
    let mut img = create(&path, 2 << 20, 16);
    let old: Vec<u8> = (0..2 << 20).map(|i: u32| (i % 253) as u8).collect();
    img.write(0, &old).unwrap();
    img.checkpoint_create("base").unwrap();
    img.flush().unwrap();
    let before = std::fs::read(&path).unwrap();
    let new = vec![0x5au8; 2 << 20];
    // whole clusters, a partial one, and a run
    for (off, len) in [(0usize, 65536usize), (70_000, 1000), (131_072, 1 << 20)] {
        img.write_from(off as u64, &Win::with(&new[off..off + len], true)).unwrap();
    }
    img.flush().unwrap();
    let after = std::fs::read(&path).unwrap();
    // every byte of the file that was a checkpoint data cluster is unchanged
    let map = img.map(Some("base")).unwrap();
    for m in map.iter().filter(|m| m.kind == "data") {
        let Some(host) = m.host_offset else { continue };
        let (h, l) = (host as usize, m.length as usize);
        assert!(after[h..h + l] == before[h..h + l], "checkpoint data at {h:#x} was overwritten");
    }
    let mut r = vec![0u8; 2 << 20];
    img.read_checkpoint("base", 0, &mut r).unwrap();
    assert!(r == old);
    let mut w = Win::new(2 << 20, true);
    img.read_into(0, &mut w).unwrap();
    let mut expect = old.clone();
    for (off, len) in [(0usize, 65536usize), (70_000, 1000), (131_072, 1 << 20)] {
        expect[off..off + len].copy_from_slice(&new[off..off + len]);
    }
    assert!(w.bytes() == &expect[..]);
}

/// Compressed clusters (written by qemu-img) read through a buffer, and writes over them
/// (partial and whole clusters) go to new clusters.
#[test]
fn compressed_clusters_through_read_into_and_write_from() {
    if !have_qemu() {
        eprintln!("qemu-img not installed: skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    let path = dir.path().join("c.qcow2");
    let size = 2usize << 20;
    let mut model = vec![0u8; size];
    let mut rng = Rng(99);
    for (i, chunk) in model.chunks_mut(65536).enumerate() {
        match i % 3 {
            0 => chunk.iter_mut().enumerate().for_each(|(j, b)| *b = (j / 100) as u8), // compressible
            1 => rng.fill(chunk),
            _ => {} // zero
        }
    }
    std::fs::write(&raw, &model).unwrap();
    common::run(&[
        "qemu-img",
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=65536",
        raw.to_str().unwrap(),
        path.to_str().unwrap(),
    ]);
    let mut img = Qcow2::open_file(&path, &OpenOptions { read_only: false }).unwrap();
    let mut w = Win::new(size, true);
    img.read_into(0, &mut w).unwrap();
    w.assert_margins();
    assert!(w.bytes() == &model[..], "compressed image read through read_into differs");
    for (off, len) in [(100usize, 5000usize), (65536 * 3, 65536), (65536 * 6 - 10, 65536 * 3 + 20)] {
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        img.write_from(off as u64, &Win::with(&data, true)).unwrap();
        model[off..off + len].copy_from_slice(&data);
    }
    let mut w = Win::new(size, true);
    img.read_into(0, &mut w).unwrap();
    assert!(w.bytes() == &model[..]);
    img.close().unwrap();
    common::assert_qemu_clean(&path);
    assert!(common::qemu_raw(&path, None) == model);
}
