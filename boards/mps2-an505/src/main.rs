//! Runs the digits models on an emulated Cortex-M33 (Arm MPS2 AN505 under QEMU) and exits with 0 only if
//! every check against the host passes.
#![no_std]
#![no_main]

use cortex_m_rt::entry;

#[entry]
fn main() -> ! {
    semihosting::process::exit(micromoe_board_common::run("mps2-an505"))
}
