//! Runtime loading of Xen's shared libraries (`dlopen`/`dlsym`).
//!
//! Why at run time and not at link time: see the crate docs ("Linking"). In short: the whole
//! workspace (including the offline `xl-snap image …` commands) must build and run on machines
//! without Xen's libraries; only the calls that need Xen fail, with [`Error::LibraryUnavailable`].
//!
//! Libraries are opened once per process and never closed (`dlclose` is never called), so a
//! function pointer taken from one stays valid for the life of the process. That removes the
//! usual use-after-unload hazard of runtime loading.

use std::ffi::{c_char, c_int, c_void, CStr, CString};

use crate::error::Error;

// glibc >= 2.34 has these in libc.so.6 itself, which std already links.
extern "C" {
    fn dlopen(filename: *const c_char, flag: c_int) -> *mut c_void;
    fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    fn dlerror() -> *mut c_char;
}

const RTLD_NOW: c_int = 0x2;
const RTLD_LOCAL: c_int = 0x0;

/// Why a library could not be loaded. Kept (cloned) in a process-wide cache so that each call
/// on a machine without the library reports the same clear error cheaply.
#[derive(Debug, Clone)]
pub(crate) struct LoadError {
    pub(crate) library: &'static str,
    pub(crate) reason: String,
}

impl From<LoadError> for Error {
    fn from(e: LoadError) -> Self {
        Error::LibraryUnavailable { library: e.library, reason: e.reason }
    }
}

/// An opened (and never closed) shared library.
pub(crate) struct Library {
    handle: *mut c_void,
    soname: &'static str,
}

fn last_dlerror() -> String {
    // SAFETY: dlerror returns NULL or a NUL-terminated string owned by the C library, valid
    // until the next dl* call on this thread; we copy it out immediately.
    unsafe {
        let p = dlerror();
        if p.is_null() {
            "unknown dlopen error".to_string()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

impl Library {
    /// Opens the first of `sonames` that loads. `label` names the library in errors.
    pub(crate) fn open(label: &'static str, sonames: &[&'static str]) -> Result<Library, LoadError> {
        let mut reasons = Vec::new();
        for &soname in sonames {
            let c = CString::new(soname).expect("sonames are literals without NUL");
            // SAFETY: `c` is a valid NUL-terminated string. Loading a Xen library runs its ELF
            // constructors; the Xen libraries' constructors only initialise internal state.
            let handle = unsafe { dlopen(c.as_ptr(), RTLD_NOW | RTLD_LOCAL) };
            if !handle.is_null() {
                tracing::debug!(soname, "loaded Xen library");
                return Ok(Library { handle, soname });
            }
            reasons.push(last_dlerror());
        }
        Err(LoadError { library: label, reason: reasons.join("; ") })
    }

    /// Looks up `name` (NUL-terminated) and returns it as a value of type `F`.
    ///
    /// # Safety
    /// `F` must be an `unsafe extern "C" fn` pointer type whose signature is exactly the C
    /// prototype of `name` in the library's ABI version that was opened.
    pub(crate) unsafe fn sym<F: Copy>(&self, name: &'static str) -> Result<F, LoadError> {
        assert_eq!(
            std::mem::size_of::<F>(),
            std::mem::size_of::<*mut c_void>(),
            "sym::<F> must be a function pointer type"
        );
        let cname = CStr::from_bytes_with_nul(name.as_bytes()).expect("symbol names end with NUL");
        // Clear a stale error so that a NULL result can be told apart from a real failure.
        // SAFETY: dlerror has no preconditions; `self.handle` is a live dlopen handle (never
        // closed) and `cname` is NUL-terminated.
        let p = unsafe {
            let _ = dlerror();
            dlsym(self.handle, cname.as_ptr())
        };
        if p.is_null() {
            return Err(LoadError {
                library: self.soname,
                reason: format!("symbol {} not found: {}", cname.to_string_lossy(), last_dlerror()),
            });
        }
        // SAFETY: F is pointer-sized (asserted above) and, by this function's contract, a
        // function pointer type matching the symbol's C prototype.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }
}

/// Declares a table of C functions loaded from one library, with a lazily-initialised,
/// process-wide instance (`Table::get()`).
///
/// Every signature in a table is transcribed by hand from Debian's libxen-dev 4.17 headers
/// (`/usr/include/xen*.h`, `xenstore.h`, `xenctrl.h`, `xenguest.h`).
macro_rules! c_api {
    (
        $(#[$meta:meta])*
        $vis:vis struct $name:ident : $label:literal in [$($soname:literal),+ $(,)?] {
            $( fn $f:ident ( $($arg:ident : $ty:ty),* $(,)? ) $(-> $ret:ty)? ; )*
        }
    ) => {
        $(#[$meta])*
        #[allow(non_snake_case, dead_code)]
        $vis struct $name {
            $( pub(crate) $f: unsafe extern "C" fn($($ty),*) $(-> $ret)?, )*
        }

        impl $name {
            /// The library's soname(s), most preferred first.
            #[allow(dead_code)]
            pub(crate) const SONAMES: &'static [&'static str] = &[$($soname),+];

            /// The process-wide table, loading the library on first use.
            pub(crate) fn get() -> Result<&'static $name, $crate::error::Error> {
                static CELL: std::sync::OnceLock<Result<$name, $crate::dl::LoadError>> =
                    std::sync::OnceLock::new();
                match CELL.get_or_init(Self::load) {
                    Ok(t) => Ok(t),
                    Err(e) => Err(e.clone().into()),
                }
            }

            fn load() -> Result<$name, $crate::dl::LoadError> {
                let lib = $crate::dl::Library::open($label, &[$($soname),+])?;
                Ok($name {
                    $(
                        // SAFETY: the field's type is the C prototype of this symbol, as
                        // declared by the library version named in SONAMES.
                        $f: unsafe { lib.sym(concat!(stringify!($f), "\0"))? },
                    )*
                })
            }
        }
    };
}
pub(crate) use c_api;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_library_is_a_clear_error() {
        let e = Library::open("libdoesnotexist", &["libxensnap-does-not-exist.so.9"]).err().expect("must fail");
        let err: Error = e.into();
        let msg = err.to_string();
        assert!(msg.contains("libdoesnotexist"), "{msg}");
        assert!(msg.contains("libxensnap-does-not-exist.so.9"), "{msg}");
    }

    #[test]
    fn libc_symbol_lookup_works() {
        // libc is always there: proves the dlopen/dlsym plumbing itself.
        let lib = Library::open("libc", &["libc.so.6"]).expect("libc loads");
        // SAFETY: getpid has signature `pid_t getpid(void)`, pid_t = int on Linux.
        let getpid: unsafe extern "C" fn() -> c_int = unsafe { lib.sym("getpid\0") }.unwrap();
        // SAFETY: getpid has no preconditions.
        let pid = unsafe { getpid() };
        assert_eq!(pid as u32, std::process::id());
        // SAFETY: the type is irrelevant, the lookup fails before any call.
        let missing: Result<unsafe extern "C" fn(), _> = unsafe { lib.sym("xensnap_no_such_symbol\0") };
        assert!(missing.is_err());
    }
}
