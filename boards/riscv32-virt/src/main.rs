//! Runs the digits models on an emulated RISC-V core and exits with 0 only if
//! every check against the host passes.
#![no_std]
#![no_main]

use riscv_rt::entry;

#[entry]
fn main() -> ! {
    unsafe extern "C" {
        /// Initial stack pointer, from the runtime's linker script.
        static _stack_start: u8;
    }
    // Only the address of the linker symbol is taken: no unsafe needed.
    let top = core::ptr::addr_of!(_stack_start) as usize;
    semihosting::process::exit(micromoe_board_common::run("riscv32-virt", top))
}
