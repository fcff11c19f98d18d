//! Domain control through libxenctrl (/dev/xen/privcmd): domain info, pause/unpause,
//! shutdown/destroy, and `xc_domain_resume` (libxenguest).

use std::ptr::NonNull;

use crate::error::{Error, Result};
use crate::sys::{self, xc_domaininfo_t, xc_interface, CtrlApi, GuestApi};

const OPEN_HINT: &str = "is /dev/xen/privcmd present? libxenctrl needs to run as root in a \
Xen dom0 with the xen-privcmd driver loaded (modprobe xen-privcmd)";

/// Why a domain shut down (`SHUTDOWN_*`, xen/sched.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownReason {
    /// `SHUTDOWN_poweroff`
    Poweroff,
    /// `SHUTDOWN_reboot`
    Reboot,
    /// `SHUTDOWN_suspend`: the guest suspended itself (save/checkpoint in progress).
    Suspend,
    /// `SHUTDOWN_crash`
    Crash,
    /// `SHUTDOWN_watchdog`
    Watchdog,
    /// `SHUTDOWN_soft_reset`
    SoftReset,
    /// Any other code.
    Other(u8),
}

impl ShutdownReason {
    /// From the raw code.
    pub fn from_code(c: u8) -> ShutdownReason {
        match c {
            0 => ShutdownReason::Poweroff,
            1 => ShutdownReason::Reboot,
            2 => ShutdownReason::Suspend,
            3 => ShutdownReason::Crash,
            4 => ShutdownReason::Watchdog,
            5 => ShutdownReason::SoftReset,
            x => ShutdownReason::Other(x),
        }
    }
    /// The raw code.
    pub fn code(self) -> u8 {
        match self {
            ShutdownReason::Poweroff => 0,
            ShutdownReason::Reboot => 1,
            ShutdownReason::Suspend => 2,
            ShutdownReason::Crash => 3,
            ShutdownReason::Watchdog => 4,
            ShutdownReason::SoftReset => 5,
            ShutdownReason::Other(x) => x,
        }
    }
}

/// What the hypervisor reports about a domain (`xc_domaininfo_t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainInfo {
    /// Domain id.
    pub domid: u32,
    /// Raw `XEN_DOMINF_*` flags.
    pub flags: u32,
    /// Scheduled to die.
    pub dying: bool,
    /// HVM (or PVH) rather than PV.
    pub hvm: bool,
    /// `Some(reason)` once the domain has shut down (including suspended for save).
    pub shutdown: Option<ShutdownReason>,
    /// Paused by the toolstack.
    pub paused: bool,
    /// Blocked waiting for an event.
    pub blocked: bool,
    /// Running on a CPU right now.
    pub running: bool,
    /// Pages currently allocated.
    pub tot_pages: u64,
    /// Maximum pages.
    pub max_pages: u64,
    /// CPU time used, in nanoseconds.
    pub cpu_time_ns: u64,
    /// Online vCPUs.
    pub nr_online_vcpus: u32,
    /// The domain's UUID (`handle`).
    pub uuid: [u8; 16],
}

impl DomainInfo {
    pub(crate) fn from_raw(r: &xc_domaininfo_t) -> DomainInfo {
        let f = r.flags;
        let shutdown = (f & sys::XEN_DOMINF_SHUTDOWN != 0).then(|| {
            ShutdownReason::from_code(((f >> sys::XEN_DOMINF_SHUTDOWNSHIFT) & sys::XEN_DOMINF_SHUTDOWNMASK) as u8)
        });
        DomainInfo {
            domid: u32::from(r.domain),
            flags: f,
            dying: f & sys::XEN_DOMINF_DYING != 0,
            hvm: f & sys::XEN_DOMINF_HVM_GUEST != 0,
            shutdown,
            paused: f & sys::XEN_DOMINF_PAUSED != 0,
            blocked: f & sys::XEN_DOMINF_BLOCKED != 0,
            running: f & sys::XEN_DOMINF_RUNNING != 0,
            tot_pages: r.tot_pages,
            max_pages: r.max_pages,
            cpu_time_ns: r.cpu_time,
            nr_online_vcpus: r.nr_online_vcpus,
            uuid: r.handle,
        }
    }

    /// The UUID in the usual 8-4-4-4-12 form.
    pub fn uuid_string(&self) -> String {
        let h: String = self.uuid.iter().map(|b| format!("{b:02x}")).collect();
        format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
    }

