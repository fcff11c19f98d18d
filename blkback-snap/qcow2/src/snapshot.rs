//! Internal snapshots ("checkpoints"): the snapshot table, and create / revert / delete
//! with QEMU's refcount algorithm and crash-safe ordering (increase, barrier, publish;
//! unpublish, barrier, decrease; header last).

use crate::error::{Error, Result};
use crate::header::{self, check_table, get_be16, get_be32, get_be64, put_be16, put_be32, put_be64, Header};
use crate::image::{Qcow2, Tree};
use crate::io::ImageIo;
use crate::l2::{l1_to_l2, Cluster, COPIED, OFFSET_MASK};
use serde::Serialize;
use std::time::{SystemTime, UNIX_EPOCH};
use tracing::info;

const MAX_EXTRA: u32 = 1024;
const MAX_TABLE_BYTES: u64 = 64 << 20;

/// A snapshot table entry as stored (unknown extra data preserved).
#[derive(Debug, Clone)]
pub(crate) struct Snapshot {
    pub l1_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u32,
    pub extra: Vec<u8>,
    pub disk_size: Option<u64>,
}

/// Public description of a checkpoint.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub vm_state_size: u64,
    pub disk_size: u64,
    pub l1_size: u32,
    pub l1_offset: u64,
}

impl Snapshot {
    fn info(&self, cur_size: u64) -> SnapshotInfo {
        let large = if self.extra.len() >= 8 { get_be64(&self.extra, 0) } else { 0 };
        SnapshotInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            vm_state_size: large.max(u64::from(self.vm_state_size)),
            disk_size: self.disk_size.unwrap_or(cur_size),
            l1_size: self.l1_size,
            l1_offset: self.l1_offset,
        }
    }
}

fn corrupt_entry(i: u32, pos: u64, what: &str) -> Error {
    Error::corrupt(format!("snapshot table entry {i} at offset {pos:#x}: {what}"))
}

/// Read and validate the snapshot table. Returns the entries and the table length.
pub(crate) fn read_table(io: &dyn ImageIo, h: &Header, flen: u64) -> Result<(Vec<Snapshot>, u64)> {
    if h.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    let cs = h.cluster_size();
    let start = h.snapshots_offset;
    let mut pos = start;
    let mut out = Vec::with_capacity(h.nb_snapshots.min(1024) as usize);
    for i in 0..h.nb_snapshots {
        let mut hd = [0u8; 40];
        io.read_at(&mut hd, pos).map_err(|_| corrupt_entry(i, pos, "runs past the end of the image"))?;
        let l1_offset = get_be64(&hd, 0);
        let l1_size = get_be32(&hd, 8);
        let id_len = u64::from(get_be16(&hd, 12));
        let name_len = u64::from(get_be16(&hd, 14));
        let extra_len = get_be32(&hd, 36);
        if extra_len > MAX_EXTRA {
            return Err(corrupt_entry(i, pos, &format!("extra data size {extra_len} exceeds {MAX_EXTRA}")));
        }
        let var = u64::from(extra_len) + id_len + name_len;
        let end = pos + 40 + var;
        if end - start > MAX_TABLE_BYTES {
            return Err(corrupt_entry(i, pos, "snapshot table exceeds 64 MiB"));
        }
        if end > flen {
            return Err(corrupt_entry(i, pos, &format!("entry ends at {end:#x}, past the end of the image ({flen} bytes)")));
        }
        let mut vb = vec![0u8; var as usize];
        io.read_at(&mut vb, pos + 40).map_err(|_| corrupt_entry(i, pos, "runs past the end of the image"))?;
        let (extra, rest) = vb.split_at(extra_len as usize);
        let (id, name) = rest.split_at(id_len as usize);
        if u64::from(l1_size) * 8 > header::MAX_L1_BYTES {
            return Err(corrupt_entry(i, pos, &format!("L1 size {l1_size} exceeds the 32 MiB limit")));
        }
        if l1_size > 0 {
            check_table(cs, flen, &format!("snapshot {i} L1 table"), l1_offset, u64::from(l1_size) * 8)?;
        }
        let disk_size = if extra.len() >= 16 { Some(get_be64(extra, 8)) } else { None };
        if disk_size.is_some_and(|d| d > (1u64 << 62)) {
            return Err(corrupt_entry(i, pos, &format!("disk size {} is absurd", disk_size.unwrap_or(0))));
        }
        out.push(Snapshot {
            l1_offset,
            l1_size,
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            date_sec: get_be32(&hd, 16),
            date_nsec: get_be32(&hd, 20),
            vm_clock_nsec: get_be64(&hd, 24),
            vm_state_size: get_be32(&hd, 32),
            extra: extra.to_vec(),
            disk_size,
        });
        pos = start + (end - start).div_ceil(8) * 8;
    }
    Ok((out, pos - start))
}

