//! The qcow2 header (v2/v3) and header extensions: parsing with validation, and the layout
//! written by `create`.

use crate::error::{Error, Result};
use serde::Serialize;

pub(crate) const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
pub(crate) const V3_HEADER_LEN: u32 = 112;
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20; // QCOW_MAX_L1_SIZE
pub(crate) const MAX_REFTABLE_BYTES: u64 = 8 << 20; // QCOW_MAX_REFTABLE_SIZE
pub(crate) const MAX_SNAPSHOTS: u32 = 65536;

pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
pub(crate) const INCOMPAT_KNOWN: u64 = 0x1f;
pub(crate) const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

pub(crate) const EXT_END: u32 = 0;
pub(crate) const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub(crate) const EXT_CRYPTO: u32 = 0x0537_be77;
pub(crate) const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Offsets of header fields we rewrite in place.
pub(crate) const OFF_SIZE: u64 = 24;
pub(crate) const OFF_REFTABLE: u64 = 48;
pub(crate) const OFF_NB_SNAPSHOTS: u64 = 60;
pub(crate) const OFF_INCOMPAT: u64 = 72;
pub(crate) const OFF_AUTOCLEAR: u64 = 88;

/// Compression algorithm of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionType {
    Zlib,
    Zstd,
}

/// One header extension, kept verbatim (we never rewrite the header area after create).
#[derive(Debug, Clone)]
#[allow(dead_code)]
pub(crate) struct Extension {
    pub ty: u32,
    pub data: Vec<u8>,
}

#[derive(Debug, Clone)]
#[allow(dead_code)]
pub(crate) struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: CompressionType,
    pub extensions: Vec<Extension>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_be_bytes(a)
}
fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_be_bytes(a)
}
pub(crate) fn get_be16(b: &[u8], off: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        a.copy_from_slice(s);
    }
    u16::from_be_bytes(a)
}
pub(crate) fn get_be32(b: &[u8], off: usize) -> u32 {
    be32(b, off)
}
pub(crate) fn get_be64(b: &[u8], off: usize) -> u64 {
    be64(b, off)
}
pub(crate) fn put_be16(b: &mut [u8], off: usize, v: u16) {
    if let Some(s) = b.get_mut(off..off + 2) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}
pub(crate) fn put_be32(b: &mut [u8], off: usize, v: u32) {
    if let Some(s) = b.get_mut(off..off + 4) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}
pub(crate) fn put_be64(b: &mut [u8], off: usize, v: u64) {
    if let Some(s) = b.get_mut(off..off + 8) {
        s.copy_from_slice(&v.to_be_bytes());
    }
}

