//! One NBD connection: fixed newstyle handshake, then the transmission phase with simple
//! replies, served one request at a time.

use std::io::{self, Read, Write};
use std::sync::Arc;

use tracing::{debug, info, trace, warn};
use xensnap_blockdev::{check_range, BlockDevice, BlockError};

use crate::error::NbdError;
use crate::proto::*;
use crate::registry::ExportRegistry;
use crate::server::StopState;

/// What option haggling settled on.
struct Export {
    name: String,
    device: Arc<dyn BlockDevice>,
    /// Size advertised to the client; requests are checked against it.
    size: u64,
    flags: u16,
}

/// Serve one client until it disconnects.
pub(crate) fn serve<S: Read + Write>(
    stream: &mut S,
    registry: &dyn ExportRegistry,
    stop: &StopState,
    on_transmission: &mut dyn FnMut(),
) -> Result<(), NbdError> {
    match handshake(stream, registry, stop)? {
        Some(export) => {
            on_transmission();
            info!(
                export = %export.name,
                size = export.size,
                flags = format_args!("{:#x}", export.flags),
                "entering transmission phase"
            );
            transmission(stream, &export, stop)
        }
        None => Ok(()),
    }
}

/// Read exactly `buf.len()` bytes; `Ok(false)` if the peer closed the stream cleanly before
/// the first byte (a message boundary), an `UnexpectedEof` error if it closed mid-message.
fn read_exact_or_eof<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut done = 0;
    while done < buf.len() {
        match r.read(&mut buf[done..]) {
            Ok(0) if done == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed mid-message")),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn be_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[..2]);
    u16::from_be_bytes(a)
}
fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_be_bytes(a)
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Send one option reply (fixed newstyle format).
fn opt_reply<W: Write>(w: &mut W, option: u32, reply: u32, data: &[u8]) -> io::Result<()> {
    let len =
        u32::try_from(data.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "option reply too long"))?;
    let mut msg = Vec::with_capacity(20 + data.len());
    msg.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    msg.extend_from_slice(&option.to_be_bytes());
    msg.extend_from_slice(&reply.to_be_bytes());
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(data);
    w.write_all(&msg)?;
    w.flush()
}

/// Send an option error reply with a human-readable message.
fn opt_error<W: Write>(w: &mut W, option: u32, reply: u32, msg: &str) -> io::Result<()> {
    debug!(option = opt_name(option), reply = format_args!("{reply:#x}"), msg, "option refused");
    opt_reply(w, option, reply, msg.as_bytes())
}

fn transmission_flags(registry: &dyn ExportRegistry, name: &str, dev: &dyn BlockDevice) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH;
    if dev.read_only() {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    if registry.can_multi_conn(name, dev) {
        f |= TFLAG_CAN_MULTI_CONN;
    }
    f
}

