//! XenStore through libxenstore: read/write/rm/mkdir/directory/permissions, watches and
//! transactions (with retry on EAGAIN).

use std::ffi::{c_char, c_uint, c_void, CStr, CString};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;
use std::time::Duration;

use crate::error::{Error, Result, EAGAIN};
use crate::sys::{self, xs_handle, xs_transaction_t, XsApi, XBT_NULL};

const OPEN_HINT: &str = "is xenstored running (socket /run/xenstored/socket) or is \
/dev/xen/xenbus present? XenStore needs a Xen domain (dom0 with xenfs/xen tools started)";

/// Longest absolute path xenstored accepts (`XENSTORE_ABS_PATH_MAX`, xs_wire.h).
pub const ABS_PATH_MAX: usize = 3072;
/// Largest value xenstored accepts (`XENSTORE_PAYLOAD_MAX`, xs_wire.h).
pub const PAYLOAD_MAX: usize = 4096;

/// How many times [`XenStore::transaction`] retries a conflicting transaction.
pub const TRANSACTION_ATTEMPTS: u32 = 16;

/// How to open XenStore.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenFlags {
    /// `XS_OPEN_READONLY`.
    pub read_only: bool,
    /// `XS_OPEN_SOCKETONLY`: only the xenstored unix socket, not /dev/xen/xenbus.
    pub socket_only: bool,
}

/// An open connection to XenStore (`struct xs_handle`). Closed on drop.
pub struct XenStore {
    h: NonNull<xs_handle>,
    api: &'static XsApi,
}

// SAFETY: libxenstore (built with pthread support, as Debian's is) serialises requests on a
// handle with internal mutexes; the handle may be used from several threads.
unsafe impl Send for XenStore {}
// SAFETY: as above.
unsafe impl Sync for XenStore {}

impl std::fmt::Debug for XenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenStore").field("handle", &self.h).finish()
    }
}

/// Access rights of one domain on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// `XS_PERM_NONE`
    None,
    /// `XS_PERM_READ`
    Read,
    /// `XS_PERM_WRITE`
    Write,
    /// `XS_PERM_READ | XS_PERM_WRITE`
    ReadWrite,
}

/// One entry of a node's permission list. The first entry names the owner (who can always
/// read and write) and, through its `access`, what every domain not listed may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Permission {
    /// The domain.
    pub domid: u32,
    /// Its rights.
    pub access: Access,
}

impl Permission {
    fn to_raw(self) -> sys::xs_permissions {
        let perms = match self.access {
            Access::None => sys::XS_PERM_NONE,
            Access::Read => sys::XS_PERM_READ,
            Access::Write => sys::XS_PERM_WRITE,
            Access::ReadWrite => sys::XS_PERM_READ | sys::XS_PERM_WRITE,
        };
        sys::xs_permissions { id: self.domid, perms }
    }

    fn from_raw(p: sys::xs_permissions) -> Permission {
        let access = match (p.perms & sys::XS_PERM_READ != 0, p.perms & sys::XS_PERM_WRITE != 0) {
            (false, false) => Access::None,
            (true, false) => Access::Read,
            (false, true) => Access::Write,
            (true, true) => Access::ReadWrite,
        };
        Permission { domid: p.id, access }
    }
}

/// A fired watch: the path that changed (or the watched path itself, once, right after
/// `watch`) and the token given to [`XenStore::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    /// The path that triggered.
    pub path: String,
    /// The token of the watch.
    pub token: String,
}

impl WatchEvent {
    /// Builds an event from the strings libxenstore returns (`[path, token, …]`).
    pub fn from_parts(parts: &[&[u8]]) -> Result<WatchEvent> {
        if parts.len() <= sys::XS_WATCH_TOKEN {
            return Err(Error::InvalidArgument {
                call: "xs_read_watch",
                reason: format!("watch event with {} strings, expected at least 2", parts.len()),
            });
        }
        Ok(WatchEvent {
            path: String::from_utf8_lossy(parts[sys::XS_WATCH_PATH]).into_owned(),
            token: String::from_utf8_lossy(parts[sys::XS_WATCH_TOKEN]).into_owned(),
        })
    }
}

