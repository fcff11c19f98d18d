//! Adapters from `libxc-ffi` (real Xen) to the blkif seams.
//!
//! | blkif trait | here | libxc-ffi underneath |
//! |---|---|---|
//! | [`GrantMemory`] | [`XenGrants`] | `Gnttab::copy_from_guest` / `copy_to_guest` (one grant-copy ioctl per call), `Gnttab::map_grant_refs` for the ring and for persistent grants |
//! | [`GrantPage`] | [`XenPage`] | one page of a shared `GrantMapping` (unmapped when its last page is dropped) |
//! | [`SharedRing`] | [`XenRing`] | a `GrantMapping`, accessed only through `SharedMem` |
//! | [`EventChannel`] | [`XenEventChannel`] | one `Evtchn` handle per ring; waits are a blocking read of it, `interrupt()` notifies a loopback event channel on the same handle (fallback: a `UnixStream` pair, waited on with `poll::wait_any`) |
//! | [`EvtchnBinder`] | [`XenBinder`] | `Evtchn::open` + `bind_interdomain` |
//! | [`XenStore`](xenbus::XenStore) | [`XsStore`] | `libxc_ffi::XenStore` |
//!
//! Everything here is safe code; the `unsafe` lives in libxc-ffi.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libxc_ffi::gnttab::SgSeg;
use libxc_ffi::{BoundPort, Evtchn, Gnttab, GrantMapping, GrantStatus, Prot, SharedMem};
use xensnap_blkif::xenbus::{self, EvtchnBinder, WatchEvent, XsError};
use xensnap_blkif::{EventChannel, GrantError, GrantMemory, GrantPage, GrantSeg, SharedRing};

// ---- grant status mapping (pure; unit-tested) ---------------------------------------------

/// `GNTST_general_error`.
const GNTST_GENERAL_ERROR: i16 = -1;
/// `GNTST_bad_domain`.
const GNTST_BAD_DOMAIN: i16 = -2;
/// `GNTST_bad_gntref`.
const GNTST_BAD_GNTREF: i16 = -3;
/// `GNTST_permission_denied`.
const GNTST_PERMISSION_DENIED: i16 = -8;

/// Direction of a grant copy (only matters for the read-only inference).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyDir {
    FromGuest,
    ToGuest,
}

/// Map the per-segment statuses of one grant copy to blkif's [`GrantError`] (first failing
/// segment wins). Xen 4.17 reports a copy *into* a read-only grant as `GNTST_general_error`
/// ("Attempt to write-pin a r/o grant entry"), so for `ToGuest` that status (and
/// `permission_denied`) reads as [`GrantError::ReadOnly`].
pub fn map_statuses(domid: u16, segs: &[GrantSeg], statuses: &[GrantStatus], dir: CopyDir) -> Result<(), GrantError> {
    if statuses.len() != segs.len() {
        return Err(GrantError::Failed(format!(
            "grant copy returned {} statuses for {} segments",
            statuses.len(),
            segs.len()
        )));
    }
    for (s, st) in segs.iter().zip(statuses) {
        if st.is_ok() {
            continue;
        }
        let gref = s.gref;
        return Err(match (st.0, dir) {
            (GNTST_BAD_GNTREF | GNTST_BAD_DOMAIN, _) => GrantError::InvalidRef { domid, gref },
            (GNTST_GENERAL_ERROR | GNTST_PERMISSION_DENIED, CopyDir::ToGuest) => GrantError::ReadOnly { domid, gref },
            _ => GrantError::Failed(format!("grant copy of ref {gref} (domain {domid}): {st}")),
        });
    }
    Ok(())
}

/// Check the blkif contract before calling into Xen: lengths add up, no segment crosses a page.
pub fn check_segs(segs: &[GrantSeg], buf_len: usize) -> Result<(), GrantError> {
    let mut total = 0usize;
    for s in segs {
        if usize::from(s.offset) + usize::from(s.len) > libxc_ffi::PAGE_SIZE {
            return Err(GrantError::BadRange { offset: s.offset.into(), len: s.len.into() });
        }
        total += usize::from(s.len);
    }
    if total != buf_len {
        return Err(GrantError::BadRange { offset: 0, len: buf_len });
    }
    Ok(())
}

fn sg(segs: &[GrantSeg]) -> Vec<SgSeg> {
    segs.iter().map(|s| SgSeg { gref: s.gref, offset: s.offset, len: s.len }).collect()
}

// ---- GrantMemory ------------------------------------------------------------------------

