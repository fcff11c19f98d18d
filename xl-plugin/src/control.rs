//! The control socket of a served image: one JSON request ([`Request`]) per line, one JSON
//! reply per line, through `xensnap-control` (the framing, the reply envelope
//! `{"ok": <result>}` / `{"error": "<message>"}`, the server and the client).
//!
//! The socket is created with mode 0600, so only its owner (root, for a backend) can use it.

use crate::image::{execute, CliError, Request};
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};
use xensnap_control::{CallError, ControlServer, Handler};
use xensnap_qcow2::Qcow2;

/// Serves the requests on the image.
struct ImageHandler(Arc<Mutex<Qcow2>>);

impl Handler<Request> for ImageHandler {
    fn handle(&self, req: &Request) -> Result<Value, String> {
        let mut img = self.0.lock().map_err(|_| "image state poisoned by an earlier failure".to_string())?;
        execute(&mut img, req).map_err(|e| e.to_string())
    }
}

/// Listen on `path` (a live server there: `AddrInUse`; a stale socket is replaced) and serve
/// `img` until the returned server is dropped.
pub fn bind(path: &Path, img: Arc<Mutex<Qcow2>>) -> std::io::Result<ControlServer> {
    ControlServer::bind(path, Arc::new(ImageHandler(img)) as Arc<dyn Handler<Request>>)
}

/// Send `req` to the server at `path`. `Ok(None)` when nothing serves the image there.
pub fn try_call(path: &Path, req: &Request) -> Result<Option<Result<Value, String>>, CliError> {
    match xensnap_control::call(path, req, None) {
        Ok(v) => Ok(Some(Ok(v))),
        Err(CallError::Refused(msg)) => Ok(Some(Err(msg))),
        Err(CallError::Connect { .. }) => Ok(None),
        // these do not name the socket
        Err(e @ (CallError::BadReply { .. } | CallError::Encode(_))) => {
            Err(CliError::Other(format!("control socket {}: {e}", path.display())))
        }
        Err(e) => Err(CliError::Other(format!("control socket {e}"))),
    }
}
