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
//! `checkpoint-barrier {name, timeout_ms?, defer_durable_ms?}`, `durable-release`,
//! `checkpoint-list`, `checkpoint-delete {checkpoint}`, `checkpoint-revert {checkpoint}`,
//! `map {checkpoint?}`.
//!
//! The socket is created mode 0600 in a 0700 directory: only root talks to it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Longest request line accepted.
pub const MAX_LINE: u64 = 64 * 1024;

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
    /// Start the background work held back by `checkpoint-barrier`'s `defer_durable_ms` now.
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

/// What serves the requests (the device; a fake in tests).
pub trait Handler: Send + Sync {
    fn handle(&self, req: &Request) -> Result<Value, String>;
}

/// Parse one request line and produce the reply line (without the newline).
pub fn reply_for_line(h: &dyn Handler, line: &str) -> String {
    let v = match serde_json::from_str::<Request>(line.trim_end()) {
        Err(e) => json!({ "error": format!("bad request: {e}") }),
        Ok(req) => {
            tracing::info!(?req, "control request");
            match h.handle(&req) {
                Ok(v) => json!({ "ok": v }),
                Err(e) => json!({ "error": e }),
            }
        }
    };
    v.to_string()
}

/// Serve one connection until EOF (or a line longer than [`MAX_LINE`]).
pub fn serve_connection(h: &dyn Handler, stream: UnixStream) -> std::io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream).take(MAX_LINE);
    let mut line = String::new();
    loop {
        line.clear();
        r.set_limit(MAX_LINE);
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') {
            writeln!(
                w,
                "{}",
                json!({ "error": "request line too long or truncated" })
            )?;
            return Ok(());
        }
        writeln!(w, "{}", reply_for_line(h, &line))?;
    }
}

