//! Raw check of a crashed image (before any repair): with the dirty bit clear, QEMU trusts
//! the active tree's COPIED flags and writes in place where one is set, so a COPIED flag on a
//! cluster whose on-disk refcount is above 1 would let QEMU overwrite a checkpoint's data.
//! Shared by the qcow2 crash tests and the crash torture (`#[path]` include).

fn rd64(b: &[u8], o: u64) -> u64 {
    let o = o as usize;
    b.get(o..o + 8).map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
}
fn rd32(b: &[u8], o: u64) -> u32 {
    let o = o as usize;
    b.get(o..o + 4).map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap_or([0; 4])))
}

const COPIED: u64 = 1 << 63;
const OFFSET: u64 = 0x00ff_ffff_ffff_fe00;
const COMPRESSED: u64 = 1 << 62;

/// On-disk refcount of cluster `idx` (0 if its refcount block is missing).
fn refcount(b: &[u8], idx: u64) -> u64 {
    let cb = u64::from(rd32(b, 20));
    let cs = 1u64 << cb;
    let order = u64::from(rd32(b, 96));
    let bits = 1u64 << order;
    let per_rb = cs * 8 / bits;
    let rt_off = rd64(b, 48);
    let rt_entries = u64::from(rd32(b, 56)) * cs / 8;
    let (rti, k) = (idx / per_rb, idx % per_rb);
    if rti >= rt_entries {
        return 0;
    }
    let rb = rd64(b, rt_off + rti * 8) & !(cs - 1);
    if rb == 0 {
        return 0;
    }
    let bit = k * bits;
    if bits >= 8 {
        let nbytes = bits / 8;
        let mut v = 0u64;
        for i in 0..nbytes {
            v = (v << 8) | u64::from(b.get((rb + bit / 8 + i) as usize).copied().unwrap_or(0));
        }
        v
    } else {
        let byte = u64::from(b.get((rb + bit / 8) as usize).copied().unwrap_or(0));
        (byte >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// The harmful COPIED flags of a raw image: empty when the dirty bit is set (QEMU and our
/// open rebuild refcounts and flags first) or when every active L1/L2 entry with COPIED set
/// points at a cluster whose on-disk refcount is exactly 1.
pub fn harmful_copied_flags(b: &[u8]) -> Vec<String> {
    let incompat = rd64(b, 72);
    if incompat & 1 != 0 {
        return Vec::new();
    }
    let cs = 1u64 << rd32(b, 20);
    let l1_size = u64::from(rd32(b, 36));
    let l1_off = rd64(b, 40);
    let mut out = Vec::new();
    for i in 0..l1_size {
        let e = rd64(b, l1_off + i * 8);
        let l2 = e & OFFSET;
        if l2 == 0 {
            continue;
        }
        if e & COPIED != 0 {
            let rc = refcount(b, l2 / cs);
            if rc > 1 {
                out.push(format!("active L1 entry {i} ({e:#x}) has COPIED, L2 table refcount {rc}"));
            }
        }
        for j in 0..cs / 8 {
            let w = rd64(b, l2 + j * 8);
            if w & COPIED == 0 || w & COMPRESSED != 0 {
                continue;
            }
            let host = w & OFFSET;
            if host == 0 {
                continue;
            }
            let rc = refcount(b, host / cs);
            if rc > 1 {
                out.push(format!("active L2 {l2:#x} entry {j} ({w:#x}) has COPIED, data cluster refcount {rc}"));
            }
        }
    }
    out
}
