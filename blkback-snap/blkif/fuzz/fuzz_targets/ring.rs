//! Fuzz the whole ring path: hostile entries and producer index against the backend.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xensnap_blkif::fuzz_ring(data);
});
