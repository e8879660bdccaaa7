//! See `micromoe_fuzz::checkpoint`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| micromoe_fuzz::checkpoint(data));
