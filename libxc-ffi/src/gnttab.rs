//! Grant tables through libxengnttab (/dev/xen/gntdev): mapping a guest's granted pages
//! (RAII, unmapped on drop) and grant copy.

use std::ffi::{c_int, c_void};
use std::ptr::NonNull;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::mem::{check_bounds, RawRegion, SharedMem, PAGE_SIZE};
use crate::sys::{self, xengnttab_handle, GnttabApi};

const OPEN_HINT: &str = "is /dev/xen/gntdev present? It needs a Xen domain (normally dom0) \
with the xen-gntdev driver loaded (modprobe xen-gntdev) and root";

/// A domain id as grant operations take it.
pub type DomId = u32;
/// A grant reference.
pub type GrantRef = u32;

/// Protection of a grant mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prot {
    /// `PROT_READ`: the backend only reads (e.g. request pages of a write request).
    Read,
    /// `PROT_READ | PROT_WRITE` (e.g. the shared ring page).
    ReadWrite,
}

impl Prot {
    fn raw(self) -> c_int {
        match self {
            Prot::Read => sys::PROT_READ,
            Prot::ReadWrite => sys::PROT_READ | sys::PROT_WRITE,
        }
    }
}

struct Inner {
    h: NonNull<xengnttab_handle>,
    api: &'static GnttabApi,
}

// SAFETY: the libxengnttab handle is an fd plus immutable state; its operations are ioctls
// and mmaps that the kernel serialises, so it may be used from several threads.
unsafe impl Send for Inner {}
// SAFETY: as above.
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: opened by xengnttab_open, closed once; every GrantMapping holds an Arc to
        // this Inner, so all mappings are already unmapped.
        let r = unsafe { (self.api.xengnttab_close)(self.h.as_ptr()) };
        if r != 0 {
            tracing::warn!(error = %Error::last_os("xengnttab_close", ""), "closing gnttab handle failed");
        }
    }
}

/// A handle on the grant-table device. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Gnttab {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Gnttab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gnttab").field("handle", &self.inner.h).finish()
    }
}

/// A location inside a page granted by another domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForeignPage {
    /// The granting domain.
    pub domid: u16,
    /// Its grant reference.
    pub gref: GrantRef,
    /// Byte offset within the page.
    pub offset: u16,
}

/// One grant-copy segment: bytes between a buffer of ours and a guest's granted page. The
/// copy must stay within the foreign page (`offset + len <= 4096`) and `len` is the buffer's
/// length (1..=4096).
#[derive(Debug)]
pub enum CopySegment<'a> {
    /// Guest page → our buffer (serving a blkif *write* request).
    FromGuest {
        /// Source.
        src: ForeignPage,
        /// Destination, filled completely.
        dst: &'a mut [u8],
    },
    /// Our buffer → guest page (serving a blkif *read* request).
    ToGuest {
        /// Source, copied completely.
        src: &'a [u8],
        /// Destination.
        dst: ForeignPage,
    },
}

impl CopySegment<'_> {
    fn foreign(&self) -> ForeignPage {
        match self {
            CopySegment::FromGuest { src, .. } => *src,
            CopySegment::ToGuest { dst, .. } => *dst,
        }
    }
    fn len(&self) -> usize {
        match self {
            CopySegment::FromGuest { dst, .. } => dst.len(),
            CopySegment::ToGuest { src, .. } => src.len(),
        }
    }

    /// Checks the segment against the grant-copy rules (1..=4096 bytes, within the page).
    pub fn validate(&self) -> Result<()> {
        let len = self.len();
        let f = self.foreign();
        if len == 0 || len > PAGE_SIZE {
            return Err(Error::InvalidArgument {
                call: "xengnttab_grant_copy",
                reason: format!("segment length {len} not in 1..={PAGE_SIZE}"),
            });
        }
        check_bounds(f.offset as usize, len, PAGE_SIZE).map_err(|_| Error::InvalidArgument {
            call: "xengnttab_grant_copy",
            reason: format!(
                "segment offset {} + length {len} crosses the end of grant {} of domain {}",
                f.offset, f.gref, f.domid
            ),
        })
    }

    fn raw_segment(&mut self) -> sys::xengnttab_grant_copy_segment {
        let len = self.len() as u16; // validated <= 4096
        let foreign = |p: ForeignPage| sys::xengnttab_copy_ptr {
            foreign: sys::xengnttab_copy_foreign { gref: p.gref, offset: p.offset, domid: p.domid },
        };
        match self {
            CopySegment::FromGuest { src, dst } => sys::xengnttab_grant_copy_segment {
                source: foreign(*src),
                dest: sys::xengnttab_copy_ptr { virt: dst.as_mut_ptr().cast::<c_void>() },
                len,
                flags: sys::GNTCOPY_SOURCE_GREF,
                status: 0,
            },
            CopySegment::ToGuest { src, dst } => sys::xengnttab_grant_copy_segment {
                source: sys::xengnttab_copy_ptr { virt: src.as_ptr().cast_mut().cast::<c_void>() },
                dest: foreign(*dst),
                len,
                flags: sys::GNTCOPY_DEST_GREF,
                status: 0,
            },
        }
    }
}

