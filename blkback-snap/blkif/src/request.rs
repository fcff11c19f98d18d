//! Request decoding and validation.
//!
//! Two steps, both pure functions over bytes the backend has already copied out of shared
//! memory (so the guest cannot change a field between check and use):
//! 1. [`parse_request`]: bytes of one ring entry -> [`RawRequest`] (never fails on content).
//! 2. [`check_request`]: [`RawRequest`] + [`Limits`] -> [`Checked`] or a [`Rejection`] carrying
//!    the status to answer with. Indirect requests are checked in two halves: the header here,
//!    the segment descriptors (fetched from the indirect pages) with [`check_segments`].

use crate::abi::*;

/// One `blkif_request_segment`: a part of one granted page, in 512-byte sectors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Segment {
    pub gref: u32,
    pub first_sect: u8,
    pub last_sect: u8,
}

impl Segment {
    /// Sectors covered, assuming the segment passed [`Segment::is_valid`].
    pub fn nr_sectors(&self) -> u64 {
        u64::from(self.last_sect - self.first_sect) + 1
    }
    /// Byte offset inside the page.
    pub fn offset(&self) -> usize {
        usize::from(self.first_sect) * SECTOR_SIZE as usize
    }
    #[allow(clippy::len_without_is_empty)] // a valid segment is never empty
    pub fn len(&self) -> usize {
        self.nr_sectors() as usize * SECTOR_SIZE as usize
    }
    pub fn is_valid(&self) -> bool {
        self.first_sect <= self.last_sect && self.last_sect < SECTORS_PER_PAGE
    }
    fn decode(b: &[u8]) -> Segment {
        Segment { gref: le32(b, 0), first_sect: b[4], last_sect: b[5] }
    }
    fn encode(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&self.gref.to_le_bytes());
        out[4] = self.first_sect;
        out[5] = self.last_sect;
        out[6] = 0;
        out[7] = 0;
    }
}

/// A decoded, unchecked ring entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawRequest {
    /// READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE (`struct blkif_request`).
    Rw {
        operation: u8,
        nr_segments: u8,
        handle: u16,
        id: u64,
        sector_number: u64,
        seg: [Segment; MAX_SEGMENTS_PER_REQUEST],
    },
    /// `struct blkif_request_discard`.
    Discard { flag: u8, handle: u16, id: u64, sector_number: u64, nr_sectors: u64 },
    /// `struct blkif_request_indirect`.
    Indirect {
        indirect_op: u8,
        nr_segments: u16,
        id: u64,
        sector_number: u64,
        handle: u16,
        indirect_grefs: [u32; MAX_INDIRECT_PAGES_PER_REQUEST],
    },
    /// Any other operation code; only `id` is meaningful.
    Other { operation: u8, id: u64 },
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// Decode one ring entry. `entry` must hold at least `abi.entry_size()` bytes
/// (returns `None` otherwise).
pub fn parse_request(abi: Abi, entry: &[u8]) -> Option<RawRequest> {
    if entry.len() < abi.entry_size() {
        return None;
    }
    let b = &entry[..abi.entry_size()];
    let operation = b[0];
    let id = le64(b, abi.off_id());
    let sector_number = le64(b, abi.off_sector());
    Some(match operation {
        BLKIF_OP_READ | BLKIF_OP_WRITE | BLKIF_OP_WRITE_BARRIER | BLKIF_OP_FLUSH_DISKCACHE => {
            let mut seg = [Segment::default(); MAX_SEGMENTS_PER_REQUEST];
            for (i, s) in seg.iter_mut().enumerate() {
                let o = abi.off_segs() + i * SEGMENT_SIZE;
                *s = Segment::decode(&b[o..o + SEGMENT_SIZE]);
            }
            RawRequest::Rw { operation, nr_segments: b[1], handle: le16(b, 2), id, sector_number, seg }
        }
        BLKIF_OP_DISCARD => RawRequest::Discard {
            flag: b[1],
            handle: le16(b, 2),
            id,
            sector_number,
            nr_sectors: le64(b, abi.off_discard_nr_sectors()),
        },
        BLKIF_OP_INDIRECT => {
            let mut indirect_grefs = [0u32; MAX_INDIRECT_PAGES_PER_REQUEST];
            for (i, g) in indirect_grefs.iter_mut().enumerate() {
                *g = le32(b, abi.off_indirect_grefs() + 4 * i);
            }
            RawRequest::Indirect {
                indirect_op: b[1],
                nr_segments: le16(b, 2),
                id,
                sector_number,
                handle: le16(b, abi.off_indirect_handle()),
                indirect_grefs,
            }
        }
        _ => RawRequest::Other { operation, id },
    })
}