    /// `xl list`-style state letters: r b p s c d.
    pub fn state_string(&self) -> String {
        let c = |b: bool, ch: char| if b { ch } else { '-' };
        let crashed = self.shutdown == Some(ShutdownReason::Crash);
        [
            c(self.running, 'r'),
            c(self.blocked, 'b'),
            c(self.paused, 'p'),
            c(self.shutdown.is_some() && !crashed, 's'),
            c(crashed, 'c'),
            c(self.dying, 'd'),
        ]
        .iter()
        .collect()
    }
}

/// An open hypervisor control interface (`xc_interface`). Closed on drop.
pub struct XenCtrl {
    h: NonNull<xc_interface>,
    api: &'static CtrlApi,
}

// SAFETY: xc_interface handles are reentrant unless opened with XC_OPENFLAG_NON_REENTRANT
// (we never pass it): libxenctrl guards its shared state (hypercall buffer cache) itself.
unsafe impl Send for XenCtrl {}
// SAFETY: as above.
unsafe impl Sync for XenCtrl {}

impl std::fmt::Debug for XenCtrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenCtrl").field("handle", &self.h).finish()
    }
}

const BATCH: usize = 64;

impl XenCtrl {
    /// Opens the control interface (`xc_interface_open`). On failure libxenctrl also prints
    /// a line to stderr (its default logger).
    pub fn open() -> Result<XenCtrl> {
        let api = CtrlApi::get()?;
        // SAFETY: NULL loggers (libxenctrl uses stderr), no flags.
        let h = unsafe { (api.xc_interface_open)(std::ptr::null_mut(), std::ptr::null_mut(), 0) };
        match NonNull::new(h) {
            Some(h) => Ok(XenCtrl { h, api }),
            None => Err(Error::last_os("xc_interface_open", "/dev/xen/privcmd").with_hint(OPEN_HINT)),
        }
    }

    fn raw(&self) -> *mut xc_interface {
        self.h.as_ptr()
    }

    /// Up to `buf.len()` domains with id >= `first`; returns how many were filled.
    fn getinfolist(&self, first: u32, buf: &mut [xc_domaininfo_t]) -> Result<usize> {
        // SAFETY: valid handle; `buf` has room for `buf.len()` entries of exactly the
        // layout libxenctrl 4.17 writes (checked at compile time in sys.rs).
        let n = unsafe { (self.api.xc_domain_getinfolist)(self.raw(), first, buf.len() as u32, buf.as_mut_ptr()) };
        if n < 0 {
            return Err(Error::last_os("xc_domain_getinfolist", format!("first {first}")));
        }
        Ok((n as usize).min(buf.len()))
    }

    /// Information on one domain; [`Error::NoSuchDomain`] if it does not exist.
    pub fn domain_info(&self, domid: u32) -> Result<DomainInfo> {
        let mut buf = [xc_domaininfo_t::ZERO; 1];
        let n = self.getinfolist(domid, &mut buf)?;
        if n == 1 && u32::from(buf[0].domain) == domid {
            Ok(DomainInfo::from_raw(&buf[0]))
        } else {
            Err(Error::NoSuchDomain(domid))
        }
    }

    /// All domains, by increasing id.
    pub fn list_domains(&self) -> Result<Vec<DomainInfo>> {
        let mut out = Vec::new();
        let mut buf = vec![xc_domaininfo_t::ZERO; BATCH];
        let mut next = 0u32;
        loop {
            let n = self.getinfolist(next, &mut buf)?;
            out.extend(buf[..n].iter().map(DomainInfo::from_raw));
            if n < BATCH {
                return Ok(out);
            }
            next = u32::from(buf[n - 1].domain) + 1;
        }
    }

    fn simple(&self, call: &'static str, r: i32, domid: u32) -> Result<()> {
        if r == 0 {
            Ok(())
        } else {
            Err(Error::last_os(call, format!("domid {domid}")))
        }
    }

    /// Pauses a domain (nests: each pause needs an unpause).
    pub fn pause(&self, domid: u32) -> Result<()> {
        // SAFETY: valid handle.
        let r = unsafe { (self.api.xc_domain_pause)(self.raw(), domid) };
        self.simple("xc_domain_pause", r, domid)
    }