/// Guest memory through `/dev/xen/gntdev`: grant copy for data, a mapping for the ring.
pub struct XenGrants {
    gt: Gnttab,
}

impl XenGrants {
    pub fn open() -> libxc_ffi::Result<XenGrants> {
        Ok(XenGrants { gt: Gnttab::open()? })
    }
}

impl GrantMemory for XenGrants {
    fn copy_from_guest(&self, domid: u16, segs: &[GrantSeg], buf: &mut [u8]) -> Result<(), GrantError> {
        check_segs(segs, buf.len())?;
        if segs.is_empty() {
            return Ok(());
        }
        let st = self.gt.copy_from_guest(domid, &sg(segs), buf).map_err(|e| GrantError::Failed(e.to_string()))?;
        map_statuses(domid, segs, &st, CopyDir::FromGuest)
    }

    fn copy_to_guest(&self, domid: u16, segs: &[GrantSeg], buf: &[u8]) -> Result<(), GrantError> {
        check_segs(segs, buf.len())?;
        if segs.is_empty() {
            return Ok(());
        }
        let st = self.gt.copy_to_guest(domid, &sg(segs), buf).map_err(|e| GrantError::Failed(e.to_string()))?;
        map_statuses(domid, segs, &st, CopyDir::ToGuest)
    }

    fn map_ring(&self, domid: u16, grefs: &[u32]) -> Result<Arc<dyn SharedRing>, GrantError> {
        // gntdev reports a bad ref of the frontend only as an errno of the map call.
        let m = self
            .gt
            .map_grant_refs(u32::from(domid), grefs, Prot::ReadWrite)
            .map_err(|e| GrantError::Failed(e.to_string()))?;
        Ok(Arc::new(XenRing::new(m)))
    }

    fn map_pages(&self, domid: u16, grefs: &[u32]) -> Result<Vec<Arc<dyn GrantPage>>, GrantError> {
        // One gntdev mapping (one ioctl + one mmap) for the batch, read-write: a persistent
        // grant serves reads and writes alike. All or nothing; blkif retries refs singly.
        let m = self
            .gt
            .map_grant_refs(u32::from(domid), grefs, Prot::ReadWrite)
            .map_err(|e| GrantError::Failed(e.to_string()))?;
        Ok(pages_of(Arc::new(m), grefs))
    }
}

/// One [`XenPage`] per page of a mapping of `grefs` (in order).
pub fn pages_of<M: SharedMem + Send + Sync + 'static>(m: Arc<M>, grefs: &[u32]) -> Vec<Arc<dyn GrantPage>> {
    grefs
        .iter()
        .enumerate()
        .map(|(index, &gref)| Arc::new(XenPage { map: Arc::clone(&m), index, gref }) as Arc<dyn GrantPage>)
        .collect()
}

/// Page `index` of a (possibly multi-page) grant mapping; the mapping is unmapped when the
/// last of its pages is dropped. Accesses are bounds-checked copies through [`SharedMem`].
pub struct XenPage<M: SharedMem + Send + Sync> {
    map: Arc<M>,
    index: usize,
    gref: u32,
}

impl<M: SharedMem + Send + Sync> XenPage<M> {
    fn at(&self, off: usize, len: usize) -> Result<usize, GrantError> {
        let page = libxc_ffi::PAGE_SIZE;
        match off.checked_add(len) {
            Some(end) if end <= page => Ok(self.index * page + off),
            _ => Err(GrantError::BadRange { offset: off, len }),
        }
    }
}

impl<M: SharedMem + Send + Sync> GrantPage for XenPage<M> {
    fn gref(&self) -> u32 {
        self.gref
    }
    fn read(&self, off: usize, buf: &mut [u8]) -> Result<(), GrantError> {
        let at = self.at(off, buf.len())?;
        self.map.read_bytes(at, buf).map_err(|e| GrantError::Failed(e.to_string()))
    }
    fn write(&self, off: usize, buf: &[u8]) -> Result<(), GrantError> {
        let at = self.at(off, buf.len())?;
        self.map.write_bytes(at, buf).map_err(|e| GrantError::Failed(e.to_string()))
    }
    fn io_region(&self, off: usize, len: usize) -> Option<libxc_ffi::IoRegion<'_>> {
        let at = self.at(off, len).ok()?;
        self.map.io_region(at, len).ok()
    }
}

// ---- SharedRing ---------------------------------------------------------------------------

