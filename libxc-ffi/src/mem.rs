//! Safe access to memory shared with another domain.
//!
//! A grant mapping is written concurrently by the other domain, so Rust references (`&[u8]`,
//! `&mut [u8]`) to it must never exist: the compiler would be entitled to assume the bytes do
//! not change under it. Every access therefore goes through [`SharedMem`]: bounds-checked
//! volatile copies in and out for bytes, and atomic loads/stores for the ring indices (the
//! `req_prod`/`rsp_prod`/`req_event`/`rsp_event` words of a blkif ring), which is what the
//! C ring macros do with their barriers.
//!
//! [`LocalPages`] is the same interface over page-aligned memory of this process: the fake
//! "guest page" for tests of ring code without Xen.

use std::alloc::Layout;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};

/// Size of a Xen page (x86).
pub const PAGE_SIZE: usize = 4096;

/// Bounds-checked access to a region of memory that another party may change at any time.
///
/// Implemented by [`crate::GrantMapping`] (real, a guest's granted pages) and by
/// [`LocalPages`] (fake, this process's memory). Ring code written against this trait runs
/// unchanged over both.
pub trait SharedMem {
    /// Size of the region in bytes.
    fn len(&self) -> usize;
    /// True when the region has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// False when the region is mapped read-only (writes return [`Error::ReadOnly`]).
    fn is_writable(&self) -> bool;
    /// Copies `dst.len()` bytes starting at `offset` out of the region.
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<()>;
    /// Copies `src` into the region at `offset`.
    fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<()>;
    /// Atomic 32-bit load with `Acquire` ordering (offset must be 4-aligned).
    fn load_u32_acquire(&self, offset: usize) -> Result<u32>;
    /// Atomic 32-bit load with `Relaxed` ordering (offset must be 4-aligned).
    fn load_u32_relaxed(&self, offset: usize) -> Result<u32>;
    /// Atomic 32-bit store with `Release` ordering (offset must be 4-aligned).
    fn store_u32_release(&self, offset: usize, value: u32) -> Result<()>;
    /// Atomic 32-bit store with `Relaxed` ordering (offset must be 4-aligned).
    fn store_u32_relaxed(&self, offset: usize, value: u32) -> Result<()>;
    /// The bytes `offset..offset+len` as an [`IoRegion`], for file I/O straight into or out
    /// of the region ([`preadv_exact`], [`pwritev_all`]). Regions that cannot hand out their
    /// memory (the default) fail with [`Error::InvalidArgument`]; callers then copy.
    fn io_region(&self, offset: usize, len: usize) -> Result<IoRegion<'_>> {
        let _ = (offset, len);
        Err(Error::InvalidArgument { call: "io_region", reason: "this region does not expose its memory".into() })
    }
}

/// A raw region: base pointer, length, writability. The unsafe core shared by the real and
/// the fake implementations. Invariant (upheld by whoever constructs it): `ptr..ptr+len` is
/// mapped, readable (and writable if `writable`) for the whole life of the `RawRegion`, and
/// `ptr` is at least 4-byte aligned.
#[derive(Debug)]
pub(crate) struct RawRegion {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
}

// SAFETY: the region is only accessed through volatile copies and atomics, never through
// Rust references, so sharing it between threads is no different from sharing it with the
// other domain.
unsafe impl Send for RawRegion {}
// SAFETY: as above.
unsafe impl Sync for RawRegion {}

/// Checks that `offset..offset+len` lies within `size` (overflow-safe).
pub(crate) fn check_bounds(offset: usize, len: usize, size: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfBounds { offset, len, size }),
    }
}

impl RawRegion {
    /// # Safety
    /// `ptr..ptr+len` must stay mapped (readable; writable if `writable`) for the life of the
    /// returned value, and `ptr` must be 4-byte aligned.
    pub(crate) unsafe fn new(ptr: NonNull<u8>, len: usize, writable: bool) -> RawRegion {
        debug_assert_eq!(ptr.as_ptr() as usize % 4, 0);
        RawRegion { ptr, len, writable }
    }

    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn atomic_at(&self, offset: usize) -> Result<&AtomicU32> {
        check_bounds(offset, 4, self.len)?;
        if !offset.is_multiple_of(4) {
            return Err(Error::Misaligned { offset, align: 4 });
        }
        // SAFETY: in bounds (checked), 4-aligned (base is 4-aligned by the invariant, offset
        // checked), mapped for the life of `self` (invariant), and this memory is only ever
        // accessed atomically or by volatile copies from our side.
        Ok(unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(offset).cast::<u32>()) })
    }
}

