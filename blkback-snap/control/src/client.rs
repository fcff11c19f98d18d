//! The client side: one request on a new connection ([`call`]), or on connections kept
//! per socket path ([`Conns`]).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::{parse_reply, read_line, LineRead, MAX_REPLY};

/// Why a request got no `ok` result.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// No connection (nothing listens at the path, or the timeout was zero): the request
    /// was not served.
    #[error("{}: {source}", path.display())]
    Connect { path: PathBuf, source: io::Error },
    /// The request could not be written: it was not served.
    #[error("{}: {source}", path.display())]
    Send { path: PathBuf, source: io::Error },
    /// Reading the reply failed (also: the timeout passed): the request may have been
    /// served.
    #[error("{}: {source}", path.display())]
    Receive { path: PathBuf, source: io::Error },
    /// The server closed the connection before a whole reply line (or the reply was longer
    /// than [`MAX_REPLY`](crate::MAX_REPLY)): the request may have been served.
    #[error("{}: connection closed without a full reply", path.display())]
    Closed { path: PathBuf },
    /// The reply line is not JSON.
    #[error("bad reply {reply:?}: {source}")]
    BadReply { reply: String, source: serde_json::Error },
    /// The request cannot be encoded as JSON (nothing was sent).
    #[error("request not encodable as JSON: {0}")]
    Encode(serde_json::Error),
    /// The server answered `{"error": message}` (the message as is).
    #[error("{0}")]
    Refused(String),
}

/// The callers' string errors (`?` in a function returning `Result<_, String>`).
impl From<CallError> for String {
    fn from(e: CallError) -> String {
        e.to_string()
    }
}

/// A connection with its reply reader.
type Conn = BufReader<UnixStream>;

fn encode<R: Serialize + ?Sized>(req: &R) -> Result<String, CallError> {
    let mut line = serde_json::to_string(req).map_err(CallError::Encode)?;
    line.push('\n');
    Ok(line)
}

fn connect(path: &Path, timeout: Option<Duration>) -> Result<Conn, CallError> {
    let err = |source| CallError::Connect { path: path.to_path_buf(), source };
    let s = UnixStream::connect(path).map_err(err)?;
    s.set_read_timeout(timeout).map_err(err)?;
    Ok(BufReader::new(s))
}

fn send(c: &mut Conn, path: &Path, line: &str) -> Result<(), CallError> {
    c.get_mut().write_all(line.as_bytes()).map_err(|source| CallError::Send { path: path.to_path_buf(), source })
}

/// One reply line: Err = the connection failed; Ok(Err) = the server refused.
fn receive(c: &mut Conn, path: &Path) -> Result<Result<Value, String>, CallError> {
    let mut reply = String::new();
    match read_line(c, MAX_REPLY, &mut reply) {
        Ok(LineRead::Line) => parse_reply(&reply),
        Ok(LineRead::Eof | LineRead::Incomplete) => Err(CallError::Closed { path: path.to_path_buf() }),
        Err(source) => Err(CallError::Receive { path: path.to_path_buf(), source }),
    }
}

/// Send one request to the socket at `path` on a new connection and return its result
/// (`Err(CallError::Refused(message))` for an `{"error": message}` reply). `timeout` bounds
/// each wait for the reply (`None`: wait as long as the server takes).
pub fn call<R: Serialize + ?Sized>(
    path: &Path,
    req: &R,
    timeout: impl Into<Option<Duration>>,
) -> Result<Value, CallError> {
    let line = encode(req)?;
    let mut c = connect(path, timeout.into())?;
    send(&mut c, path, &line)?;
    receive(&mut c, path)?.map_err(CallError::Refused)
}

/// Kept control connections, one per socket path: opened by the first request to a path
/// and reused by the next ones (no connect, and no new connection thread in the server).
/// Not shared between threads.
pub struct Conns {
    timeout: Option<Duration>,
    open: RefCell<HashMap<PathBuf, Conn>>,
}

impl Conns {
    /// `timeout` bounds each wait for a reply (`None`: no bound).
    pub fn new(timeout: impl Into<Option<Duration>>) -> Conns {
        Conns { timeout: timeout.into(), open: RefCell::default() }
    }

    /// Send `req` to `path` on its kept connection (a new one if there is none) and return
    /// its result (`Err(CallError::Refused(message))` for an `{"error": message}` reply).
    pub fn call<R: Serialize + ?Sized>(&self, path: &Path, req: &R) -> Result<Value, CallError> {
        let line = encode(req)?;
        let mut conns = self.open.borrow_mut();
        if let Some(c) = conns.get_mut(path) {
            // A request that could not be sent was not served: retry it on a new
            // connection. After it was sent, a failure is final (it may have been served).
            if send(c, path, &line).is_ok() {
                return match receive(c, path) {
                    Ok(r) => r.map_err(CallError::Refused),
                    Err(e) => {
                        conns.remove(path);
                        Err(e)
                    }
                };
            }
            conns.remove(path);
        }
        let mut c = connect(path, self.timeout)?;
        send(&mut c, path, &line)?;
        let r = receive(&mut c, path)?;
        conns.insert(path.to_path_buf(), c);
        r.map_err(CallError::Refused)
    }

