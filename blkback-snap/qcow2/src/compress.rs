//! Decompression of compressed clusters (zlib raw deflate, zstd).

use crate::error::{Error, Result};
use crate::header::CompressionType;
use std::io::Read;

/// Decompress `input` (which may carry trailing garbage up to the sector end) into exactly
/// `out.len()` bytes.
pub(crate) fn decompress(ty: CompressionType, input: &[u8], out: &mut [u8], at: u64) -> Result<()> {
    match ty {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new(false);
            let r = d.decompress(input, out, flate2::FlushDecompress::Finish);
            let produced = d.total_out();
            match r {
                Ok(_) if produced == out.len() as u64 => Ok(()),
                Ok(_) => Err(Error::corrupt(format!(
                    "compressed cluster at {at:#x}: deflate stream produced {produced} of {} bytes",
                    out.len()
                ))),
                Err(e) => Err(Error::corrupt(format!("compressed cluster at {at:#x}: bad deflate data: {e}"))),
            }
        }
        CompressionType::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| Error::corrupt(format!("compressed cluster at {at:#x}: zstd init: {e}")))?;
            dec.read_exact(out)
                .map_err(|e| Error::corrupt(format!("compressed cluster at {at:#x}: bad zstd data: {e}")))
        }
    }
}