impl SharedMem for RawRegion {
    fn len(&self) -> usize {
        self.len
    }
    fn is_writable(&self) -> bool {
        self.writable
    }

    fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        check_bounds(offset, dst.len(), self.len)?;
        // SAFETY: the source range is in bounds (checked) and mapped (invariant); `dst` is a
        // distinct, exclusively borrowed buffer of this process.
        unsafe { volatile_copy(self.ptr.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        check_bounds(offset, src.len(), self.len)?;
        // SAFETY: the destination range is in bounds (checked), mapped writable (invariant +
        // checked flag); `src` is a distinct buffer of this process.
        unsafe { volatile_copy(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len()) };
        Ok(())
    }

    fn load_u32_acquire(&self, offset: usize) -> Result<u32> {
        Ok(self.atomic_at(offset)?.load(Ordering::Acquire))
    }
    fn load_u32_relaxed(&self, offset: usize) -> Result<u32> {
        Ok(self.atomic_at(offset)?.load(Ordering::Relaxed))
    }
    fn store_u32_release(&self, offset: usize, value: u32) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.atomic_at(offset)?.store(value, Ordering::Release);
        Ok(())
    }
    fn store_u32_relaxed(&self, offset: usize, value: u32) -> Result<()> {
        if !self.writable {
            return Err(Error::ReadOnly);
        }
        self.atomic_at(offset)?.store(value, Ordering::Relaxed);
        Ok(())
    }
    fn io_region(&self, offset: usize, len: usize) -> Result<IoRegion<'_>> {
        check_bounds(offset, len, self.len)?;
        // SAFETY: in bounds (checked), so `ptr + offset` stays inside the mapping (or one past
        // its end when len == 0, which `add` allows).
        let ptr = unsafe { self.ptr.add(offset) };
        Ok(IoRegion { ptr, len, writable: self.writable, _region: PhantomData })
    }
}

/// Copies `len` bytes with volatile accesses (8 bytes at a time where both sides allow it),
/// so the compiler neither elides nor duplicates reads of memory another domain writes.
///
/// # Safety
/// `src..src+len` must be readable, `dst..dst+len` writable, and the ranges must not overlap.
unsafe fn volatile_copy(src: *const u8, dst: *mut u8, len: usize) {
    let mut i = 0;
    // SAFETY: (all accesses below) every index is < len, so inside both ranges the caller
    // guarantees; u64 accesses happen only at offsets where both pointers are 8-aligned and
    // 8 bytes remain.
    unsafe {
        if (src as usize) % 8 == (dst as usize) % 8 {
            while i < len && !(src as usize + i).is_multiple_of(8) {
                dst.add(i).write_volatile(src.add(i).read_volatile());
                i += 1;
            }
            while i + 8 <= len {
                let v = src.add(i).cast::<u64>().read_volatile();
                dst.add(i).cast::<u64>().write_volatile(v);
                i += 8;
            }
        }
        while i < len {
            dst.add(i).write_volatile(src.add(i).read_volatile());
            i += 1;
        }
    }
}

/// Zeroed, page-aligned memory of this process exposed through [`SharedMem`]: a stand-in for
/// granted guest pages in tests (e.g. a fake frontend writing requests into a "ring page").
///
/// Cloning is not offered; share it with `Arc<LocalPages>` (both ends of a fake ring then see
/// the same bytes, exactly like a frontend and a backend do).
#[derive(Debug)]
pub struct LocalPages {
    region: RawRegion,
    layout: Layout,
}

impl LocalPages {
    /// Allocates `pages` zeroed pages of [`PAGE_SIZE`] bytes, writable.
    pub fn new(pages: usize) -> LocalPages {
        Self::with_access(pages, true)
    }

