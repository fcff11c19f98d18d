//! Positioned I/O on the image file: the [`ImageIo`] seam and its implementations.
//!
//! * [`FileIo`]: a real file (pread/pwrite, `flush` = `fdatasync`; a [`SyncHandle`] can also
//!   make only some byte ranges durable, [`SyncHandle::sync_ranges`]).
//! * [`MemIo`]: a plain in-memory image.
//! * [`FaultIo`]: an in-memory image that models a volatile write cache, so tests can
//!   simulate a power loss at any point ([`FaultIo::crash`]) and inject I/O errors.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use xensnap_blockdev::DataBuf;

/// Positioned I/O on an image file.
pub trait ImageIo: Send {
    /// Read exactly `buf.len()` bytes at `off`. Reading past the end is `UnexpectedEof`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Write all of `buf` at `off`, extending the file if needed.
    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Durability barrier: every write completed before it is durable when it returns.
    fn flush(&mut self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncate or extend (with zeroes).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// A handle that flushes the same file without access to this object (so a caller can
    /// run a flush outside the lock that serialises the image), or `None` if there is none.
    /// Such a flush is an extra barrier: it never replaces one the engine issues itself.
    fn sync_handle(&self) -> Option<SyncHandle> {
        None
    }
    /// The first failure that poisoned this image file (see [`Poison`]), if any: every
    /// later write and flush, through this object or its [`SyncHandle`]s, is refused.
    fn poisoned(&self) -> Option<String> {
        None
    }
    /// Start (`true`) or stop recording the byte ranges written through this object, for a
    /// later [`SyncHandle::sync_ranges`] that makes only them durable. What was recorded
    /// stays until [`ImageIo::take_written`] or a successful [`ImageIo::flush`].
    fn record_writes(&mut self, _on: bool) {}
    /// The ranges (offset, length) recorded since the last call, sorted and merged, or
    /// `None` if this object cannot record (then only a whole-file flush is a barrier). A
    /// successful [`ImageIo::flush`] forgets what was recorded: it is durable.
    fn take_written(&mut self) -> Option<Vec<(u64, u64)>> {
        None
    }
    /// A handle that reads and writes the same file without access to this object, for
    /// guest data written outside the lock that serialises the image (see
    /// `Qcow2::cow_plan`), or `None` if there is none. Its writes share this object's poison
    /// and range guard; the engine calls [`ImageIo::note_written`] once they are part of
    /// the image, so the next flush covers them.
    fn data_io(&self) -> Option<Arc<dyn DataIo>> {
        None
    }
    /// Writes through a [`ImageIo::data_io`] handle completed: the next flush must not be
    /// skipped as a no-op.
    fn note_written(&mut self) {}
    /// Whether the image is empty (length 0).
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Read `len` bytes at `off` straight into `dst` at `pos` ([`DataBuf::read_file`]), like
    /// [`ImageIo::read_at`] otherwise. `Ok(false)`: not done (this object or `dst` cannot),
    /// the caller reads into a buffer of its own and copies (the default).
    fn read_into(&self, dst: &mut dyn DataBuf, pos: usize, len: usize, off: u64) -> io::Result<bool> {
        let _ = (dst, pos, len, off);
        Ok(false)
    }
    /// Write `len` bytes at `pos` of `src` at `off` straight from `src`
    /// ([`DataBuf::write_file`]), like [`ImageIo::write_at`] otherwise (same poisoning and
    /// recording). `Ok(false)`: nothing written, the caller copies and uses `write_at`.
    fn write_from(&mut self, src: &dyn DataBuf, pos: usize, len: usize, off: u64) -> io::Result<bool> {
        let _ = (src, pos, len, off);
        Ok(false)
    }
}

/// Reads and writes of an image file through a handle of its own (see
/// [`ImageIo::data_io`]): same poison (refused once poisoned, a failed write poisons), same
/// range guard as the [`ImageIo`] it came from.
pub trait DataIo: Send + Sync {
    /// Read exactly `buf.len()` bytes at `off` (past the end: `UnexpectedEof`).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Write all of `buf` at `off`.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Write `len` bytes at `pos` of `src` at `off` straight from `src`, like
    /// [`ImageIo::write_from`] (`Ok(false)`: nothing written, copy and use `write_at`).
    fn write_from(&self, src: &dyn DataBuf, pos: usize, len: usize, off: u64) -> io::Result<bool> {
        let _ = (src, pos, len, off);
        Ok(false)
    }
}

fn eof(off: u64, len: usize, size: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("read of {len} bytes at offset {off} is past the end of the image ({size} bytes)"),
    )
}

fn mem_range(off: u64, len: usize) -> io::Result<(usize, usize)> {
    let start = usize::try_from(off).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset + length overflows"))?;
    Ok((start, end))
}

