//! The control socket of a served image: one JSON request per line, one JSON reply per line.
//!
//! Reply: `{"ok": <result>}` or `{"error": "<message>"}`. The socket is created with mode
//! 0600, so only its owner (root, for a backend) can use it.

use crate::image::{execute, CliError, Request};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use xensnap_qcow2::Qcow2;

/// Longest request line accepted (a request is a few hundred bytes).
const MAX_LINE: u64 = 64 * 1024;

pub struct ControlServer {
    listener: UnixListener,
    img: Arc<Mutex<Qcow2>>,
}

impl ControlServer {
    pub fn bind(path: &Path, img: Arc<Mutex<Qcow2>>) -> std::io::Result<Self> {
        if path.exists() {
            // A live server answers; a stale socket from a crashed one is replaced.
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another server is already listening there",
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ControlServer { listener, img })
    }

    pub fn run(self) {
        for conn in self.listener.incoming() {
            match conn {
                Ok(stream) => {
                    let img = self.img.clone();
                    std::thread::spawn(move || {
                        if let Err(e) = handle(stream, &img) {
                            tracing::warn!("control connection: {e}");
                        }
                    });
                }
                Err(e) => tracing::warn!("control accept: {e}"),
            }
        }
    }
}

fn handle(stream: UnixStream, img: &Mutex<Qcow2>) -> std::io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream).take(MAX_LINE);
    let mut line = String::new();
    loop {
        line.clear();
        reader.set_limit(MAX_LINE);
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if !line.ends_with('\n') {
            let reply = json!({ "error": "request line too long or truncated" });
            writeln!(writer, "{reply}")?;
            return Ok(());
        }
        let reply = match serde_json::from_str::<Request>(&line) {
            Err(e) => json!({ "error": format!("bad request: {e}") }),
            Ok(req) => {
                tracing::info!(?req, "control request");
                match img.lock() {
                    Err(_) => json!({ "error": "image state poisoned by an earlier failure" }),
                    Ok(mut g) => match execute(&mut g, &req) {
                        Ok(v) => json!({ "ok": v }),
                        Err(e) => json!({ "error": e.to_string() }),
                    },
                }
            }
        };
        writeln!(writer, "{reply}")?;
    }
}

/// Send `req` to the server at `path`. `Ok(None)` when nothing serves the image there.
pub fn try_call(path: &Path, req: &Request) -> Result<Option<Result<Value, String>>, CliError> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(_) => return Ok(None),
    };
    let io = |e: std::io::Error| CliError::Other(format!("control socket {}: {e}", path.display()));
    let mut w = stream.try_clone().map_err(io)?;
    let line = serde_json::to_string(req).map_err(|e| CliError::Other(e.to_string()))?;
    writeln!(w, "{line}").map_err(io)?;
    let mut reply = String::new();
    BufReader::new(stream).take(64 << 20).read_line(&mut reply).map_err(io)?;
    let v: Value = serde_json::from_str(&reply)
        .map_err(|e| CliError::Other(format!("control socket {}: bad reply: {e}", path.display())))?;
    if let Some(ok) = v.get("ok") {
        Ok(Some(Ok(ok.clone())))
    } else {
        let msg = v.get("error").and_then(Value::as_str).unwrap_or("malformed reply");
        Ok(Some(Err(msg.to_string())))
    }
}
