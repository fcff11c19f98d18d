//! An NBD server (fixed newstyle negotiation, simple replies) over the
//! [`xensnap_blockdev::BlockDevice`] seam.
//!
//! * Handshake: `NBD_OPT_EXPORT_NAME`, `NBD_OPT_GO`, `NBD_OPT_INFO` (with `NBD_INFO_EXPORT`,
//!   `NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`, `NBD_INFO_BLOCK_SIZE`), `NBD_OPT_LIST`,
//!   `NBD_OPT_ABORT`; everything else (TLS, structured replies, metadata contexts, extended
//!   headers) is refused with an error reply so clients fall back.
//! * Transmission: `READ`, `WRITE` (+FUA), `FLUSH`, `TRIM`, `WRITE_ZEROES` (+`NO_HOLE`), `DISC`,
//!   one request at a time per connection, replies in order.
//! * Limits against hostile clients: options longer than [`proto::MAX_OPTION_LEN`] drop the
//!   connection; reads longer than [`proto::MAX_PAYLOAD`] get `EINVAL`, writes longer than that
//!   get `EINVAL` and a disconnect; no allocation is sized by a client before those checks.
//!
//! ```no_run
//! use std::sync::Arc;
//! use xensnap_blockdev::MemDisk;
//! use xensnap_nbd::{Server, StaticExports};
//!
//! let exports = StaticExports::single("disk", Arc::new(MemDisk::new(1 << 20)));
//! let server = Server::new(Arc::new(exports));
//! let stop = server.stop_handle();
//! let listener = std::net::TcpListener::bind("127.0.0.1:10809").unwrap();
//! std::thread::spawn(move || server.serve_tcp(listener));
//! // ...
//! stop.stop();
//! ```

mod conn;
mod error;
pub mod proto;
mod registry;
mod server;

pub use error::NbdError;
pub use registry::{ExportRegistry, StaticExports};
pub use server::{Server, StopHandle, DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONNECTIONS};
