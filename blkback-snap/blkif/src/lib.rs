//! The Xen blkif protocol core: shared rings, request decoding and validation, the per-ring
//! backend with its checkpoint barrier, and the xenbus state machine — all over traits, so it
//! runs and is tested in-process without Xen.
//!
//! Layers:
//! - [`abi`]: constants, per-ABI layouts (x86_32 / x86_64), ring geometry.
//! - [`request`]: decoding ([`parse_request`]) and validation ([`check_request`]); pure.
//! - [`mem`]: the seams to Xen: [`GrantMemory`], [`SharedRing`], [`EventChannel`].
//! - [`backend`]: [`BlkifRing`], the backend of one ring (poll loop or worker thread,
//!   `quiesce()` / `resume()`).
//! - [`xenbus`]: the backend's xenbus state machine over a [`xenbus::XenStore`] trait.
//! - [`sim`]: in-process guest memory, event channels and a test blkfront.
//!
//! No `unsafe` here: everything that touches real Xen lives behind the traits (libxc-ffi).
#![forbid(unsafe_code)]

pub mod abi;
pub mod backend;
pub mod guestbuf;
pub mod mem;
pub mod request;
pub mod sim;
pub mod xenbus;

pub use abi::Abi;
pub use backend::{BlkifRing, Features, Poll, RingError, RingParams, StatsSnapshot};
pub use mem::{EventChannel, GrantError, GrantMemory, GrantPage, GrantSeg, SharedRing};
pub use request::{check_request, fuzz_parse, parse_request, Checked, Limits, RawRequest, Rejection, Segment};
pub use sim::fuzz_ring;