/// A shared ring over any [`SharedMem`] (a `GrantMapping` in production, `LocalPages` in
/// tests). Out-of-bounds offsets are bugs of the blkif crate, never guest-controlled, so they
/// panic as the [`SharedRing`] contract allows.
pub struct MemShared<M: SharedMem + Send + Sync> {
    mem: M,
}

impl<M: SharedMem + Send + Sync> MemShared<M> {
    pub fn new(mem: M) -> Self {
        MemShared { mem }
    }
}

impl<M: SharedMem + Send + Sync> SharedRing for MemShared<M> {
    fn len(&self) -> usize {
        self.mem.len()
    }
    fn load_u32_acquire(&self, off: usize) -> u32 {
        self.mem.load_u32_acquire(off).expect("ring offset in bounds")
    }
    fn store_u32_release(&self, off: usize, val: u32) {
        self.mem.store_u32_release(off, val).expect("ring offset in bounds, mapping writable")
    }
    fn read(&self, off: usize, buf: &mut [u8]) {
        self.mem.read_bytes(off, buf).expect("ring read in bounds")
    }
    fn write(&self, off: usize, buf: &[u8]) {
        self.mem.write_bytes(off, buf).expect("ring write in bounds, mapping writable")
    }
}

/// The ring of one frontend, mapped through gntdev (unmapped on drop).
pub type XenRing = MemShared<GrantMapping>;

// ---- EventChannel ---------------------------------------------------------------------------

/// The wake-up half of an event channel adapter: a socket pair whose read end is polled
/// together with the evtchn fd. Events are sticky: an `interrupt` before `wait` leaves a byte
/// in the socket.
pub struct Interrupter {
    rx: UnixStream,
    tx: UnixStream,
}

impl Interrupter {
    pub fn new() -> std::io::Result<Interrupter> {
        let (rx, tx) = UnixStream::pair()?;
        rx.set_nonblocking(true)?;
        tx.set_nonblocking(true)?;
        Ok(Interrupter { rx, tx })
    }
    /// Make the next (or current) wait return.
    pub fn raise(&self) {
        // A full socket buffer already means "pending"; nothing else can fail here that
        // matters.
        let _ = (&self.tx).write(&[1]);
    }
    /// Consume pending wake-ups; true if there were any.
    pub fn drain(&self) -> bool {
        let mut any = false;
        let mut b = [0u8; 64];
        loop {
            match (&self.rx).read(&mut b) {
                Ok(n) if n > 0 => any = true,
                _ => return any,
            }
        }
    }
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.rx.as_fd()
    }
}

/// An interdomain event channel to one frontend, on its own `Evtchn` handle (so its fd only
/// reports this port, and the loopback pair below).
///
/// Waiting costs two system calls per wake-up: a blocking `read` of the evtchn device and the
/// unmask `write`. `interrupt()` wakes that read by notifying a loopback event channel of our
/// own domain bound on the same handle (local port `wake_rx` fires when `wake_tx` is
/// notified). If the loopback cannot be set up (or with `BLKBACK_SNAP_EVTCHN_POLL=1`), it
/// falls back to `poll` on the evtchn fd plus a socket pair written by `interrupt()`.
pub struct XenEventChannel {
    port: BoundPort,
    wake: Option<Loopback>,
    intr: Interrupter,
    /// Serialises waiters (`xenevtchn_pending` must not race with itself).
    wait_lock: Mutex<()>,
}

/// Two ends of an event channel of our own domain, on the ring's handle.
struct Loopback {
    /// Fires when `tx` is notified (what `wait` reads).
    rx: BoundPort,
    tx: BoundPort,
}

impl XenEventChannel {
    /// Bind to `remote_port` of `domid`; `own_domid` (the backend's domain) enables the
    /// loopback wake-up.
    pub fn bind(domid: u16, remote_port: u32, own_domid: Option<u16>) -> Result<XenEventChannel, String> {
        let ev = Evtchn::open().map_err(|e| e.to_string())?;
        let port = ev.bind_interdomain(u32::from(domid), remote_port).map_err(|e| e.to_string())?;
        let intr = Interrupter::new().map_err(|e| format!("socketpair: {e}"))?;
        let wake = own_domid.and_then(|me| {
            let me = u32::from(me);
            let r = ev
                .bind_unbound_port(me)
                .and_then(|rx| ev.bind_interdomain(me, rx.local_port()).map(|tx| Loopback { rx, tx }));
            match r {
                Ok(l) => Some(l),
                Err(e) => {
                    tracing::warn!("loopback event channel for wake-ups: {e}; waiting with poll instead");
                    None
                }
            }
        });
        Ok(XenEventChannel { port, wake, intr, wait_lock: Mutex::new(()) })
    }
    pub fn local_port(&self) -> u32 {
        self.port.local_port()
    }
    /// Whether waits are a blocking read (loopback wake-up) rather than poll.
    pub fn blocking_read(&self) -> bool {
        self.wake.is_some()
    }

