//! Safe Rust over Xen's C libraries — the only `unsafe` code of xensnap.
//!
//! | module | library (Xen 4.17, Debian bookworm) | device it needs at run time |
//! |---|---|---|
//! | [`xenstore`] | `libxenstore.so.4` | xenstored socket or `/dev/xen/xenbus` |
//! | [`gnttab`] | `libxengnttab.so.1` | `/dev/xen/gntdev` |
//! | [`evtchn`] | `libxenevtchn.so.1` | `/dev/xen/evtchn` |
//! | [`xenctrl`] | `libxenctrl.so.4.17` (+ `libxenguest.so.4.17` for resume) | `/dev/xen/privcmd` |
//! | [`mem`] | — (safe access to shared pages, and a fake for tests) | — |
//!
//! # Linking: loaded at run time with `dlopen`
//! The libraries are **not** linked at build time. Each is `dlopen`ed (by its versioned
//! soname) the first time one of its wrappers is used, and never unloaded. So:
//! - the crate, and everything that depends on it (`xl-snap`, whose `image …` commands work
//!   offline), **builds and runs on any Linux machine**, with no Xen headers or libraries and
//!   no libclang (the declarations in `sys.rs` are hand-written from the 4.17 headers, with
//!   compile-time layout checks);
//! - on a machine without the libraries, every `open()` returns
//!   [`Error::LibraryUnavailable`] naming the library and the package to install;
//! - with the libraries but without Xen (a CI machine with `libxen-dev` installed), `open()`
//!   runs the real library code and returns [`Error::Os`] with errno and a hint naming the
//!   missing device (`/dev/xen/gntdev`, …) — never a panic;
//! - only Xen 4.17's `libxenctrl.so.4.17` is accepted, since `xc_domaininfo_t` changes with
//!   the domctl interface version; the other three libraries have stable sonames.
//!
//! Why not the crates of the field: `xenstore-rs`, `xenevtchn` and `xenctrl` (crates.io) are
//! GPL-3.0-only — incompatible with this workspace's MIT OR Apache-2.0 — link at build time
//! and generate bindings with bindgen (libclang); there is no grant-table crate. Xen's
//! libraries themselves are LGPL-2.1, fine to load dynamically.
//!
//! # Shape for the blkif layer
//! The blkif crate defines its own traits (grant memory, shared ring, event channel,
//! xenstore) so that it is testable without Xen; the adapters over this crate are meant to
//! be one-liners:
//! - ring page: [`gnttab::Gnttab::map_grant_refs`] → [`gnttab::GrantMapping`], accessed only
//!   through [`mem::SharedMem`] (bounds-checked byte copies, acquire/release `u32`s for the
//!   ring indices; use `std::sync::atomic::fence(SeqCst)` for the ring macros' full
//!   barriers). [`mem::LocalPages`] implements the same trait over local memory for fakes.
//! - request segments: [`gnttab::Gnttab::grant_copy`] with [`gnttab::CopySegment`]s, or
//!   per-request mappings.
//!   [`gnttab::Gnttab::copy_from_guest`] / [`gnttab::Gnttab::copy_to_guest`] take exactly
//!   blkif's scatter/gather shape (one buffer, a list of `(gref, offset, len)`).
//! - notify: [`evtchn::BoundPort::notify`]; waiting: [`evtchn::Evtchn::wait`] or its fd
//!   (`AsFd`, e.g. for tokio's `AsyncFd`). Open one [`evtchn::Evtchn`] per ring so that its
//!   fd only reports that ring's port. An interruptible wait (blkif's `interrupt()`) is
//!   [`poll::wait_any`] over the evtchn fd and one end of a `UnixStream::pair()`.
//! - xenstore: [`xenstore::XenStore`] read/write/watch, [`xenstore::XenStore::transaction`]
//!   (retries on EAGAIN), [`xenstore::XenStore::wait_watch`] (timeout), or
//!   [`xenstore::XenStore::watch_fd`] + [`xenstore::XenStore::check_watch`] for an event loop.
//!
//! A sketch of those adapters (in blkif or xl-plugin, not here: this crate does not depend on
//! blkif):
//! ```text
//! impl SharedRing for RingMap   { fn load_u32_acquire(&self, off) -> u32 { self.0.load_u32_acquire(off).expect("in bounds") } … }
//! impl GrantMemory for Grants   { fn copy_from_guest(&self, domid, segs, buf) { check(self.0.copy_from_guest(domid, &sg(segs), buf)?) } … }
//! impl EventChannel for Port    { fn wait(&self, t) -> bool { wait_any(&[evtchn.as_fd(), intr.as_fd()], t) → pending + unmask } … }
//! impl XenStore for Store       { fn read(&self, p) { self.0.read_opt(p).map(|o| o.map(lossy)) } … }
//! ```
//! Grant status mapping for blkif's `GrantError`: `GNTST_bad_gntref`/`GNTST_bad_domain` →
//! `InvalidRef`; Xen 4.17 reports a copy *into* a read-only grant as `GNTST_general_error`
//! ("Attempt to write-pin a r/o grant entry"), so `ReadOnly` can only be inferred for
//! `copy_to_guest` segments failing with `general_error`; anything else → `Failed`.
//!
//! # Not done yet (TODO)
//! - libxenguest save/restore (`xc_domain_save`/`xc_domain_restore` with their callback
//!   structs `save_callbacks`/`restore_callbacks`): needed by the checkpoint driver if it
//!   drives memory save itself instead of going through `xl`/libxl. Only
//!   `xc_domain_resume` is wrapped ([`xenctrl::XenCtrl::domain_resume`]).
//! - `xs_suspend_evtchn_port` / suspend event channels (fast suspend for Remus).
//! - libxenctrl beyond domain info/pause/unpause/shutdown/destroy (log-dirty, vcpu, memory).
//! - the libraries log through xentoollog's default stderr logger; routing them into
//!   `tracing` needs a C-ABI logger with `va_list` formatting.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

mod dl;
mod error;
mod sys;

pub mod evtchn;
pub mod gnttab;
pub mod mem;
pub mod poll;
pub mod xenctrl;
pub mod xenstore;

pub use error::{Error, Result};
pub use evtchn::{BoundPort, Evtchn, Port};
pub use gnttab::{CopySegment, ForeignPage, GntShr, Gnttab, GrantMapping, GrantStatus, Prot, SgSeg, SharedPages};
pub use mem::{preadv_exact, pwritev_all, IoRegion, LocalPages, SharedMem, PAGE_SIZE};
pub use xenctrl::{DomainInfo, ShutdownReason, XenCtrl};
pub use xenstore::{Access, Permission, Transaction, WatchEvent, XenStore};

/// Which Xen libraries can be loaded in this process (no hypervisor needed): one entry per
/// library with its soname, or the reason it is unavailable.
pub fn libraries() -> Vec<(&'static str, std::result::Result<(), String>)> {
    fn one<T>(name: &'static str, r: Result<T>) -> (&'static str, std::result::Result<(), String>) {
        (name, r.map(|_| ()).map_err(|e| e.to_string()))
    }
    vec![
        one(sys::XsApi::SONAMES[0], sys::XsApi::get()),
        one(sys::GnttabApi::SONAMES[0], sys::GnttabApi::get()),
        one(sys::EvtchnApi::SONAMES[0], sys::EvtchnApi::get()),
        one(sys::CtrlApi::SONAMES[0], sys::CtrlApi::get()),
        one(sys::GuestApi::SONAMES[0], sys::GuestApi::get()),
    ]
}
