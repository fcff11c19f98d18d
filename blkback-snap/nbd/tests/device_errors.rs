//! Device errors become the right NBD error values; advisory/emulated operations; registry
//! behaviour (multi-conn policy, exports changing while the server runs).

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use xensnap_blockdev::{BlockDevice, BlockError, BlockResult, MemDisk};
use xensnap_nbd::{proto::*, ExportRegistry};

const SIZE: usize = 64 * 1024;

/// A device whose operations fail in scripted ways.
#[derive(Default)]
struct Faults {
    read: Option<fn() -> BlockError>,
    write: Option<fn() -> BlockError>,
    flush: Option<fn() -> BlockError>,
    discard: Option<fn() -> BlockError>,
    write_zeroes: Option<fn() -> BlockError>,
}

struct FaultyDisk {
    inner: MemDisk,
    faults: Mutex<Faults>,
    /// Claim a bigger size than the backing store, to provoke OutOfRange from the device.
    claimed_size: u64,
}

impl FaultyDisk {
    fn new() -> Self {
        FaultyDisk {
            inner: MemDisk::from_vec(vec![0xee; SIZE], false),
            faults: Mutex::default(),
            claimed_size: SIZE as u64,
        }
    }
    fn set(&self, f: impl FnOnce(&mut Faults)) {
        let mut g = self.faults.lock().unwrap();
        *g = Faults::default();
        f(&mut g);
    }
}

