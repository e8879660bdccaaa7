//! See `micromoe_fuzz::decoder`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| micromoe_fuzz::decoder(data));