/// One element of a scatter/gather list in a guest's granted pages: `len` bytes at `offset`
/// of the page granted as `gref` (`offset + len <= 4096`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SgSeg {
    /// Grant reference.
    pub gref: GrantRef,
    /// Byte offset in the page.
    pub offset: u16,
    /// Length in bytes.
    pub len: u16,
}

/// Checks that the segment lengths add up to `buf_len`.
fn check_sg(call: &'static str, segs: &[SgSeg], buf_len: usize) -> Result<()> {
    let total: usize = segs.iter().map(|s| usize::from(s.len)).sum();
    if total != buf_len {
        return Err(Error::InvalidArgument {
            call,
            reason: format!("segments cover {total} bytes but the buffer has {buf_len}"),
        });
    }
    Ok(())
}

/// Per-segment result of a grant copy (`GNTST_*`, xen/grant_table.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantStatus(pub i16);

impl GrantStatus {
    /// `GNTST_okay`.
    pub const OKAY: GrantStatus = GrantStatus(0);
    /// True for `GNTST_okay`.
    pub fn is_ok(self) -> bool {
        self.0 == 0
    }
    /// The `GNTST_*` name.
    pub fn name(self) -> &'static str {
        match self.0 {
            0 => "okay",
            -1 => "general_error",
            -2 => "bad_domain",
            -3 => "bad_gntref",
            -4 => "bad_handle",
            -5 => "bad_virt_addr",
            -6 => "bad_dev_addr",
            -7 => "no_device_space",
            -8 => "permission_denied",
            -9 => "bad_page",
            -10 => "bad_copy_arg",
            -11 => "address_too_big",
            -12 => "eagain",
            -13 => "no_space",
            _ => "unknown",
        }
    }
}

impl std::fmt::Display for GrantStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GNTST_{} ({})", self.name(), self.0)
    }
}

impl Gnttab {
    /// Opens /dev/xen/gntdev (`xengnttab_open`).
    pub fn open() -> Result<Gnttab> {
        let api = GnttabApi::get()?;
        // SAFETY: NULL logger (libxengnttab then logs to stderr), no flags.
        let h = unsafe { (api.xengnttab_open)(std::ptr::null_mut(), 0) };
        match NonNull::new(h) {
            Some(h) => Ok(Gnttab { inner: Arc::new(Inner { h, api }) }),
            None => Err(Error::last_os("xengnttab_open", "/dev/xen/gntdev").with_hint(OPEN_HINT)),
        }
    }

    fn raw(&self) -> *mut xengnttab_handle {
        self.inner.h.as_ptr()
    }

    /// Raises the number of grants this handle may map at once (gntdev's default is low).
    pub fn set_max_grants(&self, n: u32) -> Result<()> {
        // SAFETY: valid handle.
        if unsafe { (self.inner.api.xengnttab_set_max_grants)(self.raw(), n) } == 0 {
            Ok(())
        } else {
            Err(Error::last_os("xengnttab_set_max_grants", n.to_string()))
        }
    }

    /// Maps one granted page of `domid`.
    pub fn map_grant_ref(&self, domid: DomId, gref: GrantRef, prot: Prot) -> Result<GrantMapping> {
        // SAFETY: valid handle; returns a fresh PAGE_SIZE mapping or NULL with errno.
        let p = unsafe { (self.inner.api.xengnttab_map_grant_ref)(self.raw(), domid, gref, prot.raw()) };
        self.wrap(p, domid, vec![gref], prot, "xengnttab_map_grant_ref")
    }