/// Option haggling. `Ok(None)`: the client left (or aborted) before choosing an export.
fn handshake<S: Read + Write>(
    s: &mut S,
    registry: &dyn ExportRegistry,
    stop: &StopState,
) -> Result<Option<Export>, NbdError> {
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    s.flush()?;

    let mut cf = [0u8; 4];
    if !read_exact_or_eof(s, &mut cf)? {
        debug!("client left before sending its flags");
        return Ok(None);
    }
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // Spec: the server MUST close the connection on unknown client flags.
        return Err(NbdError::BadClientFlags(client_flags));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        debug!("client did not set NBD_FLAG_C_FIXED_NEWSTYLE; answering in fixed newstyle anyway");
    }

    loop {
        let mut hdr = [0u8; 16];
        if !read_exact_or_eof(s, &mut hdr)? {
            debug!("client left during option haggling");
            return Ok(None);
        }
        let magic = be_u64(&hdr[0..8]);
        if magic != IHAVEOPT {
            return Err(NbdError::BadMagic { what: "option magic", got: magic });
        }
        let option = be_u32(&hdr[8..12]);
        let len = be_u32(&hdr[12..16]);
        if len > MAX_OPTION_LEN {
            return Err(NbdError::OptionTooLong { option, len, limit: MAX_OPTION_LEN });
        }
        // Bounded by MAX_OPTION_LEN above.
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        debug!(option = opt_name(option), code = option, len, "option");

        if stop.is_stopped() && option != OPT_ABORT {
            opt_error(s, option, REP_ERR_SHUTDOWN, "server is shutting down")?;
            if option == OPT_EXPORT_NAME {
                return Err(NbdError::Shutdown);
            }
            continue;
        }

        match option {
            OPT_EXPORT_NAME => {
                let name = match std::str::from_utf8(&data) {
                    Ok(n) if n.len() <= MAX_NAME_LEN => n.to_owned(),
                    _ => {
                        return Err(NbdError::UnknownExport(String::from_utf8_lossy(&data).chars().take(256).collect()))
                    }
                };
                let Some(device) = registry.lookup(&name) else {
                    return Err(NbdError::UnknownExport(name));
                };
                let size = device.size();
                let flags = transmission_flags(registry, &name, &*device);
                let mut reply = Vec::with_capacity(10 + 124);
                reply.extend_from_slice(&size.to_be_bytes());
                reply.extend_from_slice(&flags.to_be_bytes());
                if !no_zeroes {
                    reply.resize(10 + 124, 0);
                }
                s.write_all(&reply)?;
                s.flush()?;
                return Ok(Some(Export { name, device, size, flags }));
            }
            OPT_ABORT => {
                // The client may already have closed its end; a failed ACK is not an error.
                let _ = opt_reply(s, option, REP_ACK, &[]);
                debug!("client aborted negotiation");
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_error(s, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                    continue;
                }
                for (name, desc) in registry.list() {
                    let Ok(nlen) = u32::try_from(name.len()) else {
                        continue;
                    };
                    let mut d = Vec::with_capacity(4 + name.len() + desc.len());
                    d.extend_from_slice(&nlen.to_be_bytes());
                    d.extend_from_slice(name.as_bytes());
                    d.extend_from_slice(desc.as_bytes());
                    opt_reply(s, option, REP_SERVER, &d)?;
                }
                opt_reply(s, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                if let Some(export) = info_or_go(s, registry, option, &data)? {
                    return Ok(Some(export));
                }
            }
            OPT_STARTTLS => opt_error(s, option, REP_ERR_UNSUP, "TLS is not supported")?,
            OPT_STRUCTURED_REPLY => opt_error(s, option, REP_ERR_UNSUP, "only simple replies are supported")?,
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => opt_error(
                s,
                option,
                REP_ERR_INVALID,
                "metadata contexts need structured replies, which were not negotiated",
            )?,
            _ => opt_error(s, option, REP_ERR_UNSUP, "option not supported")?,
        }
    }
}