    /// How many connections are kept.
    pub fn len(&self) -> usize {
        self.open.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    /// A control server that answers `{"ok": N}` (N = request number on this connection) and
    /// closes each connection after `per_conn` requests; returns the accept count.
    fn line_server(path: &Path, per_conn: usize, conns: usize) -> std::thread::JoinHandle<usize> {
        let l = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let mut accepted = 0;
            for s in l.incoming().take(conns) {
                let s = s.unwrap();
                accepted += 1;
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                for i in 0..per_conn {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap() == 0 {
                        break;
                    }
                    writeln!(w, "{}", json!({ "ok": i })).unwrap();
                }
            }
            accepted
        })
    }

    #[test]
    fn requests_reuse_one_connection() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.sock");
        let srv = line_server(&p, 3, 1);
        let c = Conns::new(Duration::from_secs(30));
        for i in 0..3 {
            assert_eq!(c.call(&p, &json!({"op": "status"})).unwrap(), json!(i));
        }
        assert_eq!(c.len(), 1);
        drop(c);
        assert_eq!(srv.join().unwrap(), 1);
    }

    #[test]
    fn connection_closed_between_requests_is_reopened() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.sock");
        let srv = line_server(&p, 1, 2);
        let c = Conns::new(Duration::from_secs(30));
        assert_eq!(c.call(&p, &json!({"op": "status"})).unwrap(), json!(0));
        std::thread::sleep(Duration::from_millis(200)); // the server has closed it
        assert_eq!(c.call(&p, &json!({"op": "status"})).unwrap(), json!(0));
        drop(c);
        assert_eq!(srv.join().unwrap(), 2);
    }

    /// A request that was sent and then lost its reply is not sent again: the failure is
    /// the caller's, the connection is dropped, the next request opens a new one.
    #[test]
    fn failure_after_send_is_final() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.sock");
        let l = UnixListener::bind(&p).unwrap();
        let srv = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (n, s) in l.incoming().take(2).enumerate() {
                let s = s.unwrap();
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                let mut line = String::new();
                while r.read_line(&mut line).unwrap() > 0 {
                    seen.push((n, line.trim_end().to_string()));
                    if line.contains("lost") {
                        // served, but the reply never comes
                        break;
                    }
                    writeln!(w, "{}", json!({ "error": "refused" })).unwrap();
                    line.clear();
                }
            }
            seen
        });
        let c = Conns::new(Duration::from_secs(30));
        // a refusal keeps the connection
        let e = c.call(&p, &json!({"op": "a"})).unwrap_err();
        assert!(matches!(&e, CallError::Refused(m) if m == "refused"), "{e}");
        assert_eq!(c.len(), 1);
        let e = c.call(&p, &json!({"op": "lost"})).unwrap_err();
        assert_eq!(e.to_string(), format!("{}: connection closed without a full reply", p.display()));
        assert!(c.is_empty(), "connection dropped");
        assert!(c.call(&p, &json!({"op": "b"})).is_err());
        assert_eq!(c.len(), 1, "a new connection");
        drop(c);
        let seen = srv.join().unwrap();
        let seen: Vec<(usize, &str)> = seen.iter().map(|(n, l)| (*n, l.as_str())).collect();
        assert_eq!(seen, [(0, r#"{"op":"a"}"#), (0, r#"{"op":"lost"}"#), (1, r#"{"op":"b"}"#)]);
    }

    #[test]
    fn call_errors() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("none.sock");
        let e = call(&p, &json!({"op": "status"}), Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, CallError::Connect { .. }), "{e}");
        assert!(e.to_string().starts_with(&format!("{}: ", p.display())), "{e}");
        // a timeout while waiting for the reply
        let p = d.path().join("mute.sock");
        let l = UnixListener::bind(&p).unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            std::thread::sleep(Duration::from_millis(500));
            line
        });
        let e = call(&p, &json!({"op": "status"}), Duration::from_millis(50)).unwrap_err();
        assert!(matches!(e, CallError::Receive { .. }), "{e}");
        assert_eq!(t.join().unwrap(), "{\"op\":\"status\"}\n");
        let s: String = CallError::Refused("flush failed".into()).into();
        assert_eq!(s, "flush failed");
    }
}
