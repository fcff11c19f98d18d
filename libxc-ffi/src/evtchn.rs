//! Event channels through libxenevtchn (/dev/xen/evtchn).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::sys::{xenevtchn_handle, EvtchnApi};

const OPEN_HINT: &str = "is /dev/xen/evtchn present? It needs a Xen domain with the \
xen-evtchn driver loaded (modprobe xen-evtchn) and root";

/// A local event-channel port.
pub type Port = u32;

struct Inner {
    h: NonNull<xenevtchn_handle>,
    api: &'static EvtchnApi,
    fd: RawFd,
}

// SAFETY: the handle is an fd plus immutable state; notify/bind/unbind/unmask are ioctls or
// writes the kernel serialises. (Concurrent `pending` from several threads is a logic
// hazard documented on `Evtchn::pending`, not a memory-safety one.)
unsafe impl Send for Inner {}
// SAFETY: as above.
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        // SAFETY: opened by xenevtchn_open, closed once, after every BoundPort (each holds
        // an Arc to this Inner) has unbound.
        let r = unsafe { (self.api.xenevtchn_close)(self.h.as_ptr()) };
        if r != 0 {
            tracing::warn!(error = %Error::last_os("xenevtchn_close", ""), "closing evtchn handle failed");
        }
    }
}

/// A handle on the event-channel device. Cheap to clone (shared handle). Events of every
/// port bound through it are delivered through its one fd.
#[derive(Clone)]
pub struct Evtchn {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Evtchn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Evtchn").field("fd", &self.inner.fd).finish()
    }
}

impl Evtchn {
    /// Opens /dev/xen/evtchn (`xenevtchn_open`, close-on-exec).
    pub fn open() -> Result<Evtchn> {
        let api = EvtchnApi::get()?;
        // SAFETY: NULL logger, flags 0 (= close-on-exec).
        let h = unsafe { (api.xenevtchn_open)(std::ptr::null_mut(), 0) };
        let Some(h) = NonNull::new(h) else {
            return Err(Error::last_os("xenevtchn_open", "/dev/xen/evtchn").with_hint(OPEN_HINT));
        };
        // SAFETY: valid handle.
        let fd = unsafe { (api.xenevtchn_fd)(h.as_ptr()) };
        Ok(Evtchn { inner: Arc::new(Inner { h, api, fd }) })
    }

    fn raw(&self) -> *mut xenevtchn_handle {
        self.inner.h.as_ptr()
    }

    fn port_result(&self, r: i32, call: &'static str, ctx: String) -> Result<Port> {
        if r < 0 {
            Err(Error::last_os(call, ctx))
        } else {
            Ok(r as Port)
        }
    }

    /// Binds a local port to `remote_port` of `domid` (the frontend's `event-channel`).
    pub fn bind_interdomain(&self, domid: u32, remote_port: Port) -> Result<BoundPort> {
        // SAFETY: valid handle.
        let r = unsafe { (self.inner.api.xenevtchn_bind_interdomain)(self.raw(), domid, remote_port) };
        let local =
            self.port_result(r, "xenevtchn_bind_interdomain", format!("domid {domid}, remote port {remote_port}"))?;
        Ok(BoundPort { ev: self.clone(), local, remote: Some((domid, remote_port)) })
    }

    /// Allocates a local port that `domid` may bind to (the backend-offers-port direction).
    pub fn bind_unbound_port(&self, domid: u32) -> Result<BoundPort> {
        // SAFETY: valid handle.
        let r = unsafe { (self.inner.api.xenevtchn_bind_unbound_port)(self.raw(), domid) };
        let local = self.port_result(r, "xenevtchn_bind_unbound_port", format!("domid {domid}"))?;
        Ok(BoundPort { ev: self.clone(), local, remote: None })
    }

    /// Notifies the remote end of a local port.
    pub fn notify(&self, port: Port) -> Result<()> {
        // SAFETY: valid handle.
        if unsafe { (self.inner.api.xenevtchn_notify)(self.raw(), port) } == 0 {
            Ok(())
        } else {
            Err(Error::last_os("xenevtchn_notify", format!("port {port}")))
        }
    }