impl RawRequest {
    pub fn id(&self) -> u64 {
        match *self {
            RawRequest::Rw { id, .. }
            | RawRequest::Discard { id, .. }
            | RawRequest::Indirect { id, .. }
            | RawRequest::Other { id, .. } => id,
        }
    }

    /// The `operation` byte on the ring.
    pub fn operation(&self) -> u8 {
        match *self {
            RawRequest::Rw { operation, .. } | RawRequest::Other { operation, .. } => operation,
            RawRequest::Discard { .. } => BLKIF_OP_DISCARD,
            RawRequest::Indirect { .. } => BLKIF_OP_INDIRECT,
        }
    }

    /// The operation echoed in the response. For indirect requests this is `indirect_op`,
    /// as Linux blkback does (Linux blkfront only accepts READ/WRITE/flush/discard codes).
    pub fn response_operation(&self) -> u8 {
        match *self {
            RawRequest::Indirect { indirect_op, .. } => indirect_op,
            _ => self.operation(),
        }
    }

    /// Encode as one ring entry (`abi.entry_size()` bytes, padding zeroed).
    pub fn encode(&self, abi: Abi) -> Vec<u8> {
        let mut b = vec![0u8; abi.entry_size()];
        b[0] = self.operation();
        b[abi.off_id()..abi.off_id() + 8].copy_from_slice(&self.id().to_le_bytes());
        match self {
            RawRequest::Rw { nr_segments, handle, sector_number, seg, .. } => {
                b[1] = *nr_segments;
                b[2..4].copy_from_slice(&handle.to_le_bytes());
                put64(&mut b, abi.off_sector(), *sector_number);
                for (i, s) in seg.iter().enumerate() {
                    let o = abi.off_segs() + i * SEGMENT_SIZE;
                    s.encode(&mut b[o..o + SEGMENT_SIZE]);
                }
            }
            RawRequest::Discard { flag, handle, sector_number, nr_sectors, .. } => {
                b[1] = *flag;
                b[2..4].copy_from_slice(&handle.to_le_bytes());
                put64(&mut b, abi.off_sector(), *sector_number);
                put64(&mut b, abi.off_discard_nr_sectors(), *nr_sectors);
            }
            RawRequest::Indirect { indirect_op, nr_segments, sector_number, handle, indirect_grefs, .. } => {
                b[1] = *indirect_op;
                b[2..4].copy_from_slice(&nr_segments.to_le_bytes());
                put64(&mut b, abi.off_sector(), *sector_number);
                let h = abi.off_indirect_handle();
                b[h..h + 2].copy_from_slice(&handle.to_le_bytes());
                for (i, g) in indirect_grefs.iter().enumerate() {
                    let o = abi.off_indirect_grefs() + 4 * i;
                    b[o..o + 4].copy_from_slice(&g.to_le_bytes());
                }
            }
            RawRequest::Other { .. } => {}
        }
        b
    }

    /// Convenience constructor for a read/write-family request with up to 11 segments
    /// (more are silently cut; `nr_segments` is set to `segs.len()` as given, so callers can
    /// also build hostile counts with [`RawRequest::Rw`] directly).
    pub fn rw(operation: u8, id: u64, sector_number: u64, segs: &[Segment]) -> RawRequest {
        let mut seg = [Segment::default(); MAX_SEGMENTS_PER_REQUEST];
        for (d, s) in seg.iter_mut().zip(segs) {
            *d = *s;
        }
        RawRequest::Rw { operation, nr_segments: segs.len().min(255) as u8, handle: 0, id, sector_number, seg }
    }

    /// Convenience constructor for an indirect request: `nr_segments` as given (hostile
    /// counts included), the first 8 of `grefs` as its indirect pages (more are cut).
    pub fn indirect(indirect_op: u8, id: u64, sector_number: u64, nr_segments: u16, grefs: &[u32]) -> RawRequest {
        let mut indirect_grefs = [0u32; MAX_INDIRECT_PAGES_PER_REQUEST];
        for (d, g) in indirect_grefs.iter_mut().zip(grefs) {
            *d = *g;
        }
        RawRequest::Indirect { indirect_op, nr_segments, id, sector_number, handle: 0, indirect_grefs }
    }
}