    /// Unpauses a domain.
    pub fn unpause(&self, domid: u32) -> Result<()> {
        // SAFETY: valid handle.
        let r = unsafe { (self.api.xc_domain_unpause)(self.raw(), domid) };
        self.simple("xc_domain_unpause", r, domid)
    }

    /// Marks a domain shut down with `reason` from outside (SCHEDOP_remote_shutdown). A PV
    /// guest is asked to suspend through xenstore (`control/shutdown` = `suspend`) and then
    /// shuts itself down with [`ShutdownReason::Suspend`]; this call is for the cases where
    /// the toolstack must do it (e.g. HVM without PV drivers, or forcing).
    pub fn shutdown(&self, domid: u32, reason: ShutdownReason) -> Result<()> {
        // SAFETY: valid handle.
        let r = unsafe { (self.api.xc_domain_shutdown)(self.raw(), domid, i32::from(reason.code())) };
        self.simple("xc_domain_shutdown", r, domid)
    }

    /// Destroys a domain (its memory is gone; backends see their frontends vanish).
    pub fn destroy(&self, domid: u32) -> Result<()> {
        // SAFETY: valid handle.
        let r = unsafe { (self.api.xc_domain_destroy)(self.raw(), domid) };
        self.simple("xc_domain_destroy", r, domid)
    }

    /// Resumes a domain that suspended itself (`xc_domain_resume`, in libxenguest): with
    /// `fast` the guest sees the suspend hypercall return 1 ("cancelled", it keeps its
    /// state; what `xl save -c` / checkpoints use), otherwise a full resume.
    pub fn domain_resume(&self, domid: u32, fast: bool) -> Result<()> {
        let g = GuestApi::get()?;
        // SAFETY: valid xenctrl handle from the same libxenctrl.so.4.17 libxenguest links.
        let r = unsafe { (g.xc_domain_resume)(self.raw(), domid, i32::from(fast)) };
        self.simple("xc_domain_resume", r, domid)
    }
}

impl Drop for XenCtrl {
    fn drop(&mut self) {
        // SAFETY: opened by xc_interface_open, closed once.
        unsafe { (self.api.xc_interface_close)(self.raw()) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(domain: u16, flags: u32) -> xc_domaininfo_t {
        xc_domaininfo_t { domain, flags, ..xc_domaininfo_t::ZERO }
    }

    #[test]
    fn flags_decoding() {
        let i = DomainInfo::from_raw(&raw(0, sys::XEN_DOMINF_RUNNING));
        assert!(i.running && !i.paused && !i.dying && i.shutdown.is_none());
        assert_eq!(i.state_string(), "r-----");

        let susp = sys::XEN_DOMINF_SHUTDOWN | (2 << sys::XEN_DOMINF_SHUTDOWNSHIFT) | sys::XEN_DOMINF_PAUSED;
        let i = DomainInfo::from_raw(&raw(5, susp));
        assert_eq!(i.domid, 5);
        assert_eq!(i.shutdown, Some(ShutdownReason::Suspend));
        assert!(i.paused);
        assert_eq!(i.state_string(), "--ps--");

        let crash = sys::XEN_DOMINF_SHUTDOWN | (3 << sys::XEN_DOMINF_SHUTDOWNSHIFT) | sys::XEN_DOMINF_DYING;
        let i = DomainInfo::from_raw(&raw(9, crash | sys::XEN_DOMINF_HVM_GUEST));
        assert_eq!(i.shutdown, Some(ShutdownReason::Crash));
        assert!(i.hvm && i.dying);
        assert_eq!(i.state_string(), "----cd");

        // a shutdown code without the shutdown flag is ignored
        let i = DomainInfo::from_raw(&raw(1, 2 << sys::XEN_DOMINF_SHUTDOWNSHIFT | sys::XEN_DOMINF_BLOCKED));
        assert_eq!(i.shutdown, None);
        assert!(i.blocked);
    }

    #[test]
    fn shutdown_codes_round_trip() {
        for c in 0..=255u8 {
            assert_eq!(ShutdownReason::from_code(c).code(), c);
        }
        assert_eq!(ShutdownReason::from_code(2), ShutdownReason::Suspend);
    }

    #[test]
    fn uuid_format() {
        let mut r = raw(3, 0);
        r.handle = [0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0, 1, 2, 3, 4, 5, 6, 7, 8];
        let i = DomainInfo::from_raw(&r);
        assert_eq!(i.uuid_string(), "12345678-9abc-def0-0102-030405060708");
    }
}
