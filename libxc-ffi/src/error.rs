//! The crate's error type: which call failed, with which errno, and a hint when the cause is
//! almost always the environment (no hypervisor, driver not loaded, not root).

use std::io;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors of the Xen library wrappers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The Xen shared library could not be loaded (not installed, or a different ABI version).
    #[error(
        "Xen library {library} is not available: {reason} \
         (install Xen 4.17's userspace libraries: Debian's libxenstore4 libxengnttab1 libxenevtchn1 libxenmisc4.17, all pulled in by libxen-dev)"
    )]
    LibraryUnavailable {
        /// Library label (e.g. `libxenstore`).
        library: &'static str,
        /// What `dlopen`/`dlsym` said.
        reason: String,
    },

    /// A C call returned failure; `source` carries errno.
    #[error("{call}({context}) failed: {source}{}", hint.map(|h| format!(" — {h}")).unwrap_or_default())]
    Os {
        /// The C function that failed, e.g. `xs_read`.
        call: &'static str,
        /// Its arguments, rendered for humans (path, domid, port…).
        context: String,
        /// errno at the time of the failure.
        #[source]
        source: io::Error,
        /// What usually causes this failure.
        hint: Option<&'static str>,
    },

    /// An argument was rejected before calling into C (e.g. a NUL inside a xenstore path).
    #[error("invalid argument to {call}: {reason}")]
    InvalidArgument {
        /// The operation.
        call: &'static str,
        /// Why.
        reason: String,
    },

    /// An access to shared memory fell outside the mapping.
    #[error("access of {len} bytes at offset {offset} is out of bounds of a {size}-byte region")]
    OutOfBounds {
        /// Requested offset.
        offset: usize,
        /// Requested length.
        len: usize,
        /// Size of the region.
        size: usize,
    },

    /// An atomic access at an offset that is not aligned for its width.
    #[error("offset {offset} is not aligned to {align} bytes")]
    Misaligned {
        /// Requested offset.
        offset: usize,
        /// Required alignment.
        align: usize,
    },

    /// A write to a region that was mapped read-only.
    #[error("write to a read-only mapping")]
    ReadOnly,

    /// A xenstore transaction kept conflicting (EAGAIN) and the retry budget ran out.
    #[error("xenstore transaction still conflicting after {attempts} attempts")]
    TransactionConflict {
        /// How many times it was tried.
        attempts: u32,
    },

    /// The domain does not exist.
    #[error("domain {0} does not exist")]
    NoSuchDomain(u32),
}

impl Error {
    /// Builds [`Error::Os`] from errno as it is *now*: call this immediately after the C call.
    pub(crate) fn last_os(call: &'static str, context: impl Into<String>) -> Error {
        Error::Os { call, context: context.into(), source: io::Error::last_os_error(), hint: None }
    }

    /// Builds [`Error::Os`] from an explicit errno value.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn os(call: &'static str, context: impl Into<String>, errno: i32) -> Error {
        Error::Os { call, context: context.into(), source: io::Error::from_raw_os_error(errno), hint: None }
    }

    /// Attaches a hint to an [`Error::Os`] (no-op for other variants).
    pub(crate) fn with_hint(mut self, h: &'static str) -> Error {
        if let Error::Os { hint, .. } = &mut self {
            *hint = Some(h);
        }
        self
    }

    /// The errno of an [`Error::Os`].
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Os { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }

    /// The C call that failed, for [`Error::Os`].
    pub fn call(&self) -> Option<&'static str> {
        match self {
            Error::Os { call, .. } => Some(call),
            _ => None,
        }
    }

    /// True for ENOENT (e.g. a xenstore node that does not exist) and [`Error::NoSuchDomain`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NoSuchDomain(_)) || self.errno() == Some(ENOENT)
    }

    /// True for EAGAIN (e.g. a conflicting xenstore transaction).
    pub fn is_again(&self) -> bool {
        self.errno() == Some(EAGAIN)
    }

    /// True when the Xen library itself is missing (as opposed to Xen being absent).
    pub fn is_library_unavailable(&self) -> bool {
        matches!(self, Error::LibraryUnavailable { .. })
    }
}

pub(crate) const ENOENT: i32 = 2;
pub(crate) const EINTR: i32 = 4;
pub(crate) const EAGAIN: i32 = 11;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_error_names_call_context_errno_and_hint() {
        let e = Error::os("xs_read", "/local/domain/0/name", ENOENT).with_hint("is xenstored running?");
        let s = e.to_string();
        assert!(s.starts_with("xs_read(/local/domain/0/name) failed: "), "{s}");
        assert!(s.contains("No such file or directory"), "{s}");
        assert!(s.contains("is xenstored running?"), "{s}");
        assert_eq!(e.errno(), Some(ENOENT));
        assert_eq!(e.call(), Some("xs_read"));
        assert!(e.is_not_found());
        assert!(!e.is_again());
    }

    #[test]
    fn classification() {
        assert!(Error::os("xs_transaction_end", "", EAGAIN).is_again());
        assert!(Error::NoSuchDomain(7).is_not_found());
        assert_eq!(Error::ReadOnly.errno(), None);
        let lib = Error::LibraryUnavailable { library: "libxenstore", reason: "nope".into() };
        assert!(lib.is_library_unavailable());
        assert!(lib.to_string().contains("libxen-dev"));
        // with_hint leaves non-Os variants alone
        assert!(matches!(Error::ReadOnly.with_hint("x"), Error::ReadOnly));
    }

    #[test]
    fn errors_are_send_sync() {
        fn f<T: Send + Sync + 'static>() {}
        f::<Error>();
    }
}