fn put64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}

/// Encode a response into `out` (`abi.response_size()` bytes; padding zeroed).
pub fn encode_response(abi: Abi, id: u64, operation: u8, status: i16, out: &mut [u8]) {
    let out = &mut out[..abi.response_size()];
    out.fill(0);
    out[0..8].copy_from_slice(&id.to_le_bytes());
    out[8] = operation;
    out[10..12].copy_from_slice(&status.to_le_bytes());
}

/// Decode a response (`id`, `operation`, `status`).
pub fn decode_response(abi: Abi, b: &[u8]) -> Option<(u64, u8, i16)> {
    if b.len() < abi.response_size() {
        return None;
    }
    Some((le64(b, 0), b[8], i16::from_le_bytes([b[10], b[11]])))
}

/// Parse `n` segment descriptors from the concatenated contents of indirect pages.
pub fn parse_segment_array(bytes: &[u8], n: usize) -> Vec<Segment> {
    bytes.chunks_exact(SEGMENT_SIZE).take(n).map(Segment::decode).collect()
}

/// Encode segment descriptors as they lie in indirect pages.
pub fn encode_segment_array(segs: &[Segment]) -> Vec<u8> {
    let mut out = vec![0u8; segs.len() * SEGMENT_SIZE];
    for (s, o) in segs.iter().zip(out.chunks_exact_mut(SEGMENT_SIZE)) {
        s.encode(o);
    }
    out
}

/// What the backend offers and the disk it serves: everything validation needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Disk size in 512-byte sectors (rounded down).
    pub sectors: u64,
    pub read_only: bool,
    /// "feature-flush-cache".
    pub flush: bool,
    /// "feature-barrier".
    pub barrier: bool,
    /// "feature-discard".
    pub discard: bool,
    /// "discard-secure".
    pub discard_secure: bool,
    /// "feature-max-indirect-segments"; 0 = indirect descriptors not offered.
    pub max_indirect_segments: u32,
}

/// Where the segments of a checked I/O request are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SegList {
    /// Inline segments, already checked (and the disk range with them).
    Direct(Vec<Segment>),
    /// `nr_segments` descriptors in the first `pages.len()` indirect pages; they must be
    /// fetched and checked with [`check_segments`] before any I/O.
    Indirect { nr_segments: u16, pages: Vec<u32> },
}

impl SegList {
    pub fn nr_segments(&self) -> usize {
        match self {
            SegList::Direct(v) => v.len(),
            SegList::Indirect { nr_segments, .. } => usize::from(*nr_segments),
        }
    }
}

/// A request that passed [`check_request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Checked {
    /// Read `segs` starting at `sector`.
    Read { id: u64, op: u8, sector: u64, segs: SegList },
    /// Write `segs` at `sector`; for FLUSH_DISKCACHE / WRITE_BARRIER carrying data the backend
    /// flushes before and after (preflush + FUA semantics, what Linux blkfront means by them).
    Write { id: u64, op: u8, sector: u64, segs: SegList, flush_before: bool, flush_after: bool },
    /// FLUSH_DISKCACHE / WRITE_BARRIER without data.
    Flush { id: u64, op: u8 },
    /// Discard `nr_sectors` at `sector` (may be 0: a no-op).
    Discard { id: u64, sector: u64, nr_sectors: u64, secure: bool },
}

impl Checked {
    pub fn id(&self) -> u64 {
        match *self {
            Checked::Read { id, .. }
            | Checked::Write { id, .. }
            | Checked::Flush { id, .. }
            | Checked::Discard { id, .. } => id,
        }
    }
    pub fn op(&self) -> u8 {
        match *self {
            Checked::Read { op, .. } | Checked::Write { op, .. } | Checked::Flush { op, .. } => op,
            Checked::Discard { .. } => BLKIF_OP_DISCARD,
        }
    }
}

/// A request refused before any I/O: answer `status` for `id`/`operation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    pub id: u64,
    pub operation: u8,
    pub status: i16,
    pub reason: &'static str,
}

