//! The block-device seam.
//!
//! Front ends (the NBD export, the blkif backend) serve anything that implements
//! [`BlockDevice`]; the qcow2 engine implements it for the active disk (read-write) and for
//! any checkpoint (read-only). [`MemDisk`] is an in-memory device for front-end tests.

use std::io;
use std::os::fd::BorrowedFd;
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
    /// Read `dst.len()` bytes at `offset` into `dst`. A device whose data lives in a file
    /// can hand parts of the file straight to [`DataBuf::read_file`] (no copy through a
    /// buffer of its own); the default reads into a bounce buffer and copies it in. On
    /// failure the contents of `dst` are unspecified.
    fn read_into(&self, offset: u64, dst: &mut dyn DataBuf) -> BlockResult<()> {
        let mut buf = vec![0u8; dst.len()];
        self.read_at(offset, &mut buf)?;
        dst.copy_in(0, &buf).map_err(buf_error)
    }
    /// Write `src.len()` bytes from `src` at `offset` (like [`BlockDevice::write_at`]). The
    /// default copies `src` into a bounce buffer first.
    fn write_from(&self, offset: u64, src: &dyn DataBuf) -> BlockResult<()> {
        let mut buf = vec![0u8; src.len()];
        src.copy_out(0, &mut buf).map_err(buf_error)?;
        self.write_at(offset, &buf)
    }
    /// Whether [`BlockDevice::read_into`] / [`BlockDevice::write_from`] can move data
    /// without a bounce buffer (overridden, not the defaults). Front ends that have buffers
    /// of their own use `read_at`/`write_at` when this is false.
    fn direct_io(&self) -> bool {
        false
    }
}

/// A failure to reach the memory of a [`DataBuf`] (e.g. a guest page), as a device error.
pub fn buf_error(e: io::Error) -> BlockError {
    BlockError::Io(format!("data buffer: {e}"))
}

/// The memory of one request, as a list of pieces that need not be one slice (e.g. the
/// guest pages of a blkif request). Positions are byte offsets `0..len()` in request order.
///
/// Every method fails (with any error) rather than touch bytes outside `pos..pos+len`, and
/// a range past `len()` is an error. The `*_file` methods move bytes directly between a file
/// and the pieces; `Ok(false)` means this buffer cannot (then the caller copies through a
/// buffer of its own with `copy_in`/`copy_out`).
pub trait DataBuf {
    /// Total length in bytes.
    fn len(&self) -> usize;
    /// True when the buffer has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copy `src` into the buffer at `pos`.
    fn copy_in(&mut self, pos: usize, src: &[u8]) -> io::Result<()>;
    /// Copy `dst.len()` bytes at `pos` out of the buffer.
    fn copy_out(&self, pos: usize, dst: &mut [u8]) -> io::Result<()>;
    /// Zero `len` bytes at `pos`.
    fn zero(&mut self, pos: usize, len: usize) -> io::Result<()> {
        const Z: [u8; 4096] = [0; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(Z.len());
            self.copy_in(pos + done, &Z[..n])?;
            done += n;
        }
        Ok(())
    }
    /// Read exactly `len` bytes of `fd` at `file_off` into the buffer at `pos` (end of file
    /// first: `UnexpectedEof`).
    fn read_file(&mut self, fd: BorrowedFd<'_>, file_off: u64, pos: usize, len: usize) -> io::Result<bool> {
        let _ = (fd, file_off, pos, len);
        Ok(false)
    }
    /// Write the `len` bytes at `pos` of the buffer to `fd` at `file_off`.
    fn write_file(&self, fd: BorrowedFd<'_>, file_off: u64, pos: usize, len: usize) -> io::Result<bool> {
        let _ = (fd, file_off, pos, len);
        Ok(false)
    }
}

fn buf_range(pos: usize, len: usize, size: usize) -> io::Result<std::ops::Range<usize>> {
    match pos.checked_add(len) {
        Some(end) if end <= size => Ok(pos..end),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes at {pos} are outside a {size}-byte buffer"),
        )),
    }
}

/// A [`DataBuf`] over a plain slice of this process (copies only).
pub struct SliceBuf<'a>(pub &'a mut [u8]);

impl DataBuf for SliceBuf<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn copy_in(&mut self, pos: usize, src: &[u8]) -> io::Result<()> {
        let r = buf_range(pos, src.len(), self.0.len())?;
        self.0[r].copy_from_slice(src);
        Ok(())
    }
    fn copy_out(&self, pos: usize, dst: &mut [u8]) -> io::Result<()> {
        let r = buf_range(pos, dst.len(), self.0.len())?;
        dst.copy_from_slice(&self.0[r]);
        Ok(())
    }
    fn zero(&mut self, pos: usize, len: usize) -> io::Result<()> {
        let r = buf_range(pos, len, self.0.len())?;
        self.0[r].fill(0);
        Ok(())
    }
}

/// A read-only [`DataBuf`] over a slice (the source of a write; `copy_in` fails).
pub struct ConstBuf<'a>(pub &'a [u8]);

impl DataBuf for ConstBuf<'_> {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn copy_in(&mut self, _pos: usize, _src: &[u8]) -> io::Result<()> {
        Err(io::Error::new(io::ErrorKind::PermissionDenied, "read-only buffer"))
    }
    fn copy_out(&self, pos: usize, dst: &mut [u8]) -> io::Result<()> {
        let r = buf_range(pos, dst.len(), self.0.len())?;
        dst.copy_from_slice(&self.0[r]);
        Ok(())
    }
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
    fn read_into(&self, offset: u64, dst: &mut dyn DataBuf) -> BlockResult<()> {
        self.0.read_into(offset, dst)
    }
    fn write_from(&self, _offset: u64, _src: &dyn DataBuf) -> BlockResult<()> {
        Err(BlockError::ReadOnly)
    }
    fn direct_io(&self) -> bool {
        self.0.direct_io()
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

    #[test]
    fn default_read_into_and_write_from_bounce_through_the_buffer_traits() {
        let d = MemDisk::new(8192);
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        d.write_from(1000, &ConstBuf(&data)).unwrap();
        let mut back = vec![0u8; 3000];
        d.read_into(1000, &mut SliceBuf(&mut back)).unwrap();
        assert_eq!(back, data);
        assert_eq!(d.snapshot()[1000..4000], data[..]);
        assert!(!d.direct_io());
        // out of range stays out of range; buffer bounds are checked
        assert!(matches!(d.read_into(8000, &mut SliceBuf(&mut back)), Err(BlockError::OutOfRange { .. })));
        let mut s = [1u8; 8];
        let mut b = SliceBuf(&mut s);
        assert!(b.copy_in(5, &[0; 4]).is_err());
        assert!(b.zero(usize::MAX, 2).is_err());
        b.zero(2, 3).unwrap();
        assert_eq!(s, [1, 1, 0, 0, 0, 1, 1, 1]);
        assert!(ConstBuf(&[1, 2]).copy_out(1, &mut [0; 2]).is_err());
    }
}
