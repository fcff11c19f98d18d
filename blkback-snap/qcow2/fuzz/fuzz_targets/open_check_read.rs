#![no_main]
//! Open an arbitrary byte string as a qcow2 image (read-only), check it and read every
//! cluster of the active disk and of every checkpoint. Must never panic.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xensnap_qcow2::fuzz_one(data);
});
