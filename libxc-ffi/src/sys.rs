//! Raw C declarations, transcribed by hand from Debian's libxen-dev 4.17
//! (4.17.5+72-g01140da4e8-1): `xenstore.h`, `xenstore_lib.h`, `xengnttab.h`, `xenevtchn.h`,
//! `xenctrl.h`, `xenguest.h`, `xen/domctl.h`, `xen/grant_table.h`, `xen/sched.h`.
//!
//! Struct layouts that cross the boundary are checked at compile time against the sizes and
//! offsets gcc reports for the same headers (see the `const _` assertions).

#![allow(non_camel_case_types, dead_code)]

use std::ffi::{c_char, c_int, c_uint, c_ulong, c_void};

use crate::dl::c_api;

// ---------------------------------------------------------------- libc bits we need

extern "C" {
    /// glibc `free`, for memory the Xen libraries return from `malloc`.
    pub(crate) fn free(p: *mut c_void);
    /// `poll(2)`.
    pub(crate) fn poll(fds: *mut PollFd, nfds: c_ulong, timeout: c_int) -> c_int;
}

#[repr(C)]
pub(crate) struct PollFd {
    pub fd: c_int,
    pub events: i16,
    pub revents: i16,
}
pub(crate) const POLLIN: i16 = 0x1;

pub(crate) const PROT_READ: c_int = 0x1;
pub(crate) const PROT_WRITE: c_int = 0x2;

// ---------------------------------------------------------------- libxenstore (xenstore.h)

pub(crate) enum xs_handle {}
pub(crate) type xs_transaction_t = u32;
pub(crate) const XBT_NULL: xs_transaction_t = 0;
pub(crate) const XS_OPEN_READONLY: c_ulong = 1 << 0;
pub(crate) const XS_OPEN_SOCKETONLY: c_ulong = 1 << 1;
/// `xen/io/xs_wire.h`: index of the path and the token in a watch event.
pub(crate) const XS_WATCH_PATH: usize = 0;
pub(crate) const XS_WATCH_TOKEN: usize = 1;

/// `struct xs_permissions` (xenstore_lib.h).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct xs_permissions {
    pub id: c_uint,
    pub perms: c_uint,
}
const _: () = assert!(std::mem::size_of::<xs_permissions>() == 8);
pub(crate) const XS_PERM_NONE: c_uint = 0x00;
pub(crate) const XS_PERM_READ: c_uint = 0x01;
pub(crate) const XS_PERM_WRITE: c_uint = 0x02;

c_api! {
    /// libxenstore.so.4 (stable ABI).
    pub(crate) struct XsApi: "libxenstore" in ["libxenstore.so.4"] {
        fn xs_open(flags: c_ulong) -> *mut xs_handle;
        fn xs_close(h: *mut xs_handle);
        fn xs_directory(h: *mut xs_handle, t: xs_transaction_t, path: *const c_char, num: *mut c_uint) -> *mut *mut c_char;
        fn xs_read(h: *mut xs_handle, t: xs_transaction_t, path: *const c_char, len: *mut c_uint) -> *mut c_void;
        fn xs_write(h: *mut xs_handle, t: xs_transaction_t, path: *const c_char, data: *const c_void, len: c_uint) -> bool;
        fn xs_mkdir(h: *mut xs_handle, t: xs_transaction_t, path: *const c_char) -> bool;
        fn xs_rm(h: *mut xs_handle, t: xs_transaction_t, path: *const c_char) -> bool;
        fn xs_get_permissions(h: *mut xs_handle, t: xs_transaction_t, path: *const c_char, num: *mut c_uint) -> *mut xs_permissions;
        fn xs_set_permissions(h: *mut xs_handle, t: xs_transaction_t, path: *const c_char, perms: *mut xs_permissions, num: c_uint) -> bool;
        fn xs_watch(h: *mut xs_handle, path: *const c_char, token: *const c_char) -> bool;
        fn xs_unwatch(h: *mut xs_handle, path: *const c_char, token: *const c_char) -> bool;
        fn xs_fileno(h: *mut xs_handle) -> c_int;
        fn xs_check_watch(h: *mut xs_handle) -> *mut *mut c_char;
        fn xs_read_watch(h: *mut xs_handle, num: *mut c_uint) -> *mut *mut c_char;
        fn xs_transaction_start(h: *mut xs_handle) -> xs_transaction_t;
        fn xs_transaction_end(h: *mut xs_handle, t: xs_transaction_t, abort: bool) -> bool;
        fn xs_get_domain_path(h: *mut xs_handle, domid: c_uint) -> *mut c_char;
    }
}

// ---------------------------------------------------------------- libxengnttab (xengnttab.h)

pub(crate) enum xengnttab_handle {}

/// `union xengnttab_copy_ptr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) union xengnttab_copy_ptr {
    pub virt: *mut c_void,
    pub foreign: xengnttab_copy_foreign,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct xengnttab_copy_foreign {
    pub gref: u32,
    pub offset: u16,
    pub domid: u16,
}

