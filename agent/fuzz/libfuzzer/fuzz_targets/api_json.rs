//! libFuzzer target: `shoal_fuzz::api_json` (see the shoal-fuzz crate docs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::api_json(data));
