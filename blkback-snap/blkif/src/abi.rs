//! Wire constants and layouts of the blkif protocol (Xen `public/io/blkif.h`, `io/ring.h`).
//!
//! Everything here is plain data: byte offsets of the shared-ring header and of the request /
//! response fields for each guest ABI, and the ring geometry (how many entries fit in N pages).
//! All multi-byte fields are little-endian (x86 and Arm guests).

/// Size of a Xen page (grant granularity), independent of the host page size.
pub const PAGE_SIZE: usize = 4096;
/// The blkif sector: `sector_number`, `first_sect`/`last_sect`, `nr_sectors` count 512 bytes
/// (we never negotiate "feature-large-sector-size").
pub const SECTOR_SIZE: u64 = 512;
/// Sectors in one page; `last_sect` must be below this.
pub const SECTORS_PER_PAGE: u8 = (PAGE_SIZE as u64 / SECTOR_SIZE) as u8;

pub const BLKIF_OP_READ: u8 = 0;
pub const BLKIF_OP_WRITE: u8 = 1;
pub const BLKIF_OP_WRITE_BARRIER: u8 = 2;
pub const BLKIF_OP_FLUSH_DISKCACHE: u8 = 3;
pub const BLKIF_OP_RESERVED_1: u8 = 4;
pub const BLKIF_OP_DISCARD: u8 = 5;
pub const BLKIF_OP_INDIRECT: u8 = 6;

/// Segments carried inline in a `blkif_request`.
pub const MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// Indirect pages a `blkif_request_indirect` can name.
pub const MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// `sizeof(struct blkif_request_segment)`: gref u32, first_sect u8, last_sect u8, 2 pad.
pub const SEGMENT_SIZE: usize = 8;
/// Segment descriptors per indirect page.
pub const SEGS_PER_INDIRECT_FRAME: usize = PAGE_SIZE / SEGMENT_SIZE;
/// Hard protocol ceiling on segments in one indirect request (8 pages of 512 descriptors).
pub const MAX_INDIRECT_SEGMENTS_LIMIT: u32 = (MAX_INDIRECT_PAGES_PER_REQUEST * SEGS_PER_INDIRECT_FRAME) as u32;

pub const BLKIF_RSP_OKAY: i16 = 0;
pub const BLKIF_RSP_ERROR: i16 = -1;
pub const BLKIF_RSP_EOPNOTSUPP: i16 = -2;

/// `flag` bit of a discard request.
pub const BLKIF_DISCARD_SECURE: u8 = 1;

/// `info` bits published in xenstore.
pub const VDISK_CDROM: u32 = 1;
pub const VDISK_REMOVABLE: u32 = 2;
pub const VDISK_READONLY: u32 = 4;

/// Shared ring header (`struct blkif_sring`): four indices, then private/pad bytes up to 64.
pub const SRING_REQ_PROD: usize = 0;
pub const SRING_REQ_EVENT: usize = 4;
pub const SRING_RSP_PROD: usize = 8;
pub const SRING_RSP_EVENT: usize = 12;
/// `offsetof(struct blkif_sring, ring)`.
pub const SRING_HEADER_SIZE: usize = 64;

/// Largest ring-page-order this crate will accept at all (Linux: XENBUS_MAX_RING_GRANT_ORDER).
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// The guest ABI of the request/response structures. Xen's "native" protocol is the
/// layout of the backend's own architecture; every 64-bit platform we run on (x86_64,
/// aarch64) has the [`Abi::X86_64`] layout (u64 aligned to 8), so that is what native means here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Abi {
    /// i386 guests: u64 fields are 4-byte aligned; 108-byte requests, 12-byte responses.
    X86_32,
    /// x86_64 (and Arm) guests: 112-byte requests, 16-byte responses.
    X86_64,
}

impl Abi {
    pub const ALL: [Abi; 2] = [Abi::X86_32, Abi::X86_64];

    /// The layout the frontend uses when it writes no "protocol" node.
    pub fn native() -> Abi {
        if cfg!(target_arch = "x86") {
            Abi::X86_32
        } else {
            Abi::X86_64
        }
    }

    /// Map the frontend's xenstore "protocol" node (absent or empty = native).
    pub fn from_protocol(p: Option<&str>) -> Option<Abi> {
        match p.map(str::trim) {
            None | Some("") => Some(Abi::native()),
            Some("x86_32-abi") => Some(Abi::X86_32),
            Some("x86_64-abi") => Some(Abi::X86_64),
            // XEN_IO_PROTO_ABI_ARM: same layout as x86_64.
            Some("arm-abi") => Some(Abi::X86_64),
            Some(_) => None,
        }
    }

