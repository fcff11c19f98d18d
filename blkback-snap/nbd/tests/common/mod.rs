//! Shared test helpers: a recording device, servers on ephemeral endpoints, a raw NBD client.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use xensnap_blockdev::{BlockDevice, BlockResult, MemDisk};
use xensnap_nbd::{proto::*, ExportRegistry, Server, StaticExports, StopHandle};

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
    });
}

/// A device call, as seen by the server's backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read(u64, u64),
    Write(u64, u64),
    Flush,
    Discard(u64, u64),
    WriteZeroes { offset: u64, len: u64, may_unmap: bool },
}

/// A MemDisk that records every call made to it.
pub struct RecordingDisk {
    pub inner: MemDisk,
    pub ops: Mutex<Vec<Op>>,
}

impl RecordingDisk {
    pub fn new(size: usize) -> Self {
        RecordingDisk { inner: MemDisk::new(size), ops: Mutex::new(Vec::new()) }
    }
    pub fn from_vec(data: Vec<u8>, ro: bool) -> Self {
        RecordingDisk { inner: MemDisk::from_vec(data, ro), ops: Mutex::new(Vec::new()) }
    }
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap().clone()
    }
    pub fn clear_ops(&self) {
        self.ops.lock().unwrap().clear();
    }
    fn rec(&self, op: Op) {
        self.ops.lock().unwrap().push(op);
    }
}

impl BlockDevice for RecordingDisk {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.rec(Op::Read(offset, buf.len() as u64));
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        self.rec(Op::Write(offset, buf.len() as u64));
        self.inner.write_at(offset, buf)
    }
    fn flush(&self) -> BlockResult<()> {
        self.rec(Op::Flush);
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.rec(Op::Discard(offset, len));
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult<()> {
        self.rec(Op::WriteZeroes { offset, len, may_unmap });
        self.inner.write_zeroes(offset, len, may_unmap)
    }
}

/// A server running its accept loop on a thread; stopped (and joined) on drop.
pub struct TestServer {
    pub server: Server,
    pub stop: StopHandle,
    pub join: Option<JoinHandle<std::io::Result<()>>>,
    pub port: u16,
    pub socket: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

impl TestServer {
    pub fn tcp(registry: Arc<dyn ExportRegistry>) -> Self {
        Self::tcp_with(Server::new(registry))
    }

    pub fn tcp_with(server: Server) -> Self {
        init_tracing();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = server.stop_handle();
        let s = server.clone();
        let join = std::thread::spawn(move || s.serve_tcp(listener));
        TestServer { server, stop, join: Some(join), port, socket: None, _dir: None }
    }

    pub fn unix(registry: Arc<dyn ExportRegistry>) -> Self {
        init_tracing();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = Server::new(registry);
        let stop = server.stop_handle();
        let s = server.clone();
        let join = std::thread::spawn(move || s.serve_unix(listener));
        TestServer { server, stop, join: Some(join), port: 0, socket: Some(path), _dir: Some(dir) }
    }

    pub fn url(&self, export: &str) -> String {
        match &self.socket {
            Some(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
            None => format!("nbd://127.0.0.1:{}/{export}", self.port),
        }
    }

    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    }

    /// Stop and return what the accept loop returned.
    pub fn shutdown(mut self) -> std::io::Result<()> {
        self.stop.stop();
        self.join.take().unwrap().join().expect("accept loop panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.stop();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

pub fn single(name: &str, dev: Arc<dyn BlockDevice>) -> Arc<dyn ExportRegistry> {
    Arc::new(StaticExports::single(name, dev))
}

/// Whether a binary is available; prints a loud SKIP line when it is not.
pub fn have(bin: &str) -> bool {
    let ok = std::process::Command::new(bin)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !ok {
        eprintln!("SKIP: `{bin}` is not installed; this test did not run");
    }
    ok
}

// ---- raw protocol client -------------------------------------------------------------

pub fn read_exact<R: Read>(r: &mut R, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    r.read_exact(&mut b).unwrap();
    b
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Read the server greeting and send client flags.
pub fn greet<S: Read + Write>(s: &mut S, client_flags: u32) {
    let hello = read_exact(s, 18);
    assert_eq!(be64(&hello[0..8]), NBDMAGIC);
    assert_eq!(be64(&hello[8..16]), IHAVEOPT);
    let hf = u16::from_be_bytes([hello[16], hello[17]]);
    assert_eq!(hf, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&client_flags.to_be_bytes()).unwrap();
}

pub fn send_opt<W: Write>(w: &mut W, opt: u32, data: &[u8]) {
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    w.write_all(&m).unwrap();
}

/// One option reply: (option, type, data).
pub fn recv_opt_reply<R: Read>(r: &mut R) -> (u32, u32, Vec<u8>) {
    let h = read_exact(r, 20);
    assert_eq!(be64(&h[0..8]), OPT_REPLY_MAGIC, "option reply magic");
    let len = be32(&h[16..20]) as usize;
    assert!(len < 1 << 20);
    (be32(&h[8..12]), be32(&h[12..16]), read_exact(r, len))
}

pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// Handshake to transmission through NBD_OPT_GO; returns (size, transmission flags).
pub fn go<S: Read + Write>(s: &mut S, name: &str) -> (u64, u16) {
    greet(s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    send_opt(s, OPT_GO, &go_data(name, &[]));
    let mut export = None;
    loop {
        let (opt, typ, data) = recv_opt_reply(s);
        assert_eq!(opt, OPT_GO);
        match typ {
            REP_INFO => {
                if u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                    export = Some((be64(&data[2..10]), u16::from_be_bytes([data[10], data[11]])));
                }
            }
            REP_ACK => return export.expect("no NBD_INFO_EXPORT before ACK"),
            other => panic!("GO failed with reply {other:#x}: {}", String::from_utf8_lossy(&data)),
        }
    }
}

pub fn send_req<W: Write>(w: &mut W, flags: u16, cmd: u16, handle: u64, offset: u64, len: u32) {
    let mut m = Vec::with_capacity(28);
    m.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    m.extend_from_slice(&flags.to_be_bytes());
    m.extend_from_slice(&cmd.to_be_bytes());
    m.extend_from_slice(&handle.to_be_bytes());
    m.extend_from_slice(&offset.to_be_bytes());
    m.extend_from_slice(&len.to_be_bytes());
    w.write_all(&m).unwrap();
}

/// A simple reply header: (error, handle).
pub fn recv_reply<R: Read>(r: &mut R) -> (u32, u64) {
    let h = read_exact(r, 16);
    assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC, "simple reply magic");
    (be32(&h[4..8]), be64(&h[8..16]))
}

/// True if the peer closed (EOF or reset) within the read timeout.
pub fn closed<R: Read>(r: &mut R) -> bool {
    let mut b = [0u8; 1];
    match r.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
    }
}

/// Read `len` bytes at `offset` through a fresh GO connection and check the data.
pub fn good_client_roundtrip(ts: &TestServer, name: &str) {
    let mut s = ts.connect();
    go(&mut s, name);
    send_req(&mut s, 0, CMD_WRITE, 7, 512, 4);
    s.write_all(&[1, 2, 3, 4]).unwrap();
    assert_eq!(recv_reply(&mut s), (0, 7));
    send_req(&mut s, 0, CMD_READ, 8, 512, 4);
    assert_eq!(recv_reply(&mut s), (0, 8));
    assert_eq!(read_exact(&mut s, 4), vec![1, 2, 3, 4]);
    send_req(&mut s, 0, CMD_DISC, 9, 0, 0);
    assert!(closed(&mut s));
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}
