//! The image engine: open/create, guest read/write with COW, zeroes and discard, flush
//! (ordered write-back of the metadata caches), info and map.

use crate::compress::decompress;
use crate::error::{Error, Result};
use crate::header::{
    self, build_header, put_be32, put_be64, CompressionType, Header, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
};
use crate::io::{FileIo, ImageIo};
use crate::l2::{l1_to_l2, Cluster, L2Geom, COPIED, OFFSET_MASK, ZERO};
use crate::offmap::{OffMap, OffSet};
use crate::refcount::rb_set;
use crate::snapshot::Snapshot;
use serde::Serialize;
use std::collections::BTreeSet;
use std::path::Path;
use tracing::{debug, info, warn};
use xensnap_blockdev::DataBuf;

/// Options for [`Qcow2::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual disk size in bytes.
    pub size: u64,
    /// log2 of the cluster size, 9..=21 (default 14 = 16 KiB: see CLUSTER-SIZE.md).
    pub cluster_bits: u32,
    /// log2 of the refcount width in bits, 0..=6 (default 4 = 16-bit).
    pub refcount_order: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions { size: 0, cluster_bits: 14, refcount_order: 4 }
    }
}

/// Options for [`Qcow2::open`].
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    pub read_only: bool,
}

/// Path-free facts about an open image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub version: u32,
    pub virtual_size: u64,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub l1_size: u32,
    pub nb_snapshots: u32,
    pub dirty: bool,
    pub corrupt: bool,
    pub read_only: bool,
    pub read_only_reason: Option<String>,
    pub extended_l2: bool,
    pub compression_type: CompressionType,
    pub features: Vec<String>,
    pub file_length: u64,
    pub allocated_clusters: u64,
}

/// One run of a guest→host mapping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub guest_offset: u64,
    pub length: u64,
    pub host_offset: Option<u64>,
    /// "data", "zero", "compressed" or "unallocated".
    pub kind: &'static str,
    pub refcount: u64,
    pub shared: bool,
}

/// Which L1 table a lookup goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tree {
    Active,
    /// A snapshot's L1, keyed by its L1 offset.
    Snap(u64),
    /// An L1 table held in memory only (a taken checkpoint that is not durable yet, or the
    /// old active tree of a revert whose references are being dropped), keyed by an id.
    Mem(u64),
}

/// An open qcow2 image.
pub struct Qcow2 {
    pub(crate) io: Box<dyn ImageIo>,
    pub(crate) h: Header,
    pub(crate) cs: u64,
    pub(crate) read_only: bool,
    pub(crate) ro_reason: Option<String>,
    pub(crate) io_writable: bool,
    pub(crate) l1: Vec<u64>,
    /// Dirty 512-byte sectors of the active L1 (sector index within the table).
    pub(crate) l1_dirty: BTreeSet<u64>,
    pub(crate) reftable: Vec<u64>,
    pub(crate) rb_cache: OffMap<Vec<u8>>,
    pub(crate) rb_dirty: BTreeSet<u64>,
    /// Dirty refblocks that must be durable before a write-back of the L2/L1 tables: every
    /// change but a raise of a counted cluster — an allocation (the tables may point to
    /// it), a decrease (a drop walk's: the tables may carry COPIED flags set because of
    /// it). Raises of counted clusters (hand-overs, link walks) only make a count exceed its
    /// on-disk references (and clear COPIED flags, the safe direction), so a flush writes
    /// those blocks after the tables, with the deferred decreases of the same blocks, or,
    /// while background work is pending behind a durable dirty bit, leaves them to a later
    /// write-back (see [`Qcow2::writeback`]).
    pub(crate) rb_early: BTreeSet<u64>,
    /// The bytes a dirty refblock had when it became dirty (what the file holds): a
    /// write-back skips a block whose bytes came back to them, e.g. a hand-over's +1 and the
    /// deferred -1 of the pointer it replaced. No entry (a new block, or after a failed
    /// write): the block is written.
    pub(crate) rb_disk: OffMap<Vec<u8>>,
    /// Refcount table indices whose (new) refblock is only in memory: the block is written
    /// and flushed before the table entry, at the next write of dirty refblocks.
    pub(crate) rt_new: BTreeSet<u64>,
    pub(crate) l2_cache: OffMap<Vec<u64>>,
    pub(crate) l2_dirty: BTreeSet<u64>,
    /// Byte ranges whose clusters lose one reference once the pointer removal is durable.
    pub(crate) pending_free: Vec<(u64, u64)>,
    pub(crate) snapshots: Vec<Snapshot>,
    pub(crate) snapshot_table_bytes: u64,
    pub(crate) snap_l1: OffMap<Vec<u64>>,
    pub(crate) free_cursor: u64,
    /// Allocation search hint `(to, len)`: every free run of clusters starting in
    /// `[free_cursor, to)` is shorter than `len` clusters, so a search for `len` or more
    /// contiguous clusters starts at `to`. Reset whenever a refcount drops to 0.
    pub(crate) run_skip: (u64, u64),
    pub(crate) end_hint: u64,
    /// A length the image file is known to have reached. The engine never shrinks its file,
    /// so a data read wholly below this needs no `fstat` (one system call less per guest read).
    len_floor: std::sync::atomic::AtomicU64,
    pub(crate) cache_limit: usize,
    pub(crate) decomp: Option<(u64, Vec<u8>)>,
    pub(crate) dirty_set_by_us: bool,
    /// Background durability work, processed in order (see `durable.rs`).
    pub(crate) jobs: std::collections::VecDeque<crate::durable::Job>,
    /// In-memory L1 tables of [`Tree::Mem`] trees.
    pub(crate) mem_l1: OffMap<Vec<u64>>,
    pub(crate) next_mem: u64,
    /// Clusters allocated since the last checkpoint take / revert switch (only tracked while
    /// jobs are queued): they are not shared with the tree the active one was copied from.
    pub(crate) fresh: OffSet,
    /// A revert switch is not committed yet: the active L1 has no home on disk, so it is not
    /// written back (flush completes the switch first).
    pub(crate) l1_unpublished: bool,
    /// While a switch is not committed, the old active tree is still the published one: its
    /// unwritten L1 sectors (memory tree id, L1 offset, sectors) are written back to its
    /// old home, so pointer removals it made reach disk before anything relies on them.
    pub(crate) old_l1_dirty: Option<(u64, u64, BTreeSet<u64>)>,
    /// A write dropped a reference whose count was handed over to a pending checkpoint: a
    /// crash before that checkpoint is durable leaks clusters, so the dirty bit is set
    /// before the next write-back (and cleared by the first flush after all work is
    /// durable).
    pub(crate) leak_window: bool,
    /// The dirty bit was written set (without a barrier) when barrier ticket `n` was the
    /// last one handed out, and no flush is known to have completed since: a barrier with a
    /// later ticket, or any flush of ours, makes it durable. Refcounts a crash would leak
    /// (hand-overs) are never written before it is durable ([`Qcow2::dirty_before_leaks`]).
    pub(crate) dirty_unsynced: Option<u64>,
    /// Eviction is held off while a background step loads what it will read (see
    /// `Qcow2::prefetch_step`): the step then runs on cached tables only.
    pub(crate) hold_cache: bool,
    /// L2 entries one step of a background walk covers (see `durable.rs`, `Job`).
    pub(crate) walk_chunk: u64,
    /// Guest requests served through [`crate::SharedImage`] (wrapping count), which a
    /// durability driver reads to tell a busy guest from an idle one ([`crate::Pacer`]).
    pub(crate) guest_ops: u64,
    /// Nanoseconds guest requests through [`crate::SharedImage`] waited for the image lock
    /// while it was taken (wrapping), read by a durability driver's [`crate::Pacer`] (which
    /// can bound what its steps cost the guest, see `Pacer::with_wait_share`).
    pub(crate) guest_wait_ns: u64,
    /// Set by a durability driver while it waits for the image lock: a guest request that
    /// holds the lock then lets it in first (see `SharedImage::durable_work_handed`).
    pub(crate) driver_waiting: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Last barrier ticket handed out by a staged commit (see `durable.rs`).
    pub(crate) next_ticket: u64,
    /// Bumped by every operation that may change what the active disk reads or how it maps
    /// (guest writes, discards, flushes, checkpoint take / switch / delete, repair), not by
    /// background steps: a [`CowPlan`] made before a bump is stale.
    pub(crate) wgen: u64,
    /// Clusters allocated by [`Qcow2::cow_plan`]s not finished yet (counted, not referenced).
    pub(crate) cow_inflight: OffSet,
    /// The first failed flush or write of this engine (for an [`ImageIo`] that does not
    /// track poisoning itself, see [`crate::io::Poison`]): everything is refused after it.
    pub(crate) failed: Option<String>,
}

fn ioe(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// [`ioe`] with the description formatted only if the I/O fails (for the request paths:
/// a `format!` per read or write is an allocation and a formatting run per request).
fn ioef(what: impl FnOnce() -> String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what(), e)
}