    /// Unmasks a port after its event was consumed (required before the next delivery).
    pub fn unmask(&self, port: Port) -> Result<()> {
        // SAFETY: valid handle.
        if unsafe { (self.inner.api.xenevtchn_unmask)(self.raw(), port) } == 0 {
            Ok(())
        } else {
            Err(Error::last_os("xenevtchn_unmask", format!("port {port}")))
        }
    }

    /// Returns the next fired port without blocking, or `None`. (libxenevtchn warns that its
    /// fd cannot reliably be made non-blocking, so this polls first; do not consume events
    /// of one handle from several threads at once.) Call [`Evtchn::unmask`] on the port
    /// after handling it.
    pub fn pending(&self) -> Result<Option<Port>> {
        self.wait(Some(Duration::ZERO))
    }

    /// Waits up to `timeout` (forever if `None`) for a port to fire and returns it.
    pub fn wait(&self, timeout: Option<Duration>) -> Result<Option<Port>> {
        if !crate::poll::wait_readable(self.inner.fd, timeout, "poll(xenevtchn_fd)")? {
            return Ok(None);
        }
        // SAFETY: valid handle; the fd is readable so this read does not block.
        let r = unsafe { (self.inner.api.xenevtchn_pending)(self.raw()) };
        self.port_result(r, "xenevtchn_pending", String::new()).map(Some)
    }

    /// Reads the next fired port, blocking until one fires (one `read(2)` on the device:
    /// cheaper than `poll` + read when nothing else needs waiting for). Retries on EINTR.
    /// Like [`Evtchn::pending`], do not call from several threads at once; unmask the port
    /// after handling it.
    pub fn read_pending(&self) -> Result<Port> {
        loop {
            // SAFETY: valid handle; a blocking read of one port number from its fd.
            let r = unsafe { (self.inner.api.xenevtchn_pending)(self.raw()) };
            if r >= 0 {
                return Ok(r as Port);
            }
            let e = Error::last_os("xenevtchn_pending", String::new());
            if e.errno() != Some(crate::error::EINTR) {
                return Err(e);
            }
        }
    }
}

impl AsRawFd for Evtchn {
    /// The fd that becomes readable when a bound port fires (`xenevtchn_fd`).
    fn as_raw_fd(&self) -> RawFd {
        self.inner.fd
    }
}

impl AsFd for Evtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd belongs to the handle, which stays open while `self` (and so the
        // Arc'd handle) is borrowed.
        unsafe { BorrowedFd::borrow_raw(self.inner.fd) }
    }
}

/// A bound local port. Unbound on drop.
#[derive(Debug)]
pub struct BoundPort {
    ev: Evtchn,
    local: Port,
    remote: Option<(u32, Port)>,
}

impl BoundPort {
    /// The local port number (what `pending`/`wait` report).
    pub fn local_port(&self) -> Port {
        self.local
    }
    /// `(domid, remote port)` for interdomain bindings.
    pub fn remote(&self) -> Option<(u32, Port)> {
        self.remote
    }
    /// The handle the port is bound on (for waiting).
    pub fn evtchn(&self) -> &Evtchn {
        &self.ev
    }
    /// Kicks the other end.
    pub fn notify(&self) -> Result<()> {
        self.ev.notify(self.local)
    }
    /// Unmasks this port.
    pub fn unmask(&self) -> Result<()> {
        self.ev.unmask(self.local)
    }
}

impl Drop for BoundPort {
    fn drop(&mut self) {
        // SAFETY: valid handle (kept alive by `self.ev`); the port was bound by it.
        let r = unsafe { (self.ev.inner.api.xenevtchn_unbind)(self.ev.raw(), self.local) };
        if r != 0 {
            let e = Error::last_os("xenevtchn_unbind", format!("port {}", self.local));
            tracing::warn!(error = %e, "unbinding event channel failed");
        }
    }
}
