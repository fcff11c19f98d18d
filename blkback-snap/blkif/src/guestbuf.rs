//! A request's guest pages as a [`DataBuf`], so a block device can fill or drain them
//! directly ([`BlockDevice::read_into`](xensnap_blockdev::BlockDevice::read_into)).
//!
//! Bytes are copied in and out with [`GrantPage::read`] / [`GrantPage::write`]; file I/O goes
//! straight between the file and the pages when every page of the range offers its memory
//! ([`GrantPage::io_region`]): one `preadv`/`pwritev` for the whole range. No Rust slice over
//! guest memory is ever formed, and nothing outside the segments is reached: each piece is
//! one segment's bytes inside its own page.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use xensnap_blockdev::DataBuf;

use crate::abi::PAGE_SIZE;
use crate::mem::{GrantError, GrantPage, GrantSeg};

/// The segments of one request over their mapped pages, in request order.
pub struct GuestPages<'a> {
    /// (page, offset in the page, length, position in the request)
    pieces: Vec<(&'a dyn GrantPage, usize, usize, usize)>,
    len: usize,
}

/// The kernel could not reach the mapped pages (`EFAULT`: a mapping the kernel cannot copy
/// to or from). Not expected with gntdev mappings, which the process itself reads and writes
/// the same way; the caller then copies through a buffer of its own (the same bytes again,
/// so a partial transfer before the failure does no harm). Logged once.
fn unreachable_pages(e: &io::Error) -> bool {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if e.raw_os_error() != Some(14) {
        return false;
    }
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!("file I/O straight into mapped guest pages failed ({e}); copying instead");
    }
    true
}

fn grant_io(e: GrantError) -> io::Error {
    io::Error::other(e)
}

impl<'a> GuestPages<'a> {
    /// `segs[i]` lives in `pages[i]`. `None` if a page is missing (not mapped); fails if the
    /// lists differ in length or a segment does not lie inside one page.
    pub fn new(
        segs: &[GrantSeg],
        pages: &'a [Option<Arc<dyn GrantPage>>],
    ) -> Result<Option<GuestPages<'a>>, GrantError> {
        if segs.len() != pages.len() {
            return Err(GrantError::BadRange { offset: 0, len: segs.len() });
        }
        let mut pieces = Vec::with_capacity(segs.len());
        let mut pos = 0usize;
        for (sg, page) in segs.iter().zip(pages) {
            let Some(page) = page else { return Ok(None) };
            let (off, n) = (usize::from(sg.offset), usize::from(sg.len));
            if off + n > PAGE_SIZE {
                return Err(GrantError::BadRange { offset: off, len: n });
            }
            pieces.push((&**page, off, n, pos));
            pos += n;
        }
        Ok(Some(GuestPages { pieces, len: pos }))
    }

    /// The parts of `pos..pos+len` in each piece: (page, offset in page, length, offset in
    /// the range), in order; an error if the range is outside the request.
    fn parts(
        &self,
        pos: usize,
        len: usize,
    ) -> io::Result<impl Iterator<Item = (&'a dyn GrantPage, usize, usize, usize)> + '_> {
        let end = match pos.checked_add(len) {
            Some(e) if e <= self.len => e,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{len} bytes at {pos} are outside a {}-byte request", self.len),
                ))
            }
        };
        // first piece that ends after pos
        let first = self.pieces.partition_point(|&(_, _, n, at)| at + n <= pos);
        Ok(self.pieces[first..].iter().take_while(move |&&(_, _, _, at)| at < end).filter_map(
            move |&(page, off, n, at)| {
                let a = pos.max(at);
                let b = end.min(at + n);
                (a < b).then(|| (page, off + (a - at), b - a, a - pos))
            },
        ))
    }

    /// Regions for `pos..pos+len`, or `None` if a page cannot offer one.
    fn regions(&self, pos: usize, len: usize) -> io::Result<Option<Vec<libxc_ffi::IoRegion<'a>>>> {
        let mut v = Vec::with_capacity(self.pieces.len());
        for (page, off, n, _) in self.parts(pos, len)? {
            match page.io_region(off, n) {
                Some(r) => v.push(r),
                None => return Ok(None),
            }
        }
        Ok(Some(v))
    }
}

impl DataBuf for GuestPages<'_> {
    fn len(&self) -> usize {
        self.len
    }
    fn copy_in(&mut self, pos: usize, src: &[u8]) -> io::Result<()> {
        for (page, off, n, at) in self.parts(pos, src.len())? {
            page.write(off, &src[at..at + n]).map_err(grant_io)?;
        }
        Ok(())
    }
    fn copy_out(&self, pos: usize, dst: &mut [u8]) -> io::Result<()> {
        for (page, off, n, at) in self.parts(pos, dst.len())? {
            page.read(off, &mut dst[at..at + n]).map_err(grant_io)?;
        }
        Ok(())
    }
    fn read_file(&mut self, fd: BorrowedFd<'_>, file_off: u64, pos: usize, len: usize) -> io::Result<bool> {
        let Some(regions) = self.regions(pos, len)? else { return Ok(false) };
        if regions.iter().any(|r| !r.is_writable()) {
            return Ok(false);
        }
        match libxc_ffi::preadv_exact(fd, file_off, &regions) {
            Err(e) if unreachable_pages(&e) => Ok(false),
            r => r.map(|()| true),
        }
    }
    fn write_file(&self, fd: BorrowedFd<'_>, file_off: u64, pos: usize, len: usize) -> io::Result<bool> {
        // (a range outside the request: nothing written, the copy path reports it)
        let Ok(Some(regions)) = self.regions(pos, len) else { return Ok(false) };
        match libxc_ffi::pwritev_all(fd, file_off, &regions) {
            Err(e) if unreachable_pages(&e) => Ok(false),
            r => r.map(|()| true),
        }
    }
}
