//! Adapters to the [`BlockDevice`] seam: the active disk (read-write) and a checkpoint
//! (read-only).

use crate::error::Error;
use crate::image::Qcow2;
use crate::durable::DurableStep;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use xensnap_blockdev::{BlockDevice, BlockError, BlockResult, DataBuf};

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

    /// One bounded piece of background work for a driver thread, holding the image lock
    /// as little as possible: the work runs under the lock up to the next flush barrier a
    /// commit needs ([`Qcow2::durable_step_staged`]); the barrier (an fdatasync) runs with
    /// the lock released, and the lock is taken again briefly to record it. Guest requests
    /// are served during the fdatasync. Returns whether everything is durable, and how long
    /// the lock was held (for pacing).
    pub fn durable_work(&self, budget: usize) -> crate::Result<DurableProgress> {
        let mut g = lock(&self.0);
        let t = Instant::now();
        let r = g.durable_step_staged(budget);
        let mut locked = t.elapsed();
        drop(g);
        match r? {
            DurableStep::Done(done) => Ok(DurableProgress { done, locked, synced: Duration::ZERO }),
            DurableStep::Barrier(b) => {
                let t = Instant::now();
                // a failure poisons the image (the kernel may have dropped the writes this
                // barrier was for): every later step, flush and write is refused
                let s = b.sync()?;
                let synced = t.elapsed();
                let mut g = lock(&self.0);
                let t = Instant::now();
                g.durable_barrier_done(s);
                locked += t.elapsed();
                Ok(DurableProgress { done: false, locked, synced })
            }
        }
    }

    /// The background durability driver of a served image (run it on its own thread):
    /// [`SharedImage::durable_work`]`(`[`DURABLE_BUDGET`]`)` at a time, each followed by a pause of
    /// [`DURABLE_PACE`] times the time it held the image lock (at least 50 µs, see
    /// [`durable_pause`]), so the guest's requests get the lock most of the time (the pacing
    /// `scripts/bench-checkpoint.sh` measures). When nothing is pending it returns, or with
    /// `idle_poll = Some(d)` looks again every `d` (for a driver that outlives one
    /// checkpoint). A failed step stays queued and is retried after 1 s; on a poisoned image
    /// (a flush failed, ours or the guest's) it stops: retrying could only report a
    /// checkpoint durable over lost writes, and the engine refuses. It also returns if the
    /// image's mutex was poisoned by a panic.
    pub fn drive_durability(&self, idle_poll: Option<Duration>) {
        loop {
            let pending = match self.0.lock() {
                Err(_) => return,
                Ok(g) => g.durable_pending(),
            };
            let pause = if !pending {
                match idle_poll {
                    None => return,
                    Some(d) => d,
                }
            } else {
                match self.durable_work(DURABLE_BUDGET) {
                    Ok(p) => durable_pause(p.locked, DURABLE_PACE),
                    Err(e @ Error::Poisoned { .. }) => {
                        tracing::error!("background checkpoint work stopped: {e}");
                        return;
                    }
                    Err(e) => {
                        tracing::error!("background checkpoint work: {e}; retrying in 1 s");
                        Duration::from_secs(1)
                    }
                }
            };
            std::thread::sleep(pause);
        }
    }

    /// [`SharedImage::durable_work`], returning only whether everything is durable.
    pub fn durable_step_concurrent(&self, budget: usize) -> crate::Result<bool> {
        Ok(self.durable_work(budget)?.done)
    }
}

/// The budget of one step of the durability driver ([`SharedImage::durable_work`]): L2
/// tables walked per lock hold.
pub const DURABLE_BUDGET: usize = 1;

/// How many times the image lock's hold time a durability driver pauses after a step.
pub const DURABLE_PACE: u32 = 3;

/// The pause after a durability step that held the image lock for `locked`: `pace` times
/// as long, at least 50 µs.
pub fn durable_pause(locked: Duration, pace: u32) -> Duration {
    (locked * pace).max(Duration::from_micros(50))
}

/// What one [`SharedImage::durable_work`] call did.
#[derive(Debug, Clone, Copy)]
pub struct DurableProgress {
    /// All background work is durable.
    pub done: bool,
    /// Time the image lock was held.
    pub locked: Duration,
    /// Time spent in a flush barrier without the lock (zero if none).
    pub synced: Duration,
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
    fn read_into(&self, offset: u64, dst: &mut dyn DataBuf) -> BlockResult<()> {
        lock(&self.0).read_into(offset, dst).map_err(to_block)
    }
    fn write_from(&self, offset: u64, src: &dyn DataBuf) -> BlockResult<()> {
        lock(&self.0).write_from(offset, src).map_err(to_block)
    }
    fn direct_io(&self) -> bool {
        true
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
