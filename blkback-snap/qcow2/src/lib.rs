//! `xensnap-qcow2`: a qcow2 v3 image engine with internal snapshots used as disk
//! checkpoints, interchangeable with QEMU's `qemu-img`.
//!
//! Crash safety: data is written before the L2 entry that points to it; refcount increases
//! are durable before the pointer that uses them; pointer removals are durable before the
//! refcount decrease that frees; the header is the commit point of table switches. A crash
//! can therefore only leak clusters, which [`Qcow2::repair`] reclaims.
//!
//! Semantics the callers rely on:
//! * `write`/`write_zeroes`/`discard` return when the data is in the image file (page cache)
//!   and the metadata in memory; nothing is durable until [`Qcow2::flush`] returns. A crash
//!   before a flush loses some or all unflushed writes (never flushed ones), and may leak.
//! * `flush` writes back metadata in dependency order (refblocks, barrier, L2 tables,
//!   barrier, L1, barrier, then deferred refcount decreases), so it costs up to four
//!   fdatasyncs when metadata changed and one otherwise. While background work is pending
//!   behind a durable dirty bit the decreases wait for the next write-back's first stage
//!   (up to three), and a refcount block whose bytes came back to what the file holds is
//!   not rewritten.
//! * `checkpoint_create`/`revert`/`delete` return only when durable (they are the two-phase
//!   operations below run to completion, after any earlier background work); a completed
//!   `checkpoint_create` also leaves every earlier write durable, as `qemu-img snapshot -c`.
//!
//! Two-phase checkpoints (see `durable.rs` for the accounting model):
//! * [`Qcow2::checkpoint_take`] fixes the point in time with O(L1) work in memory and no I/O:
//!   it copies the active L1 and makes every allocated cluster shared for the writer (the
//!   set of clusters allocated since the take starts empty). The checkpoint is listed with
//!   state `taken` and readable at once.
//! * [`Qcow2::durable_step`]`(budget)` does bounded background work (about `budget` L2
//!   tables, or one commit of a few writes and flushes) and returns whether everything is
//!   durable; [`Qcow2::wait_durable`] loops it; [`Qcow2::durable_pending`] tells whether
//!   work is queued. A server runs steps from a driver thread under the same lock as guest
//!   I/O (`SharedImage`); guest writes stay correct in between.
//! * A commit (and a deletion's table rewrite) is *staged*: [`Qcow2::durable_step_staged`]
//!   stops at each flush barrier a commit needs and hands it out, so a driver runs the
//!   fdatasyncs without the image lock ([`SharedImage::durable_work`]) and guest I/O goes
//!   on meanwhile; the on-disk order is the same (refcounts and tables, barrier, header
//!   commit, barrier). A commit only depends on the frozen tree and its own writes, never
//!   on the active tree's write-back.
//! * [`Qcow2::checkpoint_revert_switch`] switches the guest-visible disk in O(L1);
//!   [`Qcow2::checkpoint_delete_begin`] hides a checkpoint at once (a taken one whose commit
//!   has not begun is then never published: abandoning it costs no table write and no
//!   flush). Their refcount work is background work too. `flush` completes a pending switch first (writes after a switch
//!   are durable only with it), as does a second switch.
//! * Several operations may be queued; they become durable in order. On disk a refcount is
//!   never below its published references (a crash only leaks); a crash loses taken
//!   checkpoints and switches/deletions not yet durable, never a durable checkpoint. A
//!   commit sets the dirty bit (durably) before its walk's raised refcounts can reach disk:
//!   the walk clears the active tree's COPIED flags in memory only, and a guest write may
//!   hand a cluster over to a taken checkpoint (the leak a crash would leave): such counts
//!   reach disk only behind a durable dirty bit, whichever write carries them. The bit is
//!   cleared by the first flush (or `close`) after all work is durable, once its write-back
//!   has put the active L1/L2 on disk, so after a crash our open and QEMU's open rebuild the
//!   refcounts and COPIED flags instead of trusting stale ones.
//! * A failed flush (or write) poisons the image (`io::Poison`, shared by the image I/O and
//!   its sync handles): after an `fdatasync` error the kernel may drop the unwritten pages
//!   and report success to the next one, and only the first of a guest flush and a
//!   background barrier sees the error. Every later write, flush, checkpoint step and
//!   barrier fails with [`Error::Poisoned`] naming the first failure, until the image is
//!   reopened (reads still work). "No space" write errors do not poison.
//! * `close` finishes pending work; dropping the engine without `close` drops it (the image
//!   stays consistent).
//! * [`Qcow2`] is not internally synchronised: use one owner, or [`SharedImage`]
//!   (`Arc<Mutex<Qcow2>>`) which serialises every request.
//! * A data cluster is written in place iff its refcount is 1 (the refcount, not the COPIED
//!   flag, is authoritative); COPIED flags are still maintained exactly for qemu-img.
//! * Refused at open: unknown incompatible bits, external data files, encryption, backing
//!   files. Opened read-only (writes give `Error::ReadOnly`): images with the corrupt bit
//!   (until `repair`), qcow2 v2, extended L2. Bitmaps are not maintained: opening read-write
//!   clears the autoclear bits, as QEMU does for features it does not know.

mod blockdev;
mod check;
mod compress;
mod durable;
mod error;
mod header;
mod image;
mod io;
mod l2;
mod offmap;
mod refcount;
mod snapshot;

pub use blockdev::{
    durable_pause, CheckpointDevice, DurableProgress, Pacer, SharedImage, DURABLE_BUDGET, DURABLE_PACE,
    DURABLE_PACE_IDLE, DURABLE_WAIT_SHARE, GUEST_BUSY_WINDOW, HANDOFF_MAX, MAX_PACE,
};
pub use check::CheckReport;
pub use durable::{DurableBarrier, DurableStep, SyncedBarrier};
pub use error::{Error, Result};
pub use header::CompressionType;
pub use image::{CowPlan, CreateOptions, ImageInfo, MapEntry, OpenOptions, Qcow2};
pub use io::{DataIo, FaultIo, FileIo, ImageIo, MemIo, Poison, SyncHandle};
pub use snapshot::{CheckpointState, SnapshotInfo};

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
