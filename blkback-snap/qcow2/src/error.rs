//! Errors of the qcow2 engine. Every variant says what went wrong and where.

use std::io;

/// Errors returned by the qcow2 engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error of the underlying image file.
    #[error("I/O error while {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The image metadata is inconsistent or hostile (names the table and offset).
    #[error("corrupt image: {what}")]
    Corrupt { what: String },
    /// The image uses a feature this engine does not implement.
    #[error("unsupported image feature: {what}")]
    Unsupported { what: String },
    /// A named checkpoint or other object does not exist.
    #[error("not found: {what}")]
    NotFound { what: String },
    /// The caller passed an invalid argument.
    #[error("invalid argument: {what}")]
    InvalidArgument { what: String },
    /// A guest request reaches past the end of the virtual disk.
    #[error("request {offset}+{len} is beyond the virtual disk size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A write-type operation on an image opened read-only (the reason, when the engine
    /// chose read-only itself, is in [`crate::ImageInfo::read_only_reason`] and the log).
    #[error("image is opened read-only")]
    ReadOnly,
    /// A refcount would exceed the maximum of the image's refcount width.
    #[error("refcount overflow: {what}")]
    RefcountOverflow { what: String },
    /// An earlier flush (or write) of the image file failed: what it should have made
    /// durable may be lost even if a later flush succeeds, so every write, flush and
    /// checkpoint step is refused until the image is reopened (which rebuilds what a crash
    /// would). Names the first failure.
    #[error("image poisoned by an earlier failure ({first}): reopen it; writes, flushes and checkpoints are refused")]
    Poisoned { first: String },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into() }
    }
    pub(crate) fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported { what: what.into() }
    }
    pub(crate) fn invalid(what: impl Into<String>) -> Self {
        Error::InvalidArgument { what: what.into() }
    }
    pub(crate) fn not_found(what: impl Into<String>) -> Self {
        Error::NotFound { what: what.into() }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