/// Validates an xenstore path (absolute, relative, or a special `@…` watch path) and makes
/// it a C string. Rejects empty paths, NULs, and paths longer than [`ABS_PATH_MAX`].
pub fn check_path(call: &'static str, path: &str) -> Result<CString> {
    if path.is_empty() {
        return Err(Error::InvalidArgument { call, reason: "empty xenstore path".into() });
    }
    if path.len() > ABS_PATH_MAX {
        return Err(Error::InvalidArgument {
            call,
            reason: format!("xenstore path of {} bytes exceeds {ABS_PATH_MAX}", path.len()),
        });
    }
    CString::new(path)
        .map_err(|_| Error::InvalidArgument { call, reason: format!("NUL byte in xenstore path {path:?}") })
}

/// Is `c` a valid character of a xenstore path component (`[A-Za-z0-9_@-]`, xenstored's
/// rule; `/` separates components)?
fn is_component_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '@')
}

/// Joins `base` and `components` with `/`, checking every component is a single valid
/// path component (non-empty, no `/`, only `[A-Za-z0-9_@-]`).
///
/// ```
/// # use libxc_ffi::xenstore::join;
/// let p = join("/local/domain/0/backend/vbd", &["5", "51712", "state"]).unwrap();
/// assert_eq!(p, "/local/domain/0/backend/vbd/5/51712/state");
/// assert!(join("/local/domain", &["a/b"]).is_err());
/// ```
pub fn join<S: AsRef<str>>(base: &str, components: &[S]) -> Result<String> {
    let mut out = base.trim_end_matches('/').to_string();
    for c in components {
        let c = c.as_ref();
        if c.is_empty() || !c.chars().all(is_component_char) {
            return Err(Error::InvalidArgument {
                call: "xenstore::join",
                reason: format!("invalid xenstore path component {c:?}"),
            });
        }
        if !out.is_empty() || base.starts_with('/') {
            out.push('/');
        }
        out.push_str(c);
    }
    if out.len() > ABS_PATH_MAX {
        return Err(Error::InvalidArgument {
            call: "xenstore::join",
            reason: format!("path of {} bytes exceeds {ABS_PATH_MAX}", out.len()),
        });
    }
    Ok(out)
}

/// `/local/domain/<domid>`, the home of a domain in XenStore.
pub fn domain_path(domid: u32) -> String {
    format!("/local/domain/{domid}")
}

/// Copies a `char **` array of `num` strings (one malloc'd block, as libxenstore returns
/// them) into owned byte vectors and frees the block.
///
/// # Safety
/// `arr` must be non-NULL, point to `num` valid NUL-terminated strings, and be a single
/// block from `malloc` that nothing else frees.
unsafe fn take_string_array(arr: *mut *mut c_char, num: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(num);
    // SAFETY: by the caller's contract `arr` holds `num` valid C strings in one malloc'd
    // block that we now own and free exactly once, after copying.
    unsafe {
        for i in 0..num {
            let s = *arr.add(i);
            if s.is_null() {
                break;
            }
            out.push(CStr::from_ptr(s).to_bytes().to_vec());
        }
        sys::free(arr.cast());
    }
    out
}

/// The node operations, the same on the store (outside any transaction) and inside a
/// [`Transaction`]: `$scope` names a method giving the store and the transaction id.
macro_rules! node_ops {
    ($scope:ident) => {
        /// Reads a node's value.
        pub fn read(&self, path: &str) -> Result<Vec<u8>> {
            let (xs, t) = self.$scope();
            xs.read_in(t, path)
        }
        /// Reads a node's value as UTF-8 (lossy).
        pub fn read_string(&self, path: &str) -> Result<String> {
            self.read(path).map(|v| String::from_utf8_lossy(&v).into_owned())
        }
        /// Reads a node, mapping "does not exist" (ENOENT) to `Ok(None)`.
        pub fn read_opt(&self, path: &str) -> Result<Option<Vec<u8>>> {
            match self.read(path) {
                Ok(v) => Ok(Some(v)),
                Err(e) if e.is_not_found() => Ok(None),
                Err(e) => Err(e),
            }
        }
        /// Writes a node (creating it and missing parents).
        pub fn write(&self, path: &str, value: &[u8]) -> Result<()> {
            let (xs, t) = self.$scope();
            xs.write_in(t, path, value)
        }
        /// Writes a string value.
        pub fn write_str(&self, path: &str, value: &str) -> Result<()> {
            self.write(path, value.as_bytes())
        }
        /// Creates an empty node (and missing parents).
        pub fn mkdir(&self, path: &str) -> Result<()> {
            let (xs, t) = self.$scope();
            xs.mkdir_in(t, path)
        }
        /// Removes a node and everything below it.
        pub fn rm(&self, path: &str) -> Result<()> {
            let (xs, t) = self.$scope();
            xs.rm_in(t, path)
        }
        /// Lists the children of a node.
        pub fn directory(&self, path: &str) -> Result<Vec<String>> {
            let (xs, t) = self.$scope();
            xs.directory_in(t, path)
        }
        /// The node's permissions (owner first).
        pub fn get_permissions(&self, path: &str) -> Result<Vec<Permission>> {
            let (xs, t) = self.$scope();
            xs.get_permissions_in(t, path)
        }
        /// Sets the node's permissions; `perms[0]` is the owner and the default for others.
        pub fn set_permissions(&self, path: &str, perms: &[Permission]) -> Result<()> {
            let (xs, t) = self.$scope();
            xs.set_permissions_in(t, path, perms)
        }
    };
}