impl Qcow2 {
    // ------------------------------------------------------------------ create / open

    /// Create a new image on an empty `io`.
    pub fn create(mut io: Box<dyn ImageIo>, opts: &CreateOptions) -> Result<Qcow2> {
        if !(9..=21).contains(&opts.cluster_bits) {
            return Err(Error::invalid(format!("cluster_bits {} not in 9..=21", opts.cluster_bits)));
        }
        if opts.refcount_order > 6 {
            return Err(Error::invalid(format!("refcount_order {} not in 0..=6", opts.refcount_order)));
        }
        if opts.size > (1u64 << 61) {
            return Err(Error::invalid(format!("size {} is too large", opts.size)));
        }
        if io.len().map_err(ioe("reading the length of the new image"))? != 0 {
            return Err(Error::invalid("the image file to create is not empty"));
        }
        let cs = 1u64 << opts.cluster_bits;
        let mut h = Header {
            version: 3,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: opts.cluster_bits,
            size: opts.size,
            crypt_method: 0,
            l1_size: 0,
            l1_table_offset: 0,
            refcount_table_offset: cs,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: opts.refcount_order,
            header_length: header::V3_HEADER_LEN,
            compression: CompressionType::Zlib,
            extensions: Vec::new(),
        };
        let l1_entries = h.l1_entries_for(opts.size);
        if l1_entries * 8 > header::MAX_L1_BYTES {
            return Err(Error::invalid(format!(
                "size {} needs an L1 table of {l1_entries} entries, above the 32 MiB limit for {cs}-byte clusters",
                opts.size
            )));
        }
        h.l1_size = l1_entries as u32;
        let l1c = (l1_entries * 8).div_ceil(cs);
        let per_rb = (cs * 8) >> opts.refcount_order;
        let (mut rt, mut rb) = (1u64, 1u64);
        loop {
            let total = 1 + rt + rb + l1c;
            let rb2 = total.div_ceil(per_rb);
            let rt2 = (rb2 * 8).div_ceil(cs);
            if rb2 == rb && rt2 == rt {
                break;
            }
            rb = rb2.max(rb);
            rt = rt2.max(rt);
        }
        let total = 1 + rt + rb + l1c;
        h.refcount_table_clusters = rt as u32;
        h.refcount_table_offset = cs;
        h.l1_table_offset = if l1c > 0 { (1 + rt + rb) * cs } else { 0 };
        // refblocks
        let mut blocks = vec![0u8; (rb * cs) as usize];
        for c in 0..total {
            let b = (c / per_rb) as usize;
            if let Some(blk) = blocks.get_mut(b * cs as usize..(b + 1) * cs as usize) {
                rb_set(blk, opts.refcount_order, c % per_rb, 1);
            }
        }
        let mut table = vec![0u8; (rt * cs) as usize];
        for b in 0..rb {
            put_be64(&mut table, (b * 8) as usize, (1 + rt + b) * cs);
        }
        io.write_at(&table, cs).map_err(ioe("writing the refcount table"))?;
        io.write_at(&blocks, (1 + rt) * cs).map_err(ioe("writing the refcount blocks"))?;
        if l1c > 0 {
            io.write_at(&vec![0u8; (l1c * cs) as usize], h.l1_table_offset).map_err(ioe("writing the L1 table"))?;
        }
        io.flush().map_err(ioe("flushing the new image"))?;
        io.write_at(&build_header(&h), 0).map_err(ioe("writing the header"))?;
        io.flush().map_err(ioe("flushing the new header"))?;
        info!(size = opts.size, cluster_size = cs, "created qcow2 image");
        Self::open(io, &OpenOptions { read_only: false })
    }

