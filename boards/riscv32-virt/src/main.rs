//! Runs the digits models on an emulated RISC-V core and exits with 0 only if
//! every check against the host passes.
#![no_std]
#![no_main]

use riscv_rt::entry;

#[entry]
fn main() -> ! {
    semihosting::process::exit(micromoe_board_common::run("riscv32-virt"))
}
