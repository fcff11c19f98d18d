//! Hand-written (and random) misbehaving clients on raw sockets: the server answers with the
//! error the spec asks for, or hangs up, never panics, never allocates from a client-chosen
//! length, and the next good client still works.

mod common;

use std::io::{Cursor, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use xensnap_blockdev::MemDisk;
use xensnap_nbd::{proto::*, NbdError, Server, StaticExports};

const SIZE: usize = 1 << 20;

fn rw_server() -> (TestServer, Arc<MemDisk>) {
    let disk = Arc::new(MemDisk::new(SIZE));
    let mut ex = StaticExports::new();
    ex.insert("disk", disk.clone(), "a test disk");
    ex.insert("ro", Arc::new(MemDisk::from_vec(vec![0x42; SIZE], true)), "");
    (TestServer::tcp(Arc::new(ex)), disk)
}

#[test]
fn bad_client_flags_close_the_connection() {
    let (ts, _) = rw_server();
    let mut s = ts.connect();
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE | 0x80);
    assert!(closed(&mut s));
    good_client_roundtrip(&ts, "disk");
}

#[test]
fn wrong_option_magic_closes_the_connection() {
    let (ts, _) = rw_server();
    let mut s = ts.connect();
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    s.write_all(b"NOTAMAGC\0\0\0\x07\0\0\0\0").unwrap();
    assert!(closed(&mut s));
    // Not even an NBD client: garbage right away.
    let mut s = ts.connect();
    let _ = read_exact(&mut s, 18);
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(closed(&mut s));
    good_client_roundtrip(&ts, "disk");
}

#[test]
fn truncated_option_and_early_hangups() {
    let (ts, _) = rw_server();
    // Header promises 100 bytes, 10 arrive, then the client half-closes.
    let mut s = ts.connect();
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    let mut m = Vec::new();
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&100u32.to_be_bytes());
    m.extend_from_slice(&[0u8; 10]);
    s.write_all(&m).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed(&mut s));
    // Half an option header.
    let mut s = ts.connect();
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    s.write_all(&IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(s);
    // Gone before sending flags.
    let mut s = ts.connect();
    let _ = read_exact(&mut s, 18);
    drop(s);
    // Connect and vanish.
    drop(ts.connect());
    good_client_roundtrip(&ts, "disk");
}

#[test]
fn huge_option_length_is_refused_without_reading_it() {
    let (ts, _) = rw_server();
    for len in [u32::MAX, MAX_OPTION_LEN + 1, 1 << 30] {
        let mut s = ts.connect();
        greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
        let mut m = Vec::new();
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&0x1234u32.to_be_bytes());
        m.extend_from_slice(&len.to_be_bytes());
        s.write_all(&m).unwrap();
        let t = Instant::now();
        assert!(closed(&mut s), "server should hang up on a {len}-byte option");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
    good_client_roundtrip(&ts, "disk");
}