/// The poisoned state of an image file, shared by its [`ImageIo`] and every [`SyncHandle`].
///
/// After a failed `fdatasync` the kernel may have dropped the dirty pages it could not
/// write, and the next `fdatasync` returns success: a retried flush would then "complete"
/// over writes that never reached the disk. The error is also reported once per open file
/// description, so of a guest flush and a background barrier (a `try_clone` of the same
/// description) only the first to sync sees it. So the first failed sync (or failed write)
/// poisons the image: every later write and sync, through any handle, is refused naming that
/// failure, until the image is reopened. Syncs are serialised (a lock held across the
/// `fdatasync`), so a sync that fails poisons the image before any other sync can return
/// success; writes only read the flag and never wait for a sync.
#[derive(Clone, Default)]
pub struct Poison(Arc<PoisonState>);

#[derive(Default)]
struct PoisonState {
    first: std::sync::OnceLock<String>,
    sync: Mutex<()>,
}

impl Poison {
    /// The first failure, if the image is poisoned.
    pub fn get(&self) -> Option<String> {
        self.0.first.get().cloned()
    }
    /// Poison the image (the first failure is kept).
    pub fn set(&self, what: String) {
        let _ = self.0.first.set(what);
    }
    /// Run a sync, serialised with the other syncs: refused if poisoned, poisons on failure.
    fn sync_with(&self, what: &str, f: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let _g = self.0.sync.lock().unwrap_or_else(|e| e.into_inner());
        self.check()?;
        f().inspect_err(|e| self.set(format!("{what} failed: {e}")))
    }
    fn check(&self) -> io::Result<()> {
        match self.0.first.get() {
            Some(first) => Err(poisoned_error(first)),
            None => Ok(()),
        }
    }
}

/// The error of an operation refused on a poisoned image.
fn poisoned_error(first: &str) -> io::Error {
    io::Error::other(format!("the image is poisoned by an earlier failure ({first}); reopen it"))
}

/// Does a failed write leave the file in an unknown state? Not for "no space" (nothing was
/// written past what the error reports, and the engine keeps its metadata dirty for a later
/// retry); any other write error poisons the image.
fn write_poisons(e: &io::Error) -> bool {
    !matches!(e.raw_os_error(), Some(28) | Some(122)) // ENOSPC, EDQUOT
}

/// Flushes an image file independently of its [`ImageIo`] (see [`ImageIo::sync_handle`]).
pub struct SyncHandle(SyncTarget, Poison);

/// Sort and merge byte ranges (offset, length): overlapping or adjacent ones become one.
pub(crate) fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.retain(|r| r.1 > 0);
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (off, len) in v {
        let end = off.saturating_add(len);
        match out.last_mut() {
            Some((lo, ll)) if *lo + *ll >= off => *ll = (*ll).max(end - *lo),
            _ => out.push((off, len)),
        }
    }
    out
}

fn overlaps(sorted: &[(u64, u64)], off: u64, len: u64) -> bool {
    let end = off.saturating_add(len);
    // the first range that ends after `off`
    let i = sorted.partition_point(|(o, l)| o + l <= off);
    sorted.get(i).is_some_and(|(o, _)| *o < end)
}

/// Keeps a ranged sync from rewriting stale bytes over a concurrent write.
///
/// [`SyncHandle::sync_ranges`] makes a range durable by reading its current bytes and
/// writing them back with `RWF_DSYNC` (the only ranged data sync std and rustix offer
/// without `unsafe`). A write of the same bytes between that read and that write would be
/// undone, so while a ranged sync runs, a write overlapping its ranges waits for it, and the
/// sync waits for the overlapping writes already under way. Writes elsewhere (the guest's
/// data) never wait.
#[derive(Default)]
struct RangeGuard {
    st: Mutex<GuardState>,
    cv: std::sync::Condvar,
}

#[derive(Default)]
struct GuardState {
    /// Ranges of the ranged sync under way (sorted, merged).
    syncing: Vec<(u64, u64)>,
    /// Writes under way (offset, length).
    writing: Vec<(u64, u64)>,
}

impl RangeGuard {
    fn lock(&self) -> std::sync::MutexGuard<'_, GuardState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn write<T>(&self, off: u64, len: u64, f: impl FnOnce() -> T) -> T {
        {
            let mut g = self.lock();
            while overlaps(&g.syncing, off, len) {
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.writing.push((off, len));
        }
        let r = f();
        let mut g = self.lock();
        if let Some(i) = g.writing.iter().position(|w| *w == (off, len)) {
            g.writing.swap_remove(i);
        }
        // only a ranged sync under way can be waiting for a write to end (writers wait for
        // syncs, never for each other), and it set `syncing` before it waited: without one,
        // no wake-up is needed (std's `notify_all` is a futex system call even when nobody
        // waits, one per image write)
        let waiter = !g.syncing.is_empty();
        drop(g);
        if waiter {
            self.cv.notify_all();
        }
        r
    }
    fn sync<T>(&self, ranges: &[(u64, u64)], f: impl FnOnce() -> T) -> T {
        {
            let mut g = self.lock();
            // one ranged sync at a time (syncs are serialised by the poison lock anyway)
            while !g.syncing.is_empty() {
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            g.syncing = ranges.to_vec();
            while g.writing.iter().any(|(o, l)| overlaps(ranges, *o, *l)) {
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
        let r = f();
        self.lock().syncing.clear();
        self.cv.notify_all();
        r
    }
}

/// Make `ranges` (sorted, merged) of `file` durable: each one's current bytes written back
/// with `RWF_DSYNC` (the write, and the file metadata needed to read it, are durable when it
/// returns: the file system's journal commit and the disk cache flush are part of it). The
/// rest of the file (the guest's unflushed data) is not written. `Ok(false)` if a range is
/// no longer in the file (it was shrunk): the caller syncs the whole file instead.
fn dsync_ranges(file: &File, ranges: &[(u64, u64)]) -> io::Result<bool> {
    let mut buf = Vec::new();
    for &(off, len) in ranges {
        let n = usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "range too large"))?;
        buf.resize(n, 0);
        match file.read_exact_at(&mut buf, off) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(e),
        }
        let mut done = 0usize;
        while done < n {
            let rest = buf.get(done..).unwrap_or(&[]);
            let w = rustix::io::pwritev2(
                file,
                &[io::IoSlice::new(rest)],
                off + done as u64,
                rustix::io::ReadWriteFlags::DSYNC,
            )
            .map_err(io::Error::from)?;
            if w == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "RWF_DSYNC write wrote nothing"));
            }
            done += w;
        }
    }
    Ok(true)
}

