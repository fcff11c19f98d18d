//! Opening the disk image named by a backend's `params`.
//!
//! Format rule (never guessed from guest-writable bytes): a path ending in `.qcow2` is opened
//! as qcow2 with xensnap-qcow2 (and refused if it is not a valid qcow2 image); any other path
//! is served raw, unless the caller forces a format. Sniffing a raw disk's first bytes would
//! let a guest turn its raw disk into a qcow2 image on the next start.
//!
//! The image file is locked (`flock`, exclusive for read-write, shared for read-only) for as
//! long as it is served, the same advisory lock `xl-snap image …` takes, so offline tools
//! refuse to write an image a guest is using (they go through the control socket instead).

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use xensnap_blockdev::{buf_error, check_range, BlockDevice, BlockError, BlockResult, DataBuf};
use xensnap_qcow2::{Qcow2, SharedImage};

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    /// The format a path is served as when nothing forces one.
    pub fn for_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("qcow2") => Format::Qcow2,
            _ => Format::Raw,
        }
    }
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "qcow2" => Some(Format::Qcow2),
            "raw" | "aio" => Some(Format::Raw),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// Split a backend `params` value into an optional format prefix and the path. libxl writes
/// the bare target for `phy` disks; `qcow2:/p` / `raw:/p` / `aio:/p` (what libxl writes for
/// qdisk) are accepted too.
pub fn parse_params(params: &str) -> (Option<Format>, PathBuf) {
    if let Some((pfx, rest)) = params.split_once(':') {
        if let Some(f) = Format::parse(pfx) {
            return (Some(f), PathBuf::from(rest));
        }
    }
    (None, PathBuf::from(params))
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {msg}")]
    Open { path: String, msg: String },
    #[error("{path}: image is in use by another process (locked)")]
    Locked { path: String },
}

/// A raw image file as a block device (positioned I/O, `fdatasync` for flush).
pub struct RawFile {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawFile {
    pub fn new(file: File, read_only: bool) -> std::io::Result<RawFile> {
        // Seek, not metadata: a block device's metadata length is 0.
        use std::io::Seek;
        let size = (&file).seek(std::io::SeekFrom::End(0))? & !511;
        Ok(RawFile { file, size, read_only })
    }
}

fn io_err(e: std::io::Error) -> BlockError {
    if e.raw_os_error() == Some(28) {
        BlockError::NoSpace
    } else {
        BlockError::Io(e.to_string())
    }
}

impl BlockDevice for RawFile {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> BlockResult<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.read_exact_at(buf, offset).map_err(io_err)
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size)?;
        self.file.write_all_at(buf, offset).map_err(io_err)
    }
    fn flush(&self) -> BlockResult<()> {
        self.file.sync_data().map_err(io_err)
    }
    fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)?;
        let zero = vec![0u8; len.min(1 << 20) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(zero.len() as u64) as usize;
            self.file.write_all_at(&zero[..n], pos).map_err(io_err)?;
            pos += n as u64;
        }
        Ok(())
    }
    fn read_into(&self, offset: u64, dst: &mut dyn DataBuf) -> BlockResult<()> {
        let len = dst.len();
        check_range(offset, len as u64, self.size)?;
        if dst.read_file(self.file.as_fd(), offset, 0, len).map_err(io_err)? {
            return Ok(());
        }
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset).map_err(io_err)?;
        dst.copy_in(0, &buf).map_err(buf_error)
    }
    fn write_from(&self, offset: u64, src: &dyn DataBuf) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let len = src.len();
        check_range(offset, len as u64, self.size)?;
        if src.write_file(self.file.as_fd(), offset, 0, len).map_err(io_err)? {
            return Ok(());
        }
        let mut buf = vec![0u8; len];
        src.copy_out(0, &mut buf).map_err(buf_error)?;
        self.file.write_all_at(&buf, offset).map_err(io_err)
    }
    fn direct_io(&self) -> bool {
        true
    }
}

/// An opened, locked image.
pub struct Image {
    pub path: PathBuf,
    pub format: Format,
    /// The device the rings serve.
    pub device: Arc<dyn BlockDevice>,
    /// The qcow2 engine behind `device` (for checkpoints and checks); `None` for raw.
    pub qcow2: Option<Arc<Mutex<Qcow2>>>,
    /// Holds the advisory lock for the image's lifetime.
    _lock: File,
}