#[test]
fn option_haggling_errors_then_success() {
    let (ts, _) = rw_server();
    let mut s = ts.connect();
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);

    let refused: &[(u32, Vec<u8>, u32)] = &[
        (0xdead, b"whatever".to_vec(), REP_ERR_UNSUP),
        (OPT_STRUCTURED_REPLY, vec![], REP_ERR_UNSUP),
        (OPT_STARTTLS, vec![], REP_ERR_UNSUP),
        (OPT_EXTENDED_HEADERS, vec![], REP_ERR_UNSUP),
        (OPT_PEEK_EXPORT, vec![], REP_ERR_UNSUP),
        (OPT_SET_META_CONTEXT, go_data("disk", &[]), REP_ERR_INVALID),
        (OPT_LIST_META_CONTEXT, go_data("disk", &[]), REP_ERR_INVALID),
        (OPT_LIST, b"junk".to_vec(), REP_ERR_INVALID),
        // name length beyond the option
        (OPT_GO, vec![0, 0, 0, 200, b'd'], REP_ERR_INVALID),
        // too short to hold anything
        (OPT_GO, vec![0, 0], REP_ERR_INVALID),
        // info request count disagrees with the data
        (
            OPT_GO,
            {
                let mut d = go_data("disk", &[INFO_NAME]);
                d.pop();
                d
            },
            REP_ERR_INVALID,
        ),
        (
            OPT_INFO,
            {
                let mut d = go_data("disk", &[]);
                d.push(0);
                d
            },
            REP_ERR_INVALID,
        ),
        // name not UTF-8
        (OPT_GO, vec![0, 0, 0, 2, 0xff, 0xfe, 0, 0], REP_ERR_INVALID),
        (OPT_GO, go_data("nope", &[]), REP_ERR_UNKNOWN),
        (OPT_INFO, go_data("nope", &[]), REP_ERR_UNKNOWN),
    ];
    for (opt, data, want) in refused {
        send_opt(&mut s, *opt, data);
        let (o, typ, _msg) = recv_opt_reply(&mut s);
        assert_eq!((o, typ), (*opt, *want), "option {opt:#x}");
    }

    // LIST
    send_opt(&mut s, OPT_LIST, &[]);
    let mut names = Vec::new();
    loop {
        let (o, typ, data) = recv_opt_reply(&mut s);
        assert_eq!(o, OPT_LIST);
        if typ == REP_ACK {
            break;
        }
        assert_eq!(typ, REP_SERVER);
        let n = be32(&data) as usize;
        names.push((
            String::from_utf8(data[4..4 + n].to_vec()).unwrap(),
            String::from_utf8(data[4 + n..].to_vec()).unwrap(),
        ));
    }
    assert_eq!(names, vec![("disk".into(), "a test disk".into()), ("ro".into(), String::new())]);

    // INFO with every info type (and an unknown one, which is ignored).
    send_opt(&mut s, OPT_INFO, &go_data("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 77]));
    let mut got = Vec::new();
    loop {
        let (o, typ, data) = recv_opt_reply(&mut s);
        assert_eq!(o, OPT_INFO);
        if typ == REP_ACK {
            break;
        }
        assert_eq!(typ, REP_INFO);
        got.push(data);
    }
    let find = |t: u16| got.iter().find(|d| u16::from_be_bytes([d[0], d[1]]) == t).cloned();
    let e = find(INFO_EXPORT).expect("NBD_INFO_EXPORT");
    assert_eq!(be64(&e[2..10]), SIZE as u64);
    let flags = u16::from_be_bytes([e[10], e[11]]);
    let want = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN;
    assert_eq!(flags, want);
    assert_eq!(&find(INFO_NAME).unwrap()[2..], b"disk");
    assert_eq!(&find(INFO_DESCRIPTION).unwrap()[2..], b"a test disk");
    let bs = find(INFO_BLOCK_SIZE).unwrap();
    assert_eq!((be32(&bs[2..]), be32(&bs[6..]), be32(&bs[10..])), (1, 4096, MAX_PAYLOAD));

    // GO still works after all that.
    send_opt(&mut s, OPT_GO, &go_data("disk", &[]));
    loop {
        let (_, typ, _) = recv_opt_reply(&mut s);
        if typ == REP_ACK {
            break;
        }
        assert_eq!(typ, REP_INFO);
    }
    send_req(&mut s, 0, CMD_READ, 1, 0, 512);
    assert_eq!(recv_reply(&mut s), (0, 1));
    assert_eq!(read_exact(&mut s, 512), vec![0; 512]);
    send_req(&mut s, 0, CMD_DISC, 2, 0, 0);
    assert!(closed(&mut s));
}

#[test]
fn abort_gets_an_ack() {
    let (ts, _) = rw_server();
    let mut s = ts.connect();
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    send_opt(&mut s, OPT_ABORT, &[]);
    assert_eq!(recv_opt_reply(&mut s), (OPT_ABORT, REP_ACK, vec![]));
    assert!(closed(&mut s));
}

#[test]
fn export_name_option() {
    let (ts, disk) = rw_server();
    // Unknown export: the protocol has no error reply, the server hangs up.
    let mut s = ts.connect();
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    send_opt(&mut s, OPT_EXPORT_NAME, b"missing");
    assert!(closed(&mut s));
    // Without NO_ZEROES: size, flags, 124 zeroes.
    let mut s = ts.connect();
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    send_opt(&mut s, OPT_EXPORT_NAME, b"ro");
    let r = read_exact(&mut s, 8 + 2 + 124);
    assert_eq!(be64(&r), SIZE as u64);
    let f = u16::from_be_bytes([r[8], r[9]]);
    assert_eq!(f & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
    assert_eq!(f & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FUA), 0);
    assert!(r[10..].iter().all(|&b| b == 0));
    send_req(&mut s, 0, CMD_READ, 5, 0, 8);
    assert_eq!(recv_reply(&mut s), (0, 5));
    assert_eq!(read_exact(&mut s, 8), vec![0x42; 8]);
    // With NO_ZEROES: exactly 10 bytes, then transmission.
    let mut s = ts.connect();
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    send_opt(&mut s, OPT_EXPORT_NAME, b"disk");
    let r = read_exact(&mut s, 10);
    assert_eq!(be64(&r), SIZE as u64);
    send_req(&mut s, 0, CMD_WRITE, 6, 100, 3);
    s.write_all(b"abc").unwrap();
    assert_eq!(recv_reply(&mut s), (0, 6));
    assert_eq!(&disk.snapshot()[100..103], b"abc");
}

#[test]
fn transmission_errors_keep_the_connection() {
    let (ts, disk) = rw_server();
    let mut s = ts.connect();
    let (size, _) = go(&mut s, "disk");
    assert_eq!(size, SIZE as u64);
    let end = SIZE as u64;
    let cases: &[(u16, u16, u64, u32, u32, &str)] = &[
        (0, CMD_READ, 0, 1 << 30, EINVAL, "read of 1 GiB"),
        (0, CMD_READ, 0, MAX_PAYLOAD + 1, EINVAL, "read over the payload cap"),
        (0, CMD_READ, end, 1, EINVAL, "read past the end"),
        (0, CMD_READ, end - 1, 2, EINVAL, "read straddling the end"),
        (0, CMD_READ, u64::MAX, 1, EINVAL, "read at u64::MAX (offset+len overflows)"),
        (0, CMD_TRIM, end - 4096, 8192, EINVAL, "trim past the end"),
        (0, CMD_WRITE_ZEROES, end, 1, ENOSPC, "write zeroes past the end"),
        (0, CMD_WRITE_ZEROES, u64::MAX - 1, 4, ENOSPC, "write zeroes overflowing"),
        (0, 99, 0, 0, EINVAL, "unknown command"),
        (0, CMD_CACHE, 0, 512, EINVAL, "CACHE (not advertised)"),
        (0, CMD_BLOCK_STATUS, 0, 512, EINVAL, "BLOCK_STATUS without meta context"),
        (0, CMD_RESIZE, 0, 0, EINVAL, "RESIZE (not advertised)"),
        (CMD_FLAG_DF, CMD_READ, 0, 512, EINVAL, "DF without structured replies"),
        (CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 0, 512, EINVAL, "FAST_ZERO not advertised"),
        (0x8000, CMD_FLUSH, 0, 0, EINVAL, "unknown command flag"),
        (0, CMD_READ, 0, 0, 0, "zero-length read"),
        (0, CMD_READ, end, 0, 0, "zero-length read at the end"),
        (0, CMD_FLUSH, 0, 0, 0, "flush"),
    ];
    for (i, (flags, cmd, off, len, want, what)) in cases.iter().enumerate() {
        let h = 1000 + i as u64;
        send_req(&mut s, *flags, *cmd, h, *off, *len);
        assert_eq!(recv_reply(&mut s), (*want, h), "{what}");
    }
    // A write past the end: the payload is consumed, ENOSPC, framing intact.
    send_req(&mut s, 0, CMD_WRITE, 1, end - 2, 4);
    s.write_all(&[9, 9, 9, 9]).unwrap();
    assert_eq!(recv_reply(&mut s), (ENOSPC, 1));
    // A write with a bad flag: payload consumed, EINVAL.
    send_req(&mut s, CMD_FLAG_NO_HOLE, CMD_WRITE, 2, 0, 4);
    s.write_all(&[9, 9, 9, 9]).unwrap();
    assert_eq!(recv_reply(&mut s), (EINVAL, 2));
    assert!(disk.snapshot().iter().all(|&b| b == 0), "nothing was written");
    // Pipelined requests are answered in order.
    send_req(&mut s, 0, CMD_WRITE, 10, 0, 2);
    s.write_all(&[7, 8]).unwrap();
    send_req(&mut s, CMD_FLAG_FUA, CMD_WRITE, 11, 2, 2);
    s.write_all(&[9, 10]).unwrap();
    send_req(&mut s, 0, CMD_READ, 12, 0, 4);
    send_req(&mut s, CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 13, 1, 2);
    send_req(&mut s, 0, CMD_READ, 14, 0, 4);
    assert_eq!(recv_reply(&mut s), (0, 10));
    assert_eq!(recv_reply(&mut s), (0, 11));
    assert_eq!(recv_reply(&mut s), (0, 12));
    assert_eq!(read_exact(&mut s, 4), vec![7, 8, 9, 10]);
    assert_eq!(recv_reply(&mut s), (0, 13));
    assert_eq!(recv_reply(&mut s), (0, 14));
    assert_eq!(read_exact(&mut s, 4), vec![7, 0, 0, 10]);
    send_req(&mut s, 0, CMD_DISC, 15, 0, 0);
    assert!(closed(&mut s));
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let (ts, _) = rw_server();
    let mut s = ts.connect();
    let (_, flags) = go(&mut s, "ro");
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    send_req(&mut s, 0, CMD_WRITE, 1, 0, 4);
    s.write_all(&[1, 2, 3, 4]).unwrap();
    assert_eq!(recv_reply(&mut s), (EPERM, 1));
    send_req(&mut s, 0, CMD_TRIM, 2, 0, 4096);
    assert_eq!(recv_reply(&mut s), (EPERM, 2));
    send_req(&mut s, 0, CMD_WRITE_ZEROES, 3, 0, 4096);
    assert_eq!(recv_reply(&mut s), (EPERM, 3));
    send_req(&mut s, 0, CMD_FLUSH, 4, 0, 0);
    assert_eq!(recv_reply(&mut s), (0, 4));
    send_req(&mut s, 0, CMD_READ, 5, 4, 4);
    assert_eq!(recv_reply(&mut s), (0, 5));
    assert_eq!(read_exact(&mut s, 4), vec![0x42; 4]);
}

#[test]
fn oversized_write_gets_einval_and_a_hangup() {
    let (ts, _) = rw_server();
    for len in [1u32 << 30, MAX_PAYLOAD + 1, u32::MAX] {
        let mut s = ts.connect();
        go(&mut s, "disk");
        send_req(&mut s, 0, CMD_WRITE, 77, 0, len);
        assert_eq!(recv_reply(&mut s), (EINVAL, 77));
        assert!(closed(&mut s));
    }
    good_client_roundtrip(&ts, "disk");
}

#[test]
fn announced_write_without_payload_does_not_allocate_it() {
    // A 1 MiB write in range whose payload mostly never comes: the server buffers only what
    // arrives, then sees EOF and drops the connection.
    let (ts, _) = rw_server();
    let mut s = ts.connect();
    go(&mut s, "disk");
    send_req(&mut s, 0, CMD_WRITE, 1, 0, SIZE as u32);
    s.write_all(&[0u8; 100]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed(&mut s));
    good_client_roundtrip(&ts, "disk");
}

#[test]
fn bad_request_magic_and_truncated_requests() {
    let (ts, _) = rw_server();
    let mut s = ts.connect();
    go(&mut s, "disk");
    s.write_all(&[0xde; 28]).unwrap();
    assert!(closed(&mut s));
    let mut s = ts.connect();
    go(&mut s, "disk");
    s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
    drop(s);
    good_client_roundtrip(&ts, "disk");
}

#[test]
fn connection_limit() {
    init_tracing();
    let server = Server::new(single("disk", Arc::new(MemDisk::new(SIZE)))).with_max_connections(1);
    let ts = TestServer::tcp_with(server);
    let mut a = ts.connect();
    let _ = read_exact(&mut a, 18);
    let mut b = ts.connect();
    assert!(closed(&mut b), "second connection should be refused");
    drop(a);
    let t = Instant::now();
    while ts.server.active_connections() != 0 {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    good_client_roundtrip(&ts, "disk");
}

#[test]
fn handshake_timeout_only_applies_to_the_handshake() {
    init_tracing();
    let server = Server::new(single("disk", Arc::new(MemDisk::new(SIZE))))
        .with_handshake_timeout(Some(Duration::from_millis(300)));
    let ts = TestServer::tcp_with(server);
    let mut idle = ts.connect();
    let _ = read_exact(&mut idle, 18);
    let t = Instant::now();
    assert!(closed(&mut idle));
    assert!(t.elapsed() < Duration::from_secs(5));
    // In transmission, idling longer than the timeout is fine.
    let mut s = ts.connect();
    go(&mut s, "disk");
    std::thread::sleep(Duration::from_millis(700));
    send_req(&mut s, 0, CMD_READ, 1, 0, 16);
    assert_eq!(recv_reply(&mut s), (0, 1));
    assert_eq!(read_exact(&mut s, 16), vec![0; 16]);
}

#[test]
fn stop_closes_clients_and_returns() {
    let (ts, _) = rw_server();
    let mut s = ts.connect();
    go(&mut s, "disk");
    let mut h = ts.connect(); // still in the handshake
    let _ = read_exact(&mut h, 18);
    let t = Instant::now();
    let stop = ts.stop.clone();
    ts.shutdown().expect("serve_tcp returns Ok after stop");
    assert!(stop.is_stopped());
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(closed(&mut s));
    assert!(closed(&mut h));
}

#[test]
fn stop_unix_server() {
    init_tracing();
    let ts = TestServer::unix(single("disk", Arc::new(MemDisk::new(SIZE))));
    let mut c = UnixStream::connect(ts.socket.as_ref().unwrap()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    go(&mut c, "disk");
    ts.shutdown().unwrap();
    assert!(closed(&mut c));
}

#[test]
fn handle_connection_reports_errors_and_shutdown() {
    init_tracing();
    let server = Server::new(single("disk", Arc::new(MemDisk::new(SIZE))));
    let run = |f: fn(&mut UnixStream)| {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let srv = server.clone();
        let t = std::thread::spawn(move || srv.handle_connection(b));
        f(&mut a);
        drop(a); // the client hangs up
        t.join().expect("connection thread panicked")
    };
    let r = run(|a| {
        greet(a, 0x40);
    });
    assert!(matches!(r, Err(NbdError::BadClientFlags(0x40))), "{r:?}");
    let r = run(|a| {
        greet(a, 1);
        a.write_all(&[0u8; 16]).unwrap();
    });
    assert!(matches!(r, Err(NbdError::BadMagic { .. })), "{r:?}");
    let r = run(|a| {
        greet(a, 1);
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&[0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff]);
        a.write_all(&m).unwrap();
    });
    assert!(matches!(r, Err(NbdError::OptionTooLong { len: u32::MAX, .. })), "{r:?}");
    let r = run(|a| {
        greet(a, 1);
        send_opt(a, OPT_EXPORT_NAME, b"zzz");
    });
    assert!(matches!(r, Err(NbdError::UnknownExport(ref n)) if n == "zzz"), "{r:?}");
    let r = run(|a| {
        go(a, "disk");
        send_req(a, 0, CMD_WRITE, 1, 0, 1 << 30);
        assert_eq!(recv_reply(a), (EINVAL, 1));
    });
    assert!(matches!(r, Err(NbdError::RequestTooLarge { .. })), "{r:?}");
    let r = run(|a| {
        go(a, "disk");
        send_req(a, 0, CMD_DISC, 1, 0, 0);
    });
    assert!(r.is_ok(), "{r:?}");
    let r = run(|a| {
        go(a, "disk");
        send_req(a, 0, CMD_READ, 1, 0, 8);
        // The client closes in the middle of reading the reply: no panic, an error or Ok.
    });
    let _ = r;
    // After stop, a handle_connection client gets ESHUTDOWN on its next request.
    let r = run(|a| {
        go(a, "disk");
    });
    assert!(r.is_ok(), "EOF at a request boundary is a clean end: {r:?}");
    let stop = server.stop_handle();
    let (mut a, b) = UnixStream::pair().unwrap();
    a.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let srv = server.clone();
    let t = std::thread::spawn(move || srv.handle_connection(b));
    go(&mut a, "disk");
    stop.stop();
    send_req(&mut a, 0, CMD_READ, 3, 0, 8);
    assert_eq!(recv_reply(&mut a), (ESHUTDOWN, 3));
    assert!(matches!(t.join().unwrap(), Err(NbdError::Shutdown)));
}

/// A scripted in-memory peer: the client's bytes in, the server's bytes out.
struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}
impl Read for Duplex {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(b)
    }
}
impl Write for Duplex {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.output.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// xorshift64*: deterministic, dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn option_bytes(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    send_opt(&mut v, opt, data);
    v
}

