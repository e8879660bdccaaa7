//! See `micromoe_fuzz::stack`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| micromoe_fuzz::stack(data));