impl XenStore {
    /// Opens XenStore (`xs_open(0)`): /dev/xen/xenbus, or the xenstored socket.
    pub fn open() -> Result<XenStore> {
        Self::open_with(OpenFlags::default())
    }

    /// Opens XenStore with flags.
    pub fn open_with(flags: OpenFlags) -> Result<XenStore> {
        let api = XsApi::get()?;
        let mut f = 0;
        if flags.read_only {
            f |= sys::XS_OPEN_READONLY;
        }
        if flags.socket_only {
            f |= sys::XS_OPEN_SOCKETONLY;
        }
        // SAFETY: xs_open takes only flags; returns a handle or NULL with errno set.
        let h = unsafe { (api.xs_open)(f) };
        match NonNull::new(h) {
            Some(h) => Ok(XenStore { h, api }),
            None => {
                let ctx = match (flags.read_only, flags.socket_only) {
                    (false, false) => "",
                    (true, false) => "read-only",
                    (false, true) => "socket-only",
                    (true, true) => "read-only, socket-only",
                };
                Err(Error::last_os("xs_open", ctx).with_hint(OPEN_HINT))
            }
        }
    }

    fn raw(&self) -> *mut xs_handle {
        self.h.as_ptr()
    }

    fn read_in(&self, t: xs_transaction_t, path: &str) -> Result<Vec<u8>> {
        let c = check_path("xs_read", path)?;
        let mut len: c_uint = 0;
        // SAFETY: valid handle, NUL-terminated path, `len` is a valid out pointer.
        let p = unsafe { (self.api.xs_read)(self.raw(), t, c.as_ptr(), &mut len) };
        if p.is_null() {
            return Err(Error::last_os("xs_read", path));
        }
        // SAFETY: on success xs_read returns a malloc'd buffer of `len` bytes (plus a NUL);
        // we copy it and free it exactly once.
        let v = unsafe {
            let v = std::slice::from_raw_parts(p.cast::<u8>(), len as usize).to_vec();
            sys::free(p);
            v
        };
        Ok(v)
    }

    fn write_in(&self, t: xs_transaction_t, path: &str, value: &[u8]) -> Result<()> {
        let c = check_path("xs_write", path)?;
        if value.len() > PAYLOAD_MAX {
            return Err(Error::InvalidArgument {
                call: "xs_write",
                reason: format!("value of {} bytes exceeds {PAYLOAD_MAX}", value.len()),
            });
        }
        // SAFETY: valid handle and path; `value` is readable for `value.len()` bytes (which
        // fits c_uint, checked above) and xs_write does not keep the pointer.
        let ok = unsafe {
            (self.api.xs_write)(self.raw(), t, c.as_ptr(), value.as_ptr().cast::<c_void>(), value.len() as c_uint)
        };
        if ok {
            Ok(())
        } else {
            Err(Error::last_os("xs_write", path))
        }
    }

    fn mkdir_in(&self, t: xs_transaction_t, path: &str) -> Result<()> {
        let c = check_path("xs_mkdir", path)?;
        // SAFETY: valid handle and NUL-terminated path.
        if unsafe { (self.api.xs_mkdir)(self.raw(), t, c.as_ptr()) } {
            Ok(())
        } else {
            Err(Error::last_os("xs_mkdir", path))
        }
    }

    fn rm_in(&self, t: xs_transaction_t, path: &str) -> Result<()> {
        let c = check_path("xs_rm", path)?;
        // SAFETY: valid handle and NUL-terminated path.
        if unsafe { (self.api.xs_rm)(self.raw(), t, c.as_ptr()) } {
            Ok(())
        } else {
            Err(Error::last_os("xs_rm", path))
        }
    }