enum SyncTarget {
    File(File, Arc<RangeGuard>),
    Fault(FaultIo),
}

impl SyncHandle {
    /// `fdatasync` the image file (for a [`FaultIo`]: a flush of the shared state, counted
    /// and failed like any other flush). Refused once the image is poisoned; a failure
    /// poisons it (see [`Poison`]).
    pub fn sync(&self) -> io::Result<()> {
        match &self.0 {
            SyncTarget::File(f, _) => self.1.sync_with("fdatasync (sync handle)", || f.sync_data()),
            SyncTarget::Fault(f) => f.clone().flush(),
        }
    }
    /// Make only `ranges` (offset, length) of the image file durable, not the rest of what
    /// was written (the guest's data since its last flush): a barrier for writes whose
    /// ranges the caller recorded ([`ImageIo::record_writes`]). On a real file each range's
    /// current bytes are written back with `RWF_DSYNC` (see the private `RangeGuard`); if a range is
    /// past the end of the file, the whole file is synced instead. Serialised with the
    /// other syncs, refused once the image is poisoned, and a failure poisons it, like
    /// [`SyncHandle::sync`]. (For a [`FaultIo`]: [`FaultIo::flush_ranges`].)
    pub fn sync_ranges(&self, ranges: &[(u64, u64)]) -> io::Result<()> {
        let ranges = merge_ranges(ranges.to_vec());
        match &self.0 {
            SyncTarget::File(f, guard) => self.1.sync_with("ranged sync (RWF_DSYNC)", || {
                if guard.sync(&ranges, || dsync_ranges(f, &ranges))? {
                    Ok(())
                } else {
                    f.sync_data()
                }
            }),
            SyncTarget::Fault(f) => f.flush_ranges(&ranges),
        }
    }
    /// The first failure that poisoned the image, if any.
    pub fn poisoned(&self) -> Option<String> {
        match &self.0 {
            SyncTarget::File(..) => self.1.get(),
            SyncTarget::Fault(f) => f.poisoned(),
        }
    }
}

/// A [`FileIo`]'s [`DataIo`] handle: a duplicate descriptor of the same file.
struct FileData {
    file: File,
    poison: Poison,
    guard: Arc<RangeGuard>,
}

/// One write of `len` bytes at `off` of `file` by `w` (`Ok(false)`: it wrote nothing):
/// refused once poisoned, run under the range guard; a failure that can have lost data
/// poisons the file.
fn guarded_write(
    poison: &Poison,
    guard: &RangeGuard,
    file: &File,
    off: u64,
    len: usize,
    w: impl FnOnce(&File) -> io::Result<bool>,
) -> io::Result<bool> {
    poison.check()?;
    let r = guard.write(off, len as u64, || w(file));
    if let Err(e) = &r {
        if write_poisons(e) {
            poison.set(format!("write of {len} bytes at {off:#x} failed: {e}"));
        }
    }
    r
}

impl FileData {
    fn write_with(&self, off: u64, len: usize, w: impl FnOnce(&File) -> io::Result<bool>) -> io::Result<bool> {
        guarded_write(&self.poison, &self.guard, &self.file, off, len, w)
    }
}

impl DataIo for FileData {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_with(off, buf.len(), |f| f.write_all_at(buf, off).map(|()| true)).map(drop)
    }
    fn write_from(&self, src: &dyn DataBuf, pos: usize, len: usize, off: u64) -> io::Result<bool> {
        self.write_with(off, len, |f| src.write_file(f.as_fd(), off, pos, len))
    }
}

/// An image on a real file.
pub struct FileIo {
    /// The [`DataIo`] handle, made on first use (a `dup` of the descriptor).
    data: std::sync::OnceLock<Option<Arc<dyn DataIo>>>,
    file: File,
    /// Written (or resized) since the last successful `fdatasync` through this object: a
    /// flush with nothing written since the previous one is skipped (it would be a no-op).
    unsynced: bool,
    poison: Poison,
    /// Ranges written while recording (see [`ImageIo::record_writes`]).
    written: Vec<(u64, u64)>,
    recording: bool,
    guard: Arc<RangeGuard>,
}