    /// Maps several pages granted by `domid` into one contiguous region, in `refs` order.
    pub fn map_grant_refs(&self, domid: DomId, refs: &[GrantRef], prot: Prot) -> Result<GrantMapping> {
        if refs.is_empty() {
            return Err(Error::InvalidArgument {
                call: "xengnttab_map_domain_grant_refs",
                reason: "no grant references".into(),
            });
        }
        let count = u32::try_from(refs.len()).map_err(|_| Error::InvalidArgument {
            call: "xengnttab_map_domain_grant_refs",
            reason: "too many grant references".into(),
        })?;
        let mut refs_c = refs.to_vec();
        // SAFETY: valid handle; `refs_c` holds `count` refs and outlives the call (the C
        // prototype is non-const but the library only reads it).
        let p = unsafe {
            (self.inner.api.xengnttab_map_domain_grant_refs)(self.raw(), count, domid, refs_c.as_mut_ptr(), prot.raw())
        };
        self.wrap(p, domid, refs_c, prot, "xengnttab_map_domain_grant_refs")
    }

    fn wrap(
        &self,
        p: *mut c_void,
        domid: DomId,
        refs: Vec<GrantRef>,
        prot: Prot,
        call: &'static str,
    ) -> Result<GrantMapping> {
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(Error::last_os(call, format!("domid {domid}, refs {refs:?}")));
        };
        let len = refs.len() * PAGE_SIZE;
        // SAFETY: libxengnttab returned a page-aligned mapping of refs.len() pages with the
        // requested protection; it stays mapped until xengnttab_unmap in GrantMapping's
        // Drop, and the region lives inside that GrantMapping.
        let region = unsafe { RawRegion::new(ptr, len, prot == Prot::ReadWrite) };
        Ok(GrantMapping { gt: Arc::clone(&self.inner), region, domid, refs })
    }

    /// Grant copy (`xengnttab_grant_copy`): copies every segment, returning each segment's
    /// status. `Err` means the whole call failed (e.g. an invalid segment, or the ioctl).
    pub fn grant_copy(&self, segs: &mut [CopySegment<'_>]) -> Result<Vec<GrantStatus>> {
        if segs.is_empty() {
            return Ok(Vec::new());
        }
        for s in segs.iter() {
            s.validate()?;
        }
        let count = u32::try_from(segs.len())
            .map_err(|_| Error::InvalidArgument { call: "xengnttab_grant_copy", reason: "too many segments".into() })?;
        let mut raw: Vec<sys::xengnttab_grant_copy_segment> = segs.iter_mut().map(|s| s.raw_segment()).collect();
        // SAFETY: valid handle; `raw` holds `count` segments whose local pointers come from
        // the buffers borrowed by `segs` (exclusively for FromGuest, which gntdev writes;
        // shared for ToGuest, which it only reads), each valid for `len` bytes, and those
        // borrows outlive this synchronous call.
        let r = unsafe { (self.inner.api.xengnttab_grant_copy)(self.raw(), count, raw.as_mut_ptr()) };
        if r != 0 {
            return Err(Error::last_os("xengnttab_grant_copy", format!("{count} segments")));
        }
        Ok(raw.iter().map(|s| GrantStatus(s.status)).collect())
    }

    /// Gathers the guest memory described by `segs` (in order) into `buf`, with one grant
    /// copy call. `buf.len()` must equal the sum of the segment lengths. Returns each
    /// segment's status.
    pub fn copy_from_guest(&self, domid: u16, segs: &[SgSeg], buf: &mut [u8]) -> Result<Vec<GrantStatus>> {
        check_sg("copy_from_guest", segs, buf.len())?;
        let mut rest = buf;
        let mut ops = Vec::with_capacity(segs.len());
        for s in segs {
            let (head, tail) = std::mem::take(&mut rest).split_at_mut(usize::from(s.len));
            ops.push(CopySegment::FromGuest { src: ForeignPage { domid, gref: s.gref, offset: s.offset }, dst: head });
            rest = tail;
        }
        self.grant_copy(&mut ops)
    }

    /// Scatters `buf` into the guest memory described by `segs` (in order), with one grant
    /// copy call. `buf.len()` must equal the sum of the segment lengths.
    pub fn copy_to_guest(&self, domid: u16, segs: &[SgSeg], buf: &[u8]) -> Result<Vec<GrantStatus>> {
        check_sg("copy_to_guest", segs, buf.len())?;
        let mut rest = buf;
        let mut ops = Vec::with_capacity(segs.len());
        for s in segs {
            let (head, tail) = rest.split_at(usize::from(s.len));
            ops.push(CopySegment::ToGuest { src: head, dst: ForeignPage { domid, gref: s.gref, offset: s.offset } });
            rest = tail;
        }
        self.grant_copy(&mut ops)
    }
}

/// Pages of another domain mapped into this process. Unmapped on drop. The bytes are only
/// reachable through [`SharedMem`] (bounds-checked copies, atomic u32s).
pub struct GrantMapping {
    gt: Arc<Inner>,
    region: RawRegion,
    domid: DomId,
    refs: Vec<GrantRef>,
}