/// `NBD_OPT_INFO` / `NBD_OPT_GO`. Returns the export when a GO succeeded.
fn info_or_go<S: Read + Write>(
    s: &mut S,
    registry: &dyn ExportRegistry,
    option: u32,
    data: &[u8],
) -> Result<Option<Export>, NbdError> {
    // Data: u32 name length, name, u16 number of info requests, that many u16.
    let parsed = (|| {
        let name_len = usize::try_from(be_u32(data.get(0..4)?)).ok()?;
        let name_end = 4usize.checked_add(name_len)?;
        let name = data.get(4..name_end)?;
        let n = usize::from(be_u16(data.get(name_end..name_end.checked_add(2)?)?));
        let reqs = data.get(name_end + 2..)?;
        if reqs.len() != 2 * n {
            return None;
        }
        Some((name, reqs.chunks_exact(2).map(be_u16).collect::<Vec<u16>>()))
    })();
    let Some((name, reqs)) = parsed else {
        opt_error(s, option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO data")?;
        return Ok(None);
    };
    let name = match std::str::from_utf8(name) {
        Ok(n) if n.len() <= MAX_NAME_LEN => n,
        _ => {
            opt_error(s, option, REP_ERR_INVALID, "export name is not a valid string")?;
            return Ok(None);
        }
    };
    let Some(device) = registry.lookup(name) else {
        opt_error(s, option, REP_ERR_UNKNOWN, &format!("no export named {name:?}"))?;
        return Ok(None);
    };
    let size = device.size();
    let flags = transmission_flags(registry, name, &*device);

    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&size.to_be_bytes());
    info.extend_from_slice(&flags.to_be_bytes());
    opt_reply(s, option, REP_INFO, &info)?;

    if reqs.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        opt_reply(s, option, REP_INFO, &d)?;
    }
    if reqs.contains(&INFO_DESCRIPTION) {
        if let Some(desc) = registry.description(name) {
            let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
            d.extend_from_slice(truncate_str(&desc, MAX_NAME_LEN).as_bytes());
            opt_reply(s, option, REP_INFO, &d)?;
        }
    }
    // Always sent: our constraints are loose (any alignment), only the payload cap matters.
    let mut bs = Vec::with_capacity(14);
    bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&1u32.to_be_bytes());
    bs.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    bs.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
    opt_reply(s, option, REP_INFO, &bs)?;

    opt_reply(s, option, REP_ACK, &[])?;
    if option == OPT_GO {
        Ok(Some(Export { name: name.to_owned(), device, size, flags }))
    } else {
        Ok(None)
    }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate_str(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Map a device error to an NBD error value. `write` selects the spec's ENOSPC for
/// write-type requests past the end of the export (EINVAL for reads and trims).
fn errno(e: &BlockError, write: bool) -> u32 {
    match e {
        BlockError::OutOfRange { .. } if write => ENOSPC,
        BlockError::OutOfRange { .. } => EINVAL,
        BlockError::ReadOnly => EPERM,
        BlockError::Unsupported(_) => ENOTSUP,
        BlockError::NoSpace => ENOSPC,
        BlockError::Io(_) => EIO,
    }
}

fn reply_header(buf: &mut [u8], error: u32, handle: u64) {
    buf[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    buf[4..8].copy_from_slice(&error.to_be_bytes());
    buf[8..16].copy_from_slice(&handle.to_be_bytes());
}

fn simple_reply<W: Write>(w: &mut W, handle: u64, error: u32) -> io::Result<()> {
    let mut h = [0u8; SIMPLE_REPLY_HEADER_LEN];
    reply_header(&mut h, error, handle);
    w.write_all(&h)?;
    w.flush()
}

/// Zeroes written per chunk when a device cannot do `write_zeroes` itself.
const ZERO_CHUNK: usize = 1024 * 1024;

fn write_zeroes_fallback(dev: &dyn BlockDevice, offset: u64, len: u64) -> Result<(), BlockError> {
    let zeroes = vec![0u8; ZERO_CHUNK.min(usize::try_from(len).unwrap_or(ZERO_CHUNK))];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64);
        // n <= zeroes.len(), so the cast and slice are in range.
        dev.write_at(offset + done, &zeroes[..n as usize])?;
        done += n;
    }
    Ok(())
}

fn flush_if(dev: &dyn BlockDevice, fua: bool) -> Result<(), BlockError> {
    if fua {
        dev.flush()
    } else {
        Ok(())
    }
}

/// Validate a request against the export before any I/O: `Some(error)` to refuse it.
fn check_request(cmd: u16, flags: u16, offset: u64, len: u32, size: u64, ro: bool) -> Option<u32> {
    let in_range = check_range(offset, u64::from(len), size).is_ok();
    let allowed = match cmd {
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_DISC => return None,
        other => {
            debug!(cmd = other, name = cmd_name(other), "unsupported command");
            return Some(EINVAL);
        }
    };
    if flags & !allowed != 0 {
        return Some(EINVAL);
    }
    match cmd {
        CMD_READ if len > MAX_PAYLOAD || !in_range => Some(EINVAL),
        CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if ro => Some(EPERM),
        CMD_WRITE | CMD_WRITE_ZEROES if !in_range => Some(ENOSPC),
        CMD_TRIM if !in_range => Some(EINVAL),
        _ => None,
    }
}