impl BlockDevice for FaultyDisk {
    fn size(&self) -> u64 {
        self.claimed_size
    }
    fn read_only(&self) -> bool {
        false
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        match self.faults.lock().unwrap().read {
            Some(e) => Err(e()),
            None => self.inner.read_at(offset, buf),
        }
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        match self.faults.lock().unwrap().write {
            Some(e) => Err(e()),
            None => self.inner.write_at(offset, buf),
        }
    }
    fn flush(&self) -> BlockResult<()> {
        match self.faults.lock().unwrap().flush {
            Some(e) => Err(e()),
            None => Ok(()),
        }
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        match self.faults.lock().unwrap().discard {
            Some(e) => Err(e()),
            None => self.inner.discard(offset, len),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult<()> {
        match self.faults.lock().unwrap().write_zeroes {
            Some(e) => Err(e()),
            None => self.inner.write_zeroes(offset, len, may_unmap),
        }
    }
}

fn io() -> BlockError {
    BlockError::Io("injected".into())
}
fn nospace() -> BlockError {
    BlockError::NoSpace
}
fn unsup() -> BlockError {
    BlockError::Unsupported("injected")
}
fn ro() -> BlockError {
    BlockError::ReadOnly
}

#[test]
fn device_errors_map_to_nbd_errors() {
    let disk = Arc::new(FaultyDisk::new());
    let ts = TestServer::tcp(single("f", disk.clone()));
    let mut s = ts.connect();
    go(&mut s, "f");

    // Read failure: error reply and no payload; the next request is framed correctly.
    disk.set(|f| f.read = Some(io));
    send_req(&mut s, 0, CMD_READ, 1, 0, 4096);
    assert_eq!(recv_reply(&mut s), (EIO, 1));
    disk.set(|_| {});
    send_req(&mut s, 0, CMD_READ, 2, 0, 4);
    assert_eq!(recv_reply(&mut s), (0, 2));
    assert_eq!(read_exact(&mut s, 4), vec![0xee; 4]);

    let write = |s: &mut std::net::TcpStream, flags: u16, h: u64| {
        send_req(s, flags, CMD_WRITE, h, 8, 4);
        s.write_all(&[1, 2, 3, 4]).unwrap();
        recv_reply(s)
    };
    disk.set(|f| f.write = Some(nospace));
    assert_eq!(write(&mut s, 0, 3), (ENOSPC, 3));
    disk.set(|f| f.write = Some(unsup));
    assert_eq!(write(&mut s, 0, 4), (ENOTSUP, 4));
    disk.set(|f| f.write = Some(ro));
    assert_eq!(write(&mut s, 0, 5), (EPERM, 5));
    disk.set(|f| f.write = Some(io));
    assert_eq!(write(&mut s, 0, 6), (EIO, 6));
    // FUA: the write lands but the flush fails => the request fails.
    disk.set(|f| f.flush = Some(io));
    assert_eq!(write(&mut s, CMD_FLAG_FUA, 7), (EIO, 7));
    send_req(&mut s, 0, CMD_FLUSH, 8, 0, 0);
    assert_eq!(recv_reply(&mut s), (EIO, 8));
    disk.set(|_| {});
    assert_eq!(write(&mut s, CMD_FLAG_FUA, 9), (0, 9));

    // Trim is advisory: a device without discard still succeeds (data kept).
    disk.set(|f| f.discard = Some(unsup));
    send_req(&mut s, 0, CMD_TRIM, 10, 4096, 4096);
    assert_eq!(recv_reply(&mut s), (0, 10));
    assert_eq!(disk.inner.snapshot()[4096], 0xee);
    disk.set(|f| f.discard = Some(io));
    send_req(&mut s, 0, CMD_TRIM, 11, 4096, 4096);
    assert_eq!(recv_reply(&mut s), (EIO, 11));

    // Write zeroes without device support is emulated with plain writes.
    disk.set(|f| f.write_zeroes = Some(unsup));
    send_req(&mut s, 0, CMD_WRITE_ZEROES, 12, 8192, 3 * 4096 + 5);
    assert_eq!(recv_reply(&mut s), (0, 12));
    let snap = disk.inner.snapshot();
    assert!(snap[8192..8192 + 3 * 4096 + 5].iter().all(|&b| b == 0));
    assert_eq!(snap[8192 - 1], 0xee);
    assert_eq!(snap[8192 + 3 * 4096 + 5], 0xee);
    disk.set(|f| f.write_zeroes = Some(nospace));
    send_req(&mut s, 0, CMD_WRITE_ZEROES, 13, 0, 512);
    assert_eq!(recv_reply(&mut s), (ENOSPC, 13));

    send_req(&mut s, 0, CMD_DISC, 14, 0, 0);
    assert!(closed(&mut s));
}

#[test]
fn device_out_of_range_maps_per_direction() {
    // The device claims more than it holds: the server's own range check passes, the
    // device's fails (EINVAL for reads, ENOSPC for writes).
    let mut d = FaultyDisk::new();
    d.claimed_size = 2 * SIZE as u64;
    let ts = TestServer::tcp(single("f", Arc::new(d)));
    let mut s = ts.connect();
    let (size, _) = go(&mut s, "f");
    assert_eq!(size, 2 * SIZE as u64);
    send_req(&mut s, 0, CMD_READ, 1, SIZE as u64, 16);
    assert_eq!(recv_reply(&mut s), (EINVAL, 1));
    send_req(&mut s, 0, CMD_WRITE, 2, SIZE as u64, 2);
    s.write_all(&[1, 1]).unwrap();
    assert_eq!(recv_reply(&mut s), (ENOSPC, 2));
}

/// A registry that is not StaticExports: default multi-conn policy, exports changing live.
#[derive(Default)]
struct LiveExports(Mutex<HashMap<String, Arc<dyn BlockDevice>>>);

impl ExportRegistry for LiveExports {
    fn lookup(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        self.0.lock().unwrap().get(name).cloned()
    }
    fn list(&self) -> Vec<(String, String)> {
        self.0.lock().unwrap().keys().map(|k| (k.clone(), String::new())).collect()
    }
}

#[test]
fn registry_policy_and_live_exports() {
    let reg = Arc::new(LiveExports::default());
    reg.0.lock().unwrap().insert("rw".into(), Arc::new(MemDisk::new(SIZE)));
    reg.0.lock().unwrap().insert("ro".into(), Arc::new(MemDisk::from_vec(vec![1; SIZE], true)));
    let ts = TestServer::tcp(reg.clone());

    let mut s = ts.connect();
    let (_, f) = go(&mut s, "rw");
    assert_eq!(f & TFLAG_CAN_MULTI_CONN, 0, "default policy: no multi-conn for rw");
    assert_eq!(f & TFLAG_READ_ONLY, 0);
    let mut s = ts.connect();
    let (_, f) = go(&mut s, "ro");
    assert_ne!(f & TFLAG_CAN_MULTI_CONN, 0, "default policy: multi-conn for read-only");
    assert_ne!(f & TFLAG_READ_ONLY, 0);

    // A checkpoint export appears while the server runs...
    reg.0.lock().unwrap().insert("ckpt-1".into(), Arc::new(MemDisk::from_vec(vec![7; 4096], true)));
    let mut s = ts.connect();
    assert_eq!(go(&mut s, "ckpt-1").0, 4096);
    send_req(&mut s, 0, CMD_READ, 1, 0, 2);
    assert_eq!(recv_reply(&mut s), (0, 1));
    assert_eq!(read_exact(&mut s, 2), vec![7, 7]);
    // ...and disappears: new clients get NBD_REP_ERR_UNKNOWN; the open one keeps its device.
    reg.0.lock().unwrap().remove("ckpt-1");
    let mut n = ts.connect();
    greet(&mut n, FLAG_C_FIXED_NEWSTYLE);
    send_opt(&mut n, OPT_GO, &go_data("ckpt-1", &[]));
    assert_eq!(recv_opt_reply(&mut n).1, REP_ERR_UNKNOWN);
    send_req(&mut s, 0, CMD_READ, 2, 4094, 2);
    assert_eq!(recv_reply(&mut s), (0, 2));
    assert_eq!(read_exact(&mut s, 2), vec![7, 7]);
}
