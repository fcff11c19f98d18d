//! Two-phase checkpoints: *taken* in O(L1) with no I/O, made *durable* by bounded background
//! steps; revert and delete split the same way.
//!
//! # Accounting model
//!
//! On disk, a refcount is never below the number of references from published structures
//! (the header's active L1, the snapshot table's L1s and what they reach): a crash at any
//! moment can only leak. In memory, every refcount equals the number of references from all
//! live trees (active, published checkpoints, taken checkpoints, dropped trees whose
//! references are still being given back) **minus the uncounted shares** of the queued
//! *link* jobs:
//!
//! * A link job has a frozen `pred` tree and a `succ` tree (the active one, or another frozen
//!   tree) that was a copy of `pred` when the job was created. A cluster at the same L1/L2
//!   position in both trees is counted once, not twice, until the job's walk reaches that
//!   position (its `cursor`: an L1 index, and `sub`, an L2 entry index inside it) and adds
//!   the missing reference. The walk goes through a table in chunks of `walk_chunk` entries
//!   (one lock hold of a durability driver each, so a guest request waits at most for one
//!   chunk); the L2 table's own reference counts as the reference at entry 0: the first
//!   chunk of a shared table adds it. (A drop walk gives a table's own reference back
//!   with its last chunk instead: freed earlier, the table could be reallocated while the
//!   walk still reads it.)
//! * `checkpoint_take` makes the taken checkpoint `pred` and the active tree `succ`: the
//!   active tree's count simply stands for both. `checkpoint_revert_switch` makes the target
//!   checkpoint `pred` and the new active tree (its copy) `succ`.
//! * While the active tree is the `succ` of a link whose walk has not passed position
//!   `(i, j)`, every cluster at that position (and the L2 table at `(i, 0)`) that was not
//!   allocated since the take/switch (`fresh`) is
//!   shared with `pred`: a write takes the copy-on-write path, `pred` gets a reference of its
//!   own at once (the walk will find the positions differ and add nothing), and the dropped
//!   pointer gives its reference back like any other, once its removal is durable (a
//!   *hand-over*). Behind the cursor, the walk has added the reference, so the ordinary
//!   rules (COW iff refcount > 1, deferred decrease) apply. A guest copy of a table the walk
//!   is in the middle of (its own reference counted) makes the rest of that index follow the
//!   rule for different tables: entries equal at the same position are still shared.
//! * A new take (or switch) while a link still has the active tree as `succ` re-points that
//!   link at the frozen copy: it had the same content at that instant.
//!
//! * A guest write split around its data I/O ([`Qcow2::cow_plan`], what
//!   [`crate::SharedImage`] does while background work is pending) holds a new cluster
//!   counted and not yet referenced until [`Qcow2::cow_finish`] links it in or frees it:
//!   those count as one reference each (`cow_inflight`). A background step may run in that
//!   gap (it changes refcounts and COPIED flags, never what the active disk maps or reads);
//!   any other operation makes the plan stale and the write is made the ordinary way.
//!
//! Jobs run strictly in queue order, one at a time: a link walk, then its commit (append
//! the snapshot table entry with a 12-byte header write, or publish the new active L1 with
//! a 24-byte header write for a revert); drop jobs (the old active tree of a revert, a
//! deleted checkpoint, a taken checkpoint abandoned before its commit) give the references
//! back after the tree is durably unpublished (or was never published).
//!
//! A checkpoint commit depends only on the frozen tree and on its own writes, never on the
//! active tree's write-back: right after the take, the frozen tree's refcounts and its L2
//! tables not yet written back are made durable (one barrier, when little has been written
//! since the take); at the commit, the L1 copy, the new snapshot table and the refcounts
//! (barrier), then the header (barrier). Thanks to the hand-over rule, a stale pointer of
//! the active tree that is still on disk stays counted until its removal is durable. The
//! commit is *staged* ([`Stage`]): a driver may run its barriers without the image lock
//! ([`Qcow2::durable_step_staged`]) while guest requests go on; a deletion's table rewrite
//! is staged the same way. (A revert's commit still writes back and flushes under the lock.)
//!
//! The dirty bit. A commit's walk raises the counts of the clusters the frozen tree shares
//! with the active one and clears the active tree's COPIED flags on them, in memory only: the
//! commit writes the checkpoint's L1 copy, the table and the refcounts, never the active
//! L1/L2, so until the active tree is written back its on-disk COPIED flags claim clusters
//! that a durable checkpoint now shares (QEMU writes in place where COPIED is set and the
//! dirty bit is clear). A hand-over gives a count to a tree that is not published yet: a
//! crash leaks it. So the commit's preparation sets the dirty bit, durably (barrier), before
//! any raised count can reach disk, on every path (`checkpoint_create` too) whenever the
//! frozen tree has an L2 table. A hand-over (or the walk of a checkpoint abandoned before
//! that preparation) opens a *leak window*: every refcount block write, on whichever path
//! (guest write-back, a commit, a deletion's table rewrite, a reftable growth), first makes
//! the bit durable ([`Qcow2::dirty_before_leaks`]; the staged paths with a barrier of their
//! own, [`Qcow2::dirty_stage`]). Our
//! `open` and QEMU's open then rebuild refcounts and COPIED flags after a crash. It is
//! cleared (without a barrier) only by a flush or `close` whose write-back and barrier found
//! no queued work and left no dirty L1/L2 table or refcount block behind
//! ([`Qcow2::clear_dirty_if_written_back`]): the first flush after the work is done.

use crate::error::{Error, Result};
use crate::header::{self, put_be32, put_be64, INCOMPAT_DIRTY};
use crate::image::{Qcow2, Tree};
use crate::l2::{l1_to_l2, Cluster, COPIED};
use crate::offmap::OffSet;
use crate::snapshot::{CheckpointState, Snapshot, SnapshotInfo};
use std::collections::{HashMap, HashSet};
use std::ops::Range;
use tracing::{info, warn};

/// A checkpoint taken out of the snapshot table: its tree (moved to memory) and the cluster
/// ranges to free once its references are given back.
type Unpublished = (Tree, Vec<(u64, u64)>);

/// What a link job does once its walk is complete.
#[derive(Debug, Clone)]
pub(crate) enum Then {
    /// Publish the taken checkpoint `snap` (its L1 is the link's `pred`) in the table.
    Commit { snap: Snapshot, delete_requested: bool },
    /// Publish the active L1 at a new location (a revert switch).
    Switch,
}

#[derive(Debug, Clone)]
pub(crate) enum DropWhat {
    /// The old active tree of a revert (unpublished by the switch commit).
    OldActive,
    /// A published checkpoint (by id): unpublished by a table rewrite first.
    Snapshot(String),
    /// A taken checkpoint deleted before its commit began (by id): never published.
    Abandoned(String),
}

/// Where a staged table switch (a checkpoint commit, or a deletion's table rewrite) is.
/// Each step issues writes under the image lock; a step that must be durable before the
/// next one's writes ends with a barrier (`wait`), which a driver may run *without* the
/// image lock ([`Qcow2::durable_step_staged`]) or the engine runs itself
/// ([`Qcow2::durable_step`]). Allocations are made once and remembered, so a step retried
/// after an error (a read error: a failed write or sync poisons the image instead) rewrites
/// the same places.
#[derive(Debug, Clone, Default)]
pub(crate) struct Stage {
    /// The next step to run (0: not begun).
    pub(crate) step: u8,
    /// The barrier (ticket) that must complete before `step` runs.
    pub(crate) wait: Option<u64>,
    /// The checkpoint's L1 copy: (offset, bytes); offset 0 while not allocated.
    pub(crate) l1: (u64, u64),
    /// The new snapshot table: (offset, bytes, entries); None while not written.
    pub(crate) table: Option<(u64, u64, Vec<Snapshot>)>,
    /// A commit's preparation before its walk: 0 not begun, 1 and 2 barriers issued, 3
    /// done.
    pub(crate) early: u8,
    /// New refblocks written before the pending barrier, whose reftable entries follow it.
    pub(crate) rt: Vec<u64>,
    /// A commit's preparation has dealt with the dirty bit (set it, with its own barrier
    /// when refcounts raised by hand-overs were waiting to be written).
    pub(crate) dirty_done: bool,
    /// A whole-file barrier of this job completed: the data written before the take (the
    /// checkpoint's data clusters) is durable. Later barriers only need the job's own
    /// writes durable, so a driver syncs just their ranges ([`DurableBarrier::sync`]).
    pub(crate) data_synced: bool,
    /// The ranges the pending barrier must make durable (`None`: the whole file).
    pub(crate) wait_ranges: Option<Vec<(u64, u64)>>,
}