impl FileIo {
    pub fn new(file: File) -> Self {
        FileIo {
            data: std::sync::OnceLock::new(),
            file,
            unsynced: true,
            poison: Poison::default(),
            written: Vec::new(),
            recording: false,
            guard: Arc::default(),
        }
    }

    /// One write of `len` bytes at `off` by `w` (`Ok(false)`: it wrote nothing): checked
    /// against the poison, under the range guard; once anything may have reached the file
    /// (success or failure) the file is unsynced and the range recorded; a failure that can
    /// have lost data poisons the file.
    fn write_with(&mut self, off: u64, len: usize, w: impl FnOnce(&File) -> io::Result<bool>) -> io::Result<bool> {
        self.poison.check()?;
        let r = guarded_write(&self.poison, &self.guard, &self.file, off, len, w);
        if !matches!(r, Ok(false)) {
            self.unsynced = true;
            if self.recording {
                self.written.push((off, len as u64));
            }
        }
        r
    }
}

impl ImageIo for FileIo {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write_with(off, buf.len(), |file| file.write_all_at(buf, off).map(|()| true)).map(drop)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.poison.check()?;
        if !self.unsynced {
            return Ok(());
        }
        let file = &self.file;
        self.poison.sync_with("fdatasync", || file.sync_data())?;
        self.unsynced = false;
        self.written.clear();
        Ok(())
    }
    fn record_writes(&mut self, on: bool) {
        self.recording = on;
    }
    fn take_written(&mut self) -> Option<Vec<(u64, u64)>> {
        Some(merge_ranges(std::mem::take(&mut self.written)))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.poison.check()?;
        self.unsynced = true;
        // (a shrink must not run between a ranged sync's read and its write-back)
        let file = &self.file;
        self.guard.write(len, u64::MAX - len, || file.set_len(len)).inspect_err(|e| {
            if write_poisons(e) {
                self.poison.set(format!("resizing to {len} bytes failed: {e}"));
            }
        })
    }
    fn sync_handle(&self) -> Option<SyncHandle> {
        self.file.try_clone().ok().map(|f| SyncHandle(SyncTarget::File(f, self.guard.clone()), self.poison.clone()))
    }
    fn data_io(&self) -> Option<Arc<dyn DataIo>> {
        self.data
            .get_or_init(|| {
                let file = self.file.try_clone().ok()?;
                Some(Arc::new(FileData { file, poison: self.poison.clone(), guard: self.guard.clone() })
                    as Arc<dyn DataIo>)
            })
            .clone()
    }
    fn note_written(&mut self) {
        self.unsynced = true;
    }
    fn poisoned(&self) -> Option<String> {
        self.poison.get()
    }
    fn read_into(&self, dst: &mut dyn DataBuf, pos: usize, len: usize, off: u64) -> io::Result<bool> {
        dst.read_file(self.file.as_fd(), off, pos, len)
    }
    fn write_from(&mut self, src: &dyn DataBuf, pos: usize, len: usize, off: u64) -> io::Result<bool> {
        self.write_with(off, len, |file| src.write_file(file.as_fd(), off, pos, len))
    }
}

/// A plain in-memory image (every write is immediately "durable"; it never fails, so it is
/// only poisoned on purpose, [`MemIo::poison`], to test the refusals).
#[derive(Clone, Default)]
pub struct MemIo {
    data: Arc<Mutex<Vec<u8>>>,
    poison: Poison,
}

impl MemIo {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn from_bytes(data: Vec<u8>) -> Self {
        MemIo { data: Arc::new(Mutex::new(data)), poison: Poison::default() }
    }
    /// Poison the image as a failed sync would (see [`Poison`]).
    pub fn poison(&self, what: &str) {
        self.poison.set(what.to_string());
    }
    /// A copy of the current bytes. Clones of a `MemIo` share the same bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn vec_read(data: &[u8], buf: &mut [u8], off: u64) -> io::Result<()> {
    let (s, e) = mem_range(off, buf.len())?;
    match data.get(s..e) {
        Some(src) => {
            buf.copy_from_slice(src);
            Ok(())
        }
        None => Err(eof(off, buf.len(), data.len() as u64)),
    }
}

fn vec_write(data: &mut Vec<u8>, buf: &[u8], off: u64) -> io::Result<()> {
    let (s, e) = mem_range(off, buf.len())?;
    if data.len() < e {
        data.resize(e, 0);
    }
    if let Some(dst) = data.get_mut(s..e) {
        dst.copy_from_slice(buf);
    }
    Ok(())
}

fn vec_set_len(data: &mut Vec<u8>, len: u64) -> io::Result<()> {
    let l = usize::try_from(len).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "length too large"))?;
    data.resize(l, 0);
    Ok(())
}

impl ImageIo for MemIo {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        vec_read(&self.lock(), buf, off)
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        self.poison.check()?;
        vec_write(&mut self.lock(), buf, off)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.poison.check()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.poison.check()?;
        vec_set_len(&mut self.lock(), len)
    }
    fn poisoned(&self) -> Option<String> {
        self.poison.get()
    }
    fn data_io(&self) -> Option<Arc<dyn DataIo>> {
        Some(Arc::new(CloneData(self.clone())))
    }
}

