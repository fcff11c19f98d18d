//! The per-disk control socket: one JSON request per line, one JSON reply per line.
//!
//! Wire format (the same framing and reply shape as `xl-snap image serve`'s control socket,
//! so `xl-snap image … FILE` commands reach a running backend through `<FILE>.xensnap.sock`):
//! ```text
//! -> {"op":"status"}
//! <- {"ok":{"backend":"/local/domain/0/backend/vbd/3/51712","frontend_id":3,"state":4,...}}
//! -> {"op":"quiesce","timeout_ms":2000}
//! <- {"ok":{"drained":0,"connected":true}}
//! -> {"op":"resume"}
//! <- {"ok":{"resumed":true}}
//! -> {"op":"nonsense"}
//! <- {"error":"bad request: ..."}
//! ```
//! Ops: `status`, `stats`, `quiesce {timeout_ms?}`, `resume`, `flush`, and for qcow2 images
//! `info`, `check {repair?}`, `checkpoint-create {name}`, `checkpoint-take {name}`,
//! `checkpoint-barrier {name, timeout_ms?, defer_durable_ms?}`, `durable-hold {max_ms}`,
//! `durable-release`,
//! `checkpoint-list`, `checkpoint-delete {checkpoint}`, `checkpoint-revert {checkpoint}`,
//! `map {checkpoint?}`.
//!
//! The socket is created mode 0600 in a 0700 directory: only root talks to it. Framing, reply
//! envelope, server and client are `xensnap-control`'s; the requests are defined here.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The device serves [`Request`]s as a `Handler<Request>`.
pub use xensnap_control::{call, CallError, ControlServer, Handler};

/// A control request.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Device, ring and image state.
    Status,
    /// Ring counters.
    Stats,
    /// Stop admitting guest requests and wait until the admitted ones completed (the
    /// checkpoint barrier). Stays in force (also across a ring reconnect) until `resume`.
    Quiesce {
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Lift `quiesce`.
    Resume,
    /// Make every completed write durable.
    Flush,
    /// qcow2 image facts.
    Info,
    /// qcow2 consistency check (repair only while quiesced or disconnected).
    Check {
        #[serde(default)]
        repair: bool,
    },
    /// Disk checkpoint of the live image: quiesce (unless already quiesced), flush, create,
    /// resume (unless the caller quiesced).
    CheckpointCreate {
        name: String,
    },
    /// The critical-path half of a checkpoint: fix the point in time (O(L1), no disk I/O)
    /// under the barrier (quiesce unless already quiesced); the daemon makes it durable in
    /// the background (`checkpoint-list` shows `taken` → `durable`).
    CheckpointTake {
        name: String,
    },
    /// The whole barrier of a domain checkpoint in one request: quiesce (drain what was
    /// admitted, `timeout_ms`), take (as `checkpoint-take`), resume. The ring is resumed
    /// whatever happens (unless a `quiesce` of the caller was already in force) and a failed
    /// request leaves no checkpoint; its error starts with the step that failed
    /// ([`BARRIER_QUIESCE_FAILED`] or [`BARRIER_TAKE_FAILED`]). With `defer_durable_ms` the
    /// background work that makes the checkpoint durable waits for `durable-release`, or that
    /// long at most (capped at [`MAX_DEFER_DURABLE_MS`]): the caller keeps the daemon's disk
    /// I/O out of the time the guest is suspended.
    CheckpointBarrier {
        name: String,
        #[serde(default)]
        timeout_ms: Option<u64>,
        #[serde(default)]
        defer_durable_ms: Option<u64>,
    },
    /// Hold *all* the image's background checkpoint work back (a driver already running
    /// stops after its current step; work queued meanwhile waits too) until
    /// `durable-release`, or `max_ms` at most (capped at [`MAX_DEFER_DURABLE_MS`]). A domain
    /// checkpoint sends it before `xl save` starts, so no earlier checkpoint's or deletion's
    /// work runs during the window; `checkpoint-barrier`'s deferral joins it.
    DurableHold {
        max_ms: u64,
    },
    /// Start the background work held back by `durable-hold` or `checkpoint-barrier`'s
    /// `defer_durable_ms` now.
    DurableRelease,
    CheckpointList,
    CheckpointDelete {
        checkpoint: String,
    },
    /// Only while quiesced or disconnected (the guest's page cache would not match).
    CheckpointRevert {
        checkpoint: String,
    },
    Map {
        #[serde(default)]
        checkpoint: Option<String>,
    },
}

