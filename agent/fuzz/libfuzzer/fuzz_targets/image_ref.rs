//! libFuzzer target: `shoal_fuzz::image_ref` (see the shoal-fuzz crate docs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::image_ref(data));