    /// Unmask `p` after its event was read (the evtchn driver masks a port when it fires).
    fn unmask(&self, p: u32) {
        if let Err(e) = self.port.evtchn().unmask(p) {
            tracing::warn!("evtchn unmask {p}: {e}");
        }
    }

    fn wait_read(&self, w: &Loopback) -> bool {
        match self.port.evtchn().read_pending() {
            Ok(p) => {
                self.unmask(p);
                if p == w.tx.local_port() {
                    // Xen marks the local end of a new interdomain binding pending once
                    // (EVTCHNOP_bind_interdomain), so the loopback's sending end fires once
                    // after the bind: a spurious wake-up, nothing to report
                    tracing::debug!("evtchn: loopback sender port {p} fired (once after its bind)");
                } else if p != self.port.local_port() && p != w.rx.local_port() {
                    tracing::warn!("evtchn: unexpected port {p}");
                }
                true
            }
            Err(e) => {
                tracing::warn!("evtchn read: {e}");
                // Do not spin.
                std::thread::sleep(Duration::from_millis(10));
                false
            }
        }
    }

    fn wait_poll(&self, timeout: Option<Duration>) -> bool {
        let ev = self.port.evtchn();
        let ready = match libxc_ffi::poll::wait_any(&[ev.as_fd(), self.intr.fd()], timeout) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("evtchn poll: {e}");
                // Do not spin: behave like a short timeout.
                std::thread::sleep(Duration::from_millis(10));
                return false;
            }
        };
        let mut fired = false;
        if ready.first().copied().unwrap_or(false) {
            // The fd is readable: the read does not block. Only our ports are bound to this
            // handle; a port cannot be queued again before its unmask, and if it fires right
            // after, the fd is readable and the next wait returns at once.
            match ev.read_pending() {
                Ok(p) => {
                    fired = true;
                    self.unmask(p);
                }
                Err(e) => tracing::warn!("evtchn read: {e}"),
            }
        }
        if ready.get(1).copied().unwrap_or(false) && self.intr.drain() {
            fired = true;
        }
        fired
    }
}

impl EventChannel for XenEventChannel {
    fn notify(&self) {
        if let Err(e) = self.port.notify() {
            tracing::warn!("evtchn notify (local port {}): {e}", self.port.local_port());
        }
    }

    fn wait(&self, timeout: Option<Duration>) -> bool {
        let _g = self.wait_lock.lock().unwrap_or_else(|e| e.into_inner());
        match (&self.wake, timeout) {
            (Some(w), None) => self.wait_read(w),
            _ => self.wait_poll(timeout),
        }
    }

    fn interrupt(&self) {
        match &self.wake {
            Some(w) => {
                if let Err(e) = w.tx.notify() {
                    tracing::warn!("evtchn loopback notify: {e}");
                }
            }
            None => self.intr.raise(),
        }
    }
}

/// Binds event channels with [`XenEventChannel::bind`].
pub struct XenBinder {
    own_domid: Option<u16>,
}

impl XenBinder {
    /// For a backend at `/local/domain/<own domid>/backend/...`: waits use the loopback
    /// wake-up (unless `BLKBACK_SNAP_EVTCHN_POLL=1`).
    pub fn for_backend_path(path: &str) -> XenBinder {
        let poll = std::env::var("BLKBACK_SNAP_EVTCHN_POLL").is_ok_and(|v| v.trim() == "1");
        XenBinder { own_domid: if poll { None } else { own_domid(path) } }
    }
}

/// The backend's domain id from its xenstore path (`/local/domain/<id>/backend/...`).
pub fn own_domid(backend_path: &str) -> Option<u16> {
    backend_path.strip_prefix("/local/domain/")?.split('/').next()?.parse().ok()
}

impl EvtchnBinder for XenBinder {
    fn bind(&self, domid: u16, port: u32) -> Result<Arc<dyn EventChannel>, String> {
        let e = XenEventChannel::bind(domid, port, self.own_domid)?;
        tracing::info!(
            domid,
            remote_port = port,
            local_port = e.local_port(),
            blocking_read = e.blocking_read(),
            "event channel bound"
        );
        Ok(Arc::new(e))
    }
}