/// Check a segment list and the disk range it covers, returning the number of sectors.
pub fn check_segments(segs: &[Segment], sector: u64, sectors: u64) -> Result<u64, &'static str> {
    let mut total: u64 = 0;
    for s in segs {
        if s.last_sect >= SECTORS_PER_PAGE {
            return Err("segment last_sect beyond the page");
        }
        if s.first_sect > s.last_sect {
            return Err("segment first_sect > last_sect");
        }
        total += s.nr_sectors(); // <= 8 * 4096 segments: cannot overflow
    }
    match sector.checked_add(total) {
        Some(end) if end <= sectors => Ok(total),
        Some(_) => Err("request reaches past the end of the disk"),
        None => Err("sector_number overflows"),
    }
}

/// Validate a decoded request against the negotiated features and the disk.
pub fn check_request(req: &RawRequest, lim: &Limits) -> Result<Checked, Rejection> {
    let id = req.id();
    let operation = req.response_operation();
    let reject = |status, reason| Err(Rejection { id, operation, status, reason });
    let error = |reason| reject(BLKIF_RSP_ERROR, reason);
    match *req {
        RawRequest::Other { .. } => reject(BLKIF_RSP_EOPNOTSUPP, "unknown operation"),
        RawRequest::Rw { operation: op, nr_segments, sector_number, ref seg, .. } => {
            let n = usize::from(nr_segments);
            let flushy = op == BLKIF_OP_FLUSH_DISKCACHE || op == BLKIF_OP_WRITE_BARRIER;
            if op == BLKIF_OP_FLUSH_DISKCACHE && !lim.flush {
                return reject(BLKIF_RSP_EOPNOTSUPP, "flush not offered");
            }
            if op == BLKIF_OP_WRITE_BARRIER && !lim.barrier {
                return reject(BLKIF_RSP_EOPNOTSUPP, "barrier not offered");
            }
            if n > MAX_SEGMENTS_PER_REQUEST {
                return error("too many segments");
            }
            if n == 0 {
                return if flushy { Ok(Checked::Flush { id, op }) } else { error("no segments") };
            }
            if op != BLKIF_OP_READ && lim.read_only {
                return error("write to a read-only disk");
            }
            let segs = seg[..n].to_vec();
            if let Err(reason) = check_segments(&segs, sector_number, lim.sectors) {
                return error(reason);
            }
            let segs = SegList::Direct(segs);
            Ok(if op == BLKIF_OP_READ {
                Checked::Read { id, op, sector: sector_number, segs }
            } else {
                Checked::Write { id, op, sector: sector_number, segs, flush_before: flushy, flush_after: flushy }
            })
        }
        RawRequest::Discard { flag, sector_number, nr_sectors, .. } => {
            if !lim.discard {
                return reject(BLKIF_RSP_EOPNOTSUPP, "discard not offered");
            }
            let secure = flag & BLKIF_DISCARD_SECURE != 0;
            if secure && !lim.discard_secure {
                return reject(BLKIF_RSP_EOPNOTSUPP, "secure discard not offered");
            }
            if lim.read_only {
                return error("discard on a read-only disk");
            }
            match sector_number.checked_add(nr_sectors) {
                Some(end) if end <= lim.sectors => {}
                Some(_) => return error("discard reaches past the end of the disk"),
                None => return error("discard range overflows"),
            }
            Ok(Checked::Discard { id, sector: sector_number, nr_sectors, secure })
        }
        RawRequest::Indirect { indirect_op, nr_segments, sector_number, ref indirect_grefs, .. } => {
            if lim.max_indirect_segments == 0 {
                return reject(BLKIF_RSP_EOPNOTSUPP, "indirect descriptors not offered");
            }
            if indirect_op != BLKIF_OP_READ && indirect_op != BLKIF_OP_WRITE {
                return error("indirect_op is not READ or WRITE");
            }
            let n = usize::from(nr_segments);
            if n == 0 {
                return error("indirect request without segments");
            }
            let pages = n.div_ceil(SEGS_PER_INDIRECT_FRAME);
            if pages > MAX_INDIRECT_PAGES_PER_REQUEST {
                return error("indirect request needs too many indirect pages");
            }
            if n > lim.max_indirect_segments.min(MAX_INDIRECT_SEGMENTS_LIMIT) as usize {
                return error("more indirect segments than offered");
            }
            if sector_number >= lim.sectors {
                // Every segment covers at least one sector.
                return error("request starts past the end of the disk");
            }
            if indirect_op == BLKIF_OP_WRITE && lim.read_only {
                return error("write to a read-only disk");
            }
            let segs = SegList::Indirect { nr_segments, pages: indirect_grefs[..pages].to_vec() };
            Ok(if indirect_op == BLKIF_OP_READ {
                Checked::Read { id, op: indirect_op, sector: sector_number, segs }
            } else {
                Checked::Write {
                    id,
                    op: indirect_op,
                    sector: sector_number,
                    segs,
                    flush_before: false,
                    flush_after: false,
                }
            })
        }
    }
}