    fn directory_in(&self, t: xs_transaction_t, path: &str) -> Result<Vec<String>> {
        let c = check_path("xs_directory", path)?;
        let mut num: c_uint = 0;
        // SAFETY: valid handle, path, out pointer.
        let arr = unsafe { (self.api.xs_directory)(self.raw(), t, c.as_ptr(), &mut num) };
        if arr.is_null() {
            return Err(Error::last_os("xs_directory", path));
        }
        // SAFETY: on success xs_directory returns one malloc'd block holding `num` string
        // pointers and the strings; ownership passes to us.
        let parts = unsafe { take_string_array(arr, num as usize) };
        Ok(parts.into_iter().map(|b| String::from_utf8_lossy(&b).into_owned()).collect())
    }

    fn get_permissions_in(&self, t: xs_transaction_t, path: &str) -> Result<Vec<Permission>> {
        let c = check_path("xs_get_permissions", path)?;
        let mut num: c_uint = 0;
        // SAFETY: valid handle, path, out pointer.
        let p = unsafe { (self.api.xs_get_permissions)(self.raw(), t, c.as_ptr(), &mut num) };
        if p.is_null() {
            return Err(Error::last_os("xs_get_permissions", path));
        }
        // SAFETY: on success, a malloc'd array of `num` xs_permissions, ours to free.
        let v = unsafe {
            let v = std::slice::from_raw_parts(p, num as usize).iter().map(|&r| Permission::from_raw(r)).collect();
            sys::free(p.cast());
            v
        };
        Ok(v)
    }

    fn set_permissions_in(&self, t: xs_transaction_t, path: &str, perms: &[Permission]) -> Result<()> {
        let c = check_path("xs_set_permissions", path)?;
        if perms.is_empty() {
            return Err(Error::InvalidArgument {
                call: "xs_set_permissions",
                reason: "at least the owner's entry is required".into(),
            });
        }
        let mut raw: Vec<sys::xs_permissions> = perms.iter().map(|p| p.to_raw()).collect();
        // SAFETY: valid handle and path; `raw` holds `raw.len()` entries and outlives the
        // call; libxenstore only reads it.
        let ok =
            unsafe { (self.api.xs_set_permissions)(self.raw(), t, c.as_ptr(), raw.as_mut_ptr(), raw.len() as c_uint) };
        if ok {
            Ok(())
        } else {
            Err(Error::last_os("xs_set_permissions", path))
        }
    }

    fn scope(&self) -> (&XenStore, xs_transaction_t) {
        (self, XBT_NULL)
    }
    node_ops!(scope);

    /// `xs_get_domain_path`: where a domain lives (normally `/local/domain/<domid>`).
    pub fn get_domain_path(&self, domid: u32) -> Result<String> {
        // SAFETY: valid handle.
        let p = unsafe { (self.api.xs_get_domain_path)(self.raw(), domid) };
        if p.is_null() {
            return Err(Error::last_os("xs_get_domain_path", domid.to_string()));
        }
        // SAFETY: a malloc'd NUL-terminated string, ours to free.
        let s = unsafe {
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            sys::free(p.cast());
            s
        };
        Ok(s)
    }

    /// Registers a watch on `path` (and everything below it). Xenstored fires it once right
    /// away. `path` may also be `@introduceDomain` or `@releaseDomain`.
    pub fn watch(&self, path: &str, token: &str) -> Result<()> {
        let c = check_path("xs_watch", path)?;
        let t = check_token("xs_watch", token)?;
        // SAFETY: valid handle and NUL-terminated strings (copied by libxenstore).
        if unsafe { (self.api.xs_watch)(self.raw(), c.as_ptr(), t.as_ptr()) } {
            Ok(())
        } else {
            Err(Error::last_os("xs_watch", format!("{path}, {token}")))
        }
    }

    /// Removes a watch registered with the same path and token.
    pub fn unwatch(&self, path: &str, token: &str) -> Result<()> {
        let c = check_path("xs_unwatch", path)?;
        let t = check_token("xs_unwatch", token)?;
        // SAFETY: valid handle and NUL-terminated strings.
        if unsafe { (self.api.xs_unwatch)(self.raw(), c.as_ptr(), t.as_ptr()) } {
            Ok(())
        } else {
            Err(Error::last_os("xs_unwatch", format!("{path}, {token}")))
        }
    }