// ---- XenStore -----------------------------------------------------------------------------

/// blkif's xenstore seam over libxenstore.
pub struct XsStore {
    xs: libxc_ffi::XenStore,
}

impl XsStore {
    pub fn open() -> libxc_ffi::Result<XsStore> {
        Ok(XsStore { xs: libxc_ffi::XenStore::open()? })
    }
    pub fn inner(&self) -> &libxc_ffi::XenStore {
        &self.xs
    }
}

fn xe(e: libxc_ffi::Error) -> XsError {
    XsError::Io(e.to_string())
}

impl xenbus::XenStore for XsStore {
    fn read(&self, path: &str) -> Result<Option<String>, XsError> {
        self.xs.read_opt(path).map(|o| o.map(|v| String::from_utf8_lossy(&v).into_owned())).map_err(xe)
    }
    fn write(&self, path: &str, value: &str) -> Result<(), XsError> {
        self.xs.write_str(path, value).map_err(xe)
    }
    fn remove(&self, path: &str) -> Result<(), XsError> {
        match self.xs.rm(path) {
            Ok(()) => Ok(()),
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(xe(e)),
        }
    }
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.xs.watch(path, token).map_err(xe)
    }
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.xs.unwatch(path, token).map_err(xe)
    }
    fn read_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>, XsError> {
        self.xs.wait_watch(timeout).map(|o| o.map(|e| WatchEvent { path: e.path, token: e.token })).map_err(xe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libxc_ffi::LocalPages;

    fn seg(gref: u32, offset: u16, len: u16) -> GrantSeg {
        GrantSeg { gref, offset, len }
    }

    #[test]
    fn statuses_map_to_blkif_errors() {
        let segs = [seg(10, 0, 512), seg(11, 512, 512)];
        let ok = [GrantStatus::OKAY, GrantStatus::OKAY];
        assert_eq!(map_statuses(3, &segs, &ok, CopyDir::FromGuest), Ok(()));
        let bad = [GrantStatus::OKAY, GrantStatus(GNTST_BAD_GNTREF)];
        assert_eq!(
            map_statuses(3, &segs, &bad, CopyDir::FromGuest),
            Err(GrantError::InvalidRef { domid: 3, gref: 11 })
        );
        let dom = [GrantStatus(GNTST_BAD_DOMAIN), GrantStatus::OKAY];
        assert_eq!(map_statuses(3, &segs, &dom, CopyDir::ToGuest), Err(GrantError::InvalidRef { domid: 3, gref: 10 }));
        let ro = [GrantStatus(GNTST_GENERAL_ERROR), GrantStatus::OKAY];
        assert_eq!(map_statuses(3, &segs, &ro, CopyDir::ToGuest), Err(GrantError::ReadOnly { domid: 3, gref: 10 }));
        // A general error while reading the guest is not a read-only problem.
        assert!(matches!(map_statuses(3, &segs, &ro, CopyDir::FromGuest), Err(GrantError::Failed(_))));
        let pd = [GrantStatus::OKAY, GrantStatus(GNTST_PERMISSION_DENIED)];
        assert_eq!(map_statuses(3, &segs, &pd, CopyDir::ToGuest), Err(GrantError::ReadOnly { domid: 3, gref: 11 }));
        assert!(matches!(map_statuses(3, &segs, &ok[..1], CopyDir::ToGuest), Err(GrantError::Failed(_))));
    }

    #[test]
    fn segment_checks() {
        assert_eq!(check_segs(&[seg(1, 0, 4096)], 4096), Ok(()));
        assert_eq!(check_segs(&[seg(1, 512, 3584), seg(2, 0, 512)], 4096), Ok(()));
        assert!(matches!(check_segs(&[seg(1, 512, 4096)], 4096), Err(GrantError::BadRange { .. })));
        assert!(matches!(check_segs(&[seg(1, 0, 512)], 1024), Err(GrantError::BadRange { .. })));
        assert_eq!(check_segs(&[], 0), Ok(()));
    }

    #[test]
    fn ring_over_local_pages_runs_the_blkif_backend() {
        // The SharedRing adapter is generic over SharedMem: drive a real BlkifRing over
        // LocalPages (what a GrantMapping looks like to it) with the sim's frontend writing
        // through a second view of the same pages.
        use xensnap_blkif::abi::*;
        let pages = Arc::new(LocalPages::new(1));
        struct View(Arc<LocalPages>);
        impl SharedMem for View {
            fn len(&self) -> usize {
                self.0.len()
            }
            fn is_writable(&self) -> bool {
                true
            }
            fn read_bytes(&self, o: usize, d: &mut [u8]) -> libxc_ffi::Result<()> {
                self.0.read_bytes(o, d)
            }
            fn write_bytes(&self, o: usize, s: &[u8]) -> libxc_ffi::Result<()> {
                self.0.write_bytes(o, s)
            }
            fn load_u32_acquire(&self, o: usize) -> libxc_ffi::Result<u32> {
                self.0.load_u32_acquire(o)
            }
            fn load_u32_relaxed(&self, o: usize) -> libxc_ffi::Result<u32> {
                self.0.load_u32_relaxed(o)
            }
            fn store_u32_release(&self, o: usize, v: u32) -> libxc_ffi::Result<()> {
                self.0.store_u32_release(o, v)
            }
            fn store_u32_relaxed(&self, o: usize, v: u32) -> libxc_ffi::Result<()> {
                self.0.store_u32_relaxed(o, v)
            }
        }
        let ring = MemShared::new(View(pages.clone()));
        assert_eq!(ring.len(), PAGE_SIZE);
        ring.store_u32_release(SRING_REQ_EVENT, 1);
        assert_eq!(pages.load_u32_acquire(SRING_REQ_EVENT).unwrap(), 1);
        ring.write(64, &[1, 2, 3, 4, 5]);
        let mut b = [0u8; 5];
        ring.read(64, &mut b);
        assert_eq!(b, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn pages_of_a_mapping_stay_inside_their_page() {
        let m = Arc::new(LocalPages::new(3));
        let pages = pages_of(Arc::clone(&m), &[10, 11, 12]);
        assert_eq!(pages.iter().map(|p| p.gref()).collect::<Vec<_>>(), [10, 11, 12]);
        pages[1].write(4096 - 512, &[7u8; 512]).unwrap();
        let mut b = [0u8; 4];
        m.read_bytes(2 * 4096 - 4, &mut b).unwrap();
        assert_eq!(b, [7; 4]);
        let mut back = [0u8; 512];
        pages[1].read(3584, &mut back).unwrap();
        assert_eq!(back, [7u8; 512]);
        // Never into the neighbour page, never past the mapping.
        assert!(matches!(pages[1].write(4095, &[1, 2]), Err(GrantError::BadRange { .. })));
        assert!(matches!(pages[2].read(1, &mut [0u8; 4096]), Err(GrantError::BadRange { .. })));
        assert!(matches!(pages[0].read(usize::MAX, &mut [0u8; 1]), Err(GrantError::BadRange { .. })));
        let mut z = [0u8; 1];
        m.read_bytes(3 * 4096 - 1, &mut z).unwrap();
        assert_eq!(z, [0]);
        // The mapping lives while any page does.
        drop(pages);
        assert_eq!(Arc::strong_count(&m), 1);
    }

    #[test]
    #[should_panic(expected = "in bounds")]
    fn ring_out_of_bounds_is_a_bug() {
        let ring = MemShared::new(LocalPages::new(1));
        ring.load_u32_acquire(4096);
    }

    #[test]
    fn own_domid_from_backend_path() {
        assert_eq!(own_domid("/local/domain/0/backend/vbd/7/51712"), Some(0));
        assert_eq!(own_domid("/local/domain/12/backend/vbd/7/51712"), Some(12));
        assert_eq!(own_domid("/local/domain/x/backend"), None);
        assert_eq!(own_domid("backend/vbd/7/51712"), None);
    }

    #[test]
    fn interrupter_is_sticky_and_drains() {
        let i = Interrupter::new().unwrap();
        assert!(!i.drain());
        i.raise();
        i.raise();
        let r = libxc_ffi::poll::wait_any(&[i.fd()], Some(Duration::from_millis(0))).unwrap();
        assert_eq!(r, vec![true]);
        assert!(i.drain());
        assert!(!i.drain());
        let r = libxc_ffi::poll::wait_any(&[i.fd()], Some(Duration::from_millis(10))).unwrap();
        assert_eq!(r, vec![false]);
    }

    #[test]
    fn opening_without_xen_fails_cleanly() {
        // On a CI machine there is no gntdev/evtchn/xenstore (and maybe no libraries):
        // every open must return an error, never panic.
        if std::path::Path::new("/dev/xen/gntdev").exists() {
            return;
        }
        assert!(XenGrants::open().is_err());
        assert!(XenEventChannel::bind(1, 1, Some(0)).is_err());
    }
}
