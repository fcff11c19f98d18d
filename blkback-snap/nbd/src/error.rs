//! Connection-level errors.

use std::io;

/// Why a connection ended other than by a clean client disconnect.
///
/// Errors that the protocol lets the server report to the client (a bad option, an I/O error
/// on one request) do not end the connection and never show up here.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The transport failed (including the client closing the socket in the middle of a
    /// message).
    #[error("transport error: {0}")]
    Io(#[from] io::Error),
    /// The client sent a wrong magic number (not an NBD client, or it lost framing).
    #[error("bad magic from client: {what} = {got:#x}")]
    BadMagic { what: &'static str, got: u64 },
    /// The client set handshake flags we did not advertise.
    #[error("client sent unknown handshake flags {0:#x}")]
    BadClientFlags(u32),
    /// An option longer than we are willing to buffer.
    #[error("option {option} has length {len}, more than the limit {limit}")]
    OptionTooLong { option: u32, len: u32, limit: u32 },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist: the protocol has no way to
    /// report this, so the connection is dropped.
    #[error("client asked for unknown export {0:?} via NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
    /// A write request with a payload larger than we are willing to read; after an `EINVAL`
    /// reply the connection is dropped because we cannot stay in sync cheaply.
    #[error("write request of {len} bytes exceeds the limit {limit}")]
    RequestTooLarge { len: u32, limit: u32 },
    /// The server is stopping.
    #[error("server is shutting down")]
    Shutdown,
}