impl std::fmt::Debug for GrantMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantMapping")
            .field("domid", &self.domid)
            .field("refs", &self.refs)
            .field("writable", &self.region.is_writable())
            .finish()
    }
}

impl GrantMapping {
    /// The granting domain.
    pub fn domid(&self) -> DomId {
        self.domid
    }
    /// The grant references, in mapping order.
    pub fn refs(&self) -> &[GrantRef] {
        &self.refs
    }
    /// Number of pages mapped.
    pub fn pages(&self) -> usize {
        self.refs.len()
    }
}

impl Drop for GrantMapping {
    fn drop(&mut self) {
        // SAFETY: the address and count are those of a live mapping created by this handle,
        // unmapped once; the region (inside self) is not used afterwards.
        let r = unsafe {
            (self.gt.api.xengnttab_unmap)(self.gt.h.as_ptr(), self.region.as_ptr().cast(), self.refs.len() as u32)
        };
        if r != 0 {
            let e = Error::last_os("xengnttab_unmap", format!("domid {}, refs {:?}", self.domid, self.refs));
            tracing::warn!(error = %e, "unmapping grant failed");
        }
    }
}

const SHR_OPEN_HINT: &str = "is /dev/xen/gntalloc present? It needs a Xen domain with the \
xen-gntalloc driver loaded (modprobe xen-gntalloc) and root";

struct ShrInner {
    h: NonNull<xengnttab_handle>,
    api: &'static GnttabApi,
}

// SAFETY: like the gntdev handle: an fd and immutable state, operations are ioctls/mmaps.
unsafe impl Send for ShrInner {}
// SAFETY: as above.
unsafe impl Sync for ShrInner {}

impl Drop for ShrInner {
    fn drop(&mut self) {
        // SAFETY: opened by xengntshr_open, closed once, after every SharedPages (each holds
        // an Arc to this) has been unshared.
        let r = unsafe { (self.api.xengntshr_close)(self.h.as_ptr()) };
        if r != 0 {
            tracing::warn!(error = %Error::last_os("xengntshr_close", ""), "closing gntshr handle failed");
        }
    }
}

/// The granting side (`xengntshr_*`, /dev/xen/gntalloc): shares pages of this process with
/// another domain — what a frontend does. xensnap uses it to play a frontend inside dom0
/// (dom0 granting to itself) in tests of the real backend path. Cheap to clone.
#[derive(Clone)]
pub struct GntShr {
    inner: Arc<ShrInner>,
}

impl std::fmt::Debug for GntShr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GntShr").field("handle", &self.inner.h).finish()
    }
}

impl GntShr {
    /// Opens /dev/xen/gntalloc (`xengntshr_open`).
    pub fn open() -> Result<GntShr> {
        let api = GnttabApi::get()?;
        // SAFETY: NULL logger, no flags.
        let h = unsafe { (api.xengntshr_open)(std::ptr::null_mut(), 0) };
        match NonNull::new(h) {
            Some(h) => Ok(GntShr { inner: Arc::new(ShrInner { h, api }) }),
            None => Err(Error::last_os("xengntshr_open", "/dev/xen/gntalloc").with_hint(SHR_OPEN_HINT)),
        }
    }

    /// Allocates `count` zeroed pages and grants them to `domid`; returns them with their
    /// grant references. Ungranted (and freed) on drop.
    pub fn share_pages(&self, domid: DomId, count: usize, writable: bool) -> Result<SharedPages> {
        let n = i32::try_from(count).ok().filter(|&n| n > 0).ok_or_else(|| Error::InvalidArgument {
            call: "xengntshr_share_pages",
            reason: format!("page count {count} not in 1..=i32::MAX"),
        })?;
        let mut refs = vec![0u32; count];
        // SAFETY: valid handle; `refs` has room for `count` refs, written by the call.
        let p = unsafe {
            (self.inner.api.xengntshr_share_pages)(
                self.inner.h.as_ptr(),
                domid,
                n,
                refs.as_mut_ptr(),
                i32::from(writable),
            )
        };
        let Some(ptr) = NonNull::new(p.cast::<u8>()) else {
            return Err(Error::last_os("xengntshr_share_pages", format!("domid {domid}, {count} pages")));
        };
        // SAFETY: a fresh page-aligned read-write mapping of `count` pages (we always map it
        // writable locally; `writable` is what the *grantee* may do), valid until
        // xengntshr_unshare in SharedPages' Drop; the region lives inside that SharedPages.
        let region = unsafe { RawRegion::new(ptr, count * PAGE_SIZE, true) };
        Ok(SharedPages { shr: Arc::clone(&self.inner), region, domid, refs, grantee_writable: writable })
    }
}