fn transmission<S: Read + Write>(s: &mut S, export: &Export, stop: &StopState) -> Result<(), NbdError> {
    let dev = &*export.device;
    let ro = export.flags & TFLAG_READ_ONLY != 0;
    // Reused for read replies (header + data) and write payloads; at most
    // MAX_PAYLOAD + header bytes.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut h = [0u8; REQUEST_HEADER_LEN];
        if !read_exact_or_eof(s, &mut h)? {
            debug!("client closed the connection without NBD_CMD_DISC");
            return Ok(());
        }
        let magic = be_u32(&h[0..4]);
        if magic != REQUEST_MAGIC {
            return Err(NbdError::BadMagic { what: "request magic", got: u64::from(magic) });
        }
        let flags = be_u16(&h[4..6]);
        let cmd = be_u16(&h[6..8]);
        let handle = be_u64(&h[8..16]);
        let offset = be_u64(&h[16..24]);
        let len = be_u32(&h[24..28]);
        let fua = flags & CMD_FLAG_FUA != 0;
        trace!(cmd = cmd_name(cmd), flags, handle, offset, len, "request");

        if cmd == CMD_WRITE && len > MAX_PAYLOAD {
            // We will not buffer (or skip) that much; report and hang up.
            warn!(len, "write request too large, disconnecting");
            simple_reply(s, handle, EINVAL)?;
            return Err(NbdError::RequestTooLarge { len, limit: MAX_PAYLOAD });
        }
        // Error decided before touching the device (bad flags, read-only, out of range).
        let early = check_request(cmd, flags, offset, len, export.size, ro);
        if cmd == CMD_WRITE {
            if early.is_some() || stop.is_stopped() {
                // Skip the payload without buffering it.
                let n = io::copy(&mut (&mut *s).take(u64::from(len)), &mut io::sink())?;
                if n != u64::from(len) {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
            } else {
                // Grows only as data arrives: a client announcing a large write and sending
                // nothing does not make us allocate.
                buf.clear();
                buf.reserve((len as usize).min(1 << 20));
                (&mut *s).take(u64::from(len)).read_to_end(&mut buf)?;
                if buf.len() != len as usize {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                }
            }
        }
        if cmd == CMD_DISC {
            debug!("client sent NBD_CMD_DISC");
            return Ok(());
        }
        if stop.is_stopped() {
            simple_reply(s, handle, ESHUTDOWN)?;
            return Err(NbdError::Shutdown);
        }
        if let Some(error) = early {
            trace!(cmd = cmd_name(cmd), handle, error, "request refused");
            simple_reply(s, handle, error)?;
            continue;
        }

        let error = match cmd {
            CMD_READ => {
                let total = SIMPLE_REPLY_HEADER_LEN + len as usize;
                buf.resize(total, 0);
                match dev.read_at(offset, &mut buf[SIMPLE_REPLY_HEADER_LEN..total]) {
                    Ok(()) => {
                        reply_header(&mut buf[..SIMPLE_REPLY_HEADER_LEN], 0, handle);
                        s.write_all(&buf[..total])?;
                        s.flush()?;
                        continue;
                    }
                    Err(e) => {
                        debug!(offset, len, error = %e, "read failed");
                        errno(&e, false)
                    }
                }
            }
            CMD_WRITE => match dev.write_at(offset, &buf).and_then(|()| flush_if(dev, fua)) {
                Ok(()) => 0,
                Err(e) => {
                    debug!(offset, len, error = %e, "write failed");
                    errno(&e, true)
                }
            },
            CMD_FLUSH => match dev.flush() {
                Ok(()) => 0,
                Err(e) => {
                    warn!(error = %e, "flush failed");
                    errno(&e, true)
                }
            },
            CMD_TRIM => match dev.discard(offset, u64::from(len)) {
                // Trim is advisory: a device that cannot discard just keeps the data.
                Ok(()) | Err(BlockError::Unsupported(_)) => match flush_if(dev, fua) {
                    Ok(()) => 0,
                    Err(e) => errno(&e, true),
                },
                Err(e) => {
                    debug!(offset, len, error = %e, "trim failed");
                    errno(&e, false)
                }
            },
            CMD_WRITE_ZEROES => {
                let may_unmap = flags & CMD_FLAG_NO_HOLE == 0;
                let res = match dev.write_zeroes(offset, u64::from(len), may_unmap) {
                    Err(BlockError::Unsupported(_)) => write_zeroes_fallback(dev, offset, u64::from(len)),
                    r => r,
                };
                match res.and_then(|()| flush_if(dev, fua)) {
                    Ok(()) => 0,
                    Err(e) => {
                        debug!(offset, len, error = %e, "write_zeroes failed");
                        errno(&e, true)
                    }
                }
            }
            // check_request refused everything else.
            _ => EINVAL,
        };
        if error != 0 {
            trace!(cmd = cmd_name(cmd), handle, error, "error reply");
        }
        simple_reply(s, handle, error)?;
        // Do not keep a huge buffer around after a one-off big request.
        if buf.capacity() > 4 * 1024 * 1024 && len < 1024 * 1024 {
            buf = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_checks() {
        let size = 1 << 20;
        assert_eq!(check_request(CMD_READ, 0, 0, 4096, size, false), None);
        assert_eq!(check_request(CMD_READ, 0, size, 0, size, false), None);
        assert_eq!(check_request(CMD_READ, 0, size, 1, size, false), Some(EINVAL));
        assert_eq!(check_request(CMD_READ, 0, u64::MAX, u32::MAX, size, false), Some(EINVAL));
        assert_eq!(check_request(CMD_READ, 0, 0, MAX_PAYLOAD + 1, u64::MAX, false), Some(EINVAL));
        assert_eq!(check_request(CMD_READ, CMD_FLAG_DF, 0, 1, size, false), Some(EINVAL));
        assert_eq!(check_request(CMD_WRITE, 0, size - 1, 2, size, false), Some(ENOSPC));
        assert_eq!(check_request(CMD_WRITE, 0, 0, 2, size, true), Some(EPERM));
        assert_eq!(check_request(CMD_WRITE, CMD_FLAG_FUA, 0, 2, size, false), None);
        assert_eq!(check_request(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 2, size, false), Some(EINVAL));
        assert_eq!(check_request(CMD_TRIM, 0, size, 1, size, false), Some(EINVAL));
        assert_eq!(check_request(CMD_TRIM, 0, 0, 1, size, true), Some(EPERM));
        assert_eq!(check_request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 1, size, false), None);
        assert_eq!(check_request(CMD_WRITE_ZEROES, 0, size, 1, size, false), Some(ENOSPC));
        assert_eq!(check_request(CMD_FLUSH, 0, 0, 0, size, true), None);
        assert_eq!(check_request(CMD_DISC, 0xffff, 0, 0, size, false), None);
        assert_eq!(check_request(CMD_CACHE, 0, 0, 1, size, false), Some(EINVAL));
        assert_eq!(check_request(1000, 0, 0, 0, size, false), Some(EINVAL));
    }

    #[test]
    fn error_mapping() {
        let oor = BlockError::OutOfRange { offset: 1, len: 1, size: 1 };
        assert_eq!(errno(&oor, false), EINVAL);
        assert_eq!(errno(&oor, true), ENOSPC);
        assert_eq!(errno(&BlockError::ReadOnly, true), EPERM);
        assert_eq!(errno(&BlockError::Unsupported("x"), true), ENOTSUP);
        assert_eq!(errno(&BlockError::NoSpace, true), ENOSPC);
        assert_eq!(errno(&BlockError::Io("x".into()), false), EIO);
    }

    #[test]
    fn truncation_keeps_utf8() {
        assert_eq!(truncate_str("h\u{e9}llo", 2), "h");
        assert_eq!(truncate_str("h\u{e9}llo", 3), "h\u{e9}");
        assert_eq!(truncate_str("abc", 10), "abc");
    }
}