/// The [`DataIo`] handle of an in-memory image ([`MemIo`], [`FaultIo`]): a clone, which
/// shares its bytes (and a `FaultIo`'s volatile cache and fault injection).
struct CloneData<T>(T);

impl<T: ImageIo + Clone + Sync> DataIo for CloneData<T> {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.0.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.0.clone().write_at(buf, off)
    }
}

#[derive(Clone)]
enum Pending {
    Write { off: u64, data: Arc<Vec<u8>> },
    SetLen(u64),
}

#[derive(Default)]
struct FaultState {
    /// The durable image.
    durable: Arc<Vec<u8>>,
    /// What the running system sees (durable + every unsynced write).
    current: Vec<u8>,
    /// Unsynced operations, in issue order.
    pending: Vec<Pending>,
    /// Fail the n-th later write/flush (1 = the next one).
    fail_after: Option<u64>,
    /// Fail the n-th later read (1 = the next one), once.
    fail_read_after: Option<u64>,
    writes: u64,
    flushes: u64,
    reads: u64,
    /// Fail the n-th later flush (1 = the next one) once, dropping the unsynced writes
    /// (they stay visible to reads but never become durable), as Linux may after an
    /// `fdatasync` EIO: the flush after it succeeds.
    lossy_sync_after: Option<u64>,
    /// The first failure (see [`Poison`]): later writes and flushes are refused.
    poisoned: Option<String>,
    /// Ranges written while recording (see [`ImageIo::record_writes`]).
    written: Vec<(u64, u64)>,
    recording: bool,
    /// Ranged syncs so far ([`FaultIo::flush_ranges`]).
    range_flushes: u64,
}

/// An in-memory image with a volatile write cache, for crash tests.
///
/// Writes go to a pending list; `flush` makes them durable. [`FaultIo::crash`] returns the
/// bytes a power loss could leave: every unsynced write is independently kept, dropped or
/// torn at 512-byte granularity, applied in a random order. Clones share the same state, so
/// a test can keep one handle while the engine owns another.
#[derive(Clone, Default)]
pub struct FaultIo {
    st: Arc<Mutex<FaultState>>,
}

/// Small deterministic PRNG (splitmix64) so crash outcomes are reproducible from a seed.
struct SplitMix(u64);
impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