impl Stage {
    /// Has the commit (or table rewrite) itself begun?
    pub(crate) fn begun(&self) -> bool {
        self.step > 0
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Job {
    /// `cursor`/`sub`: the walk has done every L1 index below `cursor` and, at `cursor`,
    /// the L2 entries below `sub` (a link also the table's own reference when `sub > 0`; a
    /// drop gives it back with the index's last chunk).
    Link {
        pred: Tree,
        succ: Tree,
        cursor: u64,
        sub: u64,
        then: Then,
        stage: Stage,
    },
    Drop {
        what: DropWhat,
        tree: Option<Tree>,
        cursor: u64,
        sub: u64,
        free: Vec<(u64, u64)>,
        stage: Stage,
    },
}

/// How far a job got in one call.
enum Run {
    Finished,
    /// Out of budget.
    Paused,
    /// Its writes need barrier `ticket` before it goes on.
    Barrier(u64),
}

/// The result of [`Qcow2::durable_step_staged`].
pub enum DurableStep {
    /// Like [`Qcow2::durable_step`]'s result: whether all background work is durable.
    Done(bool),
    /// The work wrote what must be durable before its next write: run
    /// [`DurableBarrier::sync`] (without the image lock), then hand the result to
    /// [`Qcow2::durable_barrier_done`].
    Barrier(DurableBarrier),
}

/// A flush barrier the background work waits for (see [`Qcow2::durable_step_staged`]).
pub struct DurableBarrier {
    ticket: u64,
    handle: crate::io::SyncHandle,
    /// `None`: fdatasync the whole file; `Some`: only these ranges (the job's own writes
    /// since its previous barrier, once the checkpoint's data is durable).
    ranges: Option<Vec<(u64, u64)>>,
}

/// A barrier that completed: every write issued before [`DurableBarrier::sync`] began is
/// durable.
pub struct SyncedBarrier {
    ticket: u64,
}

impl DurableBarrier {
    /// Flush the image file (fdatasync); needs no access to the image.
    /// Refused on a poisoned image; a failure poisons it (see [`crate::io::Poison`]), so the
    /// barrier is never retried over writes the kernel may have dropped.
    pub fn sync(self) -> Result<SyncedBarrier> {
        if let Some(first) = self.handle.poisoned() {
            return Err(Error::Poisoned { first });
        }
        match &self.ranges {
            None => self.handle.sync(),
            Some(r) => self.handle.sync_ranges(r),
        }
        .map_err(|e| Error::io("flushing for a checkpoint commit (outside the image lock)", e))?;
        Ok(SyncedBarrier { ticket: self.ticket })
    }
    /// Whether this barrier syncs only the ranges the background work wrote (not the
    /// whole file).
    pub fn is_ranged(&self) -> bool {
        self.ranges.is_some()
    }
}

/// Budget units: one chunk of an L2 table walked (up to `walk_chunk` entries), or one
/// commit; this many empty L1 entries count as one.
const EMPTY_PER_UNIT: u64 = 512;

/// L2 entries a walk covers per budget unit, by default. A guest request that arrives while
/// a durability driver walks waits for the rest of one chunk: at 16 KiB clusters a whole
/// table (2048 entries) held the image lock 100-200 µs under load; a chunk of 256 about an
/// eighth of that.
pub(crate) const WALK_CHUNK: u64 = 256;

fn merge(mut v: Vec<u64>) -> Vec<(u64, u64)> {
    // (a table's clusters are mostly allocated in order: often sorted already)
    if !v.is_sorted() {
        v.sort_unstable();
    }
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for c in v {
        match out.last_mut() {
            Some((last, n)) if *last == c => *n += 1,
            _ => out.push((c, 1)),
        }
    }
    out
}

impl Qcow2 {
    // ------------------------------------------------------------------ state queries

    /// Is the reference of the active tree at L1 index `l1i`, L2 entry `l2i`, to cluster
    /// `idx` uncounted (shared with the frozen tree the active one was copied from, not yet
    /// walked)? The L2 table's own reference is asked for as entry 0.
    pub(crate) fn uncounted_share(&self, l1i: u64, l2i: u64, idx: u64) -> bool {
        if self.jobs.is_empty() {
            return false;
        }
        for j in &self.jobs {
            if let Job::Link { succ: Tree::Active, cursor, sub, .. } = j {
                return (l1i, l2i) >= (*cursor, *sub) && !self.fresh.contains(&idx);
            }
        }
        false
    }

    /// How many L2 entries of L1 index `l1i` the drop walk under way has given back (0 when
    /// no drop is in the middle of that index). A table of the active tree copied then
    /// holds, below that entry, clusters that may have only the copy's reference left: the
    /// copy sets COPIED on them by their count, as the walk did on the original (with whole
    /// tables per step, no copy could fall between the chunks of one index).
    pub(crate) fn dropped_below(&self, l1i: u64) -> u64 {
        match self.jobs.front() {
            Some(Job::Drop { tree: Some(_), cursor, sub, .. }) if *cursor == l1i => *sub,
            _ => 0,
        }
    }

    /// Guest requests served through [`crate::SharedImage`] so far (a wrapping count, for
    /// [`crate::Pacer`]).
    pub fn guest_ops(&self) -> u64 {
        self.guest_ops
    }

    /// Nanoseconds guest requests through [`crate::SharedImage`] waited for the image lock
    /// while it was taken, so far (a wrapping count, for [`crate::Pacer`]).
    pub fn guest_wait_ns(&self) -> u64 {
        self.guest_wait_ns
    }

    /// Is there background work (taken checkpoints, revert or delete) not durable yet?
    pub fn durable_pending(&self) -> bool {
        !self.jobs.is_empty()
    }

    /// Test hook: where the walk of the first queued job is (L1 index, L2 entry).
    #[doc(hidden)]
    pub fn durable_position(&self) -> Option<(u64, u64)> {
        match self.jobs.front()? {
            Job::Link { cursor, sub, .. } | Job::Drop { cursor, sub, .. } => Some((*cursor, *sub)),
        }
    }

    pub(crate) fn new_mem(&mut self, l1: Vec<u64>) -> u64 {
        let id = self.next_mem;
        self.next_mem += 1;
        self.mem_l1.insert(id, l1);
        id
    }

    /// Ids of published checkpoints whose deletion is queued.
    pub(crate) fn deleting_ids(&self) -> HashSet<&str> {
        self.jobs
            .iter()
            .filter_map(|j| match j {
                Job::Drop { what: DropWhat::Snapshot(id), tree: None, .. } => Some(id.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Visible checkpoints: published ones (minus queued deletions), then taken ones.
    pub(crate) fn visible(&self) -> Vec<(Tree, Snapshot, CheckpointState)> {
        let del = self.deleting_ids();
        let mut out: Vec<(Tree, Snapshot, CheckpointState)> = self
            .snapshots
            .iter()
            .filter(|s| !del.contains(s.id.as_str()))
            .map(|s| (Tree::Snap(s.l1_offset), s.clone(), CheckpointState::Durable))
            .collect();
        for j in &self.jobs {
            if let Job::Link { pred, then: Then::Commit { snap, delete_requested: false }, .. } = j {
                out.push((*pred, snap.clone(), CheckpointState::Taken));
            }
        }
        out
    }

    pub(crate) fn find_checkpoint(&self, id_or_name: &str) -> Result<(Tree, Snapshot, CheckpointState)> {
        let v = self.visible();
        let hit = v.iter().find(|s| s.1.id == id_or_name).or_else(|| v.iter().find(|s| s.1.name == id_or_name));
        hit.cloned()
            .ok_or_else(|| Error::not_found(format!("checkpoint '{id_or_name}' (no snapshot with that id or name)")))
    }

    fn next_checkpoint_id(&self) -> String {
        let pending = self.jobs.iter().filter_map(|j| match j {
            Job::Link { then: Then::Commit { snap, .. }, .. } => snap.id.parse::<u64>().ok(),
            _ => None,
        });
        let max = self.snapshots.iter().filter_map(|s| s.id.parse::<u64>().ok()).chain(pending).max().unwrap_or(0);
        (max + 1).to_string()
    }

    /// Validate an L1 table in O(L1): entries well formed, no L2 table used twice.
    fn validate_l1(&self, t: &[u64], what: &str) -> Result<()> {
        let mut seen = Vec::with_capacity(t.len());
        for (i, e) in t.iter().enumerate() {
            let l2 = l1_to_l2(*e, self.cs, &|| format!("{what} L1 entry {i}"))?;
            if l2 != 0 {
                seen.push(l2);
            }
        }
        seen.sort_unstable();
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(Error::corrupt(format!(
                "{what} L1 table: L2 table at {:#x} is used by two entries of the same L1 table",
                w[0]
            )));
        }
        Ok(())
    }

    // ------------------------------------------------------------------ phase 1 APIs

    /// Take a checkpoint: fix the point in time. O(L1) work in memory, no I/O, no flush. The
    /// checkpoint is listed (state `taken`) and readable at once; it becomes `durable` after
    /// background work ([`Qcow2::durable_step`] / [`Qcow2::wait_durable`]). A crash before
    /// that loses it (and only leaks clusters).
    pub fn checkpoint_take(&mut self, name: &str) -> Result<SnapshotInfo> {
        self.bump_gen();
        self.check_writable()?;
        if name.is_empty() || name.len() > 65535 {
            return Err(Error::invalid("checkpoint name must be 1..=65535 bytes"));
        }
        let vis = self.visible();
        if vis.iter().any(|s| s.1.name == name) {
            return Err(Error::invalid(format!("a checkpoint named '{name}' already exists")));
        }
        let queued = self.jobs.iter().filter(|j| matches!(j, Job::Link { then: Then::Commit { .. }, .. })).count();
        if self.snapshots.len() + queued >= header::MAX_SNAPSHOTS as usize {
            return Err(Error::invalid("the image already has 65536 snapshots"));
        }
        // every tree may share a cluster: the refcount width must hold one per tree
        let trees = 2 + self.snapshots.len() as u64 + self.jobs.len() as u64;
        if trees > self.rc_max() {
            return Err(Error::RefcountOverflow {
                what: format!(
                    "{trees} trees could share a cluster, above the maximum {} of {}-bit refcounts",
                    self.rc_max(),
                    self.h.refcount_bits()
                ),
            });
        }
        self.validate_l1(&self.l1, "active")?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let mut extra = vec![0u8; 24];
        put_be64(&mut extra, 0, 0);
        put_be64(&mut extra, 8, self.h.size);
        put_be64(&mut extra, 16, u64::MAX);
        let sn = Snapshot {
            l1_offset: 0,
            l1_size: self.l1.len() as u32,
            id: self.next_checkpoint_id(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra,
            disk_size: Some(self.h.size),
        };
        let m = self.new_mem(self.l1.clone());
        self.relink_active(Tree::Mem(m));
        let info = sn.info(self.h.size, CheckpointState::Taken);
        self.jobs.push_back(Job::Link {
            pred: Tree::Mem(m),
            succ: Tree::Active,
            cursor: 0,
            sub: 0,
            then: Then::Commit { snap: sn, delete_requested: false },
            stage: Stage::default(),
        });
        info!(id = %info.id, name, "checkpoint taken");
        Ok(info)
    }

    /// The active tree is about to be frozen as `frozen`: a link whose `succ` is the active
    /// tree now links to the frozen copy; everything allocated so far becomes shared.
    fn relink_active(&mut self, frozen: Tree) {
        for j in self.jobs.iter_mut() {
            if let Job::Link { succ, .. } = j {
                if *succ == Tree::Active {
                    *succ = frozen;
                }
            }
        }
        self.fresh = OffSet::default();
    }

    /// Switch the guest-visible disk to a checkpoint (taken or durable): O(L1) in memory
    /// (plus reading a durable checkpoint's L1 if not cached). The switch is durable after
    /// background work; a crash before leaves the disk as it was. [`Qcow2::flush`] completes
    /// the switch first (writes after a switch become durable with it), and so does a second
    /// switch.
    pub fn checkpoint_revert_switch(&mut self, id_or_name: &str) -> Result<()> {
        self.bump_gen();
        self.check_writable()?;
        self.find_checkpoint(id_or_name)?;
        if self.l1_unpublished {
            self.complete_switch()?;
        }
        let (tree, sn, _) = self.find_checkpoint(id_or_name)?;
        let size = sn.disk_size.unwrap_or(self.h.size);
        let need = self.h.l1_entries_for(size);
        if need * 8 > header::MAX_L1_BYTES {
            return Err(Error::corrupt(format!("checkpoint '{}' disk size {size} is absurd", sn.name)));
        }
        self.l1_len(tree)?; // loads a durable checkpoint's L1
        let src = match tree {
            Tree::Snap(o) => self.snap_l1.get(&o),
            Tree::Mem(m) => self.mem_l1.get(&m),
            Tree::Active => None,
        };
        let mut new_l1: Vec<u64> = src.map(|t| t.iter().map(|v| v & !COPIED).collect()).unwrap_or_default();
        self.validate_l1(&new_l1, &format!("checkpoint '{}'", sn.name))?;
        if (new_l1.len() as u64) < need {
            new_l1.resize(need as usize, 0);
        }
        // The old tree's unwritten L1 changes are dropped with it, so the decreases waiting
        // for them must wait for the switch instead: the drop job applies them.
        let mut free = vec![(self.h.l1_table_offset, u64::from(self.h.l1_size) * 8)];
        free.append(&mut self.pending_free);
        let old_l1 = std::mem::replace(&mut self.l1, new_l1);
        let d = self.new_mem(old_l1);
        self.relink_active(Tree::Mem(d));
        let sectors = std::mem::take(&mut self.l1_dirty);
        if !sectors.is_empty() {
            self.old_l1_dirty = Some((d, self.h.l1_table_offset, sectors));
        }
        self.l1_unpublished = true;
        self.h.size = size;
        self.decomp = None;
        self.jobs.push_back(Job::Link {
            pred: tree,
            succ: Tree::Active,
            cursor: 0,
            sub: 0,
            then: Then::Switch,
            stage: Stage::default(),
        });
        self.jobs.push_back(Job::Drop {
            what: DropWhat::OldActive,
            tree: Some(Tree::Mem(d)),
            cursor: 0,
            sub: 0,
            free,
            stage: Stage::default(),
        });
        info!(id = %sn.id, name = %sn.name, "switched to checkpoint");
        Ok(())
    }

    /// Delete a checkpoint: it disappears from the list at once (no I/O); the rest is
    /// background work. A durable checkpoint is removed from the table (a crash before that
    /// rewrite is durable keeps it), then what only it referenced is freed. A *taken* one
    /// whose commit has not begun (an abandoned checkpoint) is never published: its walk
    /// ends in giving its references back, with no table write and no flush, and a crash at
    /// any point loses it. One whose commit is under way becomes durable, then is deleted.
    pub fn checkpoint_delete_begin(&mut self, id_or_name: &str) -> Result<()> {
        self.bump_gen();
        self.check_writable()?;
        let (tree, sn, state) = self.find_checkpoint(id_or_name)?;
        let mut committing = state == CheckpointState::Durable;
        if state == CheckpointState::Taken {
            for j in self.jobs.iter_mut() {
                if let Job::Link { pred, then: Then::Commit { delete_requested, .. }, stage, .. } = j {
                    if *pred == tree {
                        *delete_requested = true;
                        committing = stage.begun();
                    }
                }
            }
        }
        if committing {
            self.jobs.push_back(Job::Drop {
                what: DropWhat::Snapshot(sn.id.clone()),
                tree: None,
                cursor: 0,
                sub: 0,
                free: vec![],
                stage: Stage::default(),
            });
        }
        info!(id = %sn.id, name = %sn.name, abandoned = !committing, "checkpoint deletion queued");
        Ok(())
    }

    /// Will the next [`Qcow2::durable_step`] flush (a commit, a table rewrite)? Then a
    /// handle to flush the image file is returned, which a caller may run without the image
    /// lock first so that the step's own barriers find little to write. Superseded by
    /// [`Qcow2::durable_step_staged`], which runs every barrier of a commit outside the lock.
    pub fn durable_presync(&mut self) -> Result<Option<crate::io::SyncHandle>> {
        if self.read_only {
            return Ok(None);
        }
        let syncs = match self.jobs.front().cloned() {
            None => false,
            Some(Job::Link { pred, cursor, .. }) => cursor >= self.l1_len(pred)? as u64,
            Some(Job::Drop { tree: None, .. }) => true,
            Some(Job::Drop { .. }) => false,
        };
        Ok(if syncs { self.io.sync_handle() } else { None })
    }

    /// Run all background work to completion.
    pub fn wait_durable(&mut self) -> Result<()> {
        while !self.durable_step(64)? {}
        Ok(())
    }

    /// Complete a pending revert switch (and the work queued before it).
    pub(crate) fn complete_switch(&mut self) -> Result<()> {
        while self.l1_unpublished {
            if self.durable_step(64)? {
                break;
            }
        }
        Ok(())
    }

    /// Do a bounded amount of background work: about `budget` chunks of L2 tables walked
    /// (up to 256 entries each), or one commit (a few writes and flushes, all issued here).
    /// Returns whether everything is durable. On error the job stays queued at the position
    /// it reached.
    pub fn durable_step(&mut self, budget: usize) -> Result<bool> {
        match self.step_inner(budget, true)? {
            DurableStep::Done(d) => Ok(d),
            // unreachable with inline barriers; report "not done" rather than fail
            DurableStep::Barrier(_) => Ok(false),
        }
    }

    /// [`Qcow2::durable_step`] for a driver that runs flush barriers *outside* the lock
    /// serialising the image: the work stops where a commit (or a deletion's table
    /// rewrite) needs its writes durable before the next ones, and returns that barrier.
    /// The driver releases the lock, runs [`DurableBarrier::sync`], re-takes the lock and
    /// passes the result to [`Qcow2::durable_barrier_done`]; the next call goes on. Guest
    /// I/O (writes, flushes, takes, reverts, deletes) may run in between: a commit only
    /// depends on what it wrote itself and on the frozen checkpoint tree, which guest
    /// writes never change. A barrier that is never completed is run by the next
    /// [`Qcow2::durable_step`] (and so by `flush` before a switch, `wait_durable`, `close`).
    /// If the image I/O has no [`crate::SyncHandle`], barriers run inline.
    pub fn durable_step_staged(&mut self, budget: usize) -> Result<DurableStep> {
        self.step_inner(budget, false)
    }

    /// Record a barrier run outside the lock (see [`Qcow2::durable_step_staged`]). A stale
    /// one (the work moved on meanwhile, e.g. a `wait_durable` ran it inline) is ignored.
    pub fn durable_barrier_done(&mut self, b: SyncedBarrier) {
        if self.poisoned().is_some() {
            return; // (a barrier that "succeeded" after the image was poisoned proves nothing)
        }
        // it began after it was handed out: it covers a dirty bit written before that
        if self.dirty_unsynced.is_some_and(|t| b.ticket > t) {
            self.dirty_unsynced = None;
        }
        if let Some(Job::Link { stage, .. } | Job::Drop { stage, .. }) = self.jobs.front_mut() {
            if stage.wait == Some(b.ticket) {
                stage.wait = None;
                if stage.wait_ranges.take().is_none() {
                    stage.data_synced = true;
                }
            }
        }
    }

    fn step_inner(&mut self, budget: usize, inline: bool) -> Result<DurableStep> {
        if self.read_only || self.jobs.is_empty() {
            return Ok(DurableStep::Done(self.jobs.is_empty()));
        }
        self.check_poison()?;
        let handle = if inline { None } else { self.io.sync_handle() };
        let inline = handle.is_none();
        // record what the work writes, for a barrier that syncs only that
        self.io.record_writes(!inline);
        let r = self.step_jobs(budget, inline, handle);
        self.io.record_writes(false);
        r
    }

    fn step_jobs(&mut self, budget: usize, inline: bool, handle: Option<crate::io::SyncHandle>) -> Result<DurableStep> {
        let mut left = budget.max(1) as u64 * EMPTY_PER_UNIT;
        while left > 0 {
            let Some(mut job) = self.jobs.pop_front() else { break };
            match self.run_job(&mut job, &mut left, inline) {
                Ok(Run::Finished) => {}
                Ok(Run::Paused) => {
                    self.jobs.push_front(job);
                    break;
                }
                Ok(Run::Barrier(ticket)) => {
                    let ranges = match &job {
                        Job::Link { stage, .. } | Job::Drop { stage, .. } => stage.wait_ranges.clone(),
                    };
                    self.jobs.push_front(job);
                    if let Some(handle) = handle {
                        return Ok(DurableStep::Barrier(DurableBarrier { ticket, handle, ranges }));
                    }
                    break;
                }
                Err(e) => {
                    self.jobs.push_front(job);
                    warn!("background checkpoint work failed: {e}");
                    return Err(e);
                }
            }
        }
        if self.jobs.is_empty() {
            self.all_durable()?;
        }
        Ok(DurableStep::Done(self.jobs.is_empty()))
    }

    fn all_durable(&mut self) -> Result<()> {
        self.mem_l1.clear();
        self.fresh = OffSet::default();
        self.leak_window = false;
        // The dirty bit stays: the walks changed COPIED flags of the active tree in memory
        // only, and the on-disk flags are stale until a write-back that starts now
        // ([`Qcow2::clear_dirty_if_written_back`], at the next flush or close).
        Ok(())
    }

    /// Clear the dirty bit we set, right after a write-back and barrier that found no
    /// queued work: every frozen tree whose counts could leak is published or durably
    /// unpublished, and the active tree's L1/L2 (with the COPIED flags the walks changed)
    /// and the refcounts are on disk. The clear needs no barrier: if it is lost, open just
    /// repairs. Until then a crash leaves the bit set, so neither our open nor QEMU's trusts
    /// a stale COPIED flag on a cluster a checkpoint now shares.
    pub(crate) fn clear_dirty_if_written_back(&mut self) -> Result<()> {
        if !self.dirty_set_by_us || self.h.incompatible & INCOMPAT_DIRTY == 0 {
            return Ok(());
        }
        let clean = self.jobs.is_empty()
            && self.l1_dirty.is_empty()
            && self.old_l1_dirty.is_none()
            && !self.l1_unpublished
            && self.l2_dirty.is_empty()
            && self.rb_dirty.is_empty()
            && self.rt_new.is_empty()
            && self.pending_free.is_empty();
        if clean {
            self.write_incompat(self.h.incompatible & !INCOMPAT_DIRTY)?;
            self.dirty_set_by_us = false;
        }
        Ok(())
    }

    /// Write the incompatible feature bits without a barrier. Setting the dirty bit this way
    /// leaves it unsynced until the next barrier handed out or flush completes
    /// ([`Qcow2::dirty_durable`]).
    fn write_incompat(&mut self, v: u64) -> Result<()> {
        let mut b = [0u8; 8];
        put_be64(&mut b, 0, v);
        self.write_bytes(&b, header::OFF_INCOMPAT, "incompatible feature bits")?;
        if v & INCOMPAT_DIRTY != 0 && self.h.incompatible & INCOMPAT_DIRTY == 0 {
            self.dirty_unsynced = Some(self.next_ticket);
        }
        self.h.incompatible = v;
        Ok(())
    }

    /// Is the dirty bit set on disk, durably?
    pub(crate) fn dirty_durable(&self) -> bool {
        self.h.incompatible & INCOMPAT_DIRTY != 0 && self.dirty_unsynced.is_none()
    }

    /// Before any refcount block is written while guest writes have handed counts over to a
    /// tree that is not published (a crash would leak them): the dirty bit set and durable,
    /// so that the leak, and the COPIED flags the on-disk active tree still carries on the
    /// clusters concerned, are repaired on open. Costs one flush per leak window at most;
    /// the staged paths make the bit durable with a barrier of their own first
    /// ([`Qcow2::dirty_stage`]), so this finds nothing to do there.
    pub(crate) fn dirty_before_leaks(&mut self) -> Result<()> {
        if !self.leak_window || self.dirty_durable() || self.read_only {
            return Ok(());
        }
        if self.h.incompatible & INCOMPAT_DIRTY == 0 {
            self.write_incompat(self.h.incompatible | INCOMPAT_DIRTY)?;
            self.dirty_set_by_us = true;
        }
        self.sync("dirty bit before handed-over refcounts")
    }

    /// A staged table switch (a commit, a deletion's table rewrite) about to write refcount
    /// blocks: if guest writes handed counts over and the dirty bit is not durable yet,
    /// set it and ask for a barrier. (Once the barrier is done the bit is durable, so a
    /// step that runs this again goes straight on.)
    fn dirty_stage(&mut self, st: &mut Stage, inline: bool, what: &str) -> Result<Option<Run>> {
        if !self.leak_window || self.dirty_durable() {
            return Ok(None);
        }
        if self.h.incompatible & INCOMPAT_DIRTY == 0 {
            self.write_incompat(self.h.incompatible | INCOMPAT_DIRTY)?;
            self.dirty_set_by_us = true;
        }
        self.barrier(st, inline, what)
    }

    /// A step wants barrier `what` before going on: run it here (inline) or hand it out.
    fn barrier(&mut self, stage: &mut Stage, inline: bool, what: &str) -> Result<Option<Run>> {
        self.next_ticket += 1;
        stage.wait = Some(self.next_ticket);
        if inline {
            self.sync(what)?;
            stage.wait = None;
            stage.data_synced = true;
            return Ok(None);
        }
        // The first barrier of a job syncs the whole file: it makes the data written before
        // the take durable (the checkpoint's data clusters). After it the job's barriers
        // only order its own writes (recorded since the last barrier): the guest's data
        // written meanwhile is not the checkpoint's and waits for the guest's own flush.
        let written = self.io.take_written();
        stage.wait_ranges = match written {
            Some(w) if stage.data_synced => {
                let mut all = stage.wait_ranges.take().unwrap_or_default();
                all.extend(w);
                Some(crate::io::merge_ranges(all))
            }
            _ => None,
        };
        Ok(Some(Run::Barrier(self.next_ticket)))
    }

    /// Work on one job.
    fn run_job(&mut self, job: &mut Job, left: &mut u64, inline: bool) -> Result<Run> {
        // a barrier handed out earlier and not reported done: run it now
        let (Job::Link { stage, .. } | Job::Drop { stage, .. }) = job;
        if let Some(t) = stage.wait {
            if !inline {
                return Ok(Run::Barrier(t));
            }
            self.sync("checkpoint commit barrier")?;
            stage.wait = None;
            stage.wait_ranges = None;
            stage.data_synced = true;
        }
        match job {
            Job::Link { pred, succ, cursor, sub, then, stage } => {
                if let Then::Commit { delete_requested: false, .. } = then {
                    if stage.early < 3 {
                        if let Some(r) = self.commit_prepare(*pred, stage, inline)? {
                            return Ok(r);
                        }
                    }
                }
                // a taken checkpoint abandoned before its commit's preparation: its walk
                // raises counts (given back by the drop that follows) and clears the active
                // tree's COPIED flags in memory with no dirty bit made durable for them
                let unprepared = matches!(then, Then::Commit { delete_requested: true, .. }) && stage.early < 3;
                let (p, s) = (*pred, *succ);
                let n = self.l1_len(p)? as u64;
                if !self.walk(n, cursor, sub, left, |this, i, r| this.link_index(p, s, i, r, unprepared))? {
                    return Ok(Run::Paused);
                }
                if *left == 0 && !stage.begun() {
                    return Ok(Run::Paused);
                }
                match then {
                    Then::Commit { snap, delete_requested } => {
                        if *delete_requested && !stage.begun() {
                            // abandoned before its commit: never publish it, give its
                            // references back after everything that still reads it
                            let Tree::Mem(_) = *pred else {
                                return Err(Error::corrupt("taken checkpoint without an in-memory L1"));
                            };
                            info!(id = %snap.id, name = %snap.name, "abandoned checkpoint: dropping it unpublished");
                            self.jobs.push_back(Job::Drop {
                                what: DropWhat::Abandoned(snap.id.clone()),
                                tree: Some(*pred),
                                cursor: 0,
                                sub: 0,
                                free: vec![],
                                stage: Stage::default(),
                            });
                            return Ok(Run::Finished);
                        }
                        let snap = snap.clone();
                        let r = self.commit_snapshot(*pred, snap, stage, inline)?;
                        if matches!(r, Run::Finished) {
                            *left = left.saturating_sub(EMPTY_PER_UNIT);
                        }
                        Ok(r)
                    }
                    Then::Switch => {
                        *left = left.saturating_sub(EMPTY_PER_UNIT);
                        self.commit_switch()?;
                        Ok(Run::Finished)
                    }
                }
            }
            Job::Drop { what, tree, cursor, sub, free, stage } => {
                if tree.is_none() {
                    let DropWhat::Snapshot(id) = what else {
                        return Err(Error::corrupt("drop job without a tree"));
                    };
                    let id = id.clone();
                    match self.unpublish_snapshot(&id, stage, inline)? {
                        Some((t, f)) => {
                            *tree = Some(t);
                            *free = f;
                            *stage = Stage::default();
                            *left = left.saturating_sub(EMPTY_PER_UNIT);
                        }
                        None => return Ok(Run::Barrier(stage.wait.unwrap_or(0))),
                    }
                }
                let t = tree.ok_or_else(|| Error::corrupt("drop job without a tree"))?;
                let n = self.l1_len(t)? as u64;
                if !self.walk(n, cursor, sub, left, |this, i, r| this.drop_index(t, i, r))? {
                    return Ok(Run::Paused);
                }
                // The tree is durably unpublished (or never was): its decreases reach disk
                // with the next write-back; nothing depends on them being durable.
                // one range at a time, each whole or not at all: a retry after a read
                // error neither repeats nor skips a decrease
                while let Some(&(off, len)) = free.first() {
                    self.free_bytes(off, len)?;
                    free.remove(0);
                }
                if let Tree::Mem(m) = t {
                    self.mem_l1.remove(&m);
                }
                match what {
                    DropWhat::Abandoned(id) => info!(id = %id, "abandoned checkpoint dropped"),
                    _ => info!("checkpoint references dropped"),
                }
                Ok(Run::Finished)
            }
        }
    }
    // ------------------------------------------------------------------ walks

    /// Words of an L2 table as the walks index them (entries, unless extended L2 entries,
    /// whose tables are walked whole) and the chunk of one walk step.
    pub(crate) fn walk_geometry(&self) -> (u64, u64) {
        let words = self.cs / 8;
        let chunk = if self.geom().extended { words } else { self.walk_chunk.clamp(1, words) };
        (words, chunk)
    }

    /// Walk L1 indices `cursor..n` of a job, one chunk of L2 entries per `step(index,
    /// entries)` (which returns whether the tree had an L2 table there; if not, the whole
    /// index is done), from the job's position on, while the budget lasts: a chunk costs a
    /// unit, an empty index 1/`EMPTY_PER_UNIT` of one. Returns false when out of budget.
    fn walk(
        &mut self,
        n: u64,
        cursor: &mut u64,
        sub: &mut u64,
        left: &mut u64,
        mut step: impl FnMut(&mut Self, u64, Range<u64>) -> Result<bool>,
    ) -> Result<bool> {
        let (words, chunk) = self.walk_geometry();
        while *cursor < n {
            if *left == 0 {
                return Ok(false);
            }
            let to = (*sub + chunk).min(words);
            let worked = step(self, *cursor, *sub..to)?;
            if worked && to < words {
                *sub = to;
            } else {
                *cursor += 1;
                *sub = 0;
            }
            *left = left.saturating_sub(if worked { EMPTY_PER_UNIT } else { 1 });
        }
        Ok(true)
    }

    /// Words `r` of a table of `len` words, clipped to it.
    fn clip(r: &Range<u64>, len: usize) -> Range<usize> {
        r.start.min(len as u64) as usize..r.end.min(len as u64) as usize
    }

    /// Words `r` of the L2 table at `off` (clipped to the table).
    fn l2_words(&mut self, off: u64, r: &Range<u64>) -> Result<Vec<u64>> {
        self.load_l2(off)?;
        let t = self
            .l2_cache
            .get(&off)
            .ok_or_else(|| Error::corrupt(format!("L2 table at {off:#x} vanished from cache")))?;
        Ok(t.get(Self::clip(r, t.len())).map(<[u64]>::to_vec).unwrap_or_default())
    }

    /// Cluster references of one L2 entry.
    fn push_refs(c: Cluster, cs: u64, v: &mut Vec<u64>) {
        match c {
            Cluster::Normal { host, .. } => v.push(host / cs),
            Cluster::Compressed { offset, len } => {
                for c in offset / cs..=(offset + len.max(1) - 1) / cs {
                    v.push(c);
                }
            }
            _ => {}
        }
    }

    /// References shared by `pred` and `succ` at L1 index `i`, L2 entries `r` (same L2
    /// table: those entries, and the table itself if `table`; different tables: the
    /// entries at equal positions with equal clusters). The bool says whether the L2 table
    /// itself is shared.
    pub(crate) fn shares_at(
        &mut self,
        pred: Tree,
        succ: Tree,
        i: u64,
        r: Range<u64>,
        table: bool,
    ) -> Result<Option<(Vec<u64>, bool)>> {
        let cs = self.cs;
        let fe = self.l1_entry(pred, i)?;
        let tf = l1_to_l2(fe, cs, &|| format!("{pred:?} L1 entry {i}"))?;
        if tf == 0 {
            return Ok(None);
        }
        let se = if (i as usize) < self.l1_len(succ)? { self.l1_entry(succ, i)? } else { 0 };
        let ts = l1_to_l2(se, cs, &|| format!("{succ:?} L1 entry {i}"))?;
        let geom = self.geom();
        let mut v = Vec::new();
        let ft = self.l2_words(tf, &r)?;
        if ts == tf {
            v.reserve(ft.len() + 1);
            if table {
                v.push(tf / cs);
            }
            for (k, w) in ft.iter().enumerate() {
                if *w & !COPIED == 0 {
                    continue;
                }
                let j = r.start + k as u64;
                Self::push_refs(geom.classify(*w, 0, &|| format!("L2 table at {tf:#x} entry {j}"))?, cs, &mut v);
            }
            return Ok(Some((v, true)));
        }
        if ts != 0 {
            let st = self.l2_words(ts, &r)?;
            for (k, (a, b)) in ft.iter().zip(st.iter()).enumerate() {
                if *a & !COPIED == 0 {
                    continue;
                }
                let j = r.start + k as u64;
                let ca = geom.classify(*a, 0, &|| format!("L2 table at {tf:#x} entry {j}"))?;
                let same = match ca {
                    Cluster::Normal { host, .. } => {
                        b & crate::l2::OFFSET_MASK == host && b & crate::l2::COMPRESSED == 0
                    }
                    Cluster::Compressed { .. } => *a & !COPIED == *b & !COPIED,
                    _ => false,
                };
                if same {
                    Self::push_refs(ca, cs, &mut v);
                }
            }
        }
        Ok(Some((v, false)))
    }

    /// One link step: add the references `pred` and `succ` share at index `i`, entries `r`
    /// (and the shared table's own with the chunk at entry 0: from then on the active
    /// tree's copy-on-write of it is an ordinary one). `leaks`: no commit preparation made
    /// the dirty bit durable for these counts (an abandoned checkpoint's walk): they open a
    /// leak window like a hand-over, so the dirty bit is durable before they reach disk
    /// ([`Qcow2::dirty_before_leaks`]).
    fn link_index(&mut self, pred: Tree, succ: Tree, i: u64, r: Range<u64>, leaks: bool) -> Result<bool> {
        let table = r.start == 0;
        let Some((v, table_shared)) = self.shares_at(pred, succ, i, r.clone(), table)? else { return Ok(false) };
        let deltas = merge(v);
        self.prefetch_step(&deltas, Some((i, r.clone())))?;
        self.check_deltas(&deltas, true)?;
        if leaks && !deltas.is_empty() {
            self.leak_window = true;
        }
        self.apply_deltas_unchecked(&deltas, true)?;
        self.fix_copied_index(i, r, table_shared && succ == Tree::Active)?;
        Ok(true)
    }

    /// References of `tree` at index `i`, entries `r` (and the table itself if `table`).
    fn refs_at(&mut self, tree: Tree, i: u64, r: Range<u64>, table: bool) -> Result<Option<Vec<u64>>> {
        Ok(self.shares_at(tree, tree, i, r, table)?.map(|(v, _)| v))
    }

    /// One drop step: give back the references of `tree` at index `i`, entries `r` (the
    /// tree is durably unpublished, so the decrease may reach disk at any time), and the
    /// table's own with the last chunk: a table freed earlier could be reallocated and
    /// overwritten while the walk still reads it.
    fn drop_index(&mut self, tree: Tree, i: u64, r: Range<u64>) -> Result<bool> {
        let table = r.end >= self.walk_geometry().0;
        let Some(v) = self.refs_at(tree, i, r.clone(), table)? else { return Ok(false) };
        let deltas = merge(v);
        self.prefetch_step(&deltas, Some((i, r.clone())))?;
        self.check_deltas(&deltas, false)?;
        self.apply_deltas_unchecked(&deltas, false)?;
        self.fix_copied_index(i, r, false)?;
        Ok(true)
    }

    /// Load, with eviction held off, everything a walk step (or a freed range) reads once it
    /// starts changing counts: the refcount blocks of `deltas` and, for L1 index `i`, what
    /// [`Qcow2::fix_copied_index`] reads (the active L2 table there and the refcount blocks
    /// of the clusters its entries `r` point to). A read error therefore leaves the step undone, and
    /// the step itself then runs on the cache only: it cannot fail half-applied, so a retry
    /// never applies its counts twice.
    fn prefetch_step(&mut self, deltas: &[(u64, u64)], i: Option<(u64, Range<u64>)>) -> Result<()> {
        self.hold_cache = true;
        let r = self.prefetch_inner(deltas, i);
        self.hold_cache = false;
        r
    }

    /// The active L1 entry `i` and the L2 table it points to, or `None` when there is none
    /// to look at (extended L2 entries, an index past the L1 table, an unallocated entry).
    fn active_l2_of(&mut self, i: u64) -> Result<Option<(u64, u64)>> {
        if self.geom().extended || i as usize >= self.l1.len() {
            return Ok(None);
        }
        let e = self.l1_entry(Tree::Active, i)?;
        let l2 = l1_to_l2(e, self.cs, &|| format!("active L1 entry {i}"))?;
        Ok((l2 != 0).then_some((e, l2)))
    }

    fn prefetch_inner(&mut self, deltas: &[(u64, u64)], i: Option<(u64, Range<u64>)>) -> Result<()> {
        self.load_refblocks_of(deltas.iter().map(|d| d.0))?;
        let cs = self.cs;
        let geom = self.geom();
        let Some((i, r)) = i else { return Ok(()) };
        let Some((_, l2)) = self.active_l2_of(i)? else { return Ok(()) };
        self.refcount(l2 / cs)?;
        let t = self.l2_words(l2, &r)?;
        // each entry in order, like refcount() of its cluster, one block lookup per run
        let e = self.rb_entries();
        let mut last = None;
        for (k, w) in t.iter().enumerate() {
            let j = r.start + k as u64;
            if let Cluster::Normal { host, .. } = geom.classify(*w, 0, &|| format!("L2 table at {l2:#x} entry {j}"))? {
                let idx = host / cs;
                if last != Some(idx / e) {
                    last = Some(idx / e);
                    self.load_refblocks_of([idx])?;
                }
            }
        }
        Ok(())
    }

    /// Set COPIED in the active L1 entry `i` and entries `r` of its L2 table exactly where
    /// the refcount is 1. `all_shared`: every entry in `r` just gained a reference (clear
    /// them all).
    pub(crate) fn fix_copied_index(&mut self, i: u64, r: Range<u64>, all_shared: bool) -> Result<()> {
        let cs = self.cs;
        let geom = self.geom();
        let Some((e, l2)) = self.active_l2_of(i)? else { return Ok(()) };
        let want = if self.refcount(l2 / cs)? == 1 { l2 | COPIED } else { l2 };
        if want != e {
            self.set_l1(i, want);
        }
        self.load_l2(l2)?;
        if all_shared {
            if let Some(t) = self.l2_cache.get_mut(&l2) {
                let mut changed = false;
                let range = Self::clip(&r, t.len());
                for w in t.get_mut(range).unwrap_or_default() {
                    if *w & COPIED != 0 {
                        *w &= !COPIED;
                        changed = true;
                    }
                }
                if changed {
                    self.l2_dirty.insert(l2);
                }
            }
            return Ok(());
        }
        // Every entry asks for its cluster's count (the walk's path once the guest has
        // copied the table): one refcount block lookup per run of entries in the same
        // block, then the changed entries set together.
        let t = self.l2_words(l2, &r)?;
        let mut hosts = Vec::with_capacity(t.len());
        for (k, w) in t.iter().enumerate() {
            let j = r.start + k as u64;
            if let Cluster::Normal { host, .. } = geom.classify(*w, 0, &|| format!("L2 table at {l2:#x} entry {j}"))? {
                hosts.push((k, host / cs));
            }
        }
        let mut changes = Vec::new();
        self.each_refcount(
            &hosts,
            |h| h.1,
            |&(k, _), rc| {
                let w = t[k];
                let nv = if rc == 1 { w | COPIED } else { w & !COPIED };
                if nv != w {
                    changes.push((r.start as usize + k, nv));
                }
                Ok(())
            },
        )?;
        if !changes.is_empty() {
            self.load_l2(l2)?;
            if let Some(tb) = self.l2_cache.get_mut(&l2) {
                for (j, nv) in changes {
                    if let Some(slot) = tb.get_mut(j) {
                        *slot = nv;
                    }
                }
            }
            self.l2_dirty.insert(l2);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ commits

    /// Drop one reference of every cluster of a byte range, all or none (the refcount
    /// blocks are loaded first: a read error changes nothing).
    fn free_bytes(&mut self, off: u64, bytes: u64) -> Result<()> {
        if bytes == 0 || off == 0 {
            return Ok(());
        }
        let range: Vec<(u64, u64)> = (off / self.cs..=(off + bytes - 1) / self.cs).map(|c| (c, 1)).collect();
        self.prefetch_step(&range, None)?;
        for c in off / self.cs..=(off + bytes - 1) / self.cs {
            self.add_refcount(c, -1)?;
        }
        Ok(())
    }

    /// Does `tree` point at any L2 table?
    fn has_l2(&mut self, tree: Tree) -> Result<bool> {
        let cs = self.cs;
        for i in 0..self.l1_len(tree)? as u64 {
            let e = self.l1_entry(tree, i)?;
            if l1_to_l2(e, cs, &|| format!("{tree:?} L1 entry {i}"))? != 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Dirty cached L2 tables of `tree` (offsets).
    fn dirty_l2_of(&mut self, tree: Tree) -> Result<Vec<u64>> {
        if self.l2_dirty.is_empty() {
            return Ok(Vec::new());
        }
        let cs = self.cs;
        let mut out = Vec::new();
        for i in 0..self.l1_len(tree)? as u64 {
            let e = self.l1_entry(tree, i)?;
            let t = l1_to_l2(e, cs, &|| format!("{tree:?} L1 entry {i}"))?;
            if t != 0 && self.l2_dirty.contains(&t) {
                out.push(t);
            }
        }
        Ok(out)
    }

    /// Write (or rewrite, on a retry) the new snapshot table of a staged switch.
    fn stage_table(&mut self, stage: &mut Stage, snaps: Vec<Snapshot>) -> Result<()> {
        match &stage.table {
            Some((off, _, snaps)) if *off != 0 => {
                let (off, tb) = (*off, crate::snapshot::build_table(snaps));
                self.write_bytes(&tb, off, "snapshot table")
            }
            Some(_) => Ok(()),
            None => {
                let (off, len) = self.write_new_table(&snaps)?;
                stage.table = Some((off, len, snaps));
                Ok(())
            }
        }
    }

    /// Before a commit's walk (right after the take, while little has been written since):
    /// make the frozen tree's own state durable, so the commit itself depends on nothing
    /// but its own writes. The refcounts and the dirty bit (the walk is about to make the
    /// active tree's on-disk COPIED flags stale, see the module docs), a barrier (which also
    /// covers the data written before the take), then the frozen tree's L2 tables that were
    /// not written back yet. After this the frozen tables only change by COPIED flags (the
    /// walk), which the active tree's own write-back carries: no barrier before the commit
    /// depends on them; the dirty bit stays set until that write-back is durable.
    fn commit_prepare(&mut self, pred: Tree, st: &mut Stage, inline: bool) -> Result<Option<Run>> {
        let cs = self.cs;
        let mut dirty_unsynced = false;
        if st.early == 0 && !st.dirty_done {
            // The walk will raise the counts of what the frozen tree shares and clear the
            // active tree's COPIED flags on those clusters, in memory only: on disk the
            // flags stay set until the active tree is written back, after the commit. The
            // dirty bit is durable before any raised count can be (before the walk, on
            // every path), so neither our open nor QEMU's trusts such a flag after a crash;
            // it also covers the counts that guest writes hand over. Counts already raised
            // by hand-overs (refcount 2 on a cluster the on-disk active tree still marks
            // COPIED) wait in the dirty refcount blocks written below: then the bit gets a
            // barrier of its own first.
            if self.has_l2(pred)? && self.h.incompatible & INCOMPAT_DIRTY == 0 {
                self.write_incompat(self.h.incompatible | INCOMPAT_DIRTY)?;
                self.dirty_set_by_us = true;
                st.dirty_done = true;
                dirty_unsynced = true;
                if self.leak_window {
                    dirty_unsynced = false;
                    if let Some(r) = self.barrier(st, inline, "dirty bit before the refcounts of a checkpoint")? {
                        return Ok(Some(r));
                    }
                }
            }
            st.dirty_done = true;
        }
        if st.early == 0 {
            let mut need = dirty_unsynced || !self.dirty_l2_of(pred)?.is_empty();
            st.rt = self.write_refblocks_only()?;
            need |= !st.rt.is_empty();
            st.early = 1;
            if need {
                if let Some(r) = self.barrier(st, inline, "checkpoint data and refcounts before its L2 tables")? {
                    return Ok(Some(r));
                }
            }
        }
        if st.early == 1 {
            st.early = 2;
            if !st.rt.is_empty() {
                let rt = std::mem::take(&mut st.rt);
                self.write_reftable_entries(&rt)?;
                if !self.dirty_l2_of(pred)?.is_empty() {
                    if let Some(r) = self.barrier(st, inline, "new refcount blocks before checkpoint L2 tables")? {
                        return Ok(Some(r));
                    }
                }
            }
        }
        for off in self.dirty_l2_of(pred)? {
            let Some(t) = self.l2_cache.get(&off) else { continue };
            let mut b = vec![0u8; cs as usize];
            for (i, w) in t.iter().enumerate() {
                put_be64(&mut b, i * 8, *w);
            }
            self.write_bytes(&b, off, "checkpoint L2 table")?;
            self.l2_dirty.remove(&off);
        }
        st.early = 3;
        Ok(None)
    }

    /// Publish a taken checkpoint, staged (see [`Stage`]; [`Qcow2::commit_prepare`] ran
    /// before the walk); the barriers sit between steps:
    /// 0. if guest writes handed counts over and the dirty bit is not set yet, the dirty
    ///    bit (barrier), so a crash that leaks them is repaired on open;
    /// 1. the checkpoint's L1 copy, the new snapshot table and the refcounts (the walk's
    ///    increases, the hand-overs, both allocations) (barrier);
    /// 2. only if step 1 wrote new refcount blocks: their reftable entries (barrier);
    /// 3. the 12-byte header commit (barrier): the checkpoint is durable;
    /// 4. adopt the table in memory; the old one is freed with the next write-back (this
    ///    step cannot fail, so it is never retried on a half-adopted state).
    ///
    /// It never needs the active tree written back: a guest write that drops a pointer the
    /// frozen tree shares gives the frozen tree its own count first ([`Qcow2::hand_over`]),
    /// so a stale pointer on disk stays counted. Guest writes never change the frozen tree
    /// (shared clusters are copied on write), and nothing else changes the snapshot table
    /// while this job is at the front of the queue.
    fn commit_snapshot(&mut self, pred: Tree, mut snap: Snapshot, st: &mut Stage, inline: bool) -> Result<Run> {
        let cs = self.cs;
        let Tree::Mem(m) = pred else { return Err(Error::corrupt("taken checkpoint without an in-memory L1")) };
        loop {
            match st.step {
                0 => {
                    st.step = 1;
                    if let Some(r) = self.dirty_stage(st, inline, "dirty bit before leaking refcounts")? {
                        return Ok(r);
                    }
                }
                1 => {
                    let l1 = self.mem_l1.get(&m).cloned().unwrap_or_default();
                    let bytes = Self::l1_bytes(&l1, true);
                    if !bytes.is_empty() {
                        if st.l1.0 == 0 {
                            st.l1 = (self.alloc_clusters((bytes.len() as u64).div_ceil(cs))?, bytes.len() as u64);
                        }
                        self.write_bytes(&bytes, st.l1.0, "snapshot L1 table")?;
                    }
                    snap.l1_offset = st.l1.0;
                    snap.l1_size = l1.len() as u32;
                    let mut snaps = self.snapshots.clone();
                    snaps.push(snap.clone());
                    self.stage_table(st, snaps)?;
                    st.rt = self.write_refblocks_only()?;
                    st.step = if st.rt.is_empty() { 3 } else { 2 };
                    if let Some(r) = self.barrier(st, inline, "checkpoint refcounts")? {
                        return Ok(r);
                    }
                }
                2 => {
                    let rt = std::mem::take(&mut st.rt);
                    self.write_reftable_entries(&rt)?;
                    st.step = 3;
                    if let Some(r) = self.barrier(st, inline, "new refcount blocks")? {
                        return Ok(r);
                    }
                }
                3 => {
                    let (off, n) = st.table.as_ref().map(|t| (t.0, t.2.len() as u32)).unwrap_or((0, 0));
                    self.write_table_commit(n, off)?;
                    st.step = 4;
                    if let Some(r) = self.barrier(st, inline, "snapshot table commit")? {
                        return Ok(r);
                    }
                }
                _ => {
                    // Nothing here may fail: the header commit is durable, and a retry of
                    // this step would find the staged table already taken. The old table's
                    // clusters lose their reference at the next write-back (the header
                    // that stopped pointing at them is durable already).
                    let (t_off, t_len, snaps) = st.table.take().unwrap_or_default();
                    let (old_off, old_len) = self.adopt_table(snaps, t_off, t_len);
                    let l1 = self.mem_l1.remove(&m).unwrap_or_default();
                    let off = st.l1.0;
                    self.snap_l1.insert(off, l1);
                    // later jobs that name this tree by its memory id find it in the table now
                    self.rename_tree(Tree::Mem(m), Tree::Snap(off));
                    if old_off != 0 && old_len != 0 {
                        self.pending_free.push((old_off, old_len));
                    }
                    info!(id = %snap.id, name = %snap.name, "checkpoint durable");
                    return Ok(Run::Finished);
                }
            }
        }
    }

    fn rename_tree(&mut self, from: Tree, to: Tree) {
        for j in self.jobs.iter_mut() {
            match j {
                Job::Link { pred, succ, .. } => {
                    if *pred == from {
                        *pred = to;
                    }
                    if *succ == from {
                        *succ = to;
                    }
                }
                Job::Drop { tree: Some(t), .. } if *t == from => *t = to,
                _ => {}
            }
        }
    }

    /// Publish the active L1 after a revert switch: new location, flushed, header switch.
    fn commit_switch(&mut self) -> Result<()> {
        let cs = self.cs;
        self.writeback()?; // includes the old tree's last L1 changes
        self.old_l1_dirty = None;
        let bytes = Self::l1_bytes(&self.l1, false);
        let new_off = if bytes.is_empty() { 0 } else { self.alloc_clusters((bytes.len() as u64).div_ceil(cs))? };
        if new_off != 0 {
            self.write_bytes(&bytes, new_off, "new active L1 table")?;
        }
        self.write_dirty_refblocks()?;
        self.sync("revert: new tree references")?;
        let mut hb = [0u8; 24];
        put_be64(&mut hb, 0, self.h.size);
        put_be32(&mut hb, 8, 0);
        put_be32(&mut hb, 12, self.l1.len() as u32);
        put_be64(&mut hb, 16, new_off);
        self.write_bytes(&hb, header::OFF_SIZE, "header L1 fields")?;
        self.sync("revert commit")?;
        self.h.l1_size = self.l1.len() as u32;
        self.h.l1_table_offset = new_off;
        self.l1_unpublished = false;
        self.l1_dirty.clear();
        info!("revert durable");
        Ok(())
    }

    /// Remove a published checkpoint from the table, staged like a commit: the new table
    /// and its refcounts (barrier), the reftable entries of new refcount blocks if any
    /// (barrier), the 12-byte header commit (barrier), then adopt it.
    /// Returns its tree (moved to memory) and the ranges to free once its references are
    /// given back, or `None` while a barrier handed out is pending.
    fn unpublish_snapshot(&mut self, id: &str, st: &mut Stage, inline: bool) -> Result<Option<Unpublished>> {
        let sn = self
            .snapshots
            .iter()
            .find(|s| s.id == id)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("checkpoint id {id} to delete")))?;
        loop {
            match st.step {
                0 => {
                    // the refcount blocks written below carry whatever guest writes handed
                    // over to a checkpoint queued after this deletion
                    if self.dirty_stage(st, inline, "delete: dirty bit before leaking refcounts")?.is_some() {
                        return Ok(None);
                    }
                    self.load_snap_l1(sn.l1_offset)?;
                    let snaps: Vec<Snapshot> = self.snapshots.iter().filter(|s| s.id != id).cloned().collect();
                    self.stage_table(st, snaps)?;
                    st.rt = self.write_refblocks_only()?;
                    st.step = if st.rt.is_empty() { 2 } else { 1 };
                    if self.barrier(st, inline, "delete: new snapshot table")?.is_some() {
                        return Ok(None);
                    }
                }
                1 => {
                    let rt = std::mem::take(&mut st.rt);
                    self.write_reftable_entries(&rt)?;
                    st.step = 2;
                    if self.barrier(st, inline, "delete: new refcount blocks")?.is_some() {
                        return Ok(None);
                    }
                }
                2 => {
                    let (off, n) = st.table.as_ref().map(|t| (t.0, t.2.len() as u32)).unwrap_or((0, 0));
                    self.write_table_commit(n, off)?;
                    st.step = 3;
                    if self.barrier(st, inline, "delete: snapshot table commit")?.is_some() {
                        return Ok(None);
                    }
                }
                _ => {
                    self.load_snap_l1(sn.l1_offset)?;
                    let l1 = self.snap_l1.remove(&sn.l1_offset).unwrap_or_default();
                    let (t_off, t_len, snaps) = st.table.take().unwrap_or_default();
                    let (old_off, old_len) = self.adopt_table(snaps, t_off, t_len);
                    let m = self.new_mem(l1);
                    self.rename_tree(Tree::Snap(sn.l1_offset), Tree::Mem(m));
                    info!(id = %sn.id, name = %sn.name, "checkpoint removed from the table");
                    return Ok(Some((
                        Tree::Mem(m),
                        vec![(sn.l1_offset, u64::from(sn.l1_size) * 8), (old_off, old_len)],
                    )));
                }
            }
        }
    }

    /// Undo a take whose walk failed (refcount overflow, corrupt table) before its commit,
    /// when nothing else happened since the take: the job must be the only one.
    pub(crate) fn abort_only_take(&mut self) -> Result<()> {
        let (pred, cursor, sub) = match self.jobs.front() {
            Some(Job::Link { pred, succ: Tree::Active, cursor, sub, then: Then::Commit { .. }, .. })
                if self.jobs.len() == 1 =>
            {
                (*pred, *cursor, *sub)
            }
            _ => return Err(Error::invalid("no single pending take to abort")),
        };
        let (words, _) = self.walk_geometry();
        for i in 0..=cursor {
            let to = if i < cursor { words } else { sub };
            if to == 0 {
                continue;
            }
            if let Some((v, _)) = self.shares_at(pred, Tree::Active, i, 0..to, true)? {
                let deltas = merge(v);
                self.apply_deltas_unchecked(&deltas, false)?;
                self.fix_copied_index(i, 0..to, false)?;
            }
        }
        self.jobs.clear();
        self.mem_l1.clear();
        self.fresh = OffSet::default();
        if self.dirty_set_by_us {
            // the dirty bit set before the walk: clear it once the undone state is on disk
            self.writeback()?;
            self.sync("undone checkpoint")?;
            self.clear_dirty_if_written_back()?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ accounting check

    /// Test hook: verify the in-memory accounting invariant exactly (refcount = references
    /// of every live tree − uncounted shares of queued links + deferred decreases), and that
    /// every non-fresh cluster of the active tree ahead of its link's cursor is shared with
    /// the link's `pred` at the same position. Returns the mismatches (empty = good).
    #[doc(hidden)]
    pub fn verify_accounting(&mut self) -> Result<Vec<String>> {
        let cs = self.cs;
        let mut exp: HashMap<u64, i64> = HashMap::new();
        let add = |exp: &mut HashMap<u64, i64>, off: u64, bytes: u64, d: i64| {
            if bytes == 0 {
                return;
            }
            for c in off / cs..=(off + bytes - 1) / cs {
                *exp.entry(c).or_default() += d;
            }
        };
        add(&mut exp, 0, cs, 1);
        add(&mut exp, self.h.refcount_table_offset, u64::from(self.h.refcount_table_clusters) * cs, 1);
        let mut rbs = HashSet::new();
        for rt in 0..self.reftable.len() as u64 {
            let o = self.refblock_offset(rt)?;
            if o != 0 && rbs.insert(o) {
                add(&mut exp, o, cs, 1);
            }
        }
        if !self.l1_unpublished && self.h.l1_size > 0 {
            add(&mut exp, self.h.l1_table_offset, u64::from(self.h.l1_size) * 8, 1);
        }
        add(&mut exp, self.h.snapshots_offset, self.snapshot_table_bytes, 1);
        // clusters of split writes not finished yet (see `Qcow2::cow_plan`)
        for c in &self.cow_inflight {
            *exp.entry(*c).or_default() += 1;
        }
        let (words, _) = self.walk_geometry();
        // the references of tree `t` from position `from` (L1 index, L2 entry) on, with
        // every table's own (a drop gives it back with its last chunk)
        let count_tree =
            |this: &mut Qcow2, exp: &mut HashMap<u64, i64>, t: Tree, from: (u64, u64), d: i64| -> Result<()> {
                let n = this.l1_len(t)? as u64;
                for i in from.0..n {
                    let j = if i == from.0 { from.1 } else { 0 };
                    if let Some(v) = this.refs_at(t, i, j..words, true)? {
                        for c in v {
                            *exp.entry(c).or_default() += d;
                        }
                    }
                }
                Ok(())
            };
        count_tree(self, &mut exp, Tree::Active, (0, 0), 1)?;
        for s in self.snapshots.clone() {
            add(&mut exp, s.l1_offset, u64::from(s.l1_size) * 8, 1);
            count_tree(self, &mut exp, Tree::Snap(s.l1_offset), (0, 0), 1)?;
        }
        let jobs: Vec<Job> = self.jobs.iter().cloned().collect();
        let mut errs = Vec::new();
        for j in &jobs {
            match j {
                Job::Link { pred, succ, cursor, sub, then, stage } => {
                    if let Some((o, b, _)) = &stage.table {
                        add(&mut exp, *o, *b, 1);
                    }
                    add(&mut exp, stage.l1.0, stage.l1.1, 1);
                    if let Then::Commit { .. } = then {
                        count_tree(self, &mut exp, *pred, (0, 0), 1)?;
                    }
                    let n = self.l1_len(*pred)? as u64;
                    for i in *cursor..n {
                        let j = if i == *cursor { *sub } else { 0 };
                        if let Some((v, _)) = self.shares_at(*pred, *succ, i, j..words, j == 0)? {
                            for c in v {
                                *exp.entry(c).or_default() -= 1;
                            }
                        }
                    }
                    if *succ == Tree::Active {
                        self.verify_fresh(*pred, (*cursor, *sub), &mut errs)?;
                    }
                }
                Job::Drop { tree: Some(t), cursor, sub, free, .. } => {
                    count_tree(self, &mut exp, *t, (*cursor, *sub), 1)?;
                    // (a drop with a tree has no staged table: it was adopted)
                    for (o, b) in free {
                        add(&mut exp, *o, *b, 1);
                    }
                }
                Job::Drop { stage, .. } => {
                    if let Some((o, b, _)) = &stage.table {
                        add(&mut exp, *o, *b, 1);
                    }
                }
            }
        }
        for (o, b) in self.pending_free.clone() {
            add(&mut exp, o, b, 1);
        }
        let end = self.end_cluster()?.max(exp.keys().max().map_or(0, |m| m + 1));
        for c in 0..end {
            let want = exp.get(&c).copied().unwrap_or(0);
            let have = self.refcount(c)? as i64;
            if want != have && errs.len() < 50 {
                errs.push(format!("cluster {c} (offset {:#x}): refcount {have}, expected {want}", c * cs));
            }
        }
        Ok(errs)
    }

    fn verify_fresh(&mut self, pred: Tree, (cursor, sub): (u64, u64), errs: &mut Vec<String>) -> Result<()> {
        let cs = self.cs;
        let geom = self.geom();
        for i in cursor..self.l1.len() as u64 {
            let e = self.l1_entry(Tree::Active, i)?;
            let ta = l1_to_l2(e, cs, &|| String::new())?;
            if ta == 0 {
                continue;
            }
            let pe = if (i as usize) < self.l1_len(pred)? { self.l1_entry(pred, i)? } else { 0 };
            let tp = l1_to_l2(pe, cs, &|| String::new())?;
            if !self.fresh.contains(&(ta / cs)) && ta != tp {
                errs.push(format!("active L2 table {ta:#x} at index {i} is not fresh but not shared with {pred:?}"));
            }
            let at = self.l2_table(ta)?;
            let pt = if tp != 0 { self.l2_table(tp)? } else { vec![] };
            for (j, w) in at.iter().enumerate() {
                if i == cursor && (j as u64) < sub {
                    continue; // walked: counted apart
                }
                if let Cluster::Normal { host, .. } = geom.classify(*w, 0, &String::new)? {
                    let p = pt.get(j).copied().unwrap_or(0);
                    if !self.fresh.contains(&(host / cs)) && p & crate::l2::OFFSET_MASK != host {
                        errs.push(format!(
                            "active cluster {host:#x} at ({i},{j}) is not fresh but not shared with {pred:?}"
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