    /// Blocks until a watch fires (`xs_read_watch`).
    pub fn read_watch(&self) -> Result<WatchEvent> {
        let mut num: c_uint = 0;
        // SAFETY: valid handle and out pointer.
        let arr = unsafe { (self.api.xs_read_watch)(self.raw(), &mut num) };
        if arr.is_null() {
            return Err(Error::last_os("xs_read_watch", ""));
        }
        // SAFETY: on success a single malloc'd block of `num` strings, ours to free.
        let parts = unsafe { take_string_array(arr, num as usize) };
        let refs: Vec<&[u8]> = parts.iter().map(|v| v.as_slice()).collect();
        WatchEvent::from_parts(&refs)
    }

    /// Returns a pending watch event without blocking (`xs_check_watch`), `None` if none.
    /// After [`XenStore::watch_fd`] polls readable, call this until it returns `None`.
    pub fn check_watch(&self) -> Result<Option<WatchEvent>> {
        // SAFETY: valid handle.
        let arr = unsafe { (self.api.xs_check_watch)(self.raw()) };
        if arr.is_null() {
            let e = Error::last_os("xs_check_watch", "");
            return if e.errno() == Some(EAGAIN) { Ok(None) } else { Err(e) };
        }
        // SAFETY: on success `ret[0]` and `ret[1]` are valid strings in one malloc'd block.
        let parts = unsafe { take_string_array(arr, 2) };
        let refs: Vec<&[u8]> = parts.iter().map(|v| v.as_slice()).collect();
        WatchEvent::from_parts(&refs).map(Some)
    }

    /// Waits up to `timeout` (forever if `None`) for a watch event.
    pub fn wait_watch(&self, timeout: Option<Duration>) -> Result<Option<WatchEvent>> {
        if let Some(ev) = self.check_watch()? {
            return Ok(Some(ev));
        }
        if !crate::poll::wait_readable(self.as_raw_fd(), timeout, "poll(xs_fileno)")? {
            return Ok(None);
        }
        self.check_watch()
    }

    /// Starts a transaction. Prefer [`XenStore::transaction`], which retries on conflict.
    pub fn transaction_start(&self) -> Result<Transaction<'_>> {
        // SAFETY: valid handle.
        let id = unsafe { (self.api.xs_transaction_start)(self.raw()) };
        if id == XBT_NULL {
            return Err(Error::last_os("xs_transaction_start", ""));
        }
        Ok(Transaction { xs: self, id, done: false })
    }

    /// Runs `f` in a transaction and commits it, retrying the whole closure when xenstored
    /// reports a conflict (EAGAIN), at most [`TRANSACTION_ATTEMPTS`] times. An `Err` from `f`
    /// aborts the transaction and is returned (retried if it is itself EAGAIN).
    pub fn transaction<T>(&self, mut f: impl FnMut(&Transaction<'_>) -> Result<T>) -> Result<T> {
        for attempt in 1..=TRANSACTION_ATTEMPTS {
            let t = self.transaction_start()?;
            match f(&t) {
                Ok(v) => match t.commit() {
                    Ok(()) => return Ok(v),
                    Err(e) if e.is_again() => {
                        tracing::debug!(attempt, "xenstore transaction conflict, retrying");
                    }
                    Err(e) => return Err(e),
                },
                Err(e) => {
                    t.abort()?;
                    if !e.is_again() {
                        return Err(e);
                    }
                }
            }
        }
        Err(Error::TransactionConflict { attempts: TRANSACTION_ATTEMPTS })
    }
}

impl XenStore {
    /// The fd that becomes readable when a watch fires, for a poll loop or tokio's
    /// `AsyncFd` (then drain with [`XenStore::check_watch`]).
    pub fn watch_fd(&self) -> Result<BorrowedFd<'_>> {
        let fd = self.as_raw_fd();
        if fd < 0 {
            return Err(Error::last_os("xs_fileno", ""));
        }
        // SAFETY: the fd is owned by the handle and stays open until xs_close in Drop, which
        // cannot run while `self` is borrowed.
        Ok(unsafe { BorrowedFd::borrow_raw(fd) })
    }
}

fn check_token(call: &'static str, token: &str) -> Result<CString> {
    CString::new(token)
        .map_err(|_| Error::InvalidArgument { call, reason: format!("NUL byte in watch token {token:?}") })
}

impl AsRawFd for XenStore {
    /// The fd that becomes readable when a watch fires (`xs_fileno`).
    fn as_raw_fd(&self) -> RawFd {
        // SAFETY: valid handle; xs_fileno returns an fd owned by the handle (creating the
        // watch pipe on first use).
        unsafe { (self.api.xs_fileno)(self.raw()) }
    }
}