fn incompat_name(bit: u32) -> &'static str {
    match bit {
        0 => "dirty bit",
        1 => "corrupt bit",
        2 => "external data file",
        3 => "compression type",
        4 => "extended L2 entries",
        _ => "unknown",
    }
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }
    pub fn refcount_bits(&self) -> u32 {
        1u32 << self.refcount_order
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible & INCOMPAT_EXTL2 != 0
    }
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_bytes()
    }
    /// L1 entries needed to map `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        let per_l2 = self.l2_entries() << self.cluster_bits;
        size.div_ceil(per_l2)
    }

    /// Parse and validate the header in `buf` (the first cluster, or at least the first
    /// 4 KiB, of the image). `file_len` is the image length, to check table placement.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header> {
        if buf.len() < 72 {
            return Err(Error::corrupt(format!(
                "image is {} bytes, shorter than a qcow2 header (72 bytes)",
                buf.len()
            )));
        }
        let magic = be32(buf, 0);
        if magic != MAGIC {
            return Err(Error::corrupt(format!("bad magic {magic:#010x} at offset 0 (not a qcow2 image)")));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!("qcow2 version {version} (only 2 and 3 exist)")));
        }
        let cluster_bits = be32(buf, 20);
        if !(9..=21).contains(&cluster_bits) {
            return Err(Error::corrupt(format!(
                "header cluster_bits {cluster_bits} at offset 20 is out of range 9..=21"
            )));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: 72,
            compression: CompressionType::Zlib,
            extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < 104 {
                return Err(Error::corrupt("v3 header truncated (shorter than 104 bytes)"));
            }
            h.incompatible = be64(buf, 72);
            h.compatible = be64(buf, 80);
            h.autoclear = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < 104 || !h.header_length.is_multiple_of(8) {
                return Err(Error::corrupt(format!(
                    "header_length {} at offset 100 must be >= 104 and a multiple of 8",
                    h.header_length
                )));
            }
            if u64::from(h.header_length) > cs || h.header_length as usize > buf.len() {
                return Err(Error::corrupt(format!(
                    "header_length {} at offset 100 is larger than the first cluster ({cs} bytes)",
                    h.header_length
                )));
            }
        }
        if h.refcount_order > 6 {
            return Err(Error::corrupt(format!(
                "refcount_order {} at offset 96 is out of range 0..=6",
                h.refcount_order
            )));
        }
        let unknown = h.incompatible & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(Error::unsupported(format!(
                "unknown incompatible feature bits {unknown:#x} in header field at offset 72"
            )));
        }
        if h.incompatible & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(format!(
                "incompatible feature bit 2 ({}) is set; external data files are not supported",
                incompat_name(2)
            )));
        }
        if h.crypt_method != 0 {
            return Err(Error::unsupported(format!("encrypted image (crypt_method {} at offset 32)", h.crypt_method)));
        }
        if h.backing_file_offset != 0 {
            return Err(Error::unsupported(
                "image has a backing file (backing_file_offset at offset 8 is set); backing chains are not supported",
            ));
        }
        if h.extended_l2() && cluster_bits < 14 {
            return Err(Error::corrupt(format!(
                "extended L2 entries need cluster_bits >= 14, header has {cluster_bits}"
            )));
        }
        if h.incompatible & INCOMPAT_COMPRESSION != 0 {
            if h.header_length < 105 {
                return Err(Error::corrupt(
                    "compression type feature bit set but header_length has no compression_type byte",
                ));
            }
            h.compression = match buf.get(104).copied() {
                Some(0) => CompressionType::Zlib,
                Some(1) => CompressionType::Zstd,
                Some(t) => return Err(Error::unsupported(format!("compression_type {t} at offset 104"))),
                None => return Err(Error::corrupt("header truncated before compression_type")),
            };
        } else if h.header_length >= 105 && buf.get(104).copied().unwrap_or(0) != 0 {
            return Err(Error::corrupt("compression_type at offset 104 is non-zero but incompatible bit 3 is not set"));
        }
        // sizes and table placement
        if h.size > (1u64 << 62) {
            return Err(Error::corrupt(format!("virtual size {} at offset 24 is absurd", h.size)));
        }
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::corrupt(format!(
                "active L1 table size {} entries (offset 36) exceeds the 32 MiB limit",
                h.l1_size
            )));
        }
        if u64::from(h.l1_size) < h.l1_entries_for(h.size) {
            return Err(Error::corrupt(format!(
                "active L1 table has {} entries, too small for the virtual size {} (needs {})",
                h.l1_size,
                h.size,
                h.l1_entries_for(h.size)
            )));
        }
        check_table(cs, file_len, "active L1 table", h.l1_table_offset, l1_bytes)?;
        if h.refcount_table_clusters == 0 {
            return Err(Error::corrupt("refcount table has 0 clusters (offset 56)"));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(Error::corrupt(format!(
                "refcount table of {} clusters exceeds the 8 MiB limit",
                h.refcount_table_clusters
            )));
        }
        check_table(cs, file_len, "refcount table", h.refcount_table_offset, rt_bytes)?;
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::corrupt(format!(
                "nb_snapshots {} at offset 60 exceeds the limit {MAX_SNAPSHOTS}",
                h.nb_snapshots
            )));
        }
        if h.nb_snapshots > 0 {
            // 40-byte minimum per entry, actual size checked when the table is read
            check_table(cs, file_len, "snapshot table", h.snapshots_offset, u64::from(h.nb_snapshots) * 40)?;
        }
        // header extensions
        let ext_start = if version == 3 { h.header_length as usize } else { 72 };
        h.extensions = parse_extensions(buf, ext_start, cs as usize)?;
        for e in &h.extensions {
            if e.ty == EXT_DATA_FILE {
                return Err(Error::unsupported("external data file name extension present"));
            }
            if e.ty == EXT_CRYPTO {
                return Err(Error::unsupported("full disk encryption header extension present"));
            }
        }
        Ok(h)
    }

    /// Names of set feature bits, for `info`.
    pub fn feature_names(&self) -> Vec<String> {
        let mut v = Vec::new();
        for bit in 0..64u32 {
            if self.incompatible & (1u64 << bit) != 0 {
                v.push(format!("incompatible:{}", incompat_name(bit)));
            }
        }
        if self.compatible & COMPAT_LAZY_REFCOUNTS != 0 {
            v.push("compatible:lazy refcounts".into());
        }
        for bit in 0..64u32 {
            if self.compatible & (1u64 << bit) != 0 && bit != 0 {
                v.push(format!("compatible:bit{bit}"));
            }
            if self.autoclear & (1u64 << bit) != 0 {
                v.push(format!("autoclear:bit{bit}"));
            }
        }
        v
    }
}

