//! [`generate`](../generate.rs) with the tiny language model's int8 weights
//! at one scale per 32 columns (`micromoe convert --group 32`) on an
//! emulated Cortex-M4F; exits with 0 only if every token and every logit
//! matches the host bit for bit.
#![no_std]
#![no_main]

use cortex_m_rt::entry;

#[entry]
fn main() -> ! {
    let ok = micromoe_board_common::tinylm::generate_grouped("mps2-an386");
    semihosting::process::exit(if ok { 0 } else { 1 })
}