    /// Create a new image file (fails if it exists).
    pub fn create_file(path: &Path, opts: &CreateOptions) -> Result<Qcow2> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(ioef(|| format!("creating {}", path.display())))?;
        Self::create(Box::new(FileIo::new(f)), opts)
    }

    /// Open an image file.
    pub fn open_file(path: &Path, opts: &OpenOptions) -> Result<Qcow2> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(!opts.read_only)
            .open(path)
            .map_err(ioef(|| format!("opening {}", path.display())))?;
        Self::open(Box::new(FileIo::new(f)), opts)
    }

    /// Open an image. Never writes when `opts.read_only`; a corrupt, v2 or extended-L2
    /// image is opened read-only (see [`ImageInfo::read_only_reason`]).
    pub fn open(io: Box<dyn ImageIo>, opts: &OpenOptions) -> Result<Qcow2> {
        let len = io.len().map_err(ioe("reading the image length"))?;
        let mut first = vec![0u8; len.min(104) as usize];
        io.read_at(&mut first, 0).map_err(ioe("reading the header"))?;
        if first.len() < 72 {
            return Err(Error::corrupt(format!("image is only {len} bytes long, too short for a qcow2 header")));
        }
        let cb = header::get_be32(&first, 20);
        if !(9..=21).contains(&cb) {
            return Err(Error::corrupt(format!("header cluster_bits {cb} at offset 20 is out of range 9..=21")));
        }
        let mut buf = vec![0u8; len.min(1u64 << cb) as usize];
        io.read_at(&mut buf, 0).map_err(ioe("reading the header cluster"))?;
        let h = Header::parse(&buf, len)?;
        let cs = h.cluster_size();
        let mut ro_reason = None;
        if opts.read_only {
            ro_reason = Some(String::new());
        } else if h.incompatible & INCOMPAT_CORRUPT != 0 {
            ro_reason = Some(": the corrupt bit is set (run repair)".to_string());
        } else if h.version == 2 {
            ro_reason = Some(": qcow2 version 2 images are read-only in this engine".to_string());
        } else if h.extended_l2() {
            ro_reason = Some(": images with extended L2 entries are read-only in this engine".to_string());
        }
        if let Some(r) = &ro_reason {
            if !r.is_empty() {
                warn!("opening read-only{r}");
            }
        }
        // L1
        let mut l1b = vec![0u8; (u64::from(h.l1_size) * 8) as usize];
        io.read_at(&mut l1b, h.l1_table_offset)
            .map_err(ioef(|| format!("reading the active L1 table at {:#x}", h.l1_table_offset)))?;
        let l1: Vec<u64> = l1b.chunks_exact(8).map(|c| header::get_be64(c, 0)).collect();
        // reftable
        let mut rtb = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
        io.read_at(&mut rtb, h.refcount_table_offset)
            .map_err(ioef(|| format!("reading the refcount table at {:#x}", h.refcount_table_offset)))?;
        let reftable: Vec<u64> = rtb.chunks_exact(8).map(|c| header::get_be64(c, 0)).collect();
        let (snapshots, st_bytes) = crate::snapshot::read_table(io.as_ref(), &h, len)?;
        check_fixed_overlaps(&h, &snapshots, st_bytes)?;
        let mut img = Qcow2 {
            io,
            cs,
            read_only: ro_reason.is_some(),
            io_writable: !opts.read_only,
            ro_reason: ro_reason.filter(|r| !r.is_empty()),
            l1,
            l1_dirty: BTreeSet::new(),
            reftable,
            rb_cache: OffMap::default(),
            rb_dirty: BTreeSet::new(),
            rb_early: BTreeSet::new(),
            rb_disk: OffMap::default(),
            rt_new: BTreeSet::new(),
            l2_cache: OffMap::default(),
            l2_dirty: BTreeSet::new(),
            pending_free: Vec::new(),
            snapshots,
            snapshot_table_bytes: st_bytes,
            snap_l1: OffMap::default(),
            free_cursor: 1,
            run_skip: (0, 0),
            end_hint: 0,
            len_floor: std::sync::atomic::AtomicU64::new(0),
            cache_limit: ((256u64 << 20) / cs).max(64) as usize,
            decomp: None,
            dirty_set_by_us: false,
            jobs: std::collections::VecDeque::new(),
            mem_l1: OffMap::default(),
            next_mem: 1,
            fresh: OffSet::default(),
            l1_unpublished: false,
            old_l1_dirty: None,
            leak_window: false,
            dirty_unsynced: None,
            hold_cache: false,
            walk_chunk: crate::durable::WALK_CHUNK,
            guest_ops: 0,
            guest_wait_ns: 0,
            driver_waiting: Default::default(),
            next_ticket: 0,
            wgen: 0,
            cow_inflight: OffSet::default(),
            failed: None,
            h,
        };
        if !img.read_only {
            if img.h.incompatible & INCOMPAT_DIRTY != 0 {
                warn!("image has the dirty bit set: rebuilding refcounts");
                let rep = img.repair()?;
                info!(leaks = rep.leaks, corruptions = rep.corruptions, "refcounts rebuilt after unclean shutdown");
                img.set_incompat(img.h.incompatible & !INCOMPAT_DIRTY)?;
            }
            if img.h.autoclear != 0 {
                // we maintain none of the autoclear features: clear them, as QEMU does
                let mut b = [0u8; 8];
                put_be64(&mut b, 0, 0);
                img.io.write_at(&b, header::OFF_AUTOCLEAR).map_err(ioe("clearing autoclear feature bits"))?;
                img.io.flush().map_err(ioe("flushing the header"))?;
                img.h.autoclear = 0;
            }
        }
        debug!(size = img.h.size, cluster_size = cs, snapshots = img.snapshots.len(), "opened qcow2 image");
        Ok(img)
    }

    pub(crate) fn set_incompat(&mut self, v: u64) -> Result<()> {
        let mut b = [0u8; 8];
        put_be64(&mut b, 0, v);
        self.io.write_at(&b, header::OFF_INCOMPAT).map_err(ioe("writing incompatible feature bits"))?;
        self.io.flush().map_err(ioe("flushing the header"))?;
        self.h.incompatible = v;
        self.dirty_unsynced = None;
        Ok(())
    }

    // ------------------------------------------------------------------ small helpers

    pub fn virtual_size(&self) -> u64 {
        self.h.size
    }
    pub fn cluster_size(&self) -> u64 {
        self.cs
    }
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }
    /// Set the metadata cache size (L2 tables + refcount blocks, in clusters; minimum 4).
    /// The default is 256 MiB worth of clusters.
    pub fn set_cache_limit(&mut self, clusters: usize) {
        self.cache_limit = clusters.max(4);
    }
    /// Test hook: L2 entries per chunk of a background walk (default
    /// [`crate::durable::WALK_CHUNK`]; at least 1), so that tests with small tables stop
    /// walks in the middle of a table.
    #[doc(hidden)]
    pub fn set_walk_chunk(&mut self, entries: u64) {
        self.walk_chunk = entries.max(1);
    }

    pub(crate) fn file_len(&self) -> Result<u64> {
        self.io.len().map_err(ioe("reading the image length"))
    }
    /// First cluster index past everything in the file or allocated in memory.
    pub(crate) fn end_cluster(&self) -> Result<u64> {
        Ok(self.file_len()?.div_ceil(self.cs).max(self.end_hint))
    }
    pub(crate) fn note_end(&mut self, idx: u64) {
        self.end_hint = self.end_hint.max(idx);
    }
    pub(crate) fn geom(&self) -> L2Geom {
        L2Geom { cluster_bits: self.h.cluster_bits, extended: self.h.extended_l2() }
    }
    /// The first failure that poisoned the image (a failed flush or write, here or through
    /// a sync handle), if any.
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.failed.clone().or_else(|| self.io.poisoned())
    }
    /// Refuse work on a poisoned image ([`Error::Poisoned`]).
    pub(crate) fn check_poison(&self) -> Result<()> {
        match self.poisoned() {
            Some(first) => Err(Error::Poisoned { first }),
            None => Ok(()),
        }
    }
    pub(crate) fn check_writable(&self) -> Result<()> {
        self.check_poison()?;
        if self.read_only {
            if let Some(r) = &self.ro_reason {
                debug!("write refused: read-only{r}");
            }
            return Err(Error::ReadOnly);
        }
        Ok(())
    }
    pub(crate) fn check_range(&self, offset: u64, len: u64, size: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(e) if e <= size => Ok(()),
            _ => Err(Error::OutOfRange { offset, len, size }),
        }
    }

    pub(crate) fn evict_if_needed(&mut self) -> Result<()> {
        if self.hold_cache || self.l2_cache.len() + self.rb_cache.len() < self.cache_limit {
            return Ok(());
        }
        if !self.l2_dirty.is_empty() || !self.rb_dirty.is_empty() {
            self.writeback()?;
        }
        let target = self.cache_limit / 2;
        let l2_keys: Vec<u64> = self.l2_cache.keys().copied().filter(|k| !self.l2_dirty.contains(k)).collect();
        for k in l2_keys {
            if self.l2_cache.len() + self.rb_cache.len() <= target {
                break;
            }
            self.l2_cache.remove(&k);
        }
        let rb_keys: Vec<u64> = self.rb_cache.keys().copied().filter(|k| !self.rb_dirty.contains(k)).collect();
        for k in rb_keys {
            if self.l2_cache.len() + self.rb_cache.len() <= target {
                break;
            }
            self.rb_cache.remove(&k);
        }
        Ok(())
    }

    // ------------------------------------------------------------------ L1 / L2 access

    /// Snapshot L1 tables are loaded on first use and kept.
    pub(crate) fn load_snap_l1(&mut self, l1_off: u64) -> Result<()> {
        if self.snap_l1.contains_key(&l1_off) {
            return Ok(());
        }
        let sn = self
            .snapshots
            .iter()
            .find(|s| s.l1_offset == l1_off)
            .ok_or_else(|| Error::not_found(format!("snapshot with L1 table at {l1_off:#x}")))?;
        let t = crate::snapshot::read_l1(self.io.as_ref(), l1_off, sn.l1_size, self.cs, self.file_len()?)?;
        self.snap_l1.insert(l1_off, t);
        Ok(())
    }

    pub(crate) fn l1_len(&mut self, tree: Tree) -> Result<usize> {
        match tree {
            Tree::Active => Ok(self.l1.len()),
            Tree::Snap(o) => {
                self.load_snap_l1(o)?;
                Ok(self.snap_l1.get(&o).map_or(0, |t| t.len()))
            }
            Tree::Mem(m) => Ok(self.mem_l1.get(&m).map_or(0, |t| t.len())),
        }
    }

    pub(crate) fn l1_entry(&mut self, tree: Tree, i: u64) -> Result<u64> {
        match tree {
            Tree::Active => Ok(self.l1.get(i as usize).copied().unwrap_or(0)),
            Tree::Snap(o) => {
                self.load_snap_l1(o)?;
                Ok(self.snap_l1.get(&o).and_then(|t| t.get(i as usize)).copied().unwrap_or(0))
            }
            Tree::Mem(m) => Ok(self.mem_l1.get(&m).and_then(|t| t.get(i as usize)).copied().unwrap_or(0)),
        }
    }

    pub(crate) fn load_l2(&mut self, off: u64) -> Result<()> {
        if self.l2_cache.contains_key(&off) {
            return Ok(());
        }
        self.evict_if_needed()?;
        let flen = self.file_len()?;
        if off == 0 || !off.is_multiple_of(self.cs) || off.checked_add(self.cs).is_none_or(|e| e > flen) {
            return Err(Error::corrupt(format!(
                "L2 table at offset {off:#x} is unaligned or outside the image ({flen} bytes)"
            )));
        }
        let mut b = vec![0u8; self.cs as usize];
        self.io.read_at(&mut b, off).map_err(ioef(|| format!("reading L2 table at {off:#x}")))?;
        let t: Vec<u64> = b.chunks_exact(8).map(|c| header::get_be64(c, 0)).collect();
        self.l2_cache.insert(off, t);
        Ok(())
    }

    /// A copy of the raw words of L2 table `off`.
    pub(crate) fn l2_table(&mut self, off: u64) -> Result<Vec<u64>> {
        self.load_l2(off)?;
        self.l2_cache
            .get(&off)
            .cloned()
            .ok_or_else(|| Error::corrupt(format!("L2 table at {off:#x} vanished from cache")))
    }

    /// L2 entry `i` of table `off`: (descriptor, subcluster bitmap or 0).
    pub(crate) fn l2_get(&mut self, off: u64, i: u64) -> Result<(u64, u64)> {
        self.load_l2(off)?;
        let ext = self.h.extended_l2();
        let t = self
            .l2_cache
            .get(&off)
            .ok_or_else(|| Error::corrupt(format!("L2 table at {off:#x} vanished from cache")))?;
        if ext {
            let w = (i * 2) as usize;
            Ok((t.get(w).copied().unwrap_or(0), t.get(w + 1).copied().unwrap_or(0)))
        } else {
            Ok((t.get(i as usize).copied().unwrap_or(0), 0))
        }
    }

    pub(crate) fn l2_set(&mut self, off: u64, i: u64, v: u64) -> Result<()> {
        self.load_l2(off)?;
        if let Some(slot) = self.l2_cache.get_mut(&off).and_then(|t| t.get_mut(i as usize)) {
            *slot = v;
        }
        self.l2_dirty.insert(off);
        Ok(())
    }

    pub(crate) fn set_l1(&mut self, i: u64, v: u64) {
        if let Some(slot) = self.l1.get_mut(i as usize) {
            if *slot != v {
                *slot = v;
                self.l1_dirty.insert(i / 64);
            }
        }
    }

    /// Classify the mapping of guest cluster `gc` in `tree`. Returns (L2 offset or 0,
    /// descriptor class, bitmap).
    pub(crate) fn lookup(&mut self, tree: Tree, gc: u64) -> Result<(u64, Cluster, u64)> {
        let l2e = self.h.l2_entries();
        let (l1i, l2i) = (gc / l2e, gc % l2e);
        let e = self.l1_entry(tree, l1i)?;
        let l2 = l1_to_l2(e, self.cs, &|| format!("{tree:?} L1 entry {l1i}"))?;
        if l2 == 0 {
            return Ok((0, Cluster::Unallocated, 0));
        }
        let (d, bm) = self.l2_get(l2, l2i)?;
        let c = self.geom().classify(d, bm, &|| format!("L2 table at {l2:#x} entry {l2i}"))?;
        Ok((l2, c, bm))
    }

    // ------------------------------------------------------------------ reads

    /// Read guest data of the active disk.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check_range(offset, buf.len() as u64, self.h.size)?;
        self.read_tree(Tree::Active, offset, buf)
    }

    pub(crate) fn read_tree(&mut self, tree: Tree, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.cs;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let gc = pos / cs;
            let co = pos % cs;
            let n = ((cs - co) as usize).min(buf.len() - done);
            let Some(out) = buf.get_mut(done..done + n) else { break };
            let (_, c, bm) = self.lookup(tree, gc)?;
            self.read_cluster(c, bm, co, out)?;
            done += n;
        }
        Ok(())
    }

    /// [`Qcow2::read`] into a [`DataBuf`] (e.g. guest pages). Data clusters that follow each
    /// other in the file are read as one run, straight into `dst` when the [`ImageIo`] and
    /// `dst` can ([`ImageIo::read_into`]: one vectored read for the run); zero and unallocated
    /// clusters zero-fill `dst`; compressed clusters and extended-L2 subclusters go through
    /// a buffer as in [`Qcow2::read`]. Same results as `read`; on failure the contents of
    /// `dst` are unspecified.
    pub fn read_into(&mut self, offset: u64, dst: &mut dyn DataBuf) -> Result<()> {
        let total = dst.len();
        self.check_range(offset, total as u64, self.h.size)?;
        let cs = self.cs;
        let direct_ok = !self.h.extended_l2();
        let mut done = 0usize;
        // data run not read yet: (host offset, position in dst, length)
        let mut run: Option<(u64, usize, usize)> = None;
        while done < total {
            let pos = offset + done as u64;
            let (gc, co) = (pos / cs, pos % cs);
            let n = ((cs - co) as usize).min(total - done);
            let (_, c, bm) = self.lookup(Tree::Active, gc)?;
            if let (Cluster::Normal { host, zero: false, .. }, true) = (c, direct_ok) {
                let h = host + co;
                match &mut run {
                    Some((rh, _, rl)) if *rh + *rl as u64 == h => *rl += n,
                    _ => {
                        if let Some(r) = run.take() {
                            self.read_run_into(r, dst)?;
                        }
                        run = Some((h, done, n));
                    }
                }
                done += n;
                continue;
            }
            if let Some(r) = run.take() {
                self.read_run_into(r, dst)?;
            }
            match c {
                Cluster::Unallocated | Cluster::Zero | Cluster::Normal { zero: true, .. } => {
                    dst.zero(done, n).map_err(ioe("zero-filling the read buffer"))?;
                }
                _ => {
                    let mut tmp = vec![0u8; n];
                    self.read_cluster(c, bm, co, &mut tmp)?;
                    dst.copy_in(done, &tmp).map_err(ioe("copying into the read buffer"))?;
                }
            }
            done += n;
        }
        if let Some(r) = run {
            self.read_run_into(r, dst)?;
        }
        Ok(())
    }

    /// Read `len` bytes of data clusters at `host` into `dst` at `pos` (one run of
    /// [`Qcow2::read_into`]), with [`Qcow2::read_host`]'s checks against the file length.
    /// Are the `len` bytes at `host` wholly inside the file? Asks for the file's length
    /// (and remembers it) only when they reach past the length already seen.
    fn in_file(&self, host: u64, len: usize) -> Result<bool> {
        use std::sync::atomic::Ordering::Relaxed;
        let within = |floor: u64| host.checked_add(len as u64).is_some_and(|end| end <= floor);
        if within(self.len_floor.load(Relaxed)) {
            return Ok(true);
        }
        let flen = self.file_len()?;
        self.len_floor.fetch_max(flen, Relaxed);
        Ok(within(flen))
    }

    fn read_run_into(&self, (host, pos, len): (u64, usize, usize), dst: &mut dyn DataBuf) -> Result<()> {
        if !self.in_file(host, len)? {
            // the run reaches the end of the file: cluster by cluster, as `read` does
            let mut p = 0usize;
            while p < len {
                let h = host + p as u64;
                let n = ((self.cs - h % self.cs) as usize).min(len - p);
                let mut tmp = vec![0u8; n];
                self.read_host(h, &mut tmp, "data cluster")?;
                dst.copy_in(pos + p, &tmp).map_err(ioe("copying into the read buffer"))?;
                p += n;
            }
            return Ok(());
        }
        let what = || format!("reading data cluster at {host:#x}");
        if self.io.read_into(dst, pos, len, host).map_err(ioef(&what))? {
            return Ok(());
        }
        let mut tmp = vec![0u8; len];
        self.io.read_at(&mut tmp, host).map_err(ioef(&what))?;
        dst.copy_in(pos, &tmp).map_err(ioe("copying into the read buffer"))
    }

    fn read_host(&self, host: u64, out: &mut [u8], what: &str) -> Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let floor = self.len_floor.load(Relaxed);
        if host.checked_add(out.len() as u64).is_some_and(|end| end <= floor) {
            // wholly inside what the file is known to hold: no need to ask for its length
            return self.io.read_at(out, host).map_err(ioef(|| format!("reading {what} at {host:#x}")));
        }
        let flen = self.file_len()?;
        self.len_floor.fetch_max(flen, Relaxed);
        if host >= flen {
            return Err(Error::corrupt(format!("{what} at {host:#x} is past the end of the image ({flen} bytes)")));
        }
        // the tail of the last data cluster may be missing from the file: reads as zero
        let avail = ((flen - host) as usize).min(out.len());
        let (a, b) = out.split_at_mut(avail);
        self.io.read_at(a, host).map_err(ioef(|| format!("reading {what} at {host:#x}")))?;
        b.fill(0);
        Ok(())
    }

    fn read_cluster(&mut self, c: Cluster, bm: u64, co: u64, out: &mut [u8]) -> Result<()> {
        match c {
            Cluster::Unallocated | Cluster::Zero | Cluster::Normal { zero: true, .. } => {
                out.fill(0);
                Ok(())
            }
            Cluster::Normal { host, .. } if !self.h.extended_l2() => self.read_host(host + co, out, "data cluster"),
            Cluster::Normal { host, .. } => {
                // extended L2: per subcluster allocation bitmap
                let sc = self.cs / 32;
                let mut done = 0usize;
                while done < out.len() {
                    let p = co + done as u64;
                    let s = p / sc;
                    let n = ((sc - p % sc) as usize).min(out.len() - done);
                    let Some(o) = out.get_mut(done..done + n) else { break };
                    if bm & (1u64 << s) != 0 {
                        self.read_host(host + p, o, "data subcluster")?;
                    } else {
                        o.fill(0);
                    }
                    done += n;
                }
                Ok(())
            }
            Cluster::Compressed { offset, len } => {
                let data = self.decompressed(offset, len)?;
                let s = co as usize;
                match data.get(s..s + out.len()) {
                    Some(src) => {
                        out.copy_from_slice(src);
                        Ok(())
                    }
                    None => Err(Error::corrupt(format!("compressed cluster at {offset:#x} too short"))),
                }
            }
        }
    }

    pub(crate) fn decompressed(&mut self, offset: u64, len: u64) -> Result<Vec<u8>> {
        if let Some((o, d)) = &self.decomp {
            if *o == offset {
                return Ok(d.clone());
            }
        }
        let flen = self.file_len()?;
        if offset >= flen {
            return Err(Error::corrupt(format!("compressed cluster at {offset:#x} is past the end of the image")));
        }
        let l = len.min(flen - offset) as usize;
        let mut input = vec![0u8; l];
        self.io.read_at(&mut input, offset).map_err(ioef(|| format!("reading compressed cluster at {offset:#x}")))?;
        let mut out = vec![0u8; self.cs as usize];
        decompress(self.h.compression, &input, &mut out, offset)?;
        self.decomp = Some((offset, out.clone()));
        Ok(out)
    }

    // ------------------------------------------------------------------ writes

    /// Get a writable L2 table for L1 index `l1i` of the active tree: allocate a new one,
    /// or copy a shared one (COW); returns its offset.
    fn l2_for_write(&mut self, l1i: u64) -> Result<u64> {
        let e = self.l1_entry(Tree::Active, l1i)?;
        let old = l1_to_l2(e, self.cs, &|| format!("active L1 entry {l1i}"))?;
        if old != 0 {
            let rc = self.refcount(old / self.cs)?;
            if rc == 1 && !self.uncounted_share(l1i, 0, old / self.cs) {
                if e & COPIED == 0 {
                    self.set_l1(l1i, old | COPIED);
                }
                return Ok(old);
            }
            if rc == 0 {
                return Err(Error::corrupt(format!("L2 table at {old:#x} (L1 entry {l1i}) has refcount 0")));
            }
            if self.h.extended_l2() {
                return Err(Error::unsupported("writing extended L2 images"));
            }
        }
        // copy the old table before allocating (allocation may evict it from the cache)
        let table = if old != 0 {
            self.load_l2(old)?;
            let mut t = self
                .l2_cache
                .get(&old)
                .cloned()
                .ok_or_else(|| Error::corrupt(format!("L2 table at {old:#x} vanished from cache")))?;
            for w in t.iter_mut() {
                *w &= !COPIED;
            }
            // entries a drop walk in the middle of this index gave back may be the copy's
            // alone now (see `Qcow2::dropped_below`): COPIED exactly where the count is 1
            let geom = self.geom();
            let given_back = self.dropped_below(l1i).min(t.len() as u64) as usize;
            for (j, w) in t.iter_mut().enumerate().take(given_back) {
                if let Cluster::Normal { host, .. } =
                    geom.classify(*w, 0, &|| format!("L2 table at {old:#x} entry {j}"))?
                {
                    if self.refcount(host / self.cs)? == 1 && !self.uncounted_share(l1i, j as u64, host / self.cs) {
                        *w |= COPIED;
                    }
                }
            }
            t
        } else {
            vec![0u64; (self.cs / 8) as usize]
        };
        let new = self.alloc_clusters(1)?;
        self.l2_cache.insert(new, table);
        self.l2_dirty.insert(new);
        self.set_l1(l1i, new | COPIED);
        if old != 0 {
            debug!(old, new, "COW of shared L2 table");
            if self.uncounted_share(l1i, 0, old / self.cs) {
                self.hand_over(old / self.cs, 1)?;
            }
            self.pending_free.push((old, self.cs));
        }
        Ok(new)
    }

    /// A change that can make a [`CowPlan`] stale (see [`Qcow2::wgen`]).
    pub(crate) fn bump_gen(&mut self) {
        self.wgen = self.wgen.wrapping_add(1);
    }

    /// First half of a guest write split around its data I/O, so that the data I/O can run
    /// without the image lock (a durability driver's step meanwhile, see
    /// [`crate::SharedImage`]): for a write of `len` bytes at `offset` inside one guest
    /// cluster that must be copied on write — a data cluster the active disk shares with a
    /// checkpoint, under an L2 table that exists, while background work is pending —
    /// allocate the new cluster and return the plan; `None` for every other write (make it
    /// with [`Qcow2::write`]). Nothing else changes: the new cluster is counted, not
    /// referenced, until [`Qcow2::cow_finish`]. [`CowPlan::run`] then writes the old
    /// cluster's bytes with the guest's merged in to the new cluster, with no access to the
    /// engine; `cow_finish` links it in if nothing that could change the merge happened in
    /// between (any guest write, discard, flush or checkpoint operation; background steps
    /// do not count) and the position still maps the old cluster, and otherwise frees it
    /// and reports that the write is still to be made.
    pub fn cow_plan(&mut self, offset: u64, len: usize) -> Result<Option<CowPlan>> {
        let cs = self.cs;
        if self.jobs.is_empty()
            || len == 0
            || self.h.extended_l2()
            || self.check_writable().is_err()
            || self.check_range(offset, len as u64, self.h.size).is_err()
            || offset % cs + len as u64 > cs
        {
            return Ok(None);
        }
        let Some(io) = self.io.data_io() else { return Ok(None) };
        let gc = offset / cs;
        let l2e = self.h.l2_entries();
        let (l1i, l2i) = (gc / l2e, gc % l2e);
        let Some(old) = self.mapped_host(gc)? else { return Ok(None) };
        let rc = self.refcount(old / cs)?;
        if rc == 0 || (rc == 1 && !self.uncounted_share(l1i, l2i, old / cs)) {
            // in place (or a corrupt count, which the ordinary path reports)
            return Ok(None);
        }
        // the old cluster wholly in the file (the tail of the last one may be missing: the
        // ordinary path reads it as zeroes)
        if !self.in_file(old, cs as usize)? {
            return Ok(None);
        }
        let new = self.alloc_clusters(1)?;
        // counted, not referenced: a crash before the finish leaks it, like a crash between
        // the write-back of an allocation's count and of the pointer to it
        self.cow_inflight.insert(new / cs);
        Ok(Some(CowPlan { offset, len, old, new, cs, gen: self.wgen, io }))
    }

    /// The host cluster of guest cluster `gc` of the active disk if it is an ordinary data
    /// cluster (no zero flag).
    fn mapped_host(&mut self, gc: u64) -> Result<Option<u64>> {
        Ok(match self.lookup(Tree::Active, gc)?.1 {
            Cluster::Normal { host, zero: false, .. } => Some(host),
            _ => None,
        })
    }

    /// Second half of a split write (see [`Qcow2::cow_plan`]): `ran` is what
    /// [`CowPlan::run`] returned. `Ok(true)`: the write is made (the new cluster now holds
    /// the position, the old one's reference is dropped as by an ordinary copy-on-write).
    /// `Ok(false)`: the plan was stale or its I/O failed; the new cluster is freed and the
    /// caller makes the write with [`Qcow2::write`] (which reports any error).
    pub fn cow_finish(&mut self, plan: CowPlan, ran: std::io::Result<()>) -> Result<bool> {
        let cs = self.cs;
        let l2e = self.h.l2_entries();
        let gc = plan.offset / cs;
        let (l1i, l2i) = (gc / l2e, gc % l2e);
        self.cow_inflight.remove(&(plan.new / cs));
        let valid = ran.is_ok()
            && plan.gen == self.wgen
            && self.check_writable().is_ok()
            && self.mapped_host(gc)? == Some(plan.old);
        if valid {
            // the table to write into (copied if shared) and the entry: a failure here
            // links nothing, so the copy is freed like a stale plan's
            let found = self.l2_for_write(l1i).and_then(|l2| {
                let (d, bm) = self.l2_get(l2, l2i)?;
                Ok((l2, self.geom().classify(d, bm, &|| format!("L2 table at {l2:#x} entry {l2i}"))?))
            });
            match found {
                Ok((l2, c)) => {
                    self.l2_set(l2, l2i, plan.new | COPIED)?;
                    self.io.note_written();
                    self.drop_ref(l1i, l2i, c)?;
                    self.bump_gen();
                    return Ok(true);
                }
                Err(e) => {
                    self.free_planned(plan.new)?;
                    return Err(e);
                }
            }
        }
        self.free_planned(plan.new)?;
        Ok(false)
    }

    /// Give back the cluster a split write allocated and did not link in (nothing refers
    /// to it: it is free again at once).
    fn free_planned(&mut self, new: u64) -> Result<()> {
        let idx = new / self.cs;
        self.add_refcount(idx, -1)?;
        if idx < self.free_cursor {
            self.free_cursor = idx;
        }
        self.run_skip = (0, 0);
        Ok(())
    }

    /// Data of a cluster as it currently reads (for COW merges).
    fn cluster_contents(&mut self, c: Cluster) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.cs as usize];
        self.read_cluster(c, u64::MAX, 0, &mut v)?;
        Ok(v)
    }

    /// The active tree at L1 index `l1i` stops pointing at `c`: give back its reference
    /// once the pointer removal is durable. If the reference was never counted apart from
    /// the frozen tree's (a checkpoint taken but not yet durable shares it, see
    /// [`Qcow2::hand_over`]), the frozen tree gets its own count first.
    fn drop_ref(&mut self, l1i: u64, l2i: u64, c: Cluster) -> Result<()> {
        let (first, last) = match c {
            Cluster::Normal { host, .. } => (host / self.cs, host / self.cs),
            Cluster::Compressed { offset, len } => (offset / self.cs, (offset + len.max(1) - 1) / self.cs),
            _ => return Ok(()),
        };
        if self.uncounted_share(l1i, l2i, first) {
            for idx in first..=last {
                self.hand_over(idx, 1)?;
            }
        }
        self.free_cluster_of(c);
        Ok(())
    }

    /// The active tree stops pointing at a cluster whose count stands for both the active
    /// tree and the frozen tree of a pending link (an uncounted share): the frozen tree gets
    /// a reference of its own now (the link's walk will find the positions differ and add
    /// nothing), and the active tree's reference is given back like any other, once its
    /// removal is durable. So a commit never depends on the active tree's write-back: the
    /// stale pointer on disk stays counted until the removal is on disk. A crash before the
    /// checkpoint is durable leaks the frozen tree's count: the dirty bit is set lazily.
    pub(crate) fn hand_over(&mut self, idx: u64, n: i64) -> Result<()> {
        self.add_refcount(idx, n)?;
        self.leak_window = true;
        Ok(())
    }

    fn free_cluster_of(&mut self, c: Cluster) {
        match c {
            Cluster::Normal { host, .. } => self.pending_free.push((host, self.cs)),
            Cluster::Compressed { offset, len } => self.pending_free.push((offset, len.max(1))),
            _ => {}
        }
    }

    fn write_cluster(&mut self, gc: u64, co: u64, data: &[u8]) -> Result<()> {
        self.write_cluster_src(gc, co, Src::Bytes(data))
    }

    fn write_cluster_src(&mut self, gc: u64, co: u64, data: Src<'_>) -> Result<()> {
        let cs = self.cs;
        let l2e = self.h.l2_entries();
        let (l1i, l2i) = (gc / l2e, gc % l2e);
        let l2 = self.l2_for_write(l1i)?;
        let (d, bm) = self.l2_get(l2, l2i)?;
        let c = self.geom().classify(d, bm, &|| format!("L2 table at {l2:#x} entry {l2i}"))?;
        if let Cluster::Normal { host, zero, copied } = c {
            let rc = self.refcount(host / cs)?;
            if rc == 0 {
                return Err(Error::corrupt(format!(
                    "data cluster at {host:#x} (L2 {l2:#x} entry {l2i}) has refcount 0"
                )));
            }
            if rc == 1 && !self.uncounted_share(l1i, l2i, host / cs) {
                if zero && data.len() as u64 != cs {
                    let mut full = vec![0u8; cs as usize];
                    if let Some(dst) = full.get_mut(co as usize..co as usize + data.len()) {
                        data.copy_to(dst)?;
                    }
                    self.io.write_at(&full, host).map_err(ioef(|| format!("writing data cluster at {host:#x}")))?;
                } else {
                    // the guest's bytes in place, as they are: straight from its memory if it can
                    self.write_src(data, host + co, || format!("writing data cluster at {host:#x}"))?;
                }
                if zero || !copied {
                    self.l2_set(l2, l2i, host | COPIED)?;
                }
                return Ok(());
            }
        }
        // allocate a new cluster (new data, or COW of a shared/compressed cluster)
        let mut full = if data.len() as u64 == cs {
            Vec::new()
        } else {
            match c {
                Cluster::Normal { .. } | Cluster::Compressed { .. } => self.cluster_contents(c)?,
                _ => vec![0u8; cs as usize],
            }
        };
        let new = self.alloc_clusters(1)?;
        if full.is_empty() {
            // a whole new cluster of the guest's bytes, as they are
            self.write_src(data, new, || format!("writing data cluster at {new:#x}"))?;
        } else {
            if let Some(dst) = full.get_mut(co as usize..co as usize + data.len()) {
                data.copy_to(dst)?;
            }
            self.io.write_at(&full, new).map_err(ioef(|| format!("writing data cluster at {new:#x}")))?;
        }
        if matches!(c, Cluster::Compressed { .. }) {
            self.decomp = None;
        }
        self.l2_set(l2, l2i, new | COPIED)?;
        self.drop_ref(l1i, l2i, c)?;
        Ok(())
    }

    /// Write guest data to the active disk. Durable after [`Qcow2::flush`].
    pub fn write(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_any(offset, Src::Bytes(buf))
    }

    /// [`Qcow2::write`] from a [`DataBuf`] (e.g. guest pages): where the engine writes the
    /// guest's bytes as they are (in place into a cluster the active disk owns alone, or as
    /// whole new clusters) they go from `src` to the file directly when the [`ImageIo`]
    /// and `src` can ([`ImageIo::write_from`]); partial-cluster copy-on-write merges copy
    /// them out of `src` first, as [`Qcow2::write`] does. Same semantics as `write`.
    pub fn write_from(&mut self, offset: u64, src: &dyn DataBuf) -> Result<()> {
        self.write_any(offset, Src::Buf(src, 0, src.len()))
    }

    fn write_any(&mut self, offset: u64, buf: Src<'_>) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64, self.h.size)?;
        self.bump_gen();
        let cs = self.cs;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let co = pos % cs;
            if co == 0 && (buf.len() - done) as u64 >= 2 * cs {
                let k = self.write_new_run(pos / cs, buf.sub(done, buf.len() - done))?;
                if k > 0 {
                    done += k * cs as usize;
                    continue;
                }
            }
            if (buf.len() - done) as u64 > cs - co {
                let n = self.write_inplace_run(pos / cs, co, buf.sub(done, buf.len() - done))?;
                if n > 0 {
                    done += n;
                    continue;
                }
            }
            let n = ((cs - co) as usize).min(buf.len() - done);
            self.write_cluster_src(pos / cs, co, buf.sub(done, n))?;
            done += n;
        }
        Ok(())
    }

    /// Write `data` at host offset `off`: directly from a [`DataBuf`] when possible.
    fn write_src(&mut self, data: Src<'_>, off: u64, what: impl Fn() -> String) -> Result<()> {
        match data {
            Src::Bytes(b) => self.io.write_at(b, off).map_err(ioef(&what)),
            Src::Buf(buf, pos, len) => {
                if self.io.write_from(buf, pos, len, off).map_err(ioef(&what))? {
                    return Ok(());
                }
                let mut v = vec![0u8; len];
                data.copy_to(&mut v)?;
                self.io.write_at(&v, off).map_err(ioef(&what))
            }
        }
    }

    /// Guest clusters from `gc` (the first from offset `co`) under one L2 table that the
    /// active disk owns alone, hold data (COPIED set, no zero flag) and follow each other in
    /// the file: the guest's bytes go in place with one write — what [`Self::write_cluster_src`]
    /// does for each of them, which changes no metadata there. Returns the bytes written
    /// (0: fewer than 2 such clusters; the caller goes cluster by cluster).
    fn write_inplace_run(&mut self, gc: u64, co: u64, data: Src<'_>) -> Result<usize> {
        let cs = self.cs;
        let l2e = self.h.l2_entries();
        let (l1i, l2i) = (gc / l2e, gc % l2e);
        let span = (co + data.len() as u64).div_ceil(cs).min(l2e - l2i);
        if span < 2 || self.h.extended_l2() {
            return Ok(0);
        }
        let l2 = self.l2_for_write(l1i)?;
        let geom = self.geom();
        let mut first = None;
        let mut k = 0u64;
        while k < span {
            let (d, bm) = self.l2_get(l2, l2i + k)?;
            let host = match geom.classify(d, bm, &|| format!("L2 table at {l2:#x} entry {}", l2i + k))? {
                Cluster::Normal { host, zero: false, copied: true } => host,
                _ => break,
            };
            if first.is_some_and(|f| host != f + k * cs)
                || self.refcount(host / cs)? != 1
                || self.uncounted_share(l1i, l2i + k, host / cs)
            {
                break;
            }
            first.get_or_insert(host);
            k += 1;
        }
        let Some(f) = first.filter(|_| k >= 2) else {
            return Ok(0);
        };
        let n = ((k * cs - co) as usize).min(data.len());
        self.write_src(data.sub(0, n), f + co, || format!("writing data clusters at {f:#x}"))?;
        Ok(n)
    }

    /// Whole-cluster writes from guest cluster `gc` that all need a new host cluster
    /// (unallocated, zero, compressed or shared) under one L2 table: one contiguous
    /// allocation and one write. Returns the number of clusters written (0: not applicable).
    fn write_new_run(&mut self, gc: u64, data: Src<'_>) -> Result<usize> {
        let cs = self.cs;
        let l2e = self.h.l2_entries();
        let (l1i, l2i) = (gc / l2e, gc % l2e);
        let max = (data.len() as u64 / cs).min(l2e - l2i);
        if max < 2 || self.h.extended_l2() {
            return Ok(0);
        }
        let l2 = self.l2_for_write(l1i)?;
        let geom = self.geom();
        let mut k = 0u64;
        while k < max {
            let (d, bm) = self.l2_get(l2, l2i + k)?;
            let needs_new = match geom.classify(d, bm, &|| format!("L2 table at {l2:#x} entry {}", l2i + k))? {
                Cluster::Normal { host, .. } => {
                    self.refcount(host / cs)? != 1 || self.uncounted_share(l1i, l2i + k, host / cs)
                }
                _ => true,
            };
            if !needs_new {
                break;
            }
            k += 1;
        }
        if k < 2 {
            return Ok(0);
        }
        let new = self.alloc_clusters(k)?;
        if data.len() < (k * cs) as usize {
            return Err(Error::invalid("short write run"));
        }
        self.write_src(data.sub(0, (k * cs) as usize), new, || format!("writing data clusters at {new:#x}"))?;
        // one L2 range update (the allocation may have evicted the table: reload it)
        self.load_l2(l2)?;
        let (a, b) = (l2i as usize, (l2i + k) as usize);
        let t = self
            .l2_cache
            .get_mut(&l2)
            .ok_or_else(|| Error::corrupt(format!("L2 table at {l2:#x} vanished from cache")))?;
        let slots = t.get_mut(a..b).ok_or_else(|| Error::corrupt(format!("L2 table at {l2:#x} too short")))?;
        let old: Vec<u64> = slots.to_vec();
        for (i, slot) in slots.iter_mut().enumerate() {
            *slot = (new + i as u64 * cs) | COPIED;
        }
        self.l2_dirty.insert(l2);
        for (i, d) in old.into_iter().enumerate() {
            if d == 0 {
                continue; // unallocated: nothing to give back
            }
            let c = geom.classify(d, 0, &|| format!("L2 table at {l2:#x} entry {}", l2i + i as u64))?;
            if matches!(c, Cluster::Compressed { .. }) {
                self.decomp = None;
            }
            self.drop_ref(l1i, l2i + i as u64, c)?;
        }
        Ok(k as usize)
    }

    /// Set the descriptor of whole guest cluster `gc` to `new_desc` (0 or ZERO or
    /// host|ZERO|COPIED), releasing what it pointed to as needed.
    fn set_whole_cluster(&mut self, gc: u64, unmap: bool, zero_flag: bool) -> Result<()> {
        let l2e = self.h.l2_entries();
        let (l1i, l2i) = (gc / l2e, gc % l2e);
        let e = self.l1_entry(Tree::Active, l1i)?;
        let l2cur = l1_to_l2(e, self.cs, &|| format!("active L1 entry {l1i}"))?;
        if l2cur == 0 {
            return Ok(()); // reads as zero already
        }
        let (d, bm) = self.l2_get(l2cur, l2i)?;
        let c = self.geom().classify(d, bm, &|| format!("L2 table at {l2cur:#x} entry {l2i}"))?;
        let want_zero = zero_flag && self.h.version >= 3;
        let new_desc = match c {
            Cluster::Unallocated if !want_zero => return Ok(()),
            Cluster::Zero if want_zero => return Ok(()),
            Cluster::Normal { host, .. } if !unmap => {
                let rc = self.refcount(host / self.cs)?;
                if rc == 1 && !self.uncounted_share(l1i, l2i, host / self.cs) {
                    host | ZERO | COPIED
                } else if want_zero {
                    ZERO
                } else {
                    0
                }
            }
            _ => {
                if want_zero {
                    ZERO
                } else {
                    0
                }
            }
        };
        if new_desc == d {
            return Ok(());
        }
        let l2 = self.l2_for_write(l1i)?;
        self.l2_set(l2, l2i, new_desc)?;
        if new_desc & OFFSET_MASK == 0 {
            self.drop_ref(l1i, l2i, c)?;
            if matches!(c, Cluster::Compressed { .. }) {
                self.decomp = None;
            }
        }
        Ok(())
    }

    fn zero_range(&mut self, offset: u64, len: u64, unmap: bool, zero_flag: bool) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len, self.h.size)?;
        self.bump_gen();
        let cs = self.cs;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let co = pos % cs;
            let n = (cs - co).min(end - pos);
            let whole = co == 0 && (n == cs || pos + n == self.h.size && end == self.h.size);
            if whole {
                self.set_whole_cluster(pos / cs, unmap, zero_flag)?;
            } else {
                let (_, c, _) = self.lookup(Tree::Active, pos / cs)?;
                let already_zero =
                    matches!(c, Cluster::Unallocated | Cluster::Zero | Cluster::Normal { zero: true, .. });
                if !already_zero {
                    let z = vec![0u8; n as usize];
                    self.write_cluster(pos / cs, co, &z)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Make a range read as zeroes. With `may_unmap`, whole clusters are released.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.zero_range(offset, len, may_unmap, true)
    }

    /// Discard a range: whole clusters are unmapped, partial ones zeroed; reads back zeroes.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true, false)
    }

    // ------------------------------------------------------------------ flush

    pub(crate) fn sync(&mut self, what: &str) -> Result<()> {
        self.check_poison()?;
        if let Err(e) = self.io.flush() {
            self.failed.get_or_insert_with(|| format!("flushing ({what}): {e}"));
            return Err(Error::io(format!("flushing ({what})"), e));
        }
        self.dirty_unsynced = None;
        Ok(())
    }

    fn write_dirty_l2(&mut self) -> Result<()> {
        let dirty = std::mem::take(&mut self.l2_dirty);
        for off in &dirty {
            if let Some(t) = self.l2_cache.get(off) {
                let mut b = vec![0u8; self.cs as usize];
                for (i, w) in t.iter().enumerate() {
                    put_be64(&mut b, i * 8, *w);
                }
                if let Err(e) = self.io.write_at(&b, *off) {
                    self.l2_dirty = dirty.clone();
                    return Err(Error::io(format!("writing L2 table at {off:#x}"), e));
                }
            }
        }
        Ok(())
    }

    fn write_dirty_l1(&mut self) -> Result<()> {
        if let Some((m, off, sectors)) = self.old_l1_dirty.take() {
            let t = self.mem_l1.get(&m).cloned().unwrap_or_default();
            for sector in &sectors {
                let first = (sector * 64) as usize;
                let last = (first + 64).min(t.len());
                let mut b = vec![0u8; (last.saturating_sub(first)) * 8];
                for (k, i) in (first..last).enumerate() {
                    put_be64(&mut b, k * 8, t.get(i).copied().unwrap_or(0));
                }
                let at = off + sector * 512;
                if let Err(e) = self.io.write_at(&b, at) {
                    self.old_l1_dirty = Some((m, off, sectors.clone()));
                    return Err(Error::io(format!("writing the old active L1 table at {at:#x}"), e));
                }
            }
        }
        if self.l1_unpublished {
            return Ok(());
        }
        let dirty = std::mem::take(&mut self.l1_dirty);
        for sector in &dirty {
            let first = (sector * 64) as usize;
            let last = (first + 64).min(self.l1.len());
            let mut b = vec![0u8; (last.saturating_sub(first)) * 8];
            for (k, i) in (first..last).enumerate() {
                put_be64(&mut b, k * 8, self.l1.get(i).copied().unwrap_or(0));
            }
            let at = self.h.l1_table_offset + sector * 512;
            if let Err(e) = self.io.write_at(&b, at) {
                self.l1_dirty = dirty.clone();
                return Err(Error::io(format!("writing active L1 table at {at:#x}"), e));
            }
        }
        Ok(())
    }

    /// Ordered write-back: refblocks, barrier, L2 tables, barrier, L1, barrier, then the
    /// refcount decreases of clusters whose last pointer is now durably gone (written here,
    /// or, while background work is pending behind a durable dirty bit, by the next
    /// write-back's first stage or the commit).
    pub(crate) fn writeback(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        // refcounts on disk may soon exceed the references (handed-over counts of a
        // checkpoint that is not durable yet): have a crash repaired on open
        self.dirty_before_leaks()?;
        let mut synced = false;
        // allocations and decreases before the tables; raises of counted clusters after
        if self.write_early_refblocks()? {
            self.sync("refcount blocks")?;
            synced = true;
        }
        if !self.l2_dirty.is_empty() {
            if !synced {
                self.sync("data before L2 tables")?;
            }
            self.write_dirty_l2()?;
            self.sync("L2 tables")?;
            synced = true;
        }
        if (!self.l1_dirty.is_empty() && !self.l1_unpublished) || self.old_l1_dirty.is_some() {
            if !synced {
                self.sync("data before L1 table")?;
            }
            self.write_dirty_l1()?;
            self.sync("L1 table")?;
        }
        if !self.pending_free.is_empty() {
            let frees = std::mem::take(&mut self.pending_free);
            let cs = self.cs;
            for (off, len) in frees {
                for c in off / cs..=(off + len - 1) / cs {
                    self.add_refcount(c, -1)?;
                }
            }
        }
        if !self.jobs.is_empty() && self.dirty_durable() {
            // While background work is pending behind a durable dirty bit, refcounts on
            // disk may lag (a crash is repaired on open, by us and by QEMU): the decreases
            // just applied (marked early) go out with the next write-back's first stage,
            // before its tables; raises with it or with the commit, which writes every
            // dirty block. This saves a guest flush its fourth barrier in a durable phase.
            return Ok(());
        }
        // the decreases, with the raises of the same blocks (a hand-over's +1 and the
        // deferred -1 of the pointer it replaced land in one block write)
        if self.write_dirty_refblocks()? {
            self.sync("refcount decreases")?;
        }
        Ok(())
    }

    /// Make every completed write durable.
    pub fn flush(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.check_poison()?;
        self.bump_gen();
        if self.l1_unpublished {
            // writes after a revert switch become durable with the switch itself
            self.complete_switch()?;
        }
        self.writeback()?;
        self.sync("flush")?;
        self.clear_dirty_if_written_back()
    }

    /// Flush and close; clears the dirty bit if we set it.
    pub fn close(mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.wait_durable()?;
        self.flush()?;
        if self.dirty_set_by_us {
            self.set_incompat(self.h.incompatible & !INCOMPAT_DIRTY)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ info / map

    /// Facts about the image.
    pub fn info(&self) -> ImageInfo {
        ImageInfo {
            version: self.h.version,
            virtual_size: self.h.size,
            cluster_size: self.cs,
            refcount_bits: self.h.refcount_bits(),
            l1_size: self.h.l1_size,
            nb_snapshots: self.snapshots.len() as u32,
            dirty: self.h.incompatible & INCOMPAT_DIRTY != 0,
            corrupt: self.h.incompatible & INCOMPAT_CORRUPT != 0,
            read_only: self.read_only,
            read_only_reason: self.ro_reason.clone(),
            extended_l2: self.h.extended_l2(),
            compression_type: self.h.compression,
            features: self.h.feature_names(),
            file_length: self.file_len().unwrap_or(0),
            allocated_clusters: self.count_allocated().unwrap_or(0),
        }
    }

    /// The guest→host mapping of the active disk (`None`) or a checkpoint, in merged runs.
    pub fn map(&mut self, id_or_name: Option<&str>) -> Result<Vec<MapEntry>> {
        let (tree, size) = match id_or_name {
            None => (Tree::Active, self.h.size),
            Some(n) => {
                let (t, s, _) = self.find_checkpoint(n)?;
                (t, s.disk_size.unwrap_or(self.h.size))
            }
        };
        let cs = self.cs;
        let mut out: Vec<MapEntry> = Vec::new();
        let nclusters = size.div_ceil(cs);
        let l2e = self.h.l2_entries();
        let mut gc = 0u64;
        let l1_len = self.l1_len(tree)? as u64;
        while gc < nclusters {
            if gc / l2e >= l1_len {
                // past the L1 table: unallocated to the end
                push_run(
                    &mut out,
                    MapEntry {
                        guest_offset: gc * cs,
                        length: size - gc * cs,
                        host_offset: None,
                        kind: "unallocated",
                        refcount: 0,
                        shared: false,
                    },
                );
                break;
            }
            // whole L2 ranges without a table are one unallocated run
            let e = self.l1_entry(tree, gc / l2e)?;
            if e & OFFSET_MASK == 0 && e & crate::l2::L1_RESERVED == 0 {
                let end = ((gc / l2e + 1) * l2e).min(nclusters);
                let length = (end * cs).min(size) - gc * cs;
                push_run(
                    &mut out,
                    MapEntry {
                        guest_offset: gc * cs,
                        length,
                        host_offset: None,
                        kind: "unallocated",
                        refcount: 0,
                        shared: false,
                    },
                );
                gc = end;
                continue;
            }
            let (_, c, _) = self.lookup(tree, gc)?;
            let (host, kind, rc_idx) = match c {
                Cluster::Unallocated => (None, "unallocated", None),
                Cluster::Zero => (None, "zero", None),
                Cluster::Normal { host, zero: true, .. } => (Some(host), "zero", Some(host / cs)),
                Cluster::Normal { host, .. } => (Some(host), "data", Some(host / cs)),
                Cluster::Compressed { offset, .. } => (Some(offset), "compressed", Some(offset / cs)),
            };
            let refcount = match rc_idx {
                Some(i) => self.refcount(i)?,
                None => 0,
            };
            let length = cs.min(size - gc * cs);
            push_run(
                &mut out,
                MapEntry { guest_offset: gc * cs, length, host_offset: host, kind, refcount, shared: refcount > 1 },
            );
            gc += 1;
        }
        Ok(out)
    }

    #[allow(dead_code)]
    pub(crate) fn put_be32_header(&mut self, off: u64, v: u32) -> Result<()> {
        let mut b = [0u8; 4];
        put_be32(&mut b, 0, v);
        self.io.write_at(&b, off).map_err(ioe("writing a header field"))
    }
}

/// The header, the active L1, the refcount table, the snapshot table and the snapshot L1
/// tables must not overlap each other.
fn check_fixed_overlaps(h: &Header, snaps: &[Snapshot], st_bytes: u64) -> Result<()> {
    let cs = h.cluster_size();
    let round = |b: u64| b.div_ceil(cs) * cs;
    let mut regions: Vec<(u64, u64, String)> = vec![(0, cs, "header".into())];
    if h.l1_size > 0 {
        regions.push((h.l1_table_offset, round(u64::from(h.l1_size) * 8), "active L1 table".into()));
    }
    regions.push((h.refcount_table_offset, u64::from(h.refcount_table_clusters) * cs, "refcount table".into()));
    if st_bytes > 0 {
        regions.push((h.snapshots_offset, round(st_bytes), "snapshot table".into()));
    }
    for s in snaps {
        if s.l1_size > 0 {
            regions.push((s.l1_offset, round(u64::from(s.l1_size) * 8), format!("L1 table of snapshot {}", s.id)));
        }
    }
    regions.sort_by_key(|r| r.0);
    for w in regions.windows(2) {
        if let [a, b] = w {
            if a.0.saturating_add(a.1) > b.0 {
                return Err(Error::corrupt(format!("{} at {:#x} overlaps {} at {:#x}", a.2, a.0, b.2, b.0)));
            }
        }
    }
    Ok(())
}

/// Append a map entry, merging it into the previous run when contiguous and alike.
fn push_run(out: &mut Vec<MapEntry>, ent: MapEntry) {
    if let Some(last) = out.last_mut() {
        let contiguous_host = match (last.host_offset, ent.host_offset) {
            (None, None) => true,
            (Some(a), Some(b)) => ent.kind != "compressed" && a.checked_add(last.length) == Some(b),
            _ => false,
        };
        if last.kind == ent.kind
            && last.refcount == ent.refcount
            && contiguous_host
            && last.guest_offset + last.length == ent.guest_offset
        {
            last.length += ent.length;
            return;
        }
    }
    out.push(ent);
}

/// A copy-on-write write of one guest cluster planned under the image lock, whose data I/O
/// runs without it (see [`Qcow2::cow_plan`]).
pub struct CowPlan {
    offset: u64,
    len: usize,
    /// The host cluster the position mapped (its bytes are merged with the guest's).
    old: u64,
    /// The host cluster allocated for the copy.
    new: u64,
    cs: u64,
    /// [`Qcow2::wgen`] when planned.
    gen: u64,
    io: std::sync::Arc<dyn crate::io::DataIo>,
}

impl CowPlan {
    /// The data I/O of the write of `data` (the `len` bytes planned): the old cluster's
    /// bytes with `data` merged in, written to the new cluster. Needs no access to the
    /// engine; the write is made by [`Qcow2::cow_finish`].
    pub fn run(&self, data: &[u8]) -> std::io::Result<()> {
        self.run_src(Src::Bytes(data))
    }

    /// [`CowPlan::run`] from a [`DataBuf`] (e.g. guest pages): a whole cluster goes
    /// straight from it when the file can.
    pub fn run_from(&self, src: &dyn DataBuf) -> std::io::Result<()> {
        self.run_src(Src::Buf(src, 0, src.len()))
    }

    fn run_src(&self, data: Src<'_>) -> std::io::Result<()> {
        if data.len() != self.len {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "write length differs from the plan"));
        }
        if self.len as u64 == self.cs {
            if let Src::Buf(buf, pos, len) = data {
                if self.io.write_from(buf, pos, len, self.new)? {
                    return Ok(());
                }
            }
        }
        let mut full = vec![0u8; self.cs as usize];
        if (self.len as u64) < self.cs {
            self.io.read_at(&mut full, self.old)?;
        }
        let co = (self.offset % self.cs) as usize;
        let dst = full
            .get_mut(co..co + self.len)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "write outside the cluster"))?;
        data.copy_to(dst).map_err(|e| std::io::Error::other(e.to_string()))?;
        self.io.write_at(&full, self.new)
    }
}