/// A table at `off` of `bytes` must be cluster aligned and lie inside the file.
pub(crate) fn check_table(cs: u64, file_len: u64, what: &str, off: u64, bytes: u64) -> Result<()> {
    if !off.is_multiple_of(cs) {
        return Err(Error::corrupt(format!("{what} offset {off:#x} is not cluster aligned")));
    }
    if off == 0 && bytes > 0 {
        return Err(Error::corrupt(format!("{what} offset is 0 (overlaps the header)")));
    }
    match off.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Error::corrupt(format!(
            "{what} at offset {off:#x} ({bytes} bytes) reaches past the end of the image ({file_len} bytes)"
        ))),
    }
}

fn parse_extensions(buf: &[u8], start: usize, cs: usize) -> Result<Vec<Extension>> {
    let limit = cs.min(buf.len());
    let mut off = start;
    let mut out = Vec::new();
    loop {
        if off + 8 > limit {
            // QEMU accepts a header without an end marker if the cluster ends
            break;
        }
        let ty = be32(buf, off);
        let len = be32(buf, off + 4) as usize;
        if ty == EXT_END {
            break;
        }
        let data_start = off + 8;
        let data_end = data_start.checked_add(len).filter(|e| *e <= limit).ok_or_else(|| {
            Error::corrupt(format!(
                "header extension {ty:#010x} at offset {off} with length {len} runs past the first cluster"
            ))
        })?;
        let data = buf.get(data_start..data_end).map(|s| s.to_vec()).unwrap_or_default();
        out.push(Extension { ty, data });
        off = data_start + len.div_ceil(8) * 8;
    }
    Ok(out)
}

/// Bytes of a freshly created v3 header cluster (header, feature name table, end marker).
pub(crate) fn build_header(h: &Header) -> Vec<u8> {
    let cs = h.cluster_size() as usize;
    let mut b = vec![0u8; cs];
    put_be32(&mut b, 0, MAGIC);
    put_be32(&mut b, 4, 3);
    put_be32(&mut b, 20, h.cluster_bits);
    put_be64(&mut b, 24, h.size);
    put_be32(&mut b, 36, h.l1_size);
    put_be64(&mut b, 40, h.l1_table_offset);
    put_be64(&mut b, 48, h.refcount_table_offset);
    put_be32(&mut b, 56, h.refcount_table_clusters);
    put_be32(&mut b, 60, h.nb_snapshots);
    put_be64(&mut b, 64, h.snapshots_offset);
    put_be64(&mut b, 72, h.incompatible);
    put_be64(&mut b, 80, h.compatible);
    put_be64(&mut b, 88, h.autoclear);
    put_be32(&mut b, 96, h.refcount_order);
    put_be32(&mut b, 100, V3_HEADER_LEN);
    // byte 104: compression type 0 (zlib)
    let mut off = V3_HEADER_LEN as usize;
    // feature name table, only when it fits (not with 512-byte clusters)
    let features: [(u8, u8, &str); 8] = [
        (0, 0, "dirty bit"),
        (0, 1, "corrupt bit"),
        (0, 2, "external data file"),
        (0, 3, "compression type"),
        (0, 4, "extended L2 entries"),
        (1, 0, "lazy refcounts"),
        (2, 0, "bitmaps"),
        (2, 1, "raw external data"),
    ];
    let ft_len = features.len() * 48;
    if off + 8 + ft_len + 8 <= cs {
        put_be32(&mut b, off, EXT_FEATURE_TABLE);
        put_be32(&mut b, off + 4, ft_len as u32);
        off += 8;
        for (ty, bit, name) in features {
            if let Some([t, bt, rest @ ..]) = b.get_mut(off..off + 48) {
                *t = ty;
                *bt = bit;
                let n = name.as_bytes();
                if let Some(d) = rest.get_mut(..n.len()) {
                    d.copy_from_slice(n);
                }
            }
            off += 48;
        }
    }
    // end marker: 8 zero bytes already there
    b
}
