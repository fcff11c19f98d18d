//! Adapters to the [`BlockDevice`] seam: the active disk (read-write) and a checkpoint
//! (read-only).

use crate::error::Error;
use crate::image::Qcow2;
use std::sync::{Arc, Mutex, MutexGuard};
use xensnap_blockdev::{BlockDevice, BlockError, BlockResult};

fn to_block(e: Error) -> BlockError {
    match e {
        Error::OutOfRange { offset, len, size } => BlockError::OutOfRange { offset, len, size },
        Error::ReadOnly => BlockError::ReadOnly,
        Error::Io { ref source, .. } if source.raw_os_error() == Some(28) => BlockError::NoSpace,
        other => BlockError::Io(other.to_string()),
    }
}

fn lock(m: &Mutex<Qcow2>) -> MutexGuard<'_, Qcow2> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The active disk of an image, shared behind a mutex (one request at a time).
#[derive(Clone)]
pub struct SharedImage(pub Arc<Mutex<Qcow2>>);

impl SharedImage {
    pub fn new(img: Qcow2) -> Self {
        SharedImage(Arc::new(Mutex::new(img)))
    }

    /// [`Qcow2::durable_step`] for a driver thread, holding the lock as little as possible:
    /// before a step that flushes, the image file is flushed once *without* the lock (see
    /// [`Qcow2::durable_presync`]), then the step runs under the lock with its barriers
    /// unchanged. Same result and semantics as `lock().durable_step(budget)`.
    pub fn durable_step_concurrent(&self, budget: usize) -> crate::Result<bool> {
        let h = lock(&self.0).durable_presync()?;
        if let Some(h) = h {
            h.sync().map_err(|e| crate::Error::io("flushing before a checkpoint commit", e))?;
        }
        lock(&self.0).durable_step(budget)
    }
}

impl BlockDevice for SharedImage {
    fn size(&self) -> u64 {
        lock(&self.0).virtual_size()
    }
    fn read_only(&self) -> bool {
        lock(&self.0).is_read_only()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        lock(&self.0).read(offset, buf).map_err(to_block)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        lock(&self.0).write(offset, buf).map_err(to_block)
    }
    fn flush(&self) -> BlockResult<()> {
        lock(&self.0).flush().map_err(to_block)
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        lock(&self.0).discard(offset, len).map_err(to_block)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult<()> {
        lock(&self.0).write_zeroes(offset, len, may_unmap).map_err(to_block)
    }
}

/// A checkpoint of an image as a read-only device.
#[derive(Clone)]
pub struct CheckpointDevice {
    image: Arc<Mutex<Qcow2>>,
    id_or_name: String,
}

impl CheckpointDevice {
    /// Fails if the checkpoint does not exist.
    pub fn new(image: Arc<Mutex<Qcow2>>, id_or_name: &str) -> Result<Self, Error> {
        lock(&image).checkpoint_size(id_or_name)?;
        Ok(CheckpointDevice { image, id_or_name: id_or_name.to_string() })
    }
}

impl BlockDevice for CheckpointDevice {
    fn size(&self) -> u64 {
        lock(&self.image).checkpoint_size(&self.id_or_name).unwrap_or(0)
    }
    fn read_only(&self) -> bool {
        true
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        lock(&self.image).read_checkpoint(&self.id_or_name, offset, buf).map_err(to_block)
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