/// The bytes of a guest write: a slice, or `len` bytes at `pos` of a [`DataBuf`].
#[derive(Clone, Copy)]
pub(crate) enum Src<'a> {
    Bytes(&'a [u8]),
    Buf(&'a dyn DataBuf, usize, usize),
}

impl<'a> Src<'a> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Src::Bytes(b) => b.len(),
            Src::Buf(_, _, len) => *len,
        }
    }
    /// `len` bytes from `start` (clamped to what there is).
    fn sub(&self, start: usize, len: usize) -> Src<'a> {
        let start = start.min(self.len());
        let len = len.min(self.len() - start);
        match *self {
            Src::Bytes(b) => Src::Bytes(b.get(start..start + len).unwrap_or(&[])),
            Src::Buf(buf, pos, _) => Src::Buf(buf, pos + start, len),
        }
    }
    /// Copy the bytes into `dst` (of the same length).
    fn copy_to(&self, dst: &mut [u8]) -> Result<()> {
        if dst.len() != self.len() {
            return Err(Error::invalid("write source and buffer differ in length"));
        }
        match *self {
            Src::Bytes(b) => {
                dst.copy_from_slice(b);
                Ok(())
            }
            Src::Buf(buf, pos, _) => buf.copy_out(pos, dst).map_err(ioe("copying the data to write")),
        }
    }
}