impl FaultIo {
    pub fn new() -> Self {
        Self::default()
    }
    /// Start from durable bytes.
    pub fn from_bytes(data: Vec<u8>) -> Self {
        let st = FaultState { current: data.clone(), durable: Arc::new(data), ..Default::default() };
        FaultIo { st: Arc::new(Mutex::new(st)) }
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// The durable bytes (cheap: shared).
    pub fn durable(&self) -> Arc<Vec<u8>> {
        self.lock().durable.clone()
    }
    /// What a reader of the running system sees (durable plus unsynced writes).
    pub fn current(&self) -> Vec<u8> {
        self.lock().current.clone()
    }
    /// Number of unsynced operations.
    pub fn pending_ops(&self) -> usize {
        self.lock().pending.len()
    }
    /// Number of write and flush calls so far.
    pub fn op_counts(&self) -> (u64, u64) {
        let s = self.lock();
        (s.writes, s.flushes)
    }
    /// Make the `n`-th later write or flush (1 = the next one) fail with an I/O error, and
    /// every one after it too (a dead disk). `None` disarms.
    pub fn fail_after(&self, n: Option<u64>) {
        self.lock().fail_after = n;
    }
    /// Make the `n`-th later flush (1 = the next one, through this object or a sync handle)
    /// fail once with its unsynced writes dropped: they stay visible to reads but never
    /// become durable, and the device's next flush would succeed (the kernel's behaviour
    /// after an `fdatasync` EIO). `None` disarms.
    pub fn lossy_sync_after(&self, n: Option<u64>) {
        self.lock().lossy_sync_after = n;
    }
    /// The first failure that poisoned this image, if any (see [`Poison`]).
    pub fn poisoned(&self) -> Option<String> {
        self.lock().poisoned.clone()
    }
    /// Forget a poisoning (the image is "reopened" by a test that keeps this handle).
    pub fn clear_poison(&self) {
        self.lock().poisoned = None;
    }
    /// Number of ranged syncs ([`FaultIo::flush_ranges`], through a sync handle) so far.
    pub fn range_flush_count(&self) -> u64 {
        self.lock().range_flushes
    }
    /// A ranged sync ([`SyncHandle::sync_ranges`]): the current bytes of `ranges` become
    /// durable, and nothing else: every other unsynced write stays unsynced (a crash may
    /// still drop or tear it), and the parts of unsynced writes inside the ranges are gone
    /// from the pending list (their bytes, or newer ones, are durable). Counted and failed
    /// like a flush (a failure, or a lossy sync, poisons the image).
    pub fn flush_ranges(&self, ranges: &[(u64, u64)]) -> io::Result<()> {
        let ranges = merge_ranges(ranges.to_vec());
        let mut st = self.lock();
        if let Some(first) = &st.poisoned {
            return Err(poisoned_error(first));
        }
        st.flushes += 1;
        st.range_flushes += 1;
        if let Err(e) = Self::check_fail(&mut st) {
            st.poisoned = Some(format!("ranged flush failed: {e}"));
            return Err(e);
        }
        if let Some(n) = st.lossy_sync_after {
            st.lossy_sync_after = if n <= 1 { None } else { Some(n - 1) };
            if n <= 1 {
                st.pending.clear();
                let e = io::Error::other("injected ranged sync error (unsynced writes dropped)");
                st.poisoned = Some(format!("ranged flush failed: {e}"));
                return Err(e);
            }
        }
        let mut durable = std::mem::take(&mut st.durable);
        let d = Arc::make_mut(&mut durable);
        for &(off, len) in &ranges {
            let (s, e) = mem_range(off, len as usize)?;
            let end = e.min(st.current.len());
            if let Some(src) = st.current.get(s..end) {
                let _ = vec_write(d, src, off);
            }
        }
        st.durable = durable;
        // what is left pending: the parts of each write outside the ranges
        let pending = std::mem::take(&mut st.pending);
        for op in pending {
            match op {
                Pending::Write { off, data } => {
                    let end = off + data.len() as u64;
                    let mut pos = off;
                    for &(ro, rl) in &ranges {
                        let re = ro + rl;
                        if re <= pos || ro >= end {
                            continue;
                        }
                        if ro > pos {
                            let piece = data.get((pos - off) as usize..(ro - off) as usize).unwrap_or(&[]);
                            st.pending.push(Pending::Write { off: pos, data: Arc::new(piece.to_vec()) });
                        }
                        pos = pos.max(re.min(end));
                    }
                    if pos < end {
                        let piece = data.get((pos - off) as usize..).unwrap_or(&[]);
                        let data = if pos == off { data.clone() } else { Arc::new(piece.to_vec()) };
                        st.pending.push(Pending::Write { off: pos, data });
                    }
                }
                other => st.pending.push(other),
            }
        }
        Ok(())
    }
    /// Number of read calls so far.
    pub fn read_count(&self) -> u64 {
        self.lock().reads
    }
    /// Make the `n`-th later read (1 = the next one) fail with an I/O error, once (a
    /// transient read error: later reads succeed). `None` disarms.
    pub fn fail_read_after(&self, n: Option<u64>) {
        self.lock().fail_read_after = n;
    }
    fn check_fail(st: &mut FaultState) -> io::Result<()> {
        if let Some(n) = st.fail_after {
            if n <= 1 {
                st.fail_after = Some(0);
                return Err(io::Error::other("injected I/O error"));
            }
            st.fail_after = Some(n - 1);
        }
        Ok(())
    }
    /// The bytes left after a power loss now: each unsynced write independently kept,
    /// dropped, or torn (a random subset of its 512-byte sectors kept), in a random order.
    pub fn crash(&self, rng_seed: u64) -> Vec<u8> {
        let st = self.lock();
        let mut rng = SplitMix(rng_seed ^ 0x5EED_5EED);
        let mut img: Vec<u8> = (*st.durable).clone();
        let mut ops: Vec<Pending> = st.pending.clone();
        // random order (Fisher-Yates)
        for i in (1..ops.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            ops.swap(i, j);
        }
        for op in ops {
            match op {
                Pending::SetLen(l) => {
                    if rng.below(2) == 0 {
                        let _ = vec_set_len(&mut img, l);
                    }
                }
                Pending::Write { off, data } => match rng.below(3) {
                    0 => {}
                    1 => {
                        let _ = vec_write(&mut img, &data, off);
                    }
                    _ => {
                        // torn: keep a random subset of the 512-byte sectors it covers
                        let mut pos = 0usize;
                        while pos < data.len() {
                            let abs = off + pos as u64;
                            let sector_end = ((abs / 512) + 1) * 512;
                            let n = ((sector_end - abs) as usize).min(data.len() - pos);
                            if rng.below(2) == 0 {
                                if let Some(chunk) = data.get(pos..pos + n) {
                                    let _ = vec_write(&mut img, chunk, abs);
                                }
                            }
                            pos += n;
                        }
                    }
                },
            }
        }
        img
    }
}

impl ImageIo for FaultIo {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let mut st = self.lock();
        st.reads += 1;
        if let Some(n) = st.fail_read_after {
            st.fail_read_after = if n <= 1 { None } else { Some(n - 1) };
            if n <= 1 {
                return Err(io::Error::other("injected read error"));
            }
        }
        vec_read(&st.current, buf, off)
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(first) = &st.poisoned {
            return Err(poisoned_error(first));
        }
        st.writes += 1;
        if let Err(e) = Self::check_fail(&mut st) {
            st.poisoned = Some(format!("write at {off:#x} failed: {e}"));
            return Err(e);
        }
        vec_write(&mut st.current, buf, off)?;
        st.pending.push(Pending::Write { off, data: Arc::new(buf.to_vec()) });
        if st.recording {
            st.written.push((off, buf.len() as u64));
        }
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(first) = &st.poisoned {
            return Err(poisoned_error(first));
        }
        st.flushes += 1;
        if let Err(e) = Self::check_fail(&mut st) {
            st.poisoned = Some(format!("flush failed: {e}"));
            return Err(e);
        }
        if let Some(n) = st.lossy_sync_after {
            st.lossy_sync_after = if n <= 1 { None } else { Some(n - 1) };
            if n <= 1 {
                // the kernel gives up on the dirty pages: never durable, and the next
                // flush has nothing left to write
                st.pending.clear();
                let e = io::Error::other("injected fdatasync error (unsynced writes dropped)");
                st.poisoned = Some(format!("flush failed: {e}"));
                return Err(e);
            }
        }
        // the unsynced writes become durable (not `current`: writes dropped by a failed
        // sync stay visible to reads but never reach the disk)
        let pending = std::mem::take(&mut st.pending);
        let mut durable = std::mem::take(&mut st.durable);
        let d = Arc::make_mut(&mut durable);
        for op in pending {
            match op {
                Pending::Write { off, data } => {
                    let _ = vec_write(d, &data, off);
                }
                Pending::SetLen(l) => {
                    let _ = vec_set_len(d, l);
                }
            }
        }
        st.durable = durable;
        st.written.clear();
        Ok(())
    }
    fn record_writes(&mut self, on: bool) {
        self.lock().recording = on;
    }
    fn take_written(&mut self) -> Option<Vec<(u64, u64)>> {
        Some(merge_ranges(std::mem::take(&mut self.lock().written)))
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(first) = &st.poisoned {
            return Err(poisoned_error(first));
        }
        st.writes += 1;
        if let Err(e) = Self::check_fail(&mut st) {
            st.poisoned = Some(format!("resize failed: {e}"));
            return Err(e);
        }
        vec_set_len(&mut st.current, len)?;
        st.pending.push(Pending::SetLen(len));
        Ok(())
    }
    fn sync_handle(&self) -> Option<SyncHandle> {
        Some(SyncHandle(SyncTarget::Fault(self.clone()), Poison::default()))
    }
    fn poisoned(&self) -> Option<String> {
        FaultIo::poisoned(self)
    }
    fn data_io(&self) -> Option<Arc<dyn DataIo>> {
        Some(Arc::new(CloneData(self.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memio_eof_is_error() {
        let mut m = MemIo::new();
        m.write_at(&[1, 2, 3], 10).unwrap();
        assert_eq!(m.len().unwrap(), 13);
        let mut b = [0u8; 4];
        assert_eq!(m.read_at(&mut b, 10).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let mut b = [0u8; 3];
        m.read_at(&mut b, 10).unwrap();
        assert_eq!(b, [1, 2, 3]);
    }

    #[test]
    fn faultio_crash_keeps_durable() {
        let mut f = FaultIo::from_bytes(vec![0; 2048]);
        f.write_at(&[7; 1024], 0).unwrap();
        f.flush().unwrap();
        f.write_at(&[9; 1024], 1024).unwrap();
        let mut seen_kept = false;
        let mut seen_dropped = false;
        for seed in 0..64 {
            let img = f.crash(seed);
            assert_eq!(&img[..1024], &[7; 1024][..]);
            if img[1024..] == [9; 1024][..] {
                seen_kept = true;
            }
            if img[1024..] == [0; 1024][..] {
                seen_dropped = true;
            }
        }
        assert!(seen_kept && seen_dropped);
    }

    #[test]
    fn faultio_fail_after() {
        let mut f = FaultIo::new();
        f.fail_after(Some(2));
        f.write_at(&[1], 0).unwrap();
        assert!(f.flush().is_err());
        assert!(f.write_at(&[1], 0).is_err());
        f.fail_after(None);
        // the failures poisoned it: refused until "reopened"
        assert!(f.write_at(&[1], 0).is_err());
        assert!(f.poisoned().is_some_and(|p| p.contains("flush failed")));
        f.clear_poison();
        f.write_at(&[1], 0).unwrap();
    }

    #[test]
    fn faultio_lossy_sync_drops_writes_and_poisons() {
        let mut f = FaultIo::from_bytes(vec![0; 1024]);
        f.write_at(&[7; 512], 0).unwrap();
        f.lossy_sync_after(Some(1));
        assert!(f.flush().is_err());
        assert_eq!(f.durable()[0], 0, "a failed sync made the write durable");
        assert_eq!(f.current()[0], 7, "the dropped write is still visible to reads");
        let h = f.sync_handle().unwrap();
        assert!(h.sync().is_err(), "the sync handle synced a poisoned image");
        assert!(f.flush().is_err(), "a flush after a failed sync succeeded");
        assert!(f.write_at(&[8; 512], 512).is_err());
        // the device itself would now report success over the lost write
        f.clear_poison();
        f.flush().unwrap();
        assert_eq!(f.durable()[0], 0);
    }

    #[test]
    fn fileio_ranged_sync_keeps_the_bytes_and_records_only_while_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let mut f =
            FileIo::new(File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap());
        f.write_at(&[1; 4096], 0).unwrap(); // not recorded
        f.record_writes(true);
        f.write_at(&[2; 100], 8192).unwrap();
        f.write_at(&[3; 100], 8292).unwrap();
        f.write_at(&[4; 10], 20_000).unwrap();
        f.record_writes(false);
        f.write_at(&[5; 10], 30_000).unwrap(); // not recorded
        let w = f.take_written().unwrap();
        assert_eq!(w, vec![(8192, 200), (20_000, 10)]);
        let h = f.sync_handle().unwrap();
        h.sync_ranges(&w).unwrap();
        let mut b = vec![0u8; 30_010];
        f.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|x| *x == 1));
        assert!(b[8192..8292].iter().all(|x| *x == 2) && b[8292..8392].iter().all(|x| *x == 3));
        assert!(b[20_000..20_010].iter().all(|x| *x == 4) && b[30_000..].iter().all(|x| *x == 5));
        // a range past the end (the file shrank): the whole file is synced instead
        f.set_len(10_000).unwrap();
        h.sync_ranges(&[(20_000, 10)]).unwrap();
        assert_eq!(f.len().unwrap(), 10_000);
        assert!(f.take_written().unwrap().is_empty());
    }

    /// A ranged sync that finds an overlapping write under way waits for it and is woken by
    /// its end; a write overlapping the sync under way waits for the sync; writes elsewhere
    /// never wait. (The write's end wakes only when a sync is under way: this fails by
    /// timing out if that wake-up is lost.)
    #[test]
    fn range_guard_orders_overlapping_writes_and_syncs() {
        use std::sync::mpsc;
        use std::time::Duration;
        let g = Arc::new(RangeGuard::default());
        let log = Arc::new(Mutex::new(Vec::<&str>::new()));
        let (started, wait_started) = mpsc::channel();
        let (g1, l1) = (g.clone(), log.clone());
        let writer = std::thread::spawn(move || {
            g1.write(100, 10, || {
                started.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(300));
                l1.lock().unwrap().push("write end");
            })
        });
        wait_started.recv().unwrap();
        // a write elsewhere goes on at once
        g.write(0, 10, || log.lock().unwrap().push("other write"));
        let (done, wait_done) = mpsc::channel();
        let (g2, l2) = (g.clone(), log.clone());
        let syncer = std::thread::spawn(move || {
            g2.sync(&[(105, 1)], || {
                l2.lock().unwrap().push("sync");
                std::thread::sleep(Duration::from_millis(100));
            });
            done.send(()).unwrap();
        });
        // wait until the sync has registered its ranges (it is then waiting for the writer)
        while g.lock().syncing.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // an overlapping write waits for the sync, one elsewhere does not
        let (g3, l3) = (g.clone(), log.clone());
        let late = std::thread::spawn(move || g3.write(100, 10, || l3.lock().unwrap().push("late write")));
        g.write(200, 10, || log.lock().unwrap().push("other write"));
        wait_done.recv_timeout(Duration::from_secs(10)).expect("the sync was never woken by the write's end");
        writer.join().unwrap();
        syncer.join().unwrap();
        late.join().unwrap();
        assert_eq!(*log.lock().unwrap(), vec!["other write", "other write", "write end", "sync", "late write"]);
    }

    #[test]
    fn merge_ranges_and_overlaps() {
        assert_eq!(merge_ranges(vec![(10, 5), (0, 10), (30, 0), (40, 2), (41, 5)]), vec![(0, 15), (40, 6)]);
        let r = merge_ranges(vec![(100, 10), (200, 10)]);
        assert!(overlaps(&r, 105, 1) && overlaps(&r, 90, 20) && overlaps(&r, 0, u64::MAX));
        assert!(!overlaps(&r, 110, 90) && !overlaps(&r, 0, 100) && !overlaps(&r, 210, 5));
    }

    #[test]
    fn faultio_ranged_flush_makes_only_the_ranges_durable() {
        let mut f = FaultIo::from_bytes(vec![0; 4096]);
        f.write_at(&[7; 1024], 0).unwrap();
        f.write_at(&[8; 1024], 2048).unwrap();
        f.flush_ranges(&[(512, 1024)]).unwrap();
        let d = f.durable();
        assert!(d[..512].iter().all(|x| *x == 0), "bytes outside the range became durable");
        assert!(d[512..1024].iter().all(|x| *x == 7) && d[1024..1536].iter().all(|x| *x == 0));
        assert!(d[2048..3072].iter().all(|x| *x == 0));
        // what is left pending: the parts outside the range
        for seed in 0..32 {
            let img = f.crash(seed);
            assert!(img[512..1024].iter().all(|x| *x == 7), "a crash undid a ranged flush");
        }
        assert_eq!(f.range_flush_count(), 1);
    }

    #[test]
    fn memio_poison_refuses_writes_and_flushes() {
        let mut m = MemIo::new();
        m.write_at(&[1], 0).unwrap();
        m.poison("test");
        assert!(m.write_at(&[1], 0).is_err());
        assert!(m.flush().is_err());
        assert_eq!(m.poisoned().as_deref(), Some("test"));
    }
}
