//! L1/L2 entry encoding: flags, masks and classification of cluster descriptors.

use crate::error::{Error, Result};

pub(crate) const COPIED: u64 = 1 << 63;
pub(crate) const COMPRESSED: u64 = 1 << 62;
pub(crate) const ZERO: u64 = 1;
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub(crate) const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
pub(crate) const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
pub(crate) const REFT_RESERVED: u64 = 0x1ff;

/// What an L2 entry describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cluster {
    /// Not allocated: reads as zeroes (no backing files).
    Unallocated,
    /// Zero flag, no host cluster.
    Zero,
    /// A host cluster; `zero` = zero flag with preallocated host cluster.
    Normal { host: u64, zero: bool, copied: bool },
    /// Compressed data at `offset` spanning `len` bytes of the image file.
    Compressed { offset: u64, len: u64 },
}

/// Parameters needed to decode L2 entries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct L2Geom {
    pub cluster_bits: u32,
    pub extended: bool,
}

impl L2Geom {
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }
    /// Decode an L2 entry. `where_` names the table and index for errors.
    pub fn classify(&self, e: u64, bitmap: u64, where_: &dyn Fn() -> String) -> Result<Cluster> {
        let cs = 1u64 << self.cluster_bits;
        if e & COMPRESSED != 0 {
            if e & COPIED != 0 {
                return Err(Error::corrupt(format!("{}: compressed entry {e:#x} has the COPIED flag", where_())));
            }
            let shift = self.csize_shift();
            let offset = e & ((1u64 << shift) - 1);
            let mask = (1u64 << (self.cluster_bits - 8)) - 1;
            let nb_sectors = ((e >> shift) & mask) + 1;
            let len = (nb_sectors * 512).saturating_sub(offset & 511);
            if offset == 0 {
                return Err(Error::corrupt(format!("{}: compressed cluster at offset 0", where_())));
            }
            return Ok(Cluster::Compressed { offset, len: len.min(2 * cs) });
        }
        let reserved = if self.extended { L2_RESERVED | ZERO } else { L2_RESERVED };
        if e & reserved != 0 {
            return Err(Error::corrupt(format!("{}: L2 entry {e:#018x} has reserved bits set", where_())));
        }
        let host = e & OFFSET_MASK;
        let copied = e & COPIED != 0;
        if !host.is_multiple_of(cs) {
            return Err(Error::corrupt(format!(
                "{}: cluster offset {host:#x} is not aligned to the cluster size",
                where_()
            )));
        }
        let zero = if self.extended { false } else { e & ZERO != 0 };
        if host == 0 {
            if copied {
                return Err(Error::corrupt(format!("{}: unallocated entry {e:#x} has the COPIED flag", where_())));
            }
            if zero {
                return Ok(Cluster::Zero);
            }
            if self.extended && bitmap & 0xffff_ffff != 0 {
                return Err(Error::corrupt(format!(
                    "{}: unallocated extended entry has allocated subclusters",
                    where_()
                )));
            }
            return Ok(Cluster::Unallocated);
        }
        Ok(Cluster::Normal { host, zero, copied })
    }
}

/// The L2 table offset of an L1 entry, validated.
pub(crate) fn l1_to_l2(e: u64, cs: u64, where_: &dyn Fn() -> String) -> Result<u64> {
    if e & L1_RESERVED != 0 {
        return Err(Error::corrupt(format!("{}: L1 entry {e:#018x} has reserved bits set", where_())));
    }
    let off = e & OFFSET_MASK;
    if !off.is_multiple_of(cs) {
        return Err(Error::corrupt(format!("{}: L2 table offset {off:#x} is not cluster aligned", where_())));
    }
    if off == 0 && e & COPIED != 0 {
        return Err(Error::corrupt(format!("{}: empty L1 entry has the COPIED flag", where_())));
    }
    Ok(off)
}
