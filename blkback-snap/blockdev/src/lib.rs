//! The block-device seam.
//!
//! Front ends (the NBD export, the blkif backend) serve anything that implements
//! [`BlockDevice`]; the qcow2 engine implements it for the active disk (read-write) and for
//! any checkpoint (read-only). [`MemDisk`] is an in-memory device for front-end tests.

use std::sync::Mutex;

/// Errors a block device reports to a front end. Front ends map them to protocol errors
/// (NBD error codes, `BLKIF_RSP_ERROR` / `BLKIF_RSP_EOPNOTSUPP`).
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches past the end of the device.
    #[error("request {offset}+{len} is beyond the device size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A write-type request on a read-only device.
    #[error("device is read-only")]
    ReadOnly,
    /// The device does not implement this operation.
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    /// The device ran out of space.
    #[error("no space left on the device backing store")]
    NoSpace,
    /// Any other failure of the backing store (I/O error, corrupt metadata...).
    #[error("{0}")]
    Io(String),
}

pub type BlockResult<T> = Result<T, BlockError>;

/// A virtual disk as seen by a front end. All methods take `&self`: implementations do their
/// own locking so that several connections or rings can share one device.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Whether write-type operations are refused.
    fn read_only(&self) -> bool;
    /// Read `buf.len()` bytes at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()>;
    /// Write `buf` at `offset`. Not durable until [`BlockDevice::flush`] returns.
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()>;
    /// Make every write completed so far durable.
    fn flush(&self) -> BlockResult<()>;
    /// Drop the contents of a range (it may read back as anything until written; this
    /// implementation family reads zeroes).
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()>;
    /// Make a range read as zeroes; `may_unmap` allows freeing the space.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult<()>;
}

/// Check that `offset..offset+len` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> BlockResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// An in-memory block device (zero-filled), for front-end tests.
pub struct MemDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
}

impl MemDisk {
    pub fn new(size: usize) -> Self {
        MemDisk { data: Mutex::new(vec![0; size]), read_only: false }
    }
    pub fn from_vec(data: Vec<u8>, read_only: bool) -> Self {
        MemDisk { data: Mutex::new(data), read_only }
    }
    /// A copy of the current contents.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means another thread panicked mid-copy; the bytes are still
        // a valid disk image for a test device.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn range(&self, offset: u64, len: u64) -> BlockResult<std::ops::Range<usize>> {
        check_range(offset, len, self.size())?;
        Ok(offset as usize..(offset + len) as usize)
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.lock()[r]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let r = self.range(offset, buf.len() as u64)?;
        self.lock()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let r = self.range(offset, len)?;
        self.lock()[r].fill(0);
        Ok(())
    }
}

/// A read-only view of another device: reads pass through, write-type requests fail with
/// [`BlockError::ReadOnly`] before they reach the device.
pub struct ReadOnly(pub std::sync::Arc<dyn BlockDevice>);

impl BlockDevice for ReadOnly {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, _offset: u64, _buf: &[u8]) -> BlockResult<()> {
        Err(BlockError::ReadOnly)
    }
    fn flush(&self) -> BlockResult<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> BlockResult<()> {
        Err(BlockError::ReadOnly)
    }
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> BlockResult<()> {
        Err(BlockError::ReadOnly)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memdisk_bounds_and_readonly() {
        let d = MemDisk::new(4096);
        d.write_at(4000, &[1; 96]).unwrap();
        let mut b = [0u8; 96];
        d.read_at(4000, &mut b).unwrap();
        assert_eq!(b, [1; 96]);
        assert!(matches!(d.write_at(4001, &[1; 96]), Err(BlockError::OutOfRange { .. })));
        assert!(matches!(d.read_at(u64::MAX, &mut b), Err(BlockError::OutOfRange { .. })));
        let ro = MemDisk::from_vec(vec![0; 512], true);
        assert!(matches!(ro.write_at(0, &[1]), Err(BlockError::ReadOnly)));
        assert!(matches!(ro.discard(0, 1), Err(BlockError::ReadOnly)));
        let inner = std::sync::Arc::new(MemDisk::new(512));
        let view = ReadOnly(inner.clone());
        assert!(matches!(view.write_at(0, &[1]), Err(BlockError::ReadOnly)));
        assert!(matches!(view.write_zeroes(0, 1, true), Err(BlockError::ReadOnly)));
        assert_eq!(inner.snapshot(), vec![0; 512]);
    }
}
