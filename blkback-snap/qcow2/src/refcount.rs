//! Refcount blocks: entry encoding for every refcount_order, the in-memory refblock cache,
//! cluster allocation, and batched refcount updates.

use crate::error::{Error, Result};
use crate::header::{self, put_be64};
use crate::image::Qcow2;
use crate::l2::REFT_RESERVED;
use std::collections::BTreeSet;
use tracing::{debug, info};

/// Read refcount `i` of a refblock with the given order.
pub(crate) fn rb_get(block: &[u8], order: u32, i: u64) -> u64 {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let byte = block.get(i / per_byte).copied().unwrap_or(0);
            let shift = (i % per_byte) * bits;
            u64::from((byte >> shift) & ((1u8 << bits) - 1))
        }
        3 => u64::from(block.get(i).copied().unwrap_or(0)),
        4 => u64::from(header::get_be16(block, i * 2)),
        5 => u64::from(header::get_be32(block, i * 4)),
        _ => header::get_be64(block, i * 8),
    }
}

/// Set refcount `i` of a refblock (the value must fit; callers check against `rc_max`).
pub(crate) fn rb_set(block: &mut [u8], order: u32, i: u64, v: u64) {
    let i = i as usize;
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (i % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            if let Some(b) = block.get_mut(i / per_byte) {
                *b = (*b & !mask) | (((v as u8) << shift) & mask);
            }
        }
        3 => {
            if let Some(b) = block.get_mut(i) {
                *b = v as u8;
            }
        }
        4 => header::put_be16(block, i * 2, v as u16),
        5 => header::put_be32(block, i * 4, v as u32),
        _ => put_be64(block, i * 8, v),
    }
}

