//! libFuzzer target: `shoal_fuzz::blob_msg` (see the shoal-fuzz crate docs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shoal_fuzz::blob_msg(data));