/// Error prefix of a `checkpoint-barrier` whose quiesce failed (ring resumed, no checkpoint).
pub const BARRIER_QUIESCE_FAILED: &str = "quiesce failed: ";
/// Error prefix of a `checkpoint-barrier` whose take failed (ring resumed, no checkpoint).
pub const BARRIER_TAKE_FAILED: &str = "take failed: ";
/// Longest deferral of the background durability work `checkpoint-barrier` accepts (a
/// caller that dies never leaves the work pending for longer).
pub const MAX_DEFER_DURABLE_MS: u64 = 600_000;

/// The default socket of a device: `<dir>/blkback-<domid>-<devid>.sock`.
pub fn socket_path(dir: &Path, domid: u16, devid: u32) -> PathBuf {
    dir.join(format!("blkback-{domid}-{devid}.sock"))
}

/// The per-image alias that `xl-snap image …` looks for.
pub fn image_socket_path(image: &Path) -> PathBuf {
    let mut s = image.as_os_str().to_owned();
    s.push(".xensnap.sock");
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_wire_format() {
        let p = |s: &str| serde_json::from_str::<Request>(s);
        assert_eq!(p(r#"{"op":"status"}"#).unwrap(), Request::Status);
        assert_eq!(p(r#"{"op":"quiesce"}"#).unwrap(), Request::Quiesce { timeout_ms: None });
        assert_eq!(p(r#"{"op":"quiesce","timeout_ms":5}"#).unwrap(), Request::Quiesce { timeout_ms: Some(5) });
        assert_eq!(p(r#"{"op":"check"}"#).unwrap(), Request::Check { repair: false });
        // xl-snap's own request encoding is accepted as is.
        assert_eq!(p(r#"{"op":"check","repair":true}"#).unwrap(), Request::Check { repair: true });
        assert_eq!(
            p(r#"{"op":"checkpoint-create","name":"c1"}"#).unwrap(),
            Request::CheckpointCreate { name: "c1".into() }
        );
        assert_eq!(p(r#"{"op":"map","checkpoint":null}"#).unwrap(), Request::Map { checkpoint: None });
        assert!(p(r#"{"op":"checkpoint-create"}"#).is_err());
        assert_eq!(
            p(r#"{"op":"checkpoint-take","name":"t1"}"#).unwrap(),
            Request::CheckpointTake { name: "t1".into() }
        );
        assert_eq!(
            p(r#"{"op":"checkpoint-barrier","name":"b1"}"#).unwrap(),
            Request::CheckpointBarrier { name: "b1".into(), timeout_ms: None, defer_durable_ms: None }
        );
        // what xl-snap sends
        assert_eq!(
            p(r#"{"op":"checkpoint-barrier","name":"b1","timeout_ms":2000,"defer_durable_ms":60000}"#).unwrap(),
            Request::CheckpointBarrier { name: "b1".into(), timeout_ms: Some(2000), defer_durable_ms: Some(60000) }
        );
        assert!(p(r#"{"op":"checkpoint-barrier"}"#).is_err());
        assert!(p(r#"{"op":"checkpoint-barrier","name":"b1","defer":true}"#).is_err());
        assert_eq!(p(r#"{"op":"durable-release"}"#).unwrap(), Request::DurableRelease);
        assert_eq!(p(r#"{"op":"durable-hold","max_ms":60000}"#).unwrap(), Request::DurableHold { max_ms: 60000 });
        assert!(p(r#"{"op":"durable-hold"}"#).is_err(), "a hold without a deadline");
        assert!(p(r#"{"op":"quiesce","bogus":1}"#).is_err());
        assert!(p(r#"{"op":"rm -rf"}"#).is_err());
        assert!(p("not json").is_err());
        assert_eq!(serde_json::to_string(&Request::CheckpointList).unwrap(), r#"{"op":"checkpoint-list"}"#);
    }

    #[test]
    fn paths() {
        assert_eq!(
            socket_path(Path::new("/run/xensnap"), 3, 51712),
            PathBuf::from("/run/xensnap/blkback-3-51712.sock")
        );
        assert_eq!(image_socket_path(Path::new("/v/g.qcow2")), PathBuf::from("/v/g.qcow2.xensnap.sock"));
    }
}