/// `struct xengnttab_grant_copy_segment`.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct xengnttab_grant_copy_segment {
    pub source: xengnttab_copy_ptr,
    pub dest: xengnttab_copy_ptr,
    pub len: u16,
    pub flags: u16,
    pub status: i16,
}
// gcc on the 4.17 headers: size 24, source 0, dest 8, len 16, flags 18, status 20.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<xengnttab_grant_copy_segment>() == 24);
    assert!(offset_of!(xengnttab_grant_copy_segment, source) == 0);
    assert!(offset_of!(xengnttab_grant_copy_segment, dest) == 8);
    assert!(offset_of!(xengnttab_grant_copy_segment, len) == 16);
    assert!(offset_of!(xengnttab_grant_copy_segment, flags) == 18);
    assert!(offset_of!(xengnttab_grant_copy_segment, status) == 20);
    assert!(size_of::<xengnttab_copy_ptr>() == 8);
};
/// `xen/grant_table.h`.
pub(crate) const GNTCOPY_SOURCE_GREF: u16 = 1 << 0;
pub(crate) const GNTCOPY_DEST_GREF: u16 = 1 << 1;

c_api! {
    /// libxengnttab.so.1 (stable ABI).
    pub(crate) struct GnttabApi: "libxengnttab" in ["libxengnttab.so.1"] {
        fn xengnttab_open(logger: *mut c_void, open_flags: c_uint) -> *mut xengnttab_handle;
        fn xengnttab_close(h: *mut xengnttab_handle) -> c_int;
        fn xengnttab_fd(h: *mut xengnttab_handle) -> c_int;
        fn xengnttab_map_grant_ref(h: *mut xengnttab_handle, domid: u32, gref: u32, prot: c_int) -> *mut c_void;
        fn xengnttab_map_domain_grant_refs(h: *mut xengnttab_handle, count: u32, domid: u32, refs: *mut u32, prot: c_int) -> *mut c_void;
        fn xengnttab_unmap(h: *mut xengnttab_handle, start: *mut c_void, count: u32) -> c_int;
        fn xengnttab_set_max_grants(h: *mut xengnttab_handle, nr: u32) -> c_int;
        fn xengnttab_grant_copy(h: *mut xengnttab_handle, count: u32, segs: *mut xengnttab_grant_copy_segment) -> c_int;
        fn xengntshr_open(logger: *mut c_void, open_flags: c_uint) -> *mut xengnttab_handle;
        fn xengntshr_close(h: *mut xengnttab_handle) -> c_int;
        fn xengntshr_share_pages(h: *mut xengnttab_handle, domid: u32, count: c_int, refs: *mut u32, writable: c_int) -> *mut c_void;
        fn xengntshr_unshare(h: *mut xengnttab_handle, start: *mut c_void, count: u32) -> c_int;
    }
}

// ---------------------------------------------------------------- libxenevtchn (xenevtchn.h)

pub(crate) enum xenevtchn_handle {}
pub(crate) type evtchn_port_t = u32;

c_api! {
    /// libxenevtchn.so.1 (stable ABI).
    pub(crate) struct EvtchnApi: "libxenevtchn" in ["libxenevtchn.so.1"] {
        fn xenevtchn_open(logger: *mut c_void, flags: c_uint) -> *mut xenevtchn_handle;
        fn xenevtchn_close(h: *mut xenevtchn_handle) -> c_int;
        fn xenevtchn_fd(h: *mut xenevtchn_handle) -> c_int;
        fn xenevtchn_notify(h: *mut xenevtchn_handle, port: evtchn_port_t) -> c_int;
        fn xenevtchn_bind_unbound_port(h: *mut xenevtchn_handle, domid: u32) -> c_int;
        fn xenevtchn_bind_interdomain(h: *mut xenevtchn_handle, domid: u32, remote_port: evtchn_port_t) -> c_int;
        fn xenevtchn_unbind(h: *mut xenevtchn_handle, port: evtchn_port_t) -> c_int;
        fn xenevtchn_pending(h: *mut xenevtchn_handle) -> c_int;
        fn xenevtchn_unmask(h: *mut xenevtchn_handle, port: evtchn_port_t) -> c_int;
    }
}

// ---------------------------------------------------------------- libxenctrl (xenctrl.h)

pub(crate) enum xc_interface {}