/// Pages of this process granted to another domain (see [`GntShr::share_pages`]).
pub struct SharedPages {
    shr: Arc<ShrInner>,
    region: RawRegion,
    domid: DomId,
    refs: Vec<GrantRef>,
    grantee_writable: bool,
}

impl std::fmt::Debug for SharedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPages")
            .field("domid", &self.domid)
            .field("refs", &self.refs)
            .field("grantee_writable", &self.grantee_writable)
            .finish()
    }
}

impl SharedPages {
    /// The grantee.
    pub fn domid(&self) -> DomId {
        self.domid
    }
    /// The grant references, one per page, in order.
    pub fn refs(&self) -> &[GrantRef] {
        &self.refs
    }
}

impl Drop for SharedPages {
    fn drop(&mut self) {
        // SAFETY: the address/count of a live share made by this handle, unshared once.
        let r = unsafe {
            (self.shr.api.xengntshr_unshare)(self.shr.h.as_ptr(), self.region.as_ptr().cast(), self.refs.len() as u32)
        };
        if r != 0 {
            let e = Error::last_os("xengntshr_unshare", format!("refs {:?}", self.refs));
            tracing::warn!(error = %e, "unsharing pages failed");
        }
    }
}

crate::mem::delegate_shared_mem!(GrantMapping);
crate::mem::delegate_shared_mem!(SharedPages);

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(offset: u16) -> ForeignPage {
        ForeignPage { domid: 5, gref: 8, offset }
    }

    #[test]
    fn segment_validation() {
        let mut buf = vec![0u8; 4096];
        assert!(CopySegment::FromGuest { src: fp(0), dst: &mut buf }.validate().is_ok());
        assert!(CopySegment::FromGuest { src: fp(1), dst: &mut buf }.validate().is_err());
        assert!(CopySegment::ToGuest { src: &buf[..512], dst: fp(3584) }.validate().is_ok());
        let e = CopySegment::ToGuest { src: &buf[..512], dst: fp(3585) }.validate().unwrap_err();
        assert!(e.to_string().contains("crosses the end of grant 8"), "{e}");
        assert!(CopySegment::ToGuest { src: &[], dst: fp(0) }.validate().is_err());
        let big = vec![0u8; 4097];
        assert!(CopySegment::ToGuest { src: &big, dst: fp(0) }.validate().is_err());
    }

    #[test]
    fn segment_to_raw_layout() {
        let mut buf = [0u8; 512];
        let ptr = buf.as_mut_ptr();
        let mut s = CopySegment::FromGuest { src: ForeignPage { domid: 7, gref: 99, offset: 1024 }, dst: &mut buf };
        let r = s.raw_segment();
        assert_eq!(r.len, 512);
        assert_eq!(r.flags, sys::GNTCOPY_SOURCE_GREF);
        // SAFETY: (test) reading the union members we just wrote.
        unsafe {
            assert_eq!(r.source.foreign, sys::xengnttab_copy_foreign { gref: 99, offset: 1024, domid: 7 });
            assert_eq!(r.dest.virt.cast::<u8>(), ptr);
        }
        let data = [1u8; 16];
        let mut s = CopySegment::ToGuest { src: &data, dst: ForeignPage { domid: 1, gref: 2, offset: 3 } };
        let r = s.raw_segment();
        assert_eq!((r.len, r.flags), (16, sys::GNTCOPY_DEST_GREF));
        // SAFETY: (test) as above.
        unsafe { assert_eq!(r.dest.foreign.gref, 2) };
    }

    #[test]
    fn scatter_gather_length_check() {
        let segs = [SgSeg { gref: 1, offset: 0, len: 512 }, SgSeg { gref: 2, offset: 512, len: 1024 }];
        assert!(check_sg("t", &segs, 1536).is_ok());
        let e = check_sg("t", &segs, 1535).unwrap_err();
        assert!(e.to_string().contains("1536 bytes but the buffer has 1535"), "{e}");
        assert!(check_sg("t", &[], 0).is_ok());
    }

    #[test]
    fn status_names() {
        assert!(GrantStatus::OKAY.is_ok());
        assert_eq!(GrantStatus(-3).to_string(), "GNTST_bad_gntref (-3)");
        assert_eq!(GrantStatus(-99).name(), "unknown");
        assert!(!GrantStatus(-12).is_ok());
    }
}