/// Fuzz entry point: decode and check arbitrary bytes as a ring entry (and, for indirect
/// requests, the rest of `data` as the indirect pages), asserting the invariants the backend
/// relies on. Must never panic on any input.
pub fn fuzz_parse(data: &[u8]) {
    let Some((&ctl, rest)) = data.split_first() else { return };
    let abi = if ctl & 1 == 0 { Abi::X86_64 } else { Abi::X86_32 };
    let (sectors, rest) = match rest.split_first_chunk::<8>() {
        Some((s, r)) => (u64::from_le_bytes(*s), r),
        None => (u64::from(ctl) << 3, rest),
    };
    let lim = Limits {
        sectors,
        read_only: ctl & 2 != 0,
        flush: ctl & 4 == 0,
        barrier: ctl & 8 == 0,
        discard: ctl & 16 == 0,
        discard_secure: ctl & 32 != 0,
        max_indirect_segments: if ctl & 64 != 0 { 0 } else { 256 + u32::from(ctl >> 7) * 3840 },
    };
    let mut entry = vec![0u8; abi.entry_size()];
    let take = rest.len().min(entry.len());
    entry[..take].copy_from_slice(&rest[..take]);
    let pages = &rest[take..];
    let req = parse_request(abi, &entry).expect("entry is full size");
    // Decoding is stable: re-encoding and decoding gives the same request.
    assert_eq!(parse_request(abi, &req.encode(abi)).as_ref(), Some(&req));
    match check_request(&req, &lim) {
        Err(rej) => {
            assert_eq!(rej.id, req.id());
            assert!(rej.status == BLKIF_RSP_ERROR || rej.status == BLKIF_RSP_EOPNOTSUPP);
        }
        Ok(ok) => {
            assert_eq!(ok.id(), req.id());
            match &ok {
                Checked::Read { sector, segs, .. } | Checked::Write { sector, segs, .. } => {
                    if matches!(ok, Checked::Write { .. }) {
                        assert!(!lim.read_only);
                    }
                    match segs {
                        SegList::Direct(v) => {
                            assert!((1..=MAX_SEGMENTS_PER_REQUEST).contains(&v.len()));
                            let total = check_segments(v, *sector, lim.sectors).unwrap();
                            assert!(v.iter().all(Segment::is_valid));
                            assert!(sector + total <= lim.sectors);
                        }
                        SegList::Indirect { nr_segments, pages: p } => {
                            let n = usize::from(*nr_segments);
                            assert!(n >= 1 && n <= lim.max_indirect_segments as usize);
                            assert!(p.len() <= MAX_INDIRECT_PAGES_PER_REQUEST);
                            assert_eq!(p.len(), n.div_ceil(SEGS_PER_INDIRECT_FRAME));
                            let v = parse_segment_array(pages, n);
                            if let Ok(total) = check_segments(&v, *sector, lim.sectors) {
                                assert!(v.iter().all(Segment::is_valid));
                                assert!(sector + total <= lim.sectors);
                            }
                        }
                    }
                }
                Checked::Flush { .. } => assert!(lim.flush || lim.barrier),
                Checked::Discard { sector, nr_sectors, secure, .. } => {
                    assert!(lim.discard && !lim.read_only);
                    assert!(!secure || lim.discard_secure);
                    assert!(sector.checked_add(*nr_sectors).is_some_and(|e| e <= lim.sectors));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lim() -> Limits {
        Limits {
            sectors: 1000,
            read_only: false,
            flush: true,
            barrier: true,
            discard: true,
            discard_secure: false,
            max_indirect_segments: 256,
        }
    }

    #[test]
    fn roundtrip_all_kinds() {
        for abi in Abi::ALL {
            let segs = [Segment { gref: 9, first_sect: 1, last_sect: 7 }; 3];
            let reqs = [
                RawRequest::rw(BLKIF_OP_WRITE, 0xdead_beef_0000_0001, 12, &segs),
                RawRequest::Discard { flag: 1, handle: 3, id: 5, sector_number: 7, nr_sectors: 9 },
                RawRequest::Indirect {
                    indirect_op: 0,
                    nr_segments: 600,
                    id: u64::MAX,
                    sector_number: 1,
                    handle: 0x1234,
                    indirect_grefs: [1, 2, 3, 4, 5, 6, 7, 8],
                },
                RawRequest::Other { operation: 200, id: 77 },
            ];
            for r in reqs {
                let b = r.encode(abi);
                assert_eq!(b.len(), abi.entry_size());
                assert_eq!(parse_request(abi, &b).unwrap(), r);
            }
        }
    }

    #[test]
    fn rejections() {
        let l = lim();
        let seg = |f, t| Segment { gref: 1, first_sect: f, last_sect: t };
        let st = |r: &RawRequest| check_request(r, &l).map(|_| 0).unwrap_or_else(|e| e.status);
        assert_eq!(st(&RawRequest::rw(0, 1, 0, &[seg(0, 7)])), 0);
        assert_eq!(st(&RawRequest::rw(0, 1, 0, &[seg(3, 2)])), BLKIF_RSP_ERROR);
        assert_eq!(st(&RawRequest::rw(0, 1, 0, &[seg(0, 8)])), BLKIF_RSP_ERROR);
        assert_eq!(st(&RawRequest::rw(0, 1, 992, &[seg(0, 7)])), 0);
        assert_eq!(st(&RawRequest::rw(0, 1, 993, &[seg(0, 7)])), BLKIF_RSP_ERROR);
        assert_eq!(st(&RawRequest::rw(1, 1, u64::MAX - 2, &[seg(0, 7)])), BLKIF_RSP_ERROR);
        assert_eq!(st(&RawRequest::rw(0, 1, 0, &[])), BLKIF_RSP_ERROR);
        assert_eq!(st(&RawRequest::rw(3, 1, 0, &[])), 0);
        let mut r = RawRequest::rw(0, 1, 0, &[seg(0, 0)]);
        if let RawRequest::Rw { nr_segments, .. } = &mut r {
            *nr_segments = 12;
        }
        assert_eq!(st(&r), BLKIF_RSP_ERROR);
        assert_eq!(st(&RawRequest::Other { operation: 4, id: 1 }), BLKIF_RSP_EOPNOTSUPP);
        let d = |flag, s, n| RawRequest::Discard { flag, handle: 0, id: 1, sector_number: s, nr_sectors: n };
        assert_eq!(st(&d(0, 0, 1000)), 0);
        assert_eq!(st(&d(0, 1, 1000)), BLKIF_RSP_ERROR);
        assert_eq!(st(&d(0, 1, u64::MAX)), BLKIF_RSP_ERROR);
        assert_eq!(st(&d(1, 0, 1)), BLKIF_RSP_EOPNOTSUPP);
        let ind = |op, n| RawRequest::indirect(op, 1, 0, n, &[]);
        assert_eq!(st(&ind(0, 256)), 0);
        assert_eq!(st(&ind(0, 257)), BLKIF_RSP_ERROR);
        assert_eq!(st(&ind(0, 0)), BLKIF_RSP_ERROR);
        assert_eq!(st(&ind(0, 4097)), BLKIF_RSP_ERROR);
        assert_eq!(st(&ind(3, 1)), BLKIF_RSP_ERROR);
        let rej = check_request(&ind(3, 1), &l).unwrap_err();
        assert_eq!(rej.operation, 3);
        let ro = Limits { read_only: true, ..l.clone() };
        assert!(check_request(&RawRequest::rw(1, 1, 0, &[seg(0, 0)]), &ro).is_err());
        assert!(check_request(&RawRequest::rw(0, 1, 0, &[seg(0, 0)]), &ro).is_ok());
        let noind = Limits { max_indirect_segments: 0, ..l };
        assert_eq!(check_request(&ind(0, 1), &noind).unwrap_err().status, BLKIF_RSP_EOPNOTSUPP);
    }

    #[test]
    fn fuzz_parse_smoke() {
        fuzz_parse(&[]);
        fuzz_parse(&[0]);
        fuzz_parse(&[6; 300]);
        fuzz_parse(&[0xff; 5000]);
        let mut v = vec![0u8; 9];
        v.extend(RawRequest::rw(0, 1, 0, &[Segment { gref: 1, first_sect: 0, last_sect: 7 }]).encode(Abi::X86_64));
        fuzz_parse(&v);
    }
}
