//! libFuzzer target: `shoal_fuzz::swim_packet` (see the shoal-fuzz crate docs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::swim_packet(data));
