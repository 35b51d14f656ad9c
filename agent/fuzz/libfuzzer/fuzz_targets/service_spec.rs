//! libFuzzer target: `shoal_fuzz::service_spec` (see the shoal-fuzz crate docs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::service_spec(data));