impl Drop for XenStore {
    fn drop(&mut self) {
        // SAFETY: the handle came from xs_open and is closed exactly once; every borrow of
        // `self` (transactions, fds) has ended.
        unsafe { (self.api.xs_close)(self.raw()) };
    }
}

/// An open transaction. Aborted on drop unless committed.
#[derive(Debug)]
pub struct Transaction<'a> {
    xs: &'a XenStore,
    id: xs_transaction_t,
    done: bool,
}

impl Transaction<'_> {
    fn scope(&self) -> (&XenStore, xs_transaction_t) {
        (self.xs, self.id)
    }
    node_ops!(scope);

    fn end(&mut self, abort: bool) -> Result<()> {
        self.done = true;
        // SAFETY: valid handle and a transaction id from xs_transaction_start, ended once.
        if unsafe { (self.xs.api.xs_transaction_end)(self.xs.raw(), self.id, abort) } {
            Ok(())
        } else {
            Err(Error::last_os("xs_transaction_end", if abort { "abort" } else { "commit" }))
        }
    }

    /// Commits. `Err` with [`Error::is_again`] means a conflict: start over.
    pub fn commit(mut self) -> Result<()> {
        self.end(false)
    }

    /// Discards the transaction.
    pub fn abort(mut self) -> Result<()> {
        self.end(true)
    }
}

impl Drop for Transaction<'_> {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = self.end(true) {
                tracing::warn!(error = %e, "aborting dropped xenstore transaction failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watch_event_parsing() {
        let ev = WatchEvent::from_parts(&[b"/local/domain/5/device/vbd/51712/state", b"fe:5:51712"]).unwrap();
        assert_eq!(ev.path, "/local/domain/5/device/vbd/51712/state");
        assert_eq!(ev.token, "fe:5:51712");
        // extra strings are ignored
        let ev = WatchEvent::from_parts(&[b"@releaseDomain", b"t", b"junk"]).unwrap();
        assert_eq!(ev.path, "@releaseDomain");
        assert!(WatchEvent::from_parts(&[b"/only/path"]).is_err());
        assert!(WatchEvent::from_parts(&[]).is_err());
    }

    #[test]
    fn path_checks() {
        assert!(check_path("xs_read", "/local/domain/0/name").is_ok());
        assert!(check_path("xs_watch", "@releaseDomain").is_ok());
        assert!(check_path("xs_read", "device/vbd").is_ok());
        let e = check_path("xs_read", "/a\0b").unwrap_err();
        assert!(e.to_string().contains("NUL"), "{e}");
        assert!(check_path("xs_read", "").is_err());
        assert!(check_path("xs_read", &"a".repeat(ABS_PATH_MAX + 1)).is_err());
        assert!(check_token("xs_watch", "a\0").is_err());
    }

    #[test]
    fn path_building() {
        assert_eq!(domain_path(0), "/local/domain/0");
        assert_eq!(
            join(&domain_path(0), &["backend", "vbd", "5", "51712"]).unwrap(),
            "/local/domain/0/backend/vbd/5/51712"
        );
        assert_eq!(join("/local/domain/0/", &["name"]).unwrap(), "/local/domain/0/name");
        assert_eq!(join("/", &["tool"]).unwrap(), "/tool");
        assert_eq!(join("device", &["vbd"]).unwrap(), "device/vbd");
        assert_eq!(join("", &["device", "vbd"]).unwrap(), "device/vbd");
        assert_eq!(join("/x", &[] as &[&str]).unwrap(), "/x");
        for bad in ["", "a/b", "a b", "ü", "a\0"] {
            assert!(join("/x", &[bad]).is_err(), "{bad:?} accepted");
        }
        assert!(join("/x", &["a".repeat(ABS_PATH_MAX)]).is_err());
        let n = 42u32.to_string();
        assert_eq!(join("/x", &[n.as_str(), "feature-persistent"]).unwrap(), "/x/42/feature-persistent");
    }

    #[test]
    fn permission_conversion_round_trips() {
        for access in [Access::None, Access::Read, Access::Write, Access::ReadWrite] {
            let p = Permission { domid: 7, access };
            assert_eq!(Permission::from_raw(p.to_raw()), p);
        }
        assert_eq!(
            Permission { domid: 3, access: Access::ReadWrite }.to_raw(),
            sys::xs_permissions { id: 3, perms: 3 }
        );
        // internal bits (owner, enoent-ok) are ignored on the way in
        assert_eq!(
            Permission::from_raw(sys::xs_permissions { id: 1, perms: 0x08 | 0x01 }),
            Permission { domid: 1, access: Access::Read }
        );
    }
}