impl Qcow2 {
    /// Largest refcount value of this image's refcount width.
    pub(crate) fn rc_max(&self) -> u64 {
        if self.h.refcount_order >= 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.h.refcount_order)) - 1
        }
    }
    /// Refcount entries per refblock.
    pub(crate) fn rb_entries(&self) -> u64 {
        (self.cs * 8) >> self.h.refcount_order
    }

    /// Offset of the refblock for reftable index `rt`, validated; 0 if none.
    pub(crate) fn refblock_offset(&self, rt: u64) -> Result<u64> {
        let Some(&e) = self.reftable.get(rt as usize) else { return Ok(0) };
        if e & REFT_RESERVED != 0 {
            return Err(Error::corrupt(format!("refcount table entry {rt} ({e:#x}) has reserved bits set")));
        }
        if e != 0 && e % self.cs != 0 {
            return Err(Error::corrupt(format!(
                "refcount table entry {rt}: refblock offset {e:#x} is not cluster aligned"
            )));
        }
        Ok(e)
    }

    pub(crate) fn load_refblock(&mut self, off: u64) -> Result<()> {
        if self.rb_cache.contains_key(&off) {
            return Ok(());
        }
        self.evict_if_needed()?;
        let flen = self.file_len()?;
        if off == 0 || off.checked_add(self.cs).is_none_or(|e| e > flen) {
            return Err(Error::corrupt(format!(
                "refcount block at offset {off:#x} lies outside the image ({flen} bytes)"
            )));
        }
        let mut b = vec![0u8; self.cs as usize];
        self.io.read_at(&mut b, off).map_err(|e| Error::io(format!("reading refcount block at {off:#x}"), e))?;
        self.rb_cache.insert(off, b);
        Ok(())
    }

    /// Before the cached refblock at `off` changes: a clean block's bytes are what the file
    /// holds, so keep them ([`Qcow2::rb_disk`]) for the write-back to compare with.
    fn rb_before_change(&mut self, off: u64) {
        if self.rb_dirty.contains(&off) || self.rb_disk.contains_key(&off) {
            return;
        }
        if let Some(b) = self.rb_cache.get(&off) {
            self.rb_disk.insert(off, b.clone());
        }
    }

    /// Refcount of the cluster with index `idx` (cluster offset / cluster size).
    pub(crate) fn refcount(&mut self, idx: u64) -> Result<u64> {
        let e = self.rb_entries();
        let rb = self.refblock_offset(idx / e)?;
        if rb == 0 {
            return Ok(0);
        }
        self.load_refblock(rb)?;
        let order = self.h.refcount_order;
        Ok(self.rb_cache.get(&rb).map_or(0, |b| rb_get(b, order, idx % e)))
    }

    /// Refcount without touching the cache (for `&self` callers).
    #[allow(dead_code)]
    pub(crate) fn refcount_ro(&self, idx: u64) -> Result<u64> {
        let e = self.rb_entries();
        let rb = self.refblock_offset(idx / e)?;
        if rb == 0 {
            return Ok(0);
        }
        let order = self.h.refcount_order;
        if let Some(b) = self.rb_cache.get(&rb) {
            return Ok(rb_get(b, order, idx % e));
        }
        let mut b = vec![0u8; self.cs as usize];
        self.io.read_at(&mut b, rb).map_err(|e| Error::io(format!("reading refcount block at {rb:#x}"), e))?;
        Ok(rb_get(&b, order, idx % e))
    }

    /// Set a refcount in memory (marks the refblock dirty). The refblock must exist unless
    /// `v` is 0; a missing one is created (synchronously, self-describing).
    pub(crate) fn set_refcount(&mut self, idx: u64, v: u64) -> Result<()> {
        if v > self.rc_max() {
            return Err(Error::RefcountOverflow {
                what: format!("cluster at {:#x} would need refcount {v}", idx * self.cs),
            });
        }
        let e = self.rb_entries();
        let mut rb = self.refblock_offset(idx / e)?;
        if rb == 0 {
            if v == 0 {
                return Ok(());
            }
            rb = self.create_refblock(idx / e)?;
        }
        self.load_refblock(rb)?;
        self.rb_before_change(rb);
        let order = self.h.refcount_order;
        if let Some(b) = self.rb_cache.get_mut(&rb) {
            let old = rb_get(b, order, idx % e);
            if !(old > 0 && v > old) {
                self.rb_early.insert(rb);
            }
            rb_set(b, order, idx % e, v);
        }
        self.rb_dirty.insert(rb);
        if v == 0 {
            if idx < self.free_cursor {
                self.free_cursor = idx;
            }
            self.run_skip = (0, 0);
        }
        Ok(())
    }

    /// Add `delta` (may be negative) to a refcount, with overflow/underflow errors.
    pub(crate) fn add_refcount(&mut self, idx: u64, delta: i64) -> Result<u64> {
        let rc = self.refcount(idx)?;
        let nv = if delta >= 0 {
            rc.checked_add(delta as u64).filter(|v| *v <= self.rc_max()).ok_or_else(|| Error::RefcountOverflow {
                what: format!("cluster at {:#x} has refcount {rc}, cannot add {delta}", idx * self.cs),
            })?
        } else {
            rc.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                Error::corrupt(format!(
                    "refcount of cluster at {:#x} is {rc}, cannot drop {} references",
                    idx * self.cs,
                    delta.unsigned_abs()
                ))
            })?
        };
        self.set_refcount(idx, nv)?;
        Ok(nv)
    }

    /// Apply deltas already validated by [`Qcow2::check_deltas`], one refblock at a time.
    pub(crate) fn apply_deltas_unchecked(&mut self, deltas: &[(u64, u64)], increase: bool) -> Result<()> {
        let e = self.rb_entries();
        let order = self.h.refcount_order;
        let mut k = 0;
        while k < deltas.len() {
            let rt = deltas[k].0 / e;
            let rb = self.refblock_offset(rt)?;
            let mut end = k;
            while end < deltas.len() && deltas[end].0 / e == rt {
                end += 1;
            }
            if rb == 0 {
                for &(idx, n) in &deltas[k..end] {
                    let rc = self.refcount(idx)?;
                    self.set_refcount(idx, if increase { rc + n } else { rc.saturating_sub(n) })?;
                }
            } else {
                self.load_refblock(rb)?;
                self.rb_before_change(rb);
                let mut freed = None;
                if let Some(b) = self.rb_cache.get_mut(&rb) {
                    for &(idx, n) in &deltas[k..end] {
                        let rc = rb_get(b, order, idx % e);
                        let v = if increase { rc + n } else { rc.saturating_sub(n) };
                        rb_set(b, order, idx % e, v);
                        if v == 0 && freed.is_none() {
                            freed = Some(idx);
                        }
                    }
                }
                self.rb_dirty.insert(rb);
                if !increase {
                    // a drop walk's decreases: COPIED flags set on their strength
                    self.rb_early.insert(rb);
                }
                if let Some(f) = freed {
                    self.run_skip = (0, 0);
                    if f < self.free_cursor {
                        self.free_cursor = f;
                    }
                }
            }
            k = end;
        }
        Ok(())
    }

    /// Load the refcount blocks of clusters `idxs` (what [`Qcow2::refcount`] of each would
    /// load, and failing the same way), looking each block up once per run of clusters it
    /// covers rather than once per cluster.
    pub(crate) fn load_refblocks_of(&mut self, idxs: impl IntoIterator<Item = u64>) -> Result<()> {
        let e = self.rb_entries();
        let mut last = None;
        for idx in idxs {
            let rt = idx / e;
            if last == Some(rt) {
                continue;
            }
            last = Some(rt);
            let rb = self.refblock_offset(rt)?;
            if rb != 0 {
                self.load_refblock(rb)?;
            }
        }
        Ok(())
    }

    /// Call `f` with each of `items` in order and the refcount of its cluster (`key`: the
    /// cluster index) — what [`Qcow2::refcount`] of each gives, loading the same blocks and
    /// failing the same way — looking each refcount block up once per run of items in it.
    /// Stops at the first error of `f`.
    pub(crate) fn each_refcount<T>(
        &mut self,
        items: &[T],
        key: impl Fn(&T) -> u64,
        mut f: impl FnMut(&T, u64) -> Result<()>,
    ) -> Result<()> {
        let e = self.rb_entries();
        let order = self.h.refcount_order;
        let mut k = 0;
        while k < items.len() {
            let rt = key(&items[k]) / e;
            let mut end = k + 1;
            while end < items.len() && key(&items[end]) / e == rt {
                end += 1;
            }
            let rb = self.refblock_offset(rt)?;
            if rb != 0 {
                self.load_refblock(rb)?;
            }
            let block = if rb == 0 { None } else { self.rb_cache.get(&rb) };
            for it in &items[k..end] {
                f(it, block.map_or(0, |b| rb_get(b, order, key(it) % e)))?;
            }
            k = end;
        }
        Ok(())
    }

    /// Check that deltas can be applied without overflow or underflow (in order, like
    /// [`Qcow2::refcount`] of each; one block lookup per run of deltas in the same block).
    pub(crate) fn check_deltas(&mut self, deltas: &[(u64, u64)], increase: bool) -> Result<()> {
        let max = self.rc_max();
        let (cs, bits) = (self.cs, self.h.refcount_bits());
        self.each_refcount(deltas, |d| d.0, |&(idx, n), rc| {
            if increase {
                if rc.checked_add(n).is_none_or(|v| v > max) {
                    return Err(Error::RefcountOverflow {
                        what: format!(
                            "cluster at {:#x} has refcount {rc}; adding {n} exceeds the maximum {max} of {bits}-bit refcounts",
                            idx * cs
                        ),
                    });
                }
                if rc == 0 {
                    return Err(Error::corrupt(format!("cluster at {:#x} is referenced but has refcount 0", idx * cs)));
                }
            } else if rc < n {
                return Err(Error::corrupt(format!(
                    "cluster at {:#x} has refcount {rc} but {n} references are being dropped",
                    idx * cs
                )));
            }
            Ok(())
        })
    }

    /// Cluster index range of fixed metadata that an allocation must never hand out.
    fn overlaps_fixed_metadata(&self, idx: u64, n: u64) -> Option<&'static str> {
        let cs = self.cs;
        let (s, e) = (idx * cs, (idx + n) * cs);
        let hit = |off: u64, len: u64| len > 0 && off < e && s < off + len;
        if hit(0, cs) {
            return Some("header");
        }
        if hit(self.h.l1_table_offset, u64::from(self.h.l1_size) * 8) {
            return Some("active L1 table");
        }
        if hit(self.h.refcount_table_offset, u64::from(self.h.refcount_table_clusters) * cs) {
            return Some("refcount table");
        }
        if hit(self.h.snapshots_offset, self.snapshot_table_bytes) {
            return Some("snapshot table");
        }
        None
    }

    /// Allocate `n` contiguous clusters (refcount set to 1 in memory). Returns the offset.
    /// The refcount reaches disk at the next write-back, before any pointer to it.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        if n == 0 {
            return Err(Error::invalid("allocation of 0 clusters"));
        }
        let e = self.rb_entries();
        'outer: loop {
            let mut idx = self.free_cursor.max(1);
            // shorter holes below the hint were seen by an earlier search: skip them
            let skipped = n >= self.run_skip.1 && self.run_skip.0 > idx;
            if skipped {
                idx = self.run_skip.0;
            }
            let mut run_start = idx;
            let mut first_free: Option<u64> = None;
            let order = self.h.refcount_order;
            // scan one refblock at a time
            loop {
                let end = (idx / e + 1) * e;
                let rb = self.refblock_offset(idx / e)?;
                if rb == 0 {
                    // no refblock: the whole range is free
                    first_free.get_or_insert(idx);
                    if run_start + n <= end {
                        break;
                    }
                    idx = end;
                    continue;
                }
                self.load_refblock(rb)?;
                let blk = self
                    .rb_cache
                    .get(&rb)
                    .ok_or_else(|| Error::corrupt(format!("refcount block at {rb:#x} vanished from cache")))?;
                let mut found = false;
                while idx < end {
                    if rb_get(blk, order, idx % e) != 0 {
                        run_start = idx + 1;
                    } else {
                        first_free.get_or_insert(idx);
                        if idx + 1 - run_start == n {
                            found = true;
                            break;
                        }
                    }
                    idx += 1;
                }
                if found {
                    break;
                }
            }
            // make sure every refblock covering the run exists; creating one may take a
            // cluster inside the run, so search again afterwards
            for rt in run_start / e..=(run_start + n - 1) / e {
                if self.refblock_offset(rt)? == 0 {
                    self.create_refblock(rt)?;
                    continue 'outer;
                }
            }
            if let Some(what) = self.overlaps_fixed_metadata(run_start, n) {
                return Err(Error::corrupt(format!(
                    "refcounts say clusters {:#x}+{} are free, but they hold the {what}",
                    run_start * self.cs,
                    n * self.cs
                )));
            }
            // one range update per refblock (they all exist now)
            let mut i = run_start;
            while i < run_start + n {
                let end = ((i / e + 1) * e).min(run_start + n);
                let rb = self.refblock_offset(i / e)?;
                self.load_refblock(rb)?;
                self.rb_before_change(rb);
                let blk = self
                    .rb_cache
                    .get_mut(&rb)
                    .ok_or_else(|| Error::corrupt(format!("refcount block at {rb:#x} vanished from cache")))?;
                for j in i..end {
                    rb_set(blk, order, j % e, 1);
                }
                self.rb_dirty.insert(rb);
                self.rb_early.insert(rb);
                i = end;
            }
            if !self.jobs.is_empty() {
                self.fresh.extend(run_start..run_start + n);
            }
            // everything before the first free cluster seen is in use; the holes seen
            // before the run are shorter than `n`
            if skipped {
                if run_start > self.run_skip.0 {
                    self.run_skip = (run_start + n, n);
                } else {
                    self.run_skip.0 = run_start + n;
                }
            } else {
                self.free_cursor = match first_free {
                    Some(f) if f < run_start => f,
                    _ => run_start + n,
                };
                if self.free_cursor < run_start {
                    self.run_skip = (run_start + n, n);
                }
            }
            self.note_end(run_start + n);
            return Ok(run_start * self.cs);
        }
    }

    /// Create the refblock for reftable index `rt` at the first cluster of the range it
    /// covers (so it describes itself). It lives in memory (dirty) until the next write of
    /// dirty refblocks, which writes it, flushes, then writes its reftable entry; the barrier
    /// that follows every such write (before any pointer relies on a refcount) makes the
    /// entry durable. So creating a refblock costs no flush of its own, and a crash before
    /// that write-back only loses clusters no durable pointer reaches.
    pub(crate) fn create_refblock(&mut self, rt: u64) -> Result<u64> {
        if rt as usize >= self.reftable.len() {
            self.grow_reftable(rt + 1)?;
            let existing = self.refblock_offset(rt)?;
            if existing != 0 {
                return Ok(existing);
            }
        }
        let e = self.rb_entries();
        let idx = rt * e;
        if let Some(what) = self.overlaps_fixed_metadata(idx, 1) {
            return Err(Error::corrupt(format!(
                "no refblock for cluster range starting at {:#x}, but that cluster holds the {what}",
                idx * self.cs
            )));
        }
        let off = idx * self.cs;
        let mut b = vec![0u8; self.cs as usize];
        rb_set(&mut b, self.h.refcount_order, 0, 1);
        debug!(rt, off, "creating refcount block");
        if let Some(slot) = self.reftable.get_mut(rt as usize) {
            *slot = off;
        }
        self.rb_cache.insert(off, b);
        self.rb_disk.remove(&off);
        self.rb_dirty.insert(off);
        self.rb_early.insert(off);
        self.rt_new.insert(rt);
        self.note_end(idx + 1);
        Ok(off)
    }

    /// Grow the refcount table to at least `min_entries`, moving it to the end of the image
    /// together with the refblocks needed to describe it; the header switch is the commit.
    pub(crate) fn grow_reftable(&mut self, min_entries: u64) -> Result<()> {
        let cs = self.cs;
        let e = self.rb_entries();
        let old_entries = self.reftable.len() as u64;
        let mut want = min_entries.max(old_entries * 2).max(cs / 8);
        let start = self.end_cluster()?;
        let (nc, new_rbs) = loop {
            let nc = (want * 8).div_ceil(cs);
            if nc * cs > header::MAX_REFTABLE_BYTES {
                return Err(Error::unsupported(format!(
                    "refcount table would need {nc} clusters, above the 8 MiB limit"
                )));
            }
            // refblocks placed after the table; find a fixed point for their number
            let mut k = 0u64;
            let new_rbs = loop {
                let end = start + nc + k;
                let mut missing = Vec::new();
                for rt in start / e..=(end - 1) / e {
                    if self.refblock_offset(rt)? == 0 {
                        missing.push(rt);
                    }
                }
                if missing.len() as u64 == k {
                    break missing;
                }
                k = missing.len() as u64;
            };
            let max_rt = (start + nc + k - 1) / e;
            if max_rt < want {
                break (nc, new_rbs);
            }
            want = max_rt + 1;
        };
        let k = new_rbs.len() as u64;
        info!(old_entries, new_clusters = nc, new_refblocks = k, "growing refcount table");
        let mut table: Vec<u64> = self.reftable.clone();
        table.resize((nc * cs / 8) as usize, 0);
        let order = self.h.refcount_order;
        let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for (j, rt) in new_rbs.iter().enumerate() {
            let off = (start + nc + j as u64) * cs;
            if let Some(s) = table.get_mut(*rt as usize) {
                *s = off;
            }
            blocks.push((off, vec![0u8; cs as usize]));
        }
        // refcounts of the new table and blocks
        for c in start..start + nc + k {
            let rt = c / e;
            if let Some(pos) = new_rbs.iter().position(|r| *r == rt) {
                if let Some((_, b)) = blocks.get_mut(pos) {
                    rb_set(b, order, c % e, 1);
                }
            } else {
                self.set_refcount(c, 1)?;
            }
        }
        self.write_dirty_refblocks()?;
        for (off, b) in &blocks {
            self.io.write_at(b, *off).map_err(|er| Error::io(format!("writing refblock at {off:#x}"), er))?;
        }
        let mut tb = vec![0u8; (nc * cs) as usize];
        for (i, v) in table.iter().enumerate() {
            put_be64(&mut tb, i * 8, *v);
        }
        let toff = start * cs;
        self.io.write_at(&tb, toff).map_err(|er| Error::io(format!("writing new refcount table at {toff:#x}"), er))?;
        self.io.flush().map_err(|er| Error::io("flushing new refcount table", er))?;
        let mut hb = [0u8; 12];
        put_be64(&mut hb, 0, toff);
        header::put_be32(&mut hb, 8, nc as u32);
        self.io
            .write_at(&hb, header::OFF_REFTABLE)
            .map_err(|er| Error::io("writing refcount table location to the header", er))?;
        self.io.flush().map_err(|er| Error::io("flushing header", er))?;
        let old_off = self.h.refcount_table_offset;
        let old_nc = u64::from(self.h.refcount_table_clusters);
        self.h.refcount_table_offset = toff;
        self.h.refcount_table_clusters = nc as u32;
        self.reftable = table;
        for (off, b) in blocks {
            // written above: clean
            self.rb_disk.remove(&off);
            self.rb_cache.insert(off, b);
        }
        self.note_end(start + nc + k);
        // the old table is no longer referenced: free it
        for c in old_off / cs..old_off / cs + old_nc {
            self.add_refcount(c, -1)?;
        }
        Ok(())
    }

    /// Write every dirty refblock (no flush at the end). New refblocks (see
    /// [`Qcow2::create_refblock`]) are flushed before their reftable entries are written;
    /// the caller's barrier makes the entries durable with the refcounts.
    pub(crate) fn write_dirty_refblocks(&mut self) -> Result<bool> {
        self.write_refblocks(false)
    }

    /// [`Qcow2::write_dirty_refblocks`] for the blocks with allocations or decreases
    /// ([`Qcow2::rb_early`]) only: what must be durable before the L2/L1 tables are written.
    pub(crate) fn write_early_refblocks(&mut self) -> Result<bool> {
        self.write_refblocks(true)
    }

    fn write_refblocks(&mut self, early_only: bool) -> Result<bool> {
        if self.rb_dirty.is_empty() && self.rt_new.is_empty() {
            return Ok(false);
        }
        if early_only && self.rb_early.is_empty() && self.rt_new.is_empty() {
            return Ok(false);
        }
        let (dirty, wrote) = self.write_rb_dirty(early_only)?;
        if !self.rt_new.is_empty() {
            if let Err(er) = self.io.flush() {
                self.rb_dirty.extend(dirty);
                return Err(Error::io("flushing new refcount blocks", er));
            }
            let new: Vec<u64> = self.rt_new.iter().copied().collect();
            self.write_reftable_entries(&new)?;
            return Ok(true);
        }
        Ok(wrote)
    }

    /// Write the dirty refblocks, but not the reftable entries of new ones, which need
    /// their blocks durable first: returns those reftable indices, for
    /// [`Qcow2::write_reftable_entries`] after a barrier. (The staged form of
    /// `write_dirty_refblocks`, whose barrier runs outside the image lock.)
    pub(crate) fn write_refblocks_only(&mut self) -> Result<Vec<u64>> {
        self.write_rb_dirty(false)?;
        Ok(self.rt_new.iter().copied().collect())
    }

    /// Write the dirty refblocks from the cache, but none whose bytes are those the file
    /// holds ([`Qcow2::rb_disk`]); returns the set no longer dirty (dirty again if a write
    /// fails) and whether anything was written.
    fn write_rb_dirty(&mut self, early_only: bool) -> Result<(BTreeSet<u64>, bool)> {
        // every refblock write, on every path (guest write-back, a commit, a deletion's
        // table rewrite, a reftable growth): handed-over counts only reach disk behind a
        // durable dirty bit
        self.dirty_before_leaks()?;
        let dirty = if early_only {
            // (every early block is dirty: both are marked together and the early mark goes
            // only when the block is written; a new refblock is early until written)
            let pick = self.rb_early.clone();
            for b in &pick {
                self.rb_dirty.remove(b);
            }
            pick
        } else {
            std::mem::take(&mut self.rb_dirty)
        };
        let mut wrote = false;
        for off in &dirty {
            if let Some(b) = self.rb_cache.get(off) {
                if self.rb_disk.get(off).is_some_and(|d| d == b) {
                    continue;
                }
                if let Err(er) = self.io.write_at(b, *off) {
                    self.rb_dirty.extend(dirty.iter().copied());
                    // what the file holds is unknown now: write these blocks next time
                    for d in &dirty {
                        self.rb_disk.remove(d);
                    }
                    return Err(Error::io(format!("writing refcount block at {off:#x}"), er));
                }
                wrote = true;
            }
        }
        for b in &dirty {
            self.rb_early.remove(b);
            self.rb_disk.remove(b);
        }
        Ok((dirty, wrote))
    }

    /// Write the reftable entries of new refblocks that a barrier made durable (see
    /// [`Qcow2::write_refblocks_only`]); entries written meanwhile are skipped.
    pub(crate) fn write_reftable_entries(&mut self, rts: &[u64]) -> Result<()> {
        for rt in rts {
            if !self.rt_new.contains(rt) {
                continue;
            }
            let mut ent = [0u8; 8];
            put_be64(&mut ent, 0, self.reftable.get(*rt as usize).copied().unwrap_or(0));
            let at = self.h.refcount_table_offset + rt * 8;
            self.io
                .write_at(&ent, at)
                .map_err(|er| Error::io(format!("writing reftable entry {rt} at {at:#x}"), er))?;
            self.rt_new.remove(rt);
        }
        Ok(())
    }

    /// Count clusters with a non-zero refcount.
    pub(crate) fn count_allocated(&self) -> Result<u64> {
        let mut n = 0;
        let e = self.rb_entries();
        let order = self.h.refcount_order;
        let mut seen = std::collections::HashSet::new();
        for rt in 0..self.reftable.len() as u64 {
            let rb = self.refblock_offset(rt)?;
            if rb == 0 || !seen.insert(rb) {
                continue;
            }
            let owned;
            let b = match self.rb_cache.get(&rb) {
                Some(b) => b,
                None => {
                    let mut v = vec![0u8; self.cs as usize];
                    self.io.read_at(&mut v, rb).map_err(|er| Error::io(format!("reading refblock at {rb:#x}"), er))?;
                    owned = v;
                    &owned
                }
            };
            n += (0..e).filter(|i| rb_get(b, order, *i) != 0).count() as u64;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rb_roundtrip_all_orders() {
        for order in 0..=6u32 {
            let mut b = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = if order == 6 { u64::MAX } else { (1u64 << (1 << order)) - 1 };
            for i in 0..n {
                rb_set(&mut b, order, i, (i * 7) & max);
            }
            for i in 0..n {
                assert_eq!(rb_get(&b, order, i), (i * 7) & max, "order {order} idx {i}");
            }
        }
    }

    /// `check_deltas` (one block lookup per run of deltas in the same refblock) gives the
    /// verdict of checking each delta against `refcount()`, whatever the order of the
    /// deltas and across refblocks, allocated or not.
    #[test]
    fn check_deltas_matches_refcount_of_each() {
        use crate::image::CreateOptions;
        use crate::io::MemIo;
        let opts = CreateOptions { size: 1 << 30, cluster_bits: 9, ..Default::default() };
        let mut img = Qcow2::create(Box::new(MemIo::new()), &opts).expect("create");
        let e = img.rb_entries();
        let max = img.rc_max();
        // block 0 is allocated (the image's own metadata); block 3 is not
        let (a, b, c) = (e / 2, 3 * e + 5, e - 1);
        img.set_refcount(a, 1).expect("set");
        img.set_refcount(c, max).expect("set");
        let one = |img: &mut Qcow2, d: &[(u64, u64)], inc: bool| -> std::result::Result<(), String> {
            for &(idx, n) in d {
                let rc = img.refcount(idx).map_err(|e| e.to_string())?;
                let ok = if inc { rc != 0 && rc.checked_add(n).is_some_and(|v| v <= max) } else { rc >= n };
                if !ok {
                    return Err(format!("cluster {idx}"));
                }
            }
            Ok(())
        };
        let cases: Vec<(Vec<(u64, u64)>, bool)> = vec![
            (vec![(a, 1)], true),
            (vec![(a, 1), (c, 1)], true),
            (vec![(c, 1), (a, 1)], false),
            (vec![(a, 1), (b, 1)], true),
            (vec![(b, 1), (a, 1)], false),
            (vec![(a, 2), (a + 1, 0)], false),
            (vec![(a, 1), (a + 1, 1)], true),
            (vec![(a, 1), (c, max - 1), (a, 1)], false),
        ];
        for (d, inc) in cases {
            let want = one(&mut img, &d, inc);
            let got = img.check_deltas(&d, inc);
            assert_eq!(got.is_ok(), want.is_ok(), "deltas {d:?} increase {inc}: {got:?} vs {want:?}");
        }
    }
}
