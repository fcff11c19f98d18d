//! The local control protocol of xensnap: one JSON request per line over a Unix socket, one
//! JSON reply line back.
//!
//! ```text
//! -> {"op":"status"}
//! <- {"ok":{...}}
//! -> {"op":"nonsense"}
//! <- {"error":"bad request: ..."}
//! ```
//! A reply is `{"ok": <result>}` or `{"error": "<message>"}` ([`reply`], [`parse_reply`]).
//! A request line is at most [`MAX_LINE`] bytes; a longer one gets
//! `{"error":"request line too long or truncated"}` and the connection ends. A reply line
//! is read up to [`MAX_REPLY`] bytes.
//!
//! The request types (their `op`s) belong to the servers (blkback-snap's device, `xl-snap
//! image serve`); this crate is generic over them ([`Handler`]) and sends any
//! [`serde::Serialize`] request.
//!
//! - [`server`]: [`ControlServer`] (socket mode 0600 in a 0700 directory, blocking accept
//!   thread, one thread per connection, shutdown on drop), [`serve_connection`],
//!   [`reply_for_line`];
//! - [`client`]: one request on a new connection ([`call`]) or on kept connections
//!   ([`Conns`]).
#![forbid(unsafe_code)]

use std::io::{self, BufRead, Read, Write};

use serde_json::{json, Value};

pub mod client;
pub mod server;

pub use client::{call, CallError, Conns};
pub use server::{reply_for_line, serve_connection, ControlServer, Handler};

/// CPU time (ns) this process has used so far, all threads (one `clock_gettime`, no /proc):
/// what a server reports as `cpu_ns` in its replies for a client's account of the work it
/// asked for, and what the client reads of itself.
pub fn process_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

/// Longest request line accepted (a request is a few hundred bytes).
pub const MAX_LINE: u64 = 64 * 1024;

/// Longest reply line read (an image map can be large).
pub const MAX_REPLY: u64 = 64 << 20;

/// What [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineRead {
    /// A whole line (ending in `\n`) is in the buffer.
    Line,
    /// End of stream before any byte.
    Eof,
    /// More than the limit without a newline, or end of stream inside a line; the buffer
    /// holds what was read.
    Incomplete,
}

/// Read one line of at most `max` bytes (newline included) into `buf` (cleared first).
pub fn read_line<R: BufRead>(r: &mut R, max: u64, buf: &mut String) -> io::Result<LineRead> {
    buf.clear();
    if r.by_ref().take(max).read_line(buf)? == 0 {
        return Ok(LineRead::Eof);
    }
    Ok(if buf.ends_with('\n') { LineRead::Line } else { LineRead::Incomplete })
}

/// Write `v` as one line (compact JSON and a newline, in one write).
pub fn write_line<W: Write + ?Sized>(w: &mut W, v: &Value) -> io::Result<()> {
    let mut line = v.to_string();
    line.push('\n');
    w.write_all(line.as_bytes())
}

/// The reply envelope of a handler's result: `{"ok": v}` or `{"error": message}`.
pub fn reply(r: Result<Value, String>) -> Value {
    match r {
        Ok(v) => json!({ "ok": v }),
        Err(e) => json!({ "error": e }),
    }
}

/// Open a reply envelope: `Err` = not JSON; `Ok(Err(message))` = the server refused (an
/// envelope with neither `ok` nor a string `error` is refused as "malformed reply").
pub fn parse_reply(line: &str) -> Result<Result<Value, String>, CallError> {
    let v: Value =
        serde_json::from_str(line).map_err(|source| CallError::BadReply { reply: line.to_string(), source })?;
    Ok(match v.get("ok") {
        Some(ok) => Ok(ok.clone()),
        None => Err(v.get("error").and_then(Value::as_str).unwrap_or("malformed reply").to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn envelope() {
        assert_eq!(reply(Ok(json!(3))).to_string(), r#"{"ok":3}"#);
        assert_eq!(reply(Err("no".into())).to_string(), r#"{"error":"no"}"#);
        assert_eq!(parse_reply("{\"ok\":{\"a\":1}}\n").unwrap(), Ok(json!({"a": 1})));
        assert_eq!(parse_reply(r#"{"ok":null}"#).unwrap(), Ok(Value::Null));
        assert_eq!(parse_reply(r#"{"error":"x"}"#).unwrap(), Err("x".into()));
        assert_eq!(parse_reply(r#"{"error":3}"#).unwrap(), Err("malformed reply".into()));
        assert_eq!(parse_reply("{}").unwrap(), Err("malformed reply".into()));
        let e = parse_reply("{]").unwrap_err().to_string();
        assert!(e.starts_with("bad reply \"{]\": "), "{e}");
    }

    #[test]
    fn framing() {
        let mut r = Cursor::new(b"{\"a\":1}\nabcdef\nxyz".to_vec());
        let mut b = String::new();
        assert_eq!(read_line(&mut r, 100, &mut b).unwrap(), LineRead::Line);
        assert_eq!(b, "{\"a\":1}\n");
        // over the limit: what fits, no newline
        assert_eq!(read_line(&mut r, 4, &mut b).unwrap(), LineRead::Incomplete);
        assert_eq!(b, "abcd");
        assert_eq!(read_line(&mut r, 100, &mut b).unwrap(), LineRead::Line);
        assert_eq!(b, "ef\n");
        // end of stream inside a line, then at a line boundary
        assert_eq!(read_line(&mut r, 100, &mut b).unwrap(), LineRead::Incomplete);
        assert_eq!(b, "xyz");
        assert_eq!(read_line(&mut r, 100, &mut b).unwrap(), LineRead::Eof);
        assert_eq!(b, "");
        let mut out = Vec::new();
        write_line(&mut out, &json!({"op": "status"})).unwrap();
        assert_eq!(out, b"{\"op\":\"status\"}\n");
    }

    #[test]
    fn cpu_clock_advances() {
        let a = process_cpu_ns();
        let mut x = 0u64;
        for i in 0..3_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(process_cpu_ns() > a);
    }
}
