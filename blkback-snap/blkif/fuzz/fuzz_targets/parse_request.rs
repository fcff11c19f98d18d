//! Fuzz the blkif request decoder and validator (ring entry + indirect pages).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    xensnap_blkif::fuzz_parse(data);
});