/// Serialize a snapshot table.
pub(crate) fn build_table(snaps: &[Snapshot]) -> Vec<u8> {
    let mut b = Vec::new();
    for s in snaps {
        let mut hd = [0u8; 40];
        put_be64(&mut hd, 0, s.l1_offset);
        put_be32(&mut hd, 8, s.l1_size);
        put_be16(&mut hd, 12, s.id.len() as u16);
        put_be16(&mut hd, 14, s.name.len() as u16);
        put_be32(&mut hd, 16, s.date_sec);
        put_be32(&mut hd, 20, s.date_nsec);
        put_be64(&mut hd, 24, s.vm_clock_nsec);
        put_be32(&mut hd, 32, s.vm_state_size);
        put_be32(&mut hd, 36, s.extra.len() as u32);
        b.extend_from_slice(&hd);
        b.extend_from_slice(&s.extra);
        b.extend_from_slice(s.id.as_bytes());
        b.extend_from_slice(s.name.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
    }
    b
}

/// Read a snapshot L1 table.
pub(crate) fn read_l1(io: &dyn ImageIo, off: u64, size: u32, cs: u64, flen: u64) -> Result<Vec<u64>> {
    let bytes = u64::from(size) * 8;
    if bytes > header::MAX_L1_BYTES {
        return Err(Error::corrupt(format!("snapshot L1 table at {off:#x}: {size} entries exceed the limit")));
    }
    if size == 0 {
        return Ok(Vec::new());
    }
    check_table(cs, flen, "snapshot L1 table", off, bytes)?;
    let mut b = vec![0u8; bytes as usize];
    io.read_at(&mut b, off).map_err(|e| Error::io(format!("reading snapshot L1 table at {off:#x}"), e))?;
    Ok(b.chunks_exact(8).map(|c| get_be64(c, 0)).collect())
}

impl Qcow2 {
    pub(crate) fn find_snapshot(&self, id_or_name: &str) -> Result<Snapshot> {
        self.snapshots
            .iter()
            .find(|s| s.id == id_or_name)
            .or_else(|| self.snapshots.iter().find(|s| s.name == id_or_name))
            .cloned()
            .ok_or_else(|| Error::not_found(format!("checkpoint '{id_or_name}' (no snapshot with that id or name)")))
    }

    /// All checkpoints, in table order.
    pub fn checkpoint_list(&self) -> Vec<SnapshotInfo> {
        self.snapshots.iter().map(|s| s.info(self.h.size)).collect()
    }

    /// Every cluster reference of a tree (L2 tables and data, compressed per cluster of its
    /// sector span), as sorted (cluster index, count). Validates every entry.
    pub(crate) fn tree_refs(&mut self, tree: Tree) -> Result<Vec<(u64, u64)>> {
        let cs = self.cs;
        let n = self.l1_len(tree)?;
        let geom = self.geom();
        let step = if self.h.extended_l2() { 2 } else { 1 };
        let mut v: Vec<u64> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for i in 0..n as u64 {
            let e = self.l1_entry(tree, i)?;
            let l2 = l1_to_l2(e, cs, &|| format!("{tree:?} L1 entry {i}"))?;
            if l2 == 0 {
                continue;
            }
            if !seen.insert(l2) {
                return Err(Error::corrupt(format!(
                    "{tree:?} L1 entry {i}: L2 table at {l2:#x} is already used by another entry of the same L1 table"
                )));
            }
            v.push(l2 / cs);
            self.load_l2(l2)?;
            let t = self.l2_table(l2)?;
            for (j, w) in t.iter().step_by(step).enumerate() {
                let bm = if step == 2 { t.get(j * 2 + 1).copied().unwrap_or(0) } else { 0 };
                match geom.classify(*w, bm, &|| format!("L2 table at {l2:#x} entry {j}"))? {
                    Cluster::Normal { host, .. } => v.push(host / cs),
                    Cluster::Compressed { offset, len } => {
                        for c in offset / cs..=(offset + len.max(1) - 1) / cs {
                            v.push(c);
                        }
                    }
                    _ => {}
                }
            }
        }
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for c in v {
            match out.last_mut() {
                Some((last, n)) if *last == c => *n += 1,
                _ => out.push((c, 1)),
            }
        }
        Ok(out)
    }

    /// Drop every unwritten metadata change (used when an operation fails before its
    /// commit point; callers flushed before starting, so the disk state is the truth).
    pub(crate) fn rollback(&mut self) {
        let dirty_rb = std::mem::take(&mut self.rb_dirty);
        for k in dirty_rb {
            self.rb_cache.remove(&k);
        }
        let dirty_l2 = std::mem::take(&mut self.l2_dirty);
        for k in dirty_l2 {
            self.l2_cache.remove(&k);
        }
        self.pending_free.clear();
        if !self.l1_dirty.is_empty() {
            self.l1_dirty.clear();
            let mut b = vec![0u8; self.l1.len() * 8];
            if self.io.read_at(&mut b, self.h.l1_table_offset).is_ok() {
                self.l1 = b.chunks_exact(8).map(|c| get_be64(c, 0)).collect();
            }
        }
        self.free_cursor = 1;
    }

    fn write_bytes(&mut self, b: &[u8], off: u64, what: &str) -> Result<()> {
        self.io.write_at(b, off).map_err(|e| Error::io(format!("writing {what} at {off:#x}"), e))
    }

    fn l1_bytes(t: &[u64], clear_copied: bool) -> Vec<u8> {
        let mut b = vec![0u8; t.len() * 8];
        for (i, v) in t.iter().enumerate() {
            put_be64(&mut b, i * 8, if clear_copied { v & !COPIED } else { *v });
        }
        b
    }

    /// Allocate and write a snapshot table (not flushed). Returns (offset, bytes).
    fn write_new_table(&mut self, snaps: &[Snapshot]) -> Result<(u64, u64)> {
        let tb = build_table(snaps);
        if tb.is_empty() {
            return Ok((0, 0));
        }
        if tb.len() as u64 > MAX_TABLE_BYTES {
            return Err(Error::invalid("snapshot table would exceed 64 MiB"));
        }
        let off = self.alloc_clusters((tb.len() as u64).div_ceil(self.cs))?;
        self.write_bytes(&tb, off, "snapshot table")?;
        Ok((off, tb.len() as u64))
    }

    /// The 12-byte header commit: nb_snapshots + snapshots_offset.
    fn commit_table(&mut self, nb: u32, off: u64) -> Result<()> {
        let mut hb = [0u8; 12];
        put_be32(&mut hb, 0, nb);
        put_be64(&mut hb, 4, off);
        self.write_bytes(&hb, header::OFF_NB_SNAPSHOTS, "header snapshot fields")?;
        self.sync("snapshot table commit")
    }

    fn free_range(&mut self, off: u64, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        for c in off / self.cs..=(off + bytes - 1) / self.cs {
            self.add_refcount(c, -1)?;
        }
        Ok(())
    }

    /// Set COPIED in the active L1 and its L2 tables exactly where the refcount is 1.
    pub(crate) fn rebuild_copied(&mut self) -> Result<()> {
        let cs = self.cs;
        let geom = self.geom();
        if geom.extended {
            return Ok(());
        }
        for i in 0..self.l1.len() as u64 {
            let e = self.l1_entry(Tree::Active, i)?;
            let l2 = l1_to_l2(e, cs, &|| format!("active L1 entry {i}"))?;
            if l2 == 0 {
                continue;
            }
            let want = if self.refcount(l2 / cs)? == 1 { l2 | COPIED } else { l2 };
            if want != e {
                self.set_l1(i, want);
            }
            self.load_l2(l2)?;
            let t = self.l2_table(l2)?;
            for (j, w) in t.iter().enumerate() {
                if let Cluster::Normal { host, .. } = geom.classify(*w, 0, &|| format!("L2 table at {l2:#x} entry {j}"))? {
                    let nv = if self.refcount(host / cs)? == 1 { w | COPIED } else { w & !COPIED };
                    if nv != *w {
                        self.l2_set(l2, j as u64, nv)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Create a checkpoint of the active disk. Returns when it is durable.
    pub fn checkpoint_create(&mut self, name: &str) -> Result<SnapshotInfo> {
        self.check_writable()?;
        if name.is_empty() || name.len() > 65535 {
            return Err(Error::invalid("checkpoint name must be 1..=65535 bytes"));
        }
        if self.snapshots.iter().any(|s| s.name == name) {
            return Err(Error::invalid(format!("a checkpoint named '{name}' already exists")));
        }
        if self.snapshots.len() as u32 >= header::MAX_SNAPSHOTS {
            return Err(Error::invalid("the image already has 65536 snapshots"));
        }
        self.flush()?;
        let r = self.checkpoint_create_inner(name);
        if r.is_err() {
            self.rollback();
        }
        r
    }

    fn checkpoint_create_inner(&mut self, name: &str) -> Result<SnapshotInfo> {
        let cs = self.cs;
        let refs = self.tree_refs(Tree::Active)?;
        self.apply_deltas(&refs, true)?;
        // copy of the active L1
        let l1_bytes = Self::l1_bytes(&self.l1, true);
        let l1_off = if l1_bytes.is_empty() { 0 } else { self.alloc_clusters((l1_bytes.len() as u64).div_ceil(cs))? };
        if l1_off != 0 {
            self.write_bytes(&l1_bytes, l1_off, "snapshot L1 table")?;
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let next_id = self.snapshots.iter().filter_map(|s| s.id.parse::<u64>().ok()).max().unwrap_or(0) + 1;
        let mut extra = vec![0u8; 24];
        put_be64(&mut extra, 0, 0);
        put_be64(&mut extra, 8, self.h.size);
        put_be64(&mut extra, 16, u64::MAX);
        let sn = Snapshot {
            l1_offset: l1_off,
            l1_size: self.l1.len() as u32,
            id: next_id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra,
            disk_size: Some(self.h.size),
        };
        let mut snaps = self.snapshots.clone();
        snaps.push(sn.clone());
        let (t_off, t_len) = self.write_new_table(&snaps)?;
        // 1. refcounts (+ the L1 copy and table contents) durable
        self.write_dirty_refblocks()?;
        self.sync("checkpoint refcounts")?;
        // 2. COPIED flags of the active tree: everything is shared now
        self.rebuild_copied()?;
        self.writeback()?;
        // 3. commit
        let (old_off, old_len) = (self.h.snapshots_offset, self.snapshot_table_bytes);
        self.commit_table(snaps.len() as u32, t_off)?;
        self.h.nb_snapshots = snaps.len() as u32;
        self.h.snapshots_offset = t_off;
        self.snapshot_table_bytes = t_len;
        self.snapshots = snaps;
        // 4. the old table is unreferenced now
        self.free_range(old_off, old_len)?;
        self.writeback()?;
        self.sync("checkpoint")?;
        info!(id = %sn.id, name, clusters = refs.len(), "checkpoint created");
        Ok(sn.info(self.h.size))
    }

    /// Make the active disk equal to a checkpoint again (the checkpoint stays).
    pub fn checkpoint_revert(&mut self, id_or_name: &str) -> Result<()> {
        self.check_writable()?;
        let sn = self.find_snapshot(id_or_name)?;
        self.flush()?;
        let r = self.revert_inner(&sn);
        if r.is_err() {
            self.rollback();
        }
        r
    }

    fn revert_inner(&mut self, sn: &Snapshot) -> Result<()> {
        let cs = self.cs;
        let size = sn.disk_size.unwrap_or(self.h.size);
        let need = self.h.l1_entries_for(size);
        if need * 8 > header::MAX_L1_BYTES {
            return Err(Error::corrupt(format!("checkpoint '{}' disk size {size} is absurd", sn.name)));
        }
        let tree = Tree::Snap(sn.l1_offset);
        self.load_snap_l1(sn.l1_offset)?;
        let mut new_l1 = self.snap_l1.get(&sn.l1_offset).cloned().unwrap_or_default();
        if (new_l1.len() as u64) < need {
            new_l1.resize(need as usize, 0);
        }
        let new_refs = self.tree_refs(tree)?;
        let old_refs = self.tree_refs(Tree::Active)?;
        self.apply_deltas(&new_refs, true)?;
        let bytes = Self::l1_bytes(&new_l1, true);
        let new_off = if bytes.is_empty() { 0 } else { self.alloc_clusters((bytes.len() as u64).div_ceil(cs))? };
        if new_off != 0 {
            self.write_bytes(&bytes, new_off, "new active L1 table")?;
        }
        self.write_dirty_refblocks()?;
        self.sync("revert: new tree references")?;
        // commit: size, crypt_method, l1_size, l1_table_offset (bytes 24..48)
        let mut hb = [0u8; 24];
        put_be64(&mut hb, 0, size);
        put_be32(&mut hb, 8, 0);
        put_be32(&mut hb, 12, new_l1.len() as u32);
        put_be64(&mut hb, 16, new_off);
        self.write_bytes(&hb, header::OFF_SIZE, "header L1 fields")?;
        self.sync("revert commit")?;
        let old_l1_off = self.h.l1_table_offset;
        let old_l1_bytes = self.l1.len() as u64 * 8;
        self.h.size = size;
        self.h.l1_size = new_l1.len() as u32;
        self.h.l1_table_offset = new_off;
        self.l1 = new_l1.iter().map(|v| v & !COPIED).collect();
        self.l1_dirty.clear();
        // the old active tree is unreferenced now
        self.apply_deltas(&old_refs, false)?;
        self.free_range(old_l1_off, old_l1_bytes)?;
        self.decomp = None;
        self.rebuild_copied()?;
        self.writeback()?;
        self.sync("revert")?;
        info!(id = %sn.id, name = %sn.name, "reverted to checkpoint");
        Ok(())
    }

    /// Delete a checkpoint, freeing what only it referenced.
    pub fn checkpoint_delete(&mut self, id_or_name: &str) -> Result<()> {
        self.check_writable()?;
        let sn = self.find_snapshot(id_or_name)?;
        self.flush()?;
        let r = self.delete_inner(&sn);
        if r.is_err() {
            self.rollback();
        }
        r
    }

    fn delete_inner(&mut self, sn: &Snapshot) -> Result<()> {
        let refs = self.tree_refs(Tree::Snap(sn.l1_offset))?;
        self.check_deltas(&refs, false)?;
        let snaps: Vec<Snapshot> = self.snapshots.iter().filter(|s| s.id != sn.id).cloned().collect();
        let (t_off, t_len) = self.write_new_table(&snaps)?;
        self.write_dirty_refblocks()?;
        self.sync("delete: new snapshot table")?;
        let (old_off, old_len) = (self.h.snapshots_offset, self.snapshot_table_bytes);
        self.commit_table(snaps.len() as u32, t_off)?;
        self.h.nb_snapshots = snaps.len() as u32;
        self.h.snapshots_offset = t_off;
        self.snapshot_table_bytes = t_len;
        self.snapshots = snaps;
        self.snap_l1.remove(&sn.l1_offset);
        // unpublished: drop its references
        self.apply_deltas(&refs, false)?;
        self.free_range(sn.l1_offset, u64::from(sn.l1_size) * 8)?;
        self.free_range(old_off, old_len)?;
        self.rebuild_copied()?;
        self.writeback()?;
        self.sync("delete")?;
        info!(id = %sn.id, name = %sn.name, "checkpoint deleted");
        Ok(())
    }

    /// Read a checkpoint's data (independent of later writes to the active disk).
    pub fn read_checkpoint(&mut self, id_or_name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let sn = self.find_snapshot(id_or_name)?;
        let size = sn.disk_size.unwrap_or(self.h.size);
        self.check_range(offset, buf.len() as u64, size)?;
        self.read_tree(Tree::Snap(sn.l1_offset), offset, buf)
    }

    /// Size of a checkpoint's disk.
    pub fn checkpoint_size(&self, id_or_name: &str) -> Result<u64> {
        Ok(self.find_snapshot(id_or_name)?.disk_size.unwrap_or(self.h.size))
    }
}

#[allow(dead_code)]
pub(crate) fn _unused(_: u64) -> u64 {
    OFFSET_MASK
}
