//! The server side: a listening control socket with its accept thread, one thread per
//! connection, each serving requests one line at a time.

use std::fmt::Debug;
use std::io::{self, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::json;
use serde_json::Value;

use crate::{read_line, reply, write_line, LineRead, MAX_LINE};

/// What serves the requests of type `R` (a device; a fake in tests).
pub trait Handler<R>: Send + Sync {
    fn handle(&self, req: &R) -> Result<Value, String>;
}

/// Parse one request line and produce the reply line (without the newline). A line that
/// is not a request gets `{"error":"bad request: <why>"}`.
pub fn reply_for_line<R: DeserializeOwned + Debug>(h: &dyn Handler<R>, line: &str) -> String {
    let v = match serde_json::from_str::<R>(line.trim_end()) {
        Err(e) => json!({ "error": format!("bad request: {e}") }),
        Ok(req) => {
            tracing::info!(?req, "control request");
            reply(h.handle(&req))
        }
    };
    v.to_string()
}

/// Serve one connection until EOF (or a line longer than [`MAX_LINE`]).
pub fn serve_connection<R: DeserializeOwned + Debug>(h: &dyn Handler<R>, stream: UnixStream) -> io::Result<()> {
    let mut w = stream.try_clone()?;
    let mut r = BufReader::new(stream);
    let mut line = String::new();
    loop {
        match read_line(&mut r, MAX_LINE, &mut line)? {
            LineRead::Eof => return Ok(()),
            LineRead::Incomplete => {
                write_line(&mut w, &json!({ "error": "request line too long or truncated" }))?;
                return Ok(());
            }
            LineRead::Line => {
                let mut out = reply_for_line(h, &line);
                out.push('\n');
                w.write_all(out.as_bytes())?;
            }
        }
    }
}

/// A listening control socket with its accept thread. Dropping it stops the accept thread
/// and removes the socket (connections already accepted are served to their end).
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Bind `path` (mode 0600; the parent directory is created mode 0700). A stale socket
    /// is replaced; one that answers is left alone (`AddrInUse`).
    pub fn bind<R>(path: &Path, h: Arc<dyn Handler<R>>) -> io::Result<ControlServer>
    where
        R: DeserializeOwned + Debug + 'static,
    {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.exists() {
                std::fs::create_dir_all(dir)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            }
        }
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    // the callers name the path
                    "another server is listening there",
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
        let thread = std::thread::Builder::new().name("control".into()).spawn(move || loop {
            let r = l.accept();
            if st.load(Ordering::Acquire) {
                break;
            }
            match r {
                Ok((s, _)) => {
                    let h = Arc::clone(&h);
                    let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
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
        Ok(ControlServer { path: path.to_path_buf(), stop, thread: Some(thread) })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call;
    use serde::Deserialize;
    use std::io::BufRead;
    use std::sync::Mutex;

    /// A request type of the shape the servers use.
    #[derive(Deserialize, Debug, Clone, PartialEq, Eq)]
    #[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
    enum Request {
        Status,
        Stats,
        Resume,
        Flush,
    }

    struct Echo(Mutex<Vec<Request>>);
    impl Handler<Request> for Echo {
        fn handle(&self, req: &Request) -> Result<Value, String> {
            self.0.lock().unwrap().push(req.clone());
            match req {
                Request::Flush => Err("flush failed".into()),
                _ => Ok(json!({ "seen": format!("{req:?}") })),
            }
        }
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
        let unknown: Value = serde_json::from_str(&reply_for_line(&h, r#"{"op":"checkpoint-take"}"#)).unwrap();
        assert!(
            unknown["error"].as_str().unwrap().starts_with("bad request: unknown variant `checkpoint-take`"),
            "{unknown}"
        );
        assert_eq!(h.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn socket_round_trip_permissions_and_limits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ctl.sock");
        let h = Arc::new(Echo(Mutex::new(vec![])));
        let srv = ControlServer::bind(&path, h.clone() as Arc<dyn Handler<Request>>).unwrap();
        assert_eq!(srv.path(), path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let dmode = std::fs::metadata(path.parent().unwrap()).unwrap().permissions().mode() & 0o777;
        assert_eq!(dmode, 0o700);
        // A second server on a live socket is refused.
        assert_eq!(
            ControlServer::bind(&path, h.clone() as Arc<dyn Handler<Request>>).err().unwrap().kind(),
            io::ErrorKind::AddrInUse
        );
        let r = call(&path, &json!({"op":"status"}), Duration::from_secs(5)).unwrap();
        assert!(r["seen"].as_str().unwrap().contains("Status"));
        assert_eq!(
            call(&path, &json!({"op":"flush"}), Duration::from_secs(5)).unwrap_err().to_string(),
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
        // and the connection ends (a reset: the rest of the long line was never read)
        let mut l = String::new();
        match r.read_line(&mut l) {
            Ok(n) => assert_eq!(n, 0, "connection ended: {l}"),
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset),
        }
        drop(srv);
        assert!(!path.exists(), "socket removed on drop");
        // A stale socket file is replaced.
        let l = UnixListener::bind(&path).unwrap();
        drop(l);
        let _srv2 = ControlServer::bind(&path, h as Arc<dyn Handler<Request>>).unwrap();
        assert!(call(&path, &json!({"op":"stats"}), Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn drop_with_the_socket_removed_does_not_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let h: Arc<dyn Handler<Request>> = Arc::new(Echo(Mutex::new(vec![])));
        let srv = ControlServer::bind(&path, h).unwrap();
        std::fs::remove_file(&path).unwrap();
        drop(srv);
        assert!(!path.exists());
    }
}
