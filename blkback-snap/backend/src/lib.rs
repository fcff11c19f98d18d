//! blkback-snap: the userspace Xen blkif backend of xensnap.
//!
//! - [`xen`]: adapters from `libxc-ffi` to the blkif seams (grant copy, ring mapping, event
//!   channels, xenstore);
//! - [`image`]: opening the image a backend's `params` names (qcow2 or raw), with the image lock;
//! - [`device`]: serving one disk (xenbus state machine + ring worker + control socket),
//!   generic over the seams so it runs against blkif's in-process sim in tests;
//! - [`control`]: the JSON-lines control socket (quiesce/resume for the checkpoint driver,
//!   stats, live-image checkpoints);
//! - [`watch`]: the dom0 service that starts one serving process per new disk whose hotplug
//!   script is `xensnap`.
//!
//! No `unsafe` here: everything that touches Xen goes through libxc-ffi.
#![forbid(unsafe_code)]

pub mod control;
pub mod device;
pub mod durability;
pub mod image;
pub mod watch;
pub mod xen;
