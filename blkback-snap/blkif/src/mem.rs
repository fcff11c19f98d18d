//! The seams to Xen: guest memory through grants, the shared ring page, the event channel.
//!
//! Real implementations live in `libxc-ffi` (gntdev / grant copy, a gntdev mapping of the
//! ring, evtchn); [`crate::sim`] has in-process ones for tests.

use std::sync::Arc;
use std::time::Duration;

/// Failure of a grant operation. The backend answers the request with `BLKIF_RSP_ERROR`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("grant reference {gref} of domain {domid} is not valid")]
    InvalidRef { domid: u16, gref: u32 },
    #[error("grant reference {gref} of domain {domid} is read-only")]
    ReadOnly { domid: u16, gref: u32 },
    #[error("bad grant copy range (offset {offset}, len {len})")]
    BadRange { offset: usize, len: usize },
    #[error("grant operation failed: {0}")]
    Failed(String),
}

/// One element of a scatter/gather list in guest memory: `len` bytes at `offset` in the page
/// granted as `gref`. `offset + len <= PAGE_SIZE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrantSeg {
    pub gref: u32,
    pub offset: u16,
    pub len: u16,
}

/// How the backend reaches guest pages (grant copy semantics: one call may be one batched
/// `GNTTABOP_copy` / `xengnttab_grant_copy`).
///
/// Contract for implementations:
/// - `buf.len()` equals the sum of `segs[i].len` (else [`GrantError::BadRange`]);
/// - every segment lies inside one page (else [`GrantError::BadRange`]);
/// - a reference that is not granted to us fails with [`GrantError::InvalidRef`]; writing into a
///   read-only grant fails with [`GrantError::ReadOnly`]. On failure the contents of `buf`
///   (for reads) or of the guest pages (for writes) are unspecified, but nothing outside the
///   named segments is touched.
pub trait GrantMemory: Send + Sync {
    /// Gather guest memory into `buf` (for writes to the disk, indirect pages).
    fn copy_from_guest(&self, domid: u16, segs: &[GrantSeg], buf: &mut [u8]) -> Result<(), GrantError>;
    /// Scatter `buf` into guest memory (for reads from the disk).
    fn copy_to_guest(&self, domid: u16, segs: &[GrantSeg], buf: &[u8]) -> Result<(), GrantError>;
    /// Map the ring pages `grefs` (in order, read-write) as one contiguous shared ring.
    fn map_ring(&self, domid: u16, grefs: &[u32]) -> Result<Arc<dyn SharedRing>, GrantError>;
    /// Map the data pages `grefs` read-write for as long as the returned handles live
    /// (persistent grants, "feature-persistent"): one batched mapping if possible. On success
    /// the result has one page per ref, in order. A single bad ref may fail the whole call
    /// (gntdev maps a batch all or nothing); callers then retry refs one at a time.
    /// The default says mapping is not supported: the backend then uses grant copy only.
    fn map_pages(&self, domid: u16, grefs: &[u32]) -> Result<Vec<Arc<dyn GrantPage>>, GrantError> {
        let _ = (domid, grefs);
        Err(GrantError::Failed("persistent mapping not supported".into()))
    }
}

/// One guest page mapped read-write by [`GrantMemory::map_pages`]; unmapped when the last
/// handle is dropped. The guest changes it concurrently, so access is by copies only.
/// `off + buf.len()` beyond [`crate::abi::PAGE_SIZE`] fails with [`GrantError::BadRange`].
pub trait GrantPage: Send + Sync {
    /// The grant reference this page was mapped from.
    fn gref(&self) -> u32;
    /// Copy bytes out of the page.
    fn read(&self, off: usize, buf: &mut [u8]) -> Result<(), GrantError>;
    /// Copy bytes into the page.
    fn write(&self, off: usize, buf: &[u8]) -> Result<(), GrantError>;
    /// Bytes `off..off+len` of the page as a region the kernel may read or write directly
    /// (file I/O with no copy in this process, [`libxc_ffi::preadv_exact`]), or `None`
    /// (the default; also out of bounds): the backend copies.
    fn io_region(&self, off: usize, len: usize) -> Option<libxc_ffi::IoRegion<'_>> {
        let _ = (off, len);
        None
    }
}

/// The shared ring: `len()` bytes of memory the guest writes concurrently.
///
/// The backend only uses offsets it computed from the ring geometry, so every access is in
/// bounds; implementations may panic on an out-of-bounds offset (that is a bug in this crate,
/// never something a guest can cause). `off` of the u32 accessors is 4-byte aligned.
///
/// Memory ordering follows Xen's ring.h: `load_u32_acquire` is a read followed by `rmb()`,
/// `store_u32_release` is `wmb()` followed by a write, `fence` is `mb()`.
pub trait SharedRing: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn load_u32_acquire(&self, off: usize) -> u32;
    fn store_u32_release(&self, off: usize, val: u32);
    /// Full barrier (`mb()`), between publishing an index and re-reading the peer's event index.
    fn fence(&self) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    }
    /// Copy bytes out (volatile reads; the backend copies each request exactly once).
    fn read(&self, off: usize, buf: &mut [u8]);
    /// Copy bytes in (volatile writes).
    fn write(&self, off: usize, buf: &[u8]);
}

/// One event channel to the frontend.
///
/// Events are sticky: a `notify` from the peer or an `interrupt` that happens before `wait`
/// makes the next `wait` return at once (a real evtchn fd is pending; an eventfd counter).
pub trait EventChannel: Send + Sync {
    /// Send an event to the frontend.
    fn notify(&self);
    /// Block until the frontend sent an event or [`EventChannel::interrupt`] was called
    /// (`true`), or `timeout` passed (`false`). Consumes the pending event (and unmasks).
    fn wait(&self, timeout: Option<Duration>) -> bool;
    /// Wake a thread blocked in `wait` (used by `resume()` and `stop()`).
    fn interrupt(&self);
}
