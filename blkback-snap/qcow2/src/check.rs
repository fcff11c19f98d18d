//! Consistency check and repair: count every reference from the header, all L1 tables
//! (active and snapshots), L2 tables, data, the snapshot table and the refcount structure,
//! then compare with the stored refcounts and the COPIED flags of the active tree.

use crate::error::{Error, Result};
use crate::header::{self, put_be32, put_be64, INCOMPAT_CORRUPT};
use crate::image::{Qcow2, Tree};
use crate::l2::{l1_to_l2, Cluster, COPIED};
use crate::refcount::rb_set;
use serde::Serialize;
use tracing::{info, warn};

/// Result of [`Qcow2::check`] / [`Qcow2::repair`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    /// Human readable findings (each names the table/cluster and offset).
    pub errors: Vec<String>,
    /// Clusters whose refcount is larger than their number of references.
    pub leaks: u64,
    /// Refcounts smaller than the references, and structural errors.
    pub corruptions: u64,
    /// COPIED flags of the active tree that disagree with refcount == 1.
    pub copied_flag_errors: u64,
    /// Clusters used as two different kinds of metadata/data.
    pub overlaps: u64,
    /// Clusters in use (refcount > 0 after the operation).
    pub allocated_clusters: u64,
    /// End of the last referenced cluster.
    pub image_end_offset: u64,
    /// Repair only: what was fixed.
    pub leaks_fixed: u64,
    pub corruptions_fixed: u64,
    pub copied_flags_fixed: u64,
    pub rebuilt_refcount_structure: bool,
    /// Repair only: findings left after repair (should be empty).
    pub remaining_errors: Vec<String>,
}

impl CheckReport {
    /// No errors, no leaks, no refcount or COPIED mismatches.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
            && self.leaks == 0
            && self.corruptions == 0
            && self.copied_flag_errors == 0
            && self.overlaps == 0
    }
}

/// Keep at most this many messages (the counters keep counting).
const MAX_MESSAGES: usize = 1000;

