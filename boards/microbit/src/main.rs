//! Runs the digits models on an emulated Cortex-M0 with 16 KB of RAM (BBC micro:bit, nRF51822, under QEMU) and exits with 0 only if
//! every check against the host passes.
#![no_std]
#![no_main]

use cortex_m_rt::entry;

#[entry]
fn main() -> ! {
    semihosting::process::exit(micromoe_board_common::run("microbit"))
}
