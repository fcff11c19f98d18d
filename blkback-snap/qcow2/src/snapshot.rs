//! Internal snapshots ("checkpoints"): the snapshot table, and create / revert / delete
//! with QEMU's refcount algorithm and crash-safe ordering (increase, barrier, publish;
//! unpublish, barrier, decrease; header last).

use crate::error::{Error, Result};
use crate::header::{self, check_table, get_be16, get_be32, get_be64, put_be16, put_be32, put_be64, Header};
use crate::image::{Qcow2, Tree};
use crate::io::ImageIo;
use crate::l2::{l1_to_l2, Cluster, COPIED, OFFSET_MASK};
use serde::Serialize;

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

/// Durability of a checkpoint.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointState {
    /// The point in time is fixed and the checkpoint readable; not yet on disk (a crash
    /// loses it).
    Taken,
    /// In the snapshot table on disk.
    Durable,
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
    /// 0 while `taken`.
    pub l1_offset: u64,
    /// `taken` or `durable`.
    pub state: CheckpointState,
}

impl Snapshot {
    pub(crate) fn info(&self, cur_size: u64, state: CheckpointState) -> SnapshotInfo {
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
            state,
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
            return Err(corrupt_entry(
                i,
                pos,
                &format!("entry ends at {end:#x}, past the end of the image ({flen} bytes)"),
            ));
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
    /// All checkpoints: the durable ones in table order, then the taken ones in take order.
    /// Checkpoints whose deletion has begun are not listed.
    pub fn checkpoint_list(&self) -> Vec<SnapshotInfo> {
        self.visible().into_iter().map(|(_, s, st)| s.info(self.h.size, st)).collect()
    }

    pub(crate) fn write_bytes(&mut self, b: &[u8], off: u64, what: &str) -> Result<()> {
        self.io.write_at(b, off).map_err(|e| Error::io(format!("writing {what} at {off:#x}"), e))
    }

    pub(crate) fn l1_bytes(t: &[u64], clear_copied: bool) -> Vec<u8> {
        let mut b = vec![0u8; t.len() * 8];
        for (i, v) in t.iter().enumerate() {
            put_be64(&mut b, i * 8, if clear_copied { v & !COPIED } else { *v });
        }
        b
    }

    /// Allocate and write a snapshot table (not flushed). Returns (offset, bytes).
    pub(crate) fn write_new_table(&mut self, snaps: &[Snapshot]) -> Result<(u64, u64)> {
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

    /// The 12-byte header commit: nb_snapshots + snapshots_offset (no barrier: the caller
    /// runs one before relying on it).
    pub(crate) fn write_table_commit(&mut self, nb: u32, off: u64) -> Result<()> {
        let mut hb = [0u8; 12];
        put_be32(&mut hb, 0, nb);
        put_be64(&mut hb, 4, off);
        self.write_bytes(&hb, header::OFF_NB_SNAPSHOTS, "header snapshot fields")
    }

    /// Adopt a committed snapshot table in memory. Returns the old table's (offset, bytes)
    /// for the caller to free.
    pub(crate) fn adopt_table(&mut self, snaps: Vec<Snapshot>, off: u64, len: u64) -> (u64, u64) {
        let old = (self.h.snapshots_offset, self.snapshot_table_bytes);
        self.h.nb_snapshots = snaps.len() as u32;
        self.h.snapshots_offset = off;
        self.snapshot_table_bytes = len;
        self.snapshots = snaps;
        old
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
                if let Cluster::Normal { host, .. } =
                    geom.classify(*w, 0, &|| format!("L2 table at {l2:#x} entry {j}"))?
                {
                    let nv = if self.refcount(host / cs)? == 1 { w | COPIED } else { w & !COPIED };
                    if nv != *w {
                        self.l2_set(l2, j as u64, nv)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Create a checkpoint of the active disk and return when it is durable: the earlier
    /// background work, [`Qcow2::checkpoint_take`], [`Qcow2::wait_durable`], then a flush. If the
    /// references cannot be added (refcount overflow, corrupt tree) nothing is kept.
    pub fn checkpoint_create(&mut self, name: &str) -> Result<SnapshotInfo> {
        self.check_writable()?;
        if name.is_empty() || name.len() > 65535 {
            return Err(Error::invalid("checkpoint name must be 1..=65535 bytes"));
        }
        if self.visible().iter().any(|s| s.1.name == name) {
            return Err(Error::invalid(format!("a checkpoint named '{name}' already exists")));
        }
        self.wait_durable()?;
        let info = self.checkpoint_take(name)?;
        if let Err(e) = self.wait_durable() {
            let front = match self.jobs.front() {
                Some(crate::durable::Job::Link { pred, cursor, .. }) => Some((*pred, *cursor)),
                _ => None,
            };
            let walking = match front {
                Some((pred, cursor)) => (cursor as usize) < self.l1_len(pred).unwrap_or(0),
                None => false,
            };
            if walking {
                if let Err(e2) = self.abort_only_take() {
                    tracing::warn!("could not undo the failed checkpoint: {e2}");
                }
            }
            return Err(e);
        }
        // like `qemu-img snapshot -c`, a completed create leaves every earlier write durable
        // (the commit itself only needs the frozen tree, not the active one)
        self.flush()?;
        let (_, sn, _) = self.find_checkpoint(&info.id)?;
        Ok(sn.info(self.h.size, CheckpointState::Durable))
    }

    /// Make the active disk equal to a checkpoint again (the checkpoint stays); returns when
    /// durable: [`Qcow2::checkpoint_revert_switch`] then [`Qcow2::wait_durable`].
    pub fn checkpoint_revert(&mut self, id_or_name: &str) -> Result<()> {
        self.check_writable()?;
        self.find_checkpoint(id_or_name)?;
        self.wait_durable()?;
        self.checkpoint_revert_switch(id_or_name)?;
        self.wait_durable()
    }

    /// Delete a checkpoint, freeing what only it referenced; returns when durable.
    pub fn checkpoint_delete(&mut self, id_or_name: &str) -> Result<()> {
        self.check_writable()?;
        self.find_checkpoint(id_or_name)?;
        self.wait_durable()?;
        self.checkpoint_delete_begin(id_or_name)?;
        self.wait_durable()
    }

    /// Read a checkpoint's data (independent of later writes to the active disk).
    pub fn read_checkpoint(&mut self, id_or_name: &str, offset: u64, buf: &mut [u8]) -> Result<()> {
        let (tree, sn, _) = self.find_checkpoint(id_or_name)?;
        let size = sn.disk_size.unwrap_or(self.h.size);
        self.check_range(offset, buf.len() as u64, size)?;
        self.read_tree(tree, offset, buf)
    }

    /// Size of a checkpoint's disk.
    pub fn checkpoint_size(&self, id_or_name: &str) -> Result<u64> {
        Ok(self.find_checkpoint(id_or_name)?.1.disk_size.unwrap_or(self.h.size))
    }
}

#[allow(dead_code)]
pub(crate) fn _unused(_: u64) -> u64 {
    OFFSET_MASK
}