    pub fn protocol_name(self) -> &'static str {
        match self {
            Abi::X86_32 => "x86_32-abi",
            Abi::X86_64 => "x86_64-abi",
        }
    }

    /// `sizeof(struct blkif_request)` — the ring entry is the union of request and
    /// response, and the request is the larger.
    pub const fn entry_size(self) -> usize {
        match self {
            Abi::X86_32 => 108,
            Abi::X86_64 => 112,
        }
    }

    /// `sizeof(struct blkif_response)`.
    pub const fn response_size(self) -> usize {
        match self {
            Abi::X86_32 => 12,
            Abi::X86_64 => 16,
        }
    }

    /// Offset of `id` (the same in every request variant).
    pub const fn off_id(self) -> usize {
        match self {
            Abi::X86_32 => 4,
            Abi::X86_64 => 8,
        }
    }

    /// Offset of `sector_number` (the same in every request variant).
    pub const fn off_sector(self) -> usize {
        self.off_id() + 8
    }

    /// Offset of `seg[0]` in a read/write request.
    pub const fn off_segs(self) -> usize {
        self.off_sector() + 8
    }

    /// Offset of `nr_sectors` in a discard request.
    pub const fn off_discard_nr_sectors(self) -> usize {
        self.off_sector() + 8
    }

    /// Offset of `handle` in an indirect request.
    pub const fn off_indirect_handle(self) -> usize {
        self.off_sector() + 8
    }

    /// Offset of `indirect_grefs[0]` in an indirect request.
    pub const fn off_indirect_grefs(self) -> usize {
        self.off_indirect_handle() + 4
    }
}

/// Round down to a power of two (`__RD32`); 0 stays 0.
pub const fn round_down_pow2(x: u32) -> u32 {
    if x == 0 {
        0
    } else {
        1 << (31 - x.leading_zeros())
    }
}

/// `__CONST_RING_SIZE(blkif, bytes)`: entries of `abi` that fit in a ring of `bytes`.
pub const fn ring_size(abi: Abi, bytes: usize) -> u32 {
    if bytes <= SRING_HEADER_SIZE {
        return 0;
    }
    let n = (bytes - SRING_HEADER_SIZE) / abi.entry_size();
    round_down_pow2(if n > u32::MAX as usize { u32::MAX } else { n as u32 })
}

/// Where things are in a ring of `nr_pages` pages for one ABI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGeometry {
    pub abi: Abi,
    pub nr_pages: usize,
    /// Number of entries (a power of two).
    pub size: u32,
}

impl RingGeometry {
    /// `None` when no entry fits (nr_pages == 0).
    pub fn new(abi: Abi, nr_pages: usize) -> Option<RingGeometry> {
        let bytes = nr_pages.checked_mul(PAGE_SIZE)?;
        let size = ring_size(abi, bytes);
        (size > 0).then_some(RingGeometry { abi, nr_pages, size })
    }

    pub fn bytes(&self) -> usize {
        self.nr_pages * PAGE_SIZE
    }

    /// Byte offset of the entry for free-running index `idx` (masked into the ring).
    /// Always `+ entry_size <= bytes()`.
    pub fn slot_offset(&self, idx: u32) -> usize {
        SRING_HEADER_SIZE + (idx & (self.size - 1)) as usize * self.abi.entry_size()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_matches_xen() {
        // Single page: (4096-64)/112 = 36 -> 32; (4096-64)/108 = 37 -> 32.
        assert_eq!(ring_size(Abi::X86_64, PAGE_SIZE), 32);
        assert_eq!(ring_size(Abi::X86_32, PAGE_SIZE), 32);
        // Linux BLK_MAX_RING_SIZE with order 4: (65536-64)/112 = 584 -> 512.
        assert_eq!(ring_size(Abi::X86_64, 16 * PAGE_SIZE), 512);
        assert_eq!(ring_size(Abi::X86_64, 2 * PAGE_SIZE), 64);
        for abi in Abi::ALL {
            for pages in [1, 2, 4, 8, 16] {
                let g = RingGeometry::new(abi, pages).unwrap();
                assert!(g.slot_offset(g.size - 1) + abi.entry_size() <= g.bytes());
                assert_eq!(g.slot_offset(g.size), SRING_HEADER_SIZE);
            }
        }
        assert!(RingGeometry::new(Abi::X86_64, 0).is_none());
        assert_eq!(Abi::X86_64.off_indirect_grefs(), 28);
        assert_eq!(Abi::X86_32.off_indirect_grefs(), 24);
        assert_eq!(Abi::X86_32.off_segs() + 11 * SEGMENT_SIZE, 108);
        assert_eq!(Abi::X86_64.off_segs() + 11 * SEGMENT_SIZE, 112);
    }

    #[test]
    fn protocol_names() {
        assert_eq!(Abi::from_protocol(Some("x86_32-abi")), Some(Abi::X86_32));
        assert_eq!(Abi::from_protocol(Some("x86_64-abi")), Some(Abi::X86_64));
        assert_eq!(Abi::from_protocol(None), Some(Abi::native()));
        assert_eq!(Abi::from_protocol(Some("sparc-abi")), None);
    }
}
