//! `xensnap-qcow2`: a qcow2 v3 image engine with internal snapshots used as disk
//! checkpoints, interchangeable with QEMU's `qemu-img`.
//!
//! Crash safety: data is written before the L2 entry that points to it; refcount increases
//! are durable before the pointer that uses them; pointer removals are durable before the
//! refcount decrease that frees; the header is the commit point of table switches. A crash
//! can therefore only leak clusters, which [`Qcow2::repair`] reclaims.

mod blockdev;
mod check;
mod compress;
mod error;
mod header;
mod image;
mod io;
mod l2;
mod refcount;
mod snapshot;

pub use blockdev::{CheckpointDevice, SharedImage};
pub use check::CheckReport;
pub use error::{Error, Result};
pub use header::CompressionType;
pub use image::{CreateOptions, ImageInfo, MapEntry, OpenOptions, Qcow2};
pub use io::{FaultIo, FileIo, ImageIo, MemIo};
pub use snapshot::SnapshotInfo;

/// Fuzzing entry point: open `data` read-only, check it, read every cluster of the active
/// disk and of every checkpoint. Errors are ignored; it must never panic.
pub fn fuzz_one(data: &[u8]) {
    let io = MemIo::from_bytes(data.to_vec());
    let Ok(mut img) = Qcow2::open(Box::new(io), &OpenOptions { read_only: true }) else { return };
    let _ = img.check();
    let _ = img.info();
    let cs = img.cluster_size();
    let size = img.virtual_size().min(4 << 20);
    let mut buf = vec![0u8; cs as usize];
    let mut off = 0;
    while off < size {
        let n = cs.min(size - off) as usize;
        if let Some(b) = buf.get_mut(..n) {
            let _ = img.read(off, b);
        }
        off += cs;
    }
    for s in img.checkpoint_list() {
        let _ = img.map(Some(&s.id));
        let mut off = 0;
        let size = s.disk_size.min(4 << 20);
        while off < size {
            let n = cs.min(size - off) as usize;
            if let Some(b) = buf.get_mut(..n) {
                let _ = img.read_checkpoint(&s.id, off, b);
            }
            off += cs;
        }
    }
    let _ = img.map(None);
}