    /// Like [`LocalPages::new`], choosing whether writes are allowed (to test read-only paths).
    pub fn with_access(pages: usize, writable: bool) -> LocalPages {
        let size = pages.max(1).checked_mul(PAGE_SIZE).expect("page count overflows");
        let layout = Layout::from_size_align(size, PAGE_SIZE).expect("valid layout");
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else { std::alloc::handle_alloc_error(layout) };
        // SAFETY: freshly allocated, page-aligned, `size` bytes, freed only in Drop after the
        // region is gone (the region lives inside `self`).
        let region = unsafe { RawRegion::new(ptr, pages * PAGE_SIZE, writable) };
        LocalPages { region, layout }
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.region.len / PAGE_SIZE
    }
}

impl Drop for LocalPages {
    fn drop(&mut self) {
        // SAFETY: allocated in `with_access` with exactly this layout; no access can happen
        // after drop (the region is owned by self).
        unsafe { std::alloc::dealloc(self.region.as_ptr(), self.layout) };
    }
}

/// `SharedMem` for a type that owns its memory as a `region: RawRegion` field.
macro_rules! delegate_shared_mem {
    ($t:ty) => {
        impl SharedMem for $t {
            fn len(&self) -> usize {
                self.region.len()
            }
            fn is_writable(&self) -> bool {
                self.region.is_writable()
            }
            fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
                self.region.read_bytes(offset, dst)
            }
            fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<()> {
                self.region.write_bytes(offset, src)
            }
            fn load_u32_acquire(&self, offset: usize) -> Result<u32> {
                self.region.load_u32_acquire(offset)
            }
            fn load_u32_relaxed(&self, offset: usize) -> Result<u32> {
                self.region.load_u32_relaxed(offset)
            }
            fn store_u32_release(&self, offset: usize, value: u32) -> Result<()> {
                self.region.store_u32_release(offset, value)
            }
            fn store_u32_relaxed(&self, offset: usize, value: u32) -> Result<()> {
                self.region.store_u32_relaxed(offset, value)
            }
            fn io_region(&self, offset: usize, len: usize) -> Result<$crate::mem::IoRegion<'_>> {
                self.region.io_region(offset, len)
            }
        }
    };
}
pub(crate) use delegate_shared_mem;

delegate_shared_mem!(LocalPages);

impl<T: SharedMem + ?Sized> SharedMem for std::sync::Arc<T> {
    fn len(&self) -> usize {
        (**self).len()
    }
    fn is_writable(&self) -> bool {
        (**self).is_writable()
    }
    fn read_bytes(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        (**self).read_bytes(offset, dst)
    }
    fn write_bytes(&self, offset: usize, src: &[u8]) -> Result<()> {
        (**self).write_bytes(offset, src)
    }
    fn load_u32_acquire(&self, offset: usize) -> Result<u32> {
        (**self).load_u32_acquire(offset)
    }
    fn load_u32_relaxed(&self, offset: usize) -> Result<u32> {
        (**self).load_u32_relaxed(offset)
    }
    fn store_u32_release(&self, offset: usize, value: u32) -> Result<()> {
        (**self).store_u32_release(offset, value)
    }
    fn store_u32_relaxed(&self, offset: usize, value: u32) -> Result<()> {
        (**self).store_u32_relaxed(offset, value)
    }
    fn io_region(&self, offset: usize, len: usize) -> Result<IoRegion<'_>> {
        (**self).io_region(offset, len)
    }
}

/// A bounds-checked piece of a shared region ([`SharedMem::io_region`]), valid while the
/// region is borrowed. It never becomes a Rust slice (the other domain writes the memory
/// concurrently): it only goes to the kernel, as one `iovec` of [`preadv_exact`] or
/// [`pwritev_all`], which copies bytes in or out the way a grant copy would.
#[derive(Clone, Copy, Debug)]
pub struct IoRegion<'a> {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    _region: PhantomData<&'a RawRegion>,
}

impl IoRegion<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when the piece has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Whether a read from a file may fill it.
    pub fn is_writable(&self) -> bool {
        self.writable
    }
}

/// `struct iovec` of `<sys/uio.h>`.
#[repr(C)]
struct IoVec {
    base: *mut std::ffi::c_void,
    len: usize,
}

