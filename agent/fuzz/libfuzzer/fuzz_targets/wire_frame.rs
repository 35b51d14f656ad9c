//! libFuzzer target: `shoal_fuzz::wire_frame` (see the shoal-fuzz crate docs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::wire_frame(data));