impl Image {
    /// Open `path` for serving. `lock_wait`: how long to retry while another process holds
    /// the lock (a previous backend of the same disk may still be exiting).
    pub fn open(
        path: &Path,
        format: Option<Format>,
        read_only: bool,
        lock_wait: Duration,
    ) -> Result<Image, ImageError> {
        let disp = path.display().to_string();
        let oe = |msg: String| ImageError::Open { path: disp.clone(), msg };
        let format = format.unwrap_or_else(|| Format::for_path(path));
        let lock = File::open(path).map_err(|e| oe(e.to_string()))?;
        let deadline = Instant::now() + lock_wait;
        loop {
            let r = if read_only { lock.try_lock_shared() } else { lock.try_lock() };
            match r {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        return Err(ImageError::Locked { path: disp });
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(oe(format!("lock: {e}"))),
            }
        }
        match format {
            Format::Qcow2 => {
                let img = Qcow2::open_file(path, &xensnap_qcow2::OpenOptions { read_only })
                    .map_err(|e| oe(format!("qcow2: {e}")))?;
                if !read_only && img.is_read_only() {
                    let why = img.info().read_only_reason.unwrap_or_else(|| "unknown reason".into());
                    return Err(oe(format!("qcow2 image can only be opened read-only ({why}); use access=ro")));
                }
                let shared = SharedImage::new(img);
                let q = Arc::clone(&shared.0);
                Ok(Image { path: path.to_path_buf(), format, device: Arc::new(shared), qcow2: Some(q), _lock: lock })
            }
            Format::Raw => {
                let f = OpenOptions::new().read(true).write(!read_only).open(path).map_err(|e| oe(e.to_string()))?;
                let raw = RawFile::new(f, read_only).map_err(|e| oe(e.to_string()))?;
                if raw.size() == 0 {
                    return Err(oe("raw image is empty".into()));
                }
                Ok(Image { path: path.to_path_buf(), format, device: Arc::new(raw), qcow2: None, _lock: lock })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_rules() {
        assert_eq!(Format::for_path(Path::new("/a/b.qcow2")), Format::Qcow2);
        assert_eq!(Format::for_path(Path::new("/a/b.QCOW2")), Format::Qcow2);
        assert_eq!(Format::for_path(Path::new("/a/b.img")), Format::Raw);
        assert_eq!(Format::for_path(Path::new("/dev/vg/lv")), Format::Raw);
        assert_eq!(parse_params("/x/y.qcow2"), (None, PathBuf::from("/x/y.qcow2")));
        assert_eq!(parse_params("qcow2:/x/y"), (Some(Format::Qcow2), PathBuf::from("/x/y")));
        assert_eq!(parse_params("aio:/x/y"), (Some(Format::Raw), PathBuf::from("/x/y")));
        assert_eq!(parse_params("nbd:host:1"), (None, PathBuf::from("nbd:host:1")));
    }

    #[test]
    fn raw_file_device() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.img");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let img = Image::open(&p, None, false, Duration::ZERO).unwrap();
        assert_eq!(img.format, Format::Raw);
        let d = &img.device;
        assert_eq!(d.size(), 8192);
        d.write_at(512, &[1; 512]).unwrap();
        d.write_zeroes(1024, 1024, false).unwrap();
        d.flush().unwrap();
        let mut b = vec![0; 2048];
        d.read_at(0, &mut b).unwrap();
        assert_eq!(&b[..512], &[7; 512][..]);
        assert_eq!(&b[512..1024], &[1; 512][..]);
        assert_eq!(&b[1024..2048], &[0; 1024][..]);
        assert!(matches!(d.read_at(8000, &mut b), Err(BlockError::OutOfRange { .. })));
        // Locked while served: a second writer is refused.
        assert!(matches!(Image::open(&p, None, false, Duration::ZERO), Err(ImageError::Locked { .. })));
        drop(img);
        let ro = Image::open(&p, None, true, Duration::ZERO).unwrap();
        assert!(ro.device.read_only());
        assert!(matches!(ro.device.write_at(0, &[0; 512]), Err(BlockError::ReadOnly)));
    }

    #[test]
    fn qcow2_named_file_must_be_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.qcow2");
        std::fs::write(&p, vec![0u8; 65536]).unwrap();
        let e = Image::open(&p, None, false, Duration::ZERO).err().unwrap();
        assert!(e.to_string().contains("qcow2"), "{e}");
        let q = dir.path().join("e.qcow2");
        Qcow2::create_file(&q, &xensnap_qcow2::CreateOptions { size: 1 << 20, ..Default::default() })
            .unwrap()
            .close()
            .unwrap();
        let img = Image::open(&q, None, false, Duration::ZERO).unwrap();
        assert_eq!(img.format, Format::Qcow2);
        assert_eq!(img.device.size(), 1 << 20);
        assert!(img.qcow2.is_some());
    }
}