/// `xc_domaininfo_t` = `struct xen_domctl_getdomaininfo` for XEN_DOMCTL_INTERFACE_VERSION
/// 0x15 (Xen 4.17). This layout is *not* stable across Xen versions, which is one reason the
/// crate only accepts `libxenctrl.so.4.17`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct xc_domaininfo_t {
    pub domain: u16,
    pub pad1: u16,
    pub flags: u32,
    pub tot_pages: u64,
    pub max_pages: u64,
    pub outstanding_pages: u64,
    pub shr_pages: u64,
    pub paged_pages: u64,
    pub shared_info_frame: u64,
    pub cpu_time: u64,
    pub nr_online_vcpus: u32,
    pub max_vcpu_id: u32,
    pub ssidref: u32,
    pub handle: [u8; 16],
    pub cpupool: u32,
    pub gpaddr_bits: u8,
    pub pad2: [u8; 7],
    /// `struct xen_arch_domainconfig` on x86: emulation_flags, misc_flags.
    pub arch_config: [u32; 2],
}
// gcc on the 4.17 headers: size 112 align 8; flags 4, tot_pages 8, max_pages 16, shr_pages 32,
// shared_info_frame 48, cpu_time 56, nr_online_vcpus 64, max_vcpu_id 68, ssidref 72,
// handle 76, cpupool 92, gpaddr_bits 96, arch_config 104 (8 bytes).
const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<xc_domaininfo_t>() == 112);
    assert!(align_of::<xc_domaininfo_t>() == 8);
    assert!(offset_of!(xc_domaininfo_t, flags) == 4);
    assert!(offset_of!(xc_domaininfo_t, tot_pages) == 8);
    assert!(offset_of!(xc_domaininfo_t, max_pages) == 16);
    assert!(offset_of!(xc_domaininfo_t, shr_pages) == 32);
    assert!(offset_of!(xc_domaininfo_t, shared_info_frame) == 48);
    assert!(offset_of!(xc_domaininfo_t, cpu_time) == 56);
    assert!(offset_of!(xc_domaininfo_t, nr_online_vcpus) == 64);
    assert!(offset_of!(xc_domaininfo_t, max_vcpu_id) == 68);
    assert!(offset_of!(xc_domaininfo_t, ssidref) == 72);
    assert!(offset_of!(xc_domaininfo_t, handle) == 76);
    assert!(offset_of!(xc_domaininfo_t, cpupool) == 92);
    assert!(offset_of!(xc_domaininfo_t, gpaddr_bits) == 96);
    assert!(offset_of!(xc_domaininfo_t, arch_config) == 104);
};

impl xc_domaininfo_t {
    pub(crate) const ZERO: xc_domaininfo_t = xc_domaininfo_t {
        domain: 0,
        pad1: 0,
        flags: 0,
        tot_pages: 0,
        max_pages: 0,
        outstanding_pages: 0,
        shr_pages: 0,
        paged_pages: 0,
        shared_info_frame: 0,
        cpu_time: 0,
        nr_online_vcpus: 0,
        max_vcpu_id: 0,
        ssidref: 0,
        handle: [0; 16],
        cpupool: 0,
        gpaddr_bits: 0,
        pad2: [0; 7],
        arch_config: [0; 2],
    };
}

// xen/domctl.h XEN_DOMINF_*
pub(crate) const XEN_DOMINF_DYING: u32 = 1 << 0;
pub(crate) const XEN_DOMINF_HVM_GUEST: u32 = 1 << 1;
pub(crate) const XEN_DOMINF_SHUTDOWN: u32 = 1 << 2;
pub(crate) const XEN_DOMINF_PAUSED: u32 = 1 << 3;
pub(crate) const XEN_DOMINF_BLOCKED: u32 = 1 << 4;
pub(crate) const XEN_DOMINF_RUNNING: u32 = 1 << 5;
pub(crate) const XEN_DOMINF_DEBUGGED: u32 = 1 << 6;
pub(crate) const XEN_DOMINF_XS_DOMAIN: u32 = 1 << 7;
pub(crate) const XEN_DOMINF_HAP: u32 = 1 << 8;
pub(crate) const XEN_DOMINF_SHUTDOWNMASK: u32 = 255;
pub(crate) const XEN_DOMINF_SHUTDOWNSHIFT: u32 = 16;

c_api! {
    /// libxenctrl.so.4.17 (unstable ABI: versioned with Xen).
    pub(crate) struct CtrlApi: "libxenctrl" in ["libxenctrl.so.4.17"] {
        fn xc_interface_open(logger: *mut c_void, dombuild_logger: *mut c_void, open_flags: c_uint) -> *mut xc_interface;
        fn xc_interface_close(xch: *mut xc_interface) -> c_int;
        fn xc_domain_getinfolist(xch: *mut xc_interface, first_domain: u32, max_domains: c_uint, info: *mut xc_domaininfo_t) -> c_int;
        fn xc_domain_pause(xch: *mut xc_interface, domid: u32) -> c_int;
        fn xc_domain_unpause(xch: *mut xc_interface, domid: u32) -> c_int;
        fn xc_domain_shutdown(xch: *mut xc_interface, domid: u32, reason: c_int) -> c_int;
        fn xc_domain_destroy(xch: *mut xc_interface, domid: u32) -> c_int;
    }
}

// ---------------------------------------------------------------- libxenguest (xenguest.h)

c_api! {
    /// libxenguest.so.4.17 (unstable ABI). Only what is wrapped so far; `xc_domain_save` /
    /// `xc_domain_restore` (callback structs) are a TODO, see the crate docs.
    pub(crate) struct GuestApi: "libxenguest" in ["libxenguest.so.4.17"] {
        fn xc_domain_resume(xch: *mut xc_interface, domid: u32, fast: c_int) -> c_int;
    }
}