/// A listening control socket with its accept thread.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Bind `path` (mode 0600; the parent directory is created mode 0700). A stale socket
    /// is replaced; one that answers is left alone (`AddrInUse`).
    pub fn bind(path: &Path, h: Arc<dyn Handler>) -> std::io::Result<ControlServer> {
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{}: another server is listening there", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let l = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        // A blocking accept: the thread sleeps until a client connects (no periodic wake-up,
        // which on a one-vCPU dom0 steals time from everything else). Drop wakes it with a
        // connection of its own after raising `stop`.
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || loop {
                let r = l.accept();
                if st.load(Ordering::Acquire) {
                    break;
                }
                match r {
                    Ok((s, _)) => {
                        let h = Arc::clone(&h);
                        let _ = std::thread::Builder::new()
                            .name("control-conn".into())
                            .spawn(move || {
                                if let Err(e) = serve_connection(&*h, s) {
                                    tracing::debug!("control connection: {e}");
                                }
                            });
                    }
                    Err(e) => {
                        tracing::warn!("control accept: {e}");
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            })?;
        Ok(ControlServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            // Wake the blocked accept. If nobody can connect (the socket file was removed
            // behind our back), leave the thread parked in accept rather than hang here.
            if UnixStream::connect(&self.path).is_ok() {
                let _ = t.join();
            }
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Send one request to the socket at `path` and return `Ok(result)` or `Err(message)`.
pub fn call(path: &Path, req: &Value, timeout: Duration) -> Result<Value, String> {
    let s = UnixStream::connect(path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    writeln!(w, "{req}").map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reply = String::new();
    BufReader::new(s)
        .take(64 << 20)
        .read_line(&mut reply)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&reply).map_err(|e| format!("bad reply {reply:?}: {e}"))?;
    if let Some(ok) = v.get("ok") {
        Ok(ok.clone())
    } else {
        Err(v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("malformed reply")
            .to_string())
    }
}

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
    use std::sync::Mutex;

    struct Echo(Mutex<Vec<Request>>);
    impl Handler for Echo {
        fn handle(&self, req: &Request) -> Result<Value, String> {
            self.0.lock().unwrap().push(req.clone());
            match req {
                Request::Flush => Err("flush failed".into()),
                _ => Ok(json!({ "seen": format!("{req:?}") })),
            }
        }
    }

    #[test]
    fn request_wire_format() {
        let p = |s: &str| serde_json::from_str::<Request>(s);
        assert_eq!(p(r#"{"op":"status"}"#).unwrap(), Request::Status);
        assert_eq!(
            p(r#"{"op":"quiesce"}"#).unwrap(),
            Request::Quiesce { timeout_ms: None }
        );
        assert_eq!(
            p(r#"{"op":"quiesce","timeout_ms":5}"#).unwrap(),
            Request::Quiesce {
                timeout_ms: Some(5)
            }
        );
        assert_eq!(
            p(r#"{"op":"check"}"#).unwrap(),
            Request::Check { repair: false }
        );
        // xl-snap's own request encoding is accepted as is.
        assert_eq!(
            p(r#"{"op":"check","repair":true}"#).unwrap(),
            Request::Check { repair: true }
        );
        assert_eq!(
            p(r#"{"op":"checkpoint-create","name":"c1"}"#).unwrap(),
            Request::CheckpointCreate { name: "c1".into() }
        );
        assert_eq!(
            p(r#"{"op":"map","checkpoint":null}"#).unwrap(),
            Request::Map { checkpoint: None }
        );
        assert!(p(r#"{"op":"checkpoint-create"}"#).is_err());
        assert_eq!(
            p(r#"{"op":"checkpoint-take","name":"t1"}"#).unwrap(),
            Request::CheckpointTake { name: "t1".into() }
        );
        assert_eq!(
            p(r#"{"op":"checkpoint-barrier","name":"b1"}"#).unwrap(),
            Request::CheckpointBarrier {
                name: "b1".into(),
                timeout_ms: None,
                defer_durable_ms: None
            }
        );
        // what xl-snap sends
        assert_eq!(
            p(r#"{"op":"checkpoint-barrier","name":"b1","timeout_ms":2000,"defer_durable_ms":60000}"#)
                .unwrap(),
            Request::CheckpointBarrier {
                name: "b1".into(),
                timeout_ms: Some(2000),
                defer_durable_ms: Some(60000)
            }
        );
        assert!(p(r#"{"op":"checkpoint-barrier"}"#).is_err());
        assert!(p(r#"{"op":"checkpoint-barrier","name":"b1","defer":true}"#).is_err());
        assert_eq!(
            p(r#"{"op":"durable-release"}"#).unwrap(),
            Request::DurableRelease
        );
        assert!(p(r#"{"op":"quiesce","bogus":1}"#).is_err());
        assert!(p(r#"{"op":"rm -rf"}"#).is_err());
        assert!(p("not json").is_err());
        assert_eq!(
            serde_json::to_string(&Request::CheckpointList).unwrap(),
            r#"{"op":"checkpoint-list"}"#
        );
    }

    #[test]
    fn replies() {
        let h = Echo(Mutex::new(vec![]));
        let ok: Value = serde_json::from_str(&reply_for_line(&h, "{\"op\":\"stats\"}\n")).unwrap();
        assert!(ok.get("ok").is_some());
        let err: Value = serde_json::from_str(&reply_for_line(&h, "{\"op\":\"flush\"}")).unwrap();
        assert_eq!(err["error"], "flush failed");
        let bad: Value = serde_json::from_str(&reply_for_line(&h, "{]")).unwrap();
        assert!(bad["error"].as_str().unwrap().starts_with("bad request"));
        assert_eq!(h.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn socket_round_trip_permissions_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ctl.sock");
        let h = Arc::new(Echo(Mutex::new(vec![])));
        let srv = ControlServer::bind(&path, h.clone()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(dmode, 0o700);
        // A second server on a live socket is refused.
        assert_eq!(
            ControlServer::bind(&path, h.clone()).err().unwrap().kind(),
            std::io::ErrorKind::AddrInUse
        );
        let r = call(&path, &json!({"op":"status"}), Duration::from_secs(5)).unwrap();
        assert!(r["seen"].as_str().unwrap().contains("Status"));
        assert_eq!(
            call(&path, &json!({"op":"flush"}), Duration::from_secs(5)).unwrap_err(),
            "flush failed"
        );
        // Several requests on one connection, then an over-long line ends it with an error.
        let s = UnixStream::connect(&path).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        for _ in 0..3 {
            writeln!(w, "{{\"op\":\"resume\"}}").unwrap();
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            assert!(l.contains("\"ok\""), "{l}");
        }
        let big = "x".repeat(MAX_LINE as usize + 10);
        let _ = w.write_all(big.as_bytes());
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        assert!(l.contains("too long"), "{l}");
        drop(srv);
        assert!(!path.exists(), "socket removed on drop");
        // A stale socket file is replaced.
        let l = UnixListener::bind(&path).unwrap();
        drop(l);
        let _srv2 = ControlServer::bind(&path, h).unwrap();
        assert!(call(&path, &json!({"op":"stats"}), Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn paths() {
        assert_eq!(
            socket_path(Path::new("/run/xensnap"), 3, 51712),
            PathBuf::from("/run/xensnap/blkback-3-51712.sock")
        );
        assert_eq!(
            image_socket_path(Path::new("/v/g.qcow2")),
            PathBuf::from("/v/g.qcow2.xensnap.sock")
        );
    }
}