extern "C" {
    fn preadv(fd: std::ffi::c_int, iov: *const IoVec, iovcnt: std::ffi::c_int, offset: i64) -> isize;
    fn pwritev(fd: std::ffi::c_int, iov: *const IoVec, iovcnt: std::ffi::c_int, offset: i64) -> isize;
}

/// Most `iovec`s one call takes (Linux `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// One vectored transfer between `fd` at `off` and `regions`, in order, repeated until every
/// byte moved (short transfers and `EINTR` continue where they stopped).
fn vectored(fd: BorrowedFd<'_>, off: u64, regions: &[IoRegion<'_>], read: bool) -> io::Result<()> {
    let mut iov: Vec<IoVec> =
        regions.iter().filter(|r| r.len > 0).map(|r| IoVec { base: r.ptr.as_ptr().cast(), len: r.len }).collect();
    let total: usize = iov.iter().map(|v| v.len).sum();
    let end = off
        .checked_add(total as u64)
        .filter(|&e| e <= i64::MAX as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "file range overflows"))?;
    let (mut first, mut pos) = (0usize, off);
    while pos < end {
        let batch = &iov[first..(first + IOV_MAX).min(iov.len())];
        let cnt = batch.len() as std::ffi::c_int;
        let n = if read {
            // SAFETY: every iovec describes bytes inside a region borrowed for the life of
            // `regions` (bounds checked by `io_region`), writable (checked by the caller),
            // mapped for that whole time (RawRegion's invariant); the kernel writes them like
            // a grant copy would, and no Rust reference to them exists. `batch` is a live
            // array of `cnt` iovecs.
            unsafe { preadv(fd.as_raw_fd(), batch.as_ptr(), cnt, pos as i64) }
        } else {
            // SAFETY: as above, the kernel only reads the described bytes.
            unsafe { pwritev(fd.as_raw_fd(), batch.as_ptr(), cnt, pos as i64) }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(if read {
                io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("end of file at offset {pos} (reading up to {end})"),
                )
            } else {
                io::Error::new(io::ErrorKind::WriteZero, format!("write at offset {pos} wrote nothing"))
            });
        }
        let mut left = n as usize;
        pos += left as u64;
        // skip the iovecs done, shorten a partly done one
        while left > 0 {
            let Some(v) = iov.get_mut(first) else { break };
            if left >= v.len {
                left -= v.len;
                first += 1;
            } else {
                // SAFETY: `left < v.len`, so the new base stays inside the same region.
                v.base = unsafe { v.base.cast::<u8>().add(left) }.cast();
                v.len -= left;
                left = 0;
            }
        }
    }
    Ok(())
}

/// Read exactly the regions' total length from `fd` at `off` into `regions` (in order), with
/// as few `preadv` calls as possible (one unless the kernel returns short or there are more
/// than 1024 regions). The end of the file before that is `UnexpectedEof`; every region must
/// be writable (`InvalidInput` otherwise, before anything is read).
pub fn preadv_exact(fd: BorrowedFd<'_>, off: u64, regions: &[IoRegion<'_>]) -> io::Result<()> {
    if regions.iter().any(|r| !r.writable) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "read into a read-only region"));
    }
    vectored(fd, off, regions, true)
}