#[test]
fn random_garbage_never_panics() {
    init_tracing();
    let disk = Arc::new(MemDisk::new(64 * 1024));
    let server = Server::new(single("d", disk.clone()));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut prefix = 1u32.to_be_bytes().to_vec();
    prefix.extend(option_bytes(OPT_GO, &go_data("d", &[])));
    for iter in 0..3000 {
        let mut input = Vec::new();
        match iter % 3 {
            // Pure garbage from the first byte.
            0 => {}
            // A valid handshake prefix, then mutated options.
            1 => input.extend_from_slice(&1u32.to_be_bytes()),
            // In transmission, then structured-looking garbage requests.
            _ => input.extend_from_slice(&prefix),
        }
        for _ in 0..rng.below(20) {
            match rng.below(4) {
                0 => {
                    let n = rng.below(64) as usize;
                    input.extend((0..n).map(|_| rng.next() as u8));
                }
                1 => {
                    let opt = rng.below(14) as u32;
                    let n = rng.below(32) as usize;
                    let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                    input.extend(option_bytes(opt, &data));
                }
                _ => {
                    let cmd = rng.below(10) as u16;
                    let flags = if rng.below(4) == 0 { rng.next() as u16 } else { 0 };
                    let off = match rng.below(4) {
                        0 => rng.next(),
                        _ => rng.below(70 * 1024),
                    };
                    let len = match rng.below(4) {
                        0 => rng.next() as u32,
                        _ => rng.below(8192) as u32,
                    };
                    let mut v = Vec::new();
                    send_req(&mut v, flags, cmd, rng.next(), off, len);
                    input.extend(v);
                    if cmd == CMD_WRITE && rng.below(2) == 0 {
                        let n = (len as usize).min(8192);
                        input.extend((0..n).map(|_| rng.next() as u8));
                    }
                }
            }
        }
        let mut d = Duplex { input: Cursor::new(input), output: Vec::new() };
        let _ = server.handle_connection(&mut d);
        assert!(d.output.len() < 16 << 20, "output bounded");
    }
    assert_eq!(disk.snapshot().len(), 64 * 1024);
}