fn note(rep: &mut CheckReport, msg: String) {
    if rep.errors.len() < MAX_MESSAGES {
        rep.errors.push(msg);
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    None,
    Header,
    L1,
    L2,
    Data,
    Compressed,
    SnapTable,
    Reftable,
    Refblock,
}

struct Counter {
    cs: u64,
    refs: Vec<u64>,
    kinds: Vec<Kind>,
    nclusters: u64,
}

impl Counter {
    fn inc(&mut self, rep: &mut CheckReport, off: u64, len: u64, kind: Kind, what: &str) {
        if len == 0 {
            return;
        }
        let first = off / self.cs;
        let last = (off + len - 1) / self.cs;
        for c in first..=last {
            let Some(r) = self.refs.get_mut(c as usize) else {
                rep.corruptions += 1;
                note(rep, format!("ERROR {what} at {off:#x}: cluster {:#x} is past the end of the image", c * self.cs));
                return;
            };
            *r += 1;
            if let Some(k) = self.kinds.get_mut(c as usize) {
                if *k == Kind::None {
                    *k = kind;
                } else if *k != kind {
                    rep.overlaps += 1;
                    note(
                        rep,
                        format!("ERROR overlap: cluster {:#x} is used as {k:?} and as {kind:?} ({what})", c * self.cs),
                    );
                }
            }
        }
    }
}

impl Qcow2 {
    fn walk_tree(&mut self, tree: Tree, ctr: &mut Counter, rep: &mut CheckReport, check_copied: bool) -> Result<()> {
        let cs = self.cs;
        let n = match self.l1_len(tree) {
            Ok(n) => n,
            Err(e) => {
                rep.corruptions += 1;
                note(rep, format!("ERROR cannot read {tree:?} L1 table: {e}"));
                return Ok(());
            }
        };
        let geom = self.geom();
        let step = if geom.extended { 2 } else { 1 };
        let mut seen = std::collections::HashSet::new();
        for i in 0..n as u64 {
            let e = self.l1_entry(tree, i)?;
            let l2 = match l1_to_l2(e, cs, &|| format!("{tree:?} L1 entry {i}")) {
                Ok(0) => continue,
                Ok(o) => o,
                Err(er) => {
                    rep.corruptions += 1;
                    note(rep, format!("ERROR {er}"));
                    continue;
                }
            };
            ctr.inc(rep, l2, cs, Kind::L2, &format!("L2 table ({tree:?} L1 entry {i})"));
            if !seen.insert(l2) {
                rep.corruptions += 1;
                note(rep, format!("ERROR {tree:?} L1 entry {i}: L2 table at {l2:#x} is already used by another entry of the same L1 table"));
                continue;
            }
            if check_copied {
                let rc = self.refcount(l2 / cs).unwrap_or(0);
                if (e & COPIED != 0) != (rc == 1) {
                    rep.copied_flag_errors += 1;
                    note(rep, format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:#x} refcount={rc}"));
                }
            }
            if let Err(er) = self.load_l2(l2) {
                rep.corruptions += 1;
                note(rep, format!("ERROR {er}"));
                continue;
            }
            let t = self.l2_table(l2)?;
            for (j, w) in t.iter().step_by(step).enumerate() {
                let bm = if step == 2 { t.get(j * 2 + 1).copied().unwrap_or(0) } else { 0 };
                match geom.classify(*w, bm, &|| format!("L2 table at {l2:#x} entry {j}")) {
                    Err(er) => {
                        rep.corruptions += 1;
                        note(rep, format!("ERROR {er}"));
                    }
                    Ok(Cluster::Normal { host, copied, .. }) => {
                        ctr.inc(rep, host, cs, Kind::Data, &format!("data cluster (L2 {l2:#x} entry {j})"));
                        if check_copied {
                            let rc = self.refcount(host / cs).unwrap_or(0);
                            if copied != (rc == 1) {
                                rep.copied_flag_errors += 1;
                                note(rep, format!(
                                    "ERROR OFLAG_COPIED data cluster: l2_entry={w:#x} (L2 {l2:#x} entry {j}) refcount={rc}"
                                ));
                            }
                        }
                    }
                    Ok(Cluster::Compressed { offset, len }) => {
                        let start = offset & !511;
                        let end = offset + len;
                        ctr.inc(
                            rep,
                            start,
                            end - start,
                            Kind::Compressed,
                            &format!("compressed cluster (L2 {l2:#x} entry {j})"),
                        );
                    }
                    Ok(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Count all references. `with_refcount_structure`: include the reftable and refblocks.
    fn count_refs(&mut self, rep: &mut CheckReport, with_rc: bool) -> Result<Counter> {
        let cs = self.cs;
        let flen = self.file_len()?;
        let nclusters = flen.div_ceil(cs);
        let mut ctr =
            Counter { cs, refs: vec![0; nclusters as usize], kinds: vec![Kind::None; nclusters as usize], nclusters };
        ctr.inc(rep, 0, cs, Kind::Header, "header");
        ctr.inc(rep, self.h.l1_table_offset, u64::from(self.h.l1_size) * 8, Kind::L1, "active L1 table");
        self.walk_tree(Tree::Active, &mut ctr, rep, true)?;
        let snaps = self.snapshots.clone();
        for s in &snaps {
            ctr.inc(rep, s.l1_offset, u64::from(s.l1_size) * 8, Kind::L1, &format!("snapshot {} L1 table", s.id));
            if s.l1_size > 0 {
                self.walk_tree(Tree::Snap(s.l1_offset), &mut ctr, rep, false)?;
            }
            if self.h.version >= 3 && s.extra.len() < 16 {
                note(
                    rep,
                    format!("ERROR snapshot table entry {} is incomplete (extra data {} bytes)", s.id, s.extra.len()),
                );
                rep.corruptions += 1;
            }
        }
        ctr.inc(rep, self.h.snapshots_offset, self.snapshot_table_bytes, Kind::SnapTable, "snapshot table");
        if with_rc {
            ctr.inc(
                rep,
                self.h.refcount_table_offset,
                u64::from(self.h.refcount_table_clusters) * cs,
                Kind::Reftable,
                "refcount table",
            );
            for rt in 0..self.reftable.len() as u64 {
                match self.refblock_offset(rt) {
                    Ok(0) => {}
                    Ok(o) => ctr.inc(rep, o, cs, Kind::Refblock, &format!("refcount block (reftable entry {rt})")),
                    Err(er) => {
                        rep.corruptions += 1;
                        note(rep, format!("ERROR {er}"));
                    }
                }
            }
        }
        Ok(ctr)
    }

    /// Compare counted references with stored refcounts.
    fn compare(&mut self, ctr: &Counter, rep: &mut CheckReport) {
        let cs = self.cs;
        let e = self.rb_entries();
        let mut last_used = 0u64;
        let mut allocated = 0u64;
        let mut visit = |this: &mut Qcow2, c: u64, rep: &mut CheckReport| {
            let r = ctr.refs.get(c as usize).copied().unwrap_or(0);
            let rc = match this.refcount(c) {
                Ok(v) => v,
                Err(er) => {
                    if r > 0 {
                        rep.corruptions += 1;
                        note(rep, format!("ERROR cannot read refcount of cluster {:#x}: {er}", c * cs));
                    }
                    return;
                }
            };
            if rc > 0 {
                allocated += 1;
            }
            if r > 0 {
                last_used = c + 1;
            }
            if rc < r {
                rep.corruptions += 1;
                note(rep, format!("ERROR cluster {c} (offset {:#x}) refcount={rc} reference={r}", c * cs));
            } else if rc > r {
                rep.leaks += 1;
                if rep.leaks <= 100 {
                    note(rep, format!("Leaked cluster {c} (offset {:#x}) refcount={rc} reference={r}", c * cs));
                }
            }
        };
        for c in 0..ctr.nclusters {
            visit(self, c, rep);
        }
        // refcounts of clusters past the end of the file (only distinct, readable refblocks;
        // a refblock used twice is reported as an overlap by the reference count)
        let mut seen = std::collections::HashSet::new();
        let flen = ctr.nclusters * cs;
        for rt in 0..self.reftable.len() as u64 {
            if (rt + 1) * e <= ctr.nclusters {
                continue;
            }
            let rb = self.refblock_offset(rt).unwrap_or(0);
            if rb == 0 || rb.saturating_add(cs) > flen || !seen.insert(rb) {
                continue;
            }
            for c in (rt * e).max(ctr.nclusters)..(rt + 1) * e {
                visit(self, c, rep);
            }
        }
        rep.allocated_clusters = allocated;
        rep.image_end_offset = last_used * cs;
        // leak messages are informational; keep errors list for real errors + first leaks
        rep.errors.retain(|_| true);
    }

    /// Full consistency check. Does not modify the image (a writable image is flushed first
    /// so that the check sees the current state).
    pub fn check(&mut self) -> Result<CheckReport> {
        if !self.read_only {
            self.flush()?;
        }
        let mut rep = CheckReport::default();
        let ctr = self.count_refs(&mut rep, true)?;
        self.compare(&ctr, &mut rep);
        // leak lines are not errors for is_clean(): keep only the counters for them
        rep.errors.retain(|s| !s.starts_with("Leaked cluster"));
        Ok(rep)
    }

    /// Rebuild the refcounts from every L1 table (active and all snapshots), fix leaks,
    /// refcount errors and COPIED flags. The refcount structure is rebuilt at the end of the
    /// image and switched in with one header write.
    pub fn repair(&mut self) -> Result<CheckReport> {
        self.bump_gen();
        if !self.io_writable {
            warn!("repair needs the image opened read-write");
            return Err(Error::ReadOnly);
        }
        if !self.read_only {
            self.flush()?;
        }
        // pending checkpoint work holds references the published trees do not show
        self.wait_durable()?;
        let mut rep = CheckReport::default();
        let ctr = self.count_refs(&mut rep, true)?;
        self.compare(&ctr, &mut rep);
        rep.errors.retain(|s| !s.starts_with("Leaked cluster"));
        let needs_rc = rep.leaks > 0 || rep.corruptions > 0 || rep.overlaps > 0;
        if needs_rc {
            let mut r2 = CheckReport::default();
            let base = self.count_refs(&mut r2, false)?;
            self.rebuild_refcounts(&base)?;
            rep.rebuilt_refcount_structure = true;
            rep.leaks_fixed = rep.leaks;
            rep.corruptions_fixed = rep.corruptions;
        }
        if !self.h.extended_l2() {
            let before = self.l2_dirty.len() + self.l1_dirty.len();
            self.rebuild_copied()?;
            let after = self.l2_dirty.len() + self.l1_dirty.len();
            if after > before || rep.copied_flag_errors > 0 {
                rep.copied_flags_fixed = rep.copied_flag_errors;
            }
            let ro = std::mem::replace(&mut self.read_only, false);
            let r = self.writeback().and_then(|_| self.io.flush().map_err(|e| Error::io("flushing repair", e)));
            self.read_only = ro;
            r?;
        }
        let mut after = CheckReport::default();
        let ctr = self.count_refs(&mut after, true)?;
        self.compare(&ctr, &mut after);
        after.errors.retain(|s| !s.starts_with("Leaked cluster"));
        rep.remaining_errors = after.errors.clone();
        rep.allocated_clusters = after.allocated_clusters;
        if after.is_clean() && self.h.incompatible & INCOMPAT_CORRUPT != 0 {
            self.set_incompat(self.h.incompatible & !INCOMPAT_CORRUPT)?;
            if self.h.version == 3 && !self.h.extended_l2() {
                self.read_only = false;
                self.ro_reason = None;
            }
            info!("corrupt bit cleared after successful repair");
        }
        if !after.is_clean() {
            warn!(remaining = after.errors.len(), "repair left errors");
        }
        Ok(rep)
    }

    fn rebuild_refcounts(&mut self, base: &Counter) -> Result<()> {
        let cs = self.cs;
        let e = self.rb_entries();
        let max = self.rc_max();
        if let Some((c, r)) = base.refs.iter().enumerate().find(|(_, r)| **r > max) {
            return Err(Error::corrupt(format!(
                "cluster {:#x} has {r} references, more than {}-bit refcounts can hold",
                c as u64 * cs,
                self.h.refcount_bits()
            )));
        }
        let start = base.nclusters.max(self.end_hint).max(1);
        let (mut nb, mut nt) = (1u64, 1u64);
        loop {
            let total = start + nt + nb;
            let nb2 = total.div_ceil(e);
            let nt2 = (nb2 * 8).div_ceil(cs);
            if nb2 == nb && nt2 == nt {
                break;
            }
            nb = nb2.max(nb);
            nt = nt2.max(nt);
        }
        if nt * cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::unsupported("rebuilt refcount table would exceed 8 MiB"));
        }
        let rt_off = start * cs;
        let rb_first = start + nt;
        let order = self.h.refcount_order;
        let mut blocks = vec![0u8; (nb * cs) as usize];
        let mut table = vec![0u8; (nt * cs) as usize];
        for b in 0..nb {
            put_be64(&mut table, (b * 8) as usize, (rb_first + b) * cs);
        }
        let total = start + nt + nb;
        for c in 0..total {
            let v = if c < start { base.refs.get(c as usize).copied().unwrap_or(0) } else { 1 };
            if v == 0 {
                continue;
            }
            let b = (c / e) as usize;
            if let Some(blk) = blocks.get_mut(b * cs as usize..(b + 1) * cs as usize) {
                rb_set(blk, order, c % e, v);
            }
        }
        info!(refblocks = nb, reftable_clusters = nt, at = rt_off, "rebuilding the refcount structure");
        self.io
            .write_at(&table, rt_off)
            .map_err(|er| Error::io(format!("writing rebuilt refcount table at {rt_off:#x}"), er))?;
        self.io
            .write_at(&blocks, rb_first * cs)
            .map_err(|er| Error::io(format!("writing rebuilt refcount blocks at {:#x}", rb_first * cs), er))?;
        self.io.flush().map_err(|er| Error::io("flushing rebuilt refcounts", er))?;
        let mut hb = [0u8; 12];
        put_be64(&mut hb, 0, rt_off);
        put_be32(&mut hb, 8, nt as u32);
        self.io
            .write_at(&hb, header::OFF_REFTABLE)
            .map_err(|er| Error::io("switching the refcount table in the header", er))?;
        self.io.flush().map_err(|er| Error::io("flushing header", er))?;
        self.h.refcount_table_offset = rt_off;
        self.h.refcount_table_clusters = nt as u32;
        self.reftable = table.chunks_exact(8).map(|c| header::get_be64(c, 0)).collect();
        self.rb_cache.clear();
        self.rb_dirty.clear();
        self.rb_early.clear();
        self.rb_disk.clear();
        self.rt_new.clear();
        self.pending_free.clear();
        self.free_cursor = 1;
        self.run_skip = (0, 0);
        self.note_end(total);
        Ok(())
    }
}