/// Write all bytes of `regions` (in order) to `fd` at `off`, with as few `pwritev` calls as
/// possible. The bytes written are whatever the regions hold while the kernel copies them.
pub fn pwritev_all(fd: BorrowedFd<'_>, off: u64, regions: &[IoRegion<'_>]) -> io::Result<()> {
    vectored(fd, off, regions, false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bytes_round_trip_and_bounds() {
        let p = LocalPages::new(2);
        assert_eq!(p.len(), 2 * PAGE_SIZE);
        assert_eq!(p.pages(), 2);
        // unaligned and crossing the page boundary
        let data: Vec<u8> = (0..100u8).collect();
        p.write_bytes(PAGE_SIZE - 37, &data).unwrap();
        let mut back = vec![0u8; 100];
        p.read_bytes(PAGE_SIZE - 37, &mut back).unwrap();
        assert_eq!(back, data);
        // fresh memory is zero
        let mut z = [0xffu8; 16];
        p.read_bytes(0, &mut z).unwrap();
        assert_eq!(z, [0; 16]);
        // exactly to the end is fine, one past is not
        p.write_bytes(2 * PAGE_SIZE - 4, &[1, 2, 3, 4]).unwrap();
        assert!(matches!(
            p.write_bytes(2 * PAGE_SIZE - 3, &[1, 2, 3, 4]),
            Err(Error::OutOfBounds { offset, len: 4, size }) if offset == 2 * PAGE_SIZE - 3 && size == 2 * PAGE_SIZE
        ));
        // overflowing offset+len does not wrap around
        assert!(matches!(p.read_bytes(usize::MAX, &mut [0u8; 2]), Err(Error::OutOfBounds { .. })));
        // zero-length at the end is fine, past the end is not
        p.read_bytes(2 * PAGE_SIZE, &mut []).unwrap();
        assert!(p.read_bytes(2 * PAGE_SIZE + 1, &mut []).is_err());
    }

    #[test]
    fn atomics_check_alignment_bounds_and_access() {
        let p = LocalPages::new(1);
        p.store_u32_release(0, 0xdead_beef).unwrap();
        p.store_u32_relaxed(4, 7).unwrap();
        assert_eq!(p.load_u32_acquire(0).unwrap(), 0xdead_beef);
        assert_eq!(p.load_u32_relaxed(4).unwrap(), 7);
        let mut raw = [0u8; 4];
        p.read_bytes(0, &mut raw).unwrap();
        assert_eq!(u32::from_ne_bytes(raw), 0xdead_beef);
        assert!(matches!(p.load_u32_acquire(2), Err(Error::Misaligned { offset: 2, align: 4 })));
        assert!(matches!(p.load_u32_acquire(PAGE_SIZE), Err(Error::OutOfBounds { .. })));
        assert!(p.load_u32_acquire(PAGE_SIZE - 4).is_ok());
        assert!(p.store_u32_release(PAGE_SIZE - 2, 1).is_err());
    }

    #[test]
    fn read_only_rejects_writes() {
        let p = LocalPages::with_access(1, false);
        assert!(!p.is_writable());
        assert!(matches!(p.write_bytes(0, &[1]), Err(Error::ReadOnly)));
        assert!(matches!(p.store_u32_release(0, 1), Err(Error::ReadOnly)));
        assert!(matches!(p.store_u32_relaxed(0, 1), Err(Error::ReadOnly)));
        assert_eq!(p.load_u32_acquire(0).unwrap(), 0);
    }

    #[test]
    fn two_threads_see_a_release_acquire_handoff() {
        // producer writes a payload, then publishes the index with Release;
        // consumer waits for the index with Acquire and must see the payload.
        let p = Arc::new(LocalPages::new(1));
        let q = Arc::clone(&p);
        let t = std::thread::spawn(move || {
            for i in 1..=1000u32 {
                q.write_bytes(64, &i.to_le_bytes()).unwrap();
                q.store_u32_release(0, i).unwrap();
                while q.load_u32_acquire(4).unwrap() != i {
                    std::hint::spin_loop();
                }
            }
        });
        for i in 1..=1000u32 {
            while p.load_u32_acquire(0).unwrap() != i {
                std::hint::spin_loop();
            }
            let mut b = [0u8; 4];
            p.read_bytes(64, &mut b).unwrap();
            assert_eq!(u32::from_le_bytes(b), i);
            p.store_u32_release(4, i).unwrap();
        }
        t.join().unwrap();
    }

    #[test]
    fn volatile_copy_all_alignments() {
        let p = LocalPages::new(1);
        let src: Vec<u8> = (0..64u8).map(|x| x.wrapping_mul(7)).collect();
        for off in 0..9 {
            for len in [0usize, 1, 7, 8, 9, 17, 40] {
                for s in 0..3 {
                    p.write_bytes(0, &[0u8; 128]).unwrap();
                    p.write_bytes(off, &src[s..s + len]).unwrap();
                    let mut out = vec![0u8; len + 2];
                    p.read_bytes(off, &mut out[1..1 + len]).unwrap();
                    assert_eq!(&out[1..1 + len], &src[s..s + len]);
                    // neighbours untouched
                    let mut after = [0u8; 1];
                    p.read_bytes(off + len, &mut after).unwrap();
                    assert_eq!(after[0], 0);
                }
            }
        }
    }

    /// A file of `len` patterned bytes in the temp directory, removed on drop.
    struct TempFile(std::path::PathBuf, std::fs::File);
    impl TempFile {
        fn new(tag: &str, len: usize) -> TempFile {
            let path = std::env::temp_dir().join(format!("libxc-ffi-{tag}-{}", std::process::id()));
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + i / 251) as u8).collect();
            std::fs::write(&path, &data).unwrap();
            let f = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
            TempFile(path, f)
        }
        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn preadv_fills_exactly_the_regions_and_pwritev_writes_them_back() {
        use std::os::fd::AsFd;
        let f = TempFile::new("preadv", 64 * 1024);
        let file = f.bytes();
        let p = LocalPages::new(3);
        p.write_bytes(0, &vec![0xee; 3 * PAGE_SIZE]).unwrap();
        // out of order, unaligned, one whole page, one empty piece
        let pieces = [
            (2 * PAGE_SIZE + 100, 500),
            (PAGE_SIZE - 96, 96),
            (PAGE_SIZE, 0),
            (PAGE_SIZE, PAGE_SIZE),
            (2 * PAGE_SIZE + 700, 3),
        ];
        let regions: Vec<IoRegion<'_>> = pieces.iter().map(|&(o, l)| p.io_region(o, l).unwrap()).collect();
        preadv_exact(f.1.as_fd(), 1000, &regions).unwrap();
        let mut expect = vec![0xeeu8; 3 * PAGE_SIZE];
        let mut at = 1000;
        for &(o, l) in &pieces {
            expect[o..o + l].copy_from_slice(&file[at..at + l]);
            at += l;
        }
        let mut got = vec![0u8; 3 * PAGE_SIZE];
        p.read_bytes(0, &mut got).unwrap();
        assert!(got == expect, "bytes outside the regions changed, or the regions hold the wrong bytes");
        // and back out at another offset: the file gets exactly the regions' bytes
        pwritev_all(f.1.as_fd(), 40_000, &regions).unwrap();
        let after = f.bytes();
        assert_eq!(after[40_000..40_000 + at - 1000], file[1000..at]);
        assert_eq!(after[..40_000], file[..40_000]);
        assert_eq!(after[40_000 + at - 1000..], file[40_000 + at - 1000..]);
    }

    #[test]
    fn preadv_past_the_end_is_eof_and_read_only_regions_are_refused() {
        use std::os::fd::AsFd;
        let f = TempFile::new("eof", 10_000);
        let p = LocalPages::new(1);
        let r = [p.io_region(0, 2000).unwrap()];
        let e = preadv_exact(f.1.as_fd(), 9000, &r).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        let ro = LocalPages::with_access(1, false);
        let r = [ro.io_region(0, 16).unwrap()];
        assert!(!r[0].is_writable());
        assert_eq!(preadv_exact(f.1.as_fd(), 0, &r).unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let mut z = [1u8; 16];
        ro.read_bytes(0, &mut z).unwrap();
        assert_eq!(z, [0; 16]);
        // bounds of a region are those of the mapping
        assert!(p.io_region(PAGE_SIZE - 1, 2).is_err());
        assert!(p.io_region(usize::MAX, 2).is_err());
        assert!(p.io_region(PAGE_SIZE, 0).is_ok());
    }

    #[test]
    fn more_regions_than_one_call_takes() {
        use std::os::fd::AsFd;
        let f = TempFile::new("many", 64 * 1024);
        let file = f.bytes();
        let p = LocalPages::new(8);
        // 2000 regions of 8 bytes, every other 8 bytes of 8 pages
        let regions: Vec<IoRegion<'_>> = (0..2000).map(|i| p.io_region(i * 16 + 8, 8).unwrap()).collect();
        preadv_exact(f.1.as_fd(), 3, &regions).unwrap();
        let mut got = vec![0u8; 8 * PAGE_SIZE];
        p.read_bytes(0, &mut got).unwrap();
        for i in 0..2000 {
            assert_eq!(got[i * 16..i * 16 + 8], [0; 8]);
            assert_eq!(got[i * 16 + 8..i * 16 + 16], file[3 + i * 8..3 + i * 8 + 8]);
        }
    }
}
